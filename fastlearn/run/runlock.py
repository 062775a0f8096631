"""One writer per run folder: `run.lock`, held while a process trains or resumes in the folder.

The lock is `fcntl.flock` on `run_dir/run.lock`: the kernel releases it when its holder ends, however it ends
(SIGKILL, an out-of-memory kill), so a crashed run never blocks the next one. The file says who holds it (pid,
host, start time, command) for the message a second process gets. Under DDP only rank 0 locks; every rank gets
its outcome. Filesystems without flock (some network or FUSE mounts) fall back to creating the file exclusively;
a dead holder is then recognised by its pid, on this host only.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from ..base.errors import RunLockedError
from ..base.ranks import broadcast_object, is_main_process


__all__ = ["run_lock", "check_unlocked", "read_holder", "LOCK_NAME", "command_line"]

LOCK_NAME = "run.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def command_line() -> str:
    "This process's command line as a shell would take it (`fastlearn train ...`, `python script.py ...`)."
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if len(sys.argv) and Path(sys.argv[0]).name == "fastlearn":  # the console script: show it as typed
        argv = ["fastlearn", *sys.argv[1:]]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def read_holder(run_dir: str | Path) -> dict:
    "What `run.lock` says about its holder ({} when absent, empty or unreadable)."
    try:
        return _parse((Path(run_dir) / LOCK_NAME).read_text())
    except OSError:
        return {}


def _parse(text: str) -> dict:
    try:
        d = json.loads(text)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists but not ours, or unknown: assume alive
    return True


def _describe(h: dict) -> str:
    if not h.get("pid"):
        return "another process (it has not written its details yet)"
    cmd = f" running `{h['command']}`" if h.get("command") else ""
    return f"pid {h['pid']} on {h.get('host', '?')} since {h.get('started', '?')}{cmd}"


def _busy(run_dir: Path, h: dict) -> RunLockedError:
    here = h.get("host") in (None, socket.gethostname())
    stop = (f"stop it (kill -INT {h['pid']} saves a checkpoint{'' if here else ' on ' + str(h.get('host'))})"
            if h.get("pid") else "stop it")
    return RunLockedError(f"run folder {run_dir} is in use: {_describe(h)}; wait for it to finish or {stop}, "
                          f"then resume; or train into another --run-dir")


def _holder_info(command: str | None) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command if command is not None else command_line()}


def _write_fd(fd: int, info: dict) -> None:
    data = (json.dumps(info, indent=1) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_fd(fd: int) -> dict:
    return _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))


def _same_file(fd: int, path: Path) -> bool:
    "True when `path` still names the file `fd` has open (a releasing holder removes it: then retry)."
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(run_dir: Path, command: str | None) -> tuple[int | None, dict]:
    """Lock `run_dir/run.lock`; returns (fd, what a previous holder left in it); fd None: no flock here, the
    file was created exclusively instead."""
    path = run_dir / LOCK_NAME
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            import fcntl  # lazy: POSIX only (the ImportError is handled below)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            os.close(fd)
            raise _busy(run_dir, holder) from None
        except (OSError, ImportError) as e:
            os.close(fd)
            if isinstance(e, OSError) and e.errno not in _NO_FLOCK:
                raise
            return None, _acquire_exclusive(path, command)
        if not _same_file(fd, path):
            os.close(fd)
            continue
        previous = _read_fd(fd)
        _write_fd(fd, _holder_info(command))
        return fd, previous
    raise RunLockedError(f"could not take {path}: it keeps being replaced; is another process starting in {run_dir}?")


def _acquire_exclusive(path: Path, command: str | None) -> dict:
    "No flock on this filesystem: create the file exclusively; take it over when its holder is dead on this host."
    previous: dict = {}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_holder(path.parent)
            if holder.get("host") == socket.gethostname() and holder.get("pid") and not _pid_alive(holder["pid"]):
                previous = holder
                path.unlink(missing_ok=True)
                continue
            raise _busy(path.parent, holder) from None
        try:
            _write_fd(fd, _holder_info(command))
        finally:
            os.close(fd)
        return previous
    raise _busy(path.parent, read_holder(path.parent))


def _took_over(run_dir: Path, prev: dict) -> str:
    here = prev.get("host") == socket.gethostname()
    gone = f"pid {prev['pid']} is not running" if here and not _pid_alive(prev["pid"]) else "it no longer holds it"
    return f"fastlearn: {run_dir}: took over the lock left by {_describe(prev)} ({gone})"


def _clear_temp(run_dir: Path) -> None:
    "Remove temp files a dead writer left half-written (atomic_write's `.<name>.<random>.tmp`); we are the only writer."
    for d in (run_dir, run_dir / "checkpoints"):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def check_unlocked(run_dir: str | Path) -> None:
    "Raise `RunLockedError` naming the holder if a live process holds `run_dir`'s lock; takes nothing."
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        import fcntl  # lazy: POSIX only (the ImportError is handled below)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(Path(run_dir), _read_fd(fd)) from None
    except (OSError, ImportError):
        pass  # no flock here: run_lock decides
    finally:
        os.close(fd)


@contextmanager
def run_lock(run_dir: str | Path, command: str | None = None):
    """Hold `run_dir/run.lock` (the folder must exist) while the block runs; `RunLockedError` names the holder
    if another live process has it. `command` is recorded for that message (default: this process's)."""
    run_dir = Path(run_dir)
    fd, err, took = None, None, False
    if is_main_process():
        try:
            fd, prev = _acquire(run_dir, command)
            took = True
            if prev.get("pid"):
                print(_took_over(run_dir, prev), file=sys.stderr, flush=True)
            _clear_temp(run_dir)
        except RunLockedError as e:
            err = str(e)
    err = broadcast_object(err)  # every rank fails alike, rather than waiting for rank 0 in the next collective
    if err is not None:
        raise RunLockedError(err)
    try:
        yield
    finally:
        if took:
            _release(run_dir / LOCK_NAME, fd)


def _release(path: Path, fd: int | None) -> None:
    "Remove the lock file (while still holding it, and only if it is ours), then let go."
    try:
        ours = _same_file(fd, path) if fd is not None else read_holder(path.parent).get("pid") == os.getpid()
        if ours:
            path.unlink(missing_ok=True)
    finally:
        if fd is not None:
            os.close(fd)
