"""One writer per run folder: run.lock names its holder, a second process is refused with that name, a lock left
by a killed process is taken over with a note, temp files a dead writer left are removed."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import fastlearn.run.runlock as rl
from fastlearn.base.errors import RunLockedError
from fastlearn.run.runlock import LOCK_NAME, check_unlocked, read_holder, run_lock


def _hold_in_child(run_dir, command="fastlearn train digits --data digits"):
    """A forked process that takes the lock and waits to be killed (it runs no torch code: fork is safe);
    returns its pid once it holds the lock."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.close(r)
            with run_lock(run_dir, command=command):
                os.write(w, b"locked\n")
                signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 100) == b"locked\n"
    os.close(r)
    return pid


def _kill(pid):
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_lock_file_names_the_holder_and_goes_away(tmp_path):
    with run_lock(tmp_path, command="fastlearn train x"):
        h = json.loads((tmp_path / LOCK_NAME).read_text())
        assert h["pid"] == os.getpid() and h["host"] == socket.gethostname() and h["command"] == "fastlearn train x"
        assert h["started"][:4].isdigit() and read_holder(tmp_path) == h
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(ZeroDivisionError):
        with run_lock(tmp_path):
            1 / 0
    assert not (tmp_path / LOCK_NAME).exists()  # released on errors too


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    pid = _hold_in_child(tmp_path)
    try:
        with pytest.raises(RunLockedError) as e:
            with run_lock(tmp_path):
                pass
        msg = str(e.value)
        assert f"run folder {tmp_path} is in use: pid {pid} on {socket.gethostname()} since " in msg
        assert "running `fastlearn train digits --data digits`" in msg and f"kill -INT {pid}" in msg
        with pytest.raises(RunLockedError, match=f"pid {pid}"):
            check_unlocked(tmp_path)          # the command line's early check, which takes nothing
        assert read_holder(tmp_path)["pid"] == pid
    finally:
        _kill(pid)                            # SIGKILL: no clean-up ran, run.lock is still there
    assert read_holder(tmp_path)["pid"] == pid
    check_unlocked(tmp_path)                  # the kernel released the flock with the process
    with run_lock(tmp_path):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"took over the lock left by pid {pid}" in err and f"(pid {pid} is not running)" in err
    assert len(err.strip().splitlines()) == 1


def test_the_same_process_cannot_write_one_folder_twice(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
        assert (tmp_path / LOCK_NAME).exists()  # the refused attempt did not remove the holder's lock


def test_temp_files_a_dead_writer_left_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    left = [tmp_path / ".model.safetensors.x1.tmp", tmp_path / "checkpoints" / ".latest.x2.tmp",
            tmp_path / "checkpoints" / ".ckpt-8.pt.x3.tmp"]
    for p in left:
        p.write_bytes(b"partial")
    (tmp_path / "keep.txt").write_text("mine")
    with run_lock(tmp_path):
        assert not any(p.exists() for p in left) and (tmp_path / "keep.txt").exists()


def test_without_flock_a_dead_pid_is_taken_over_and_a_live_one_refused(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead), "host": host, "started": "then", "command": "x"}))
    with run_lock(tmp_path):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert f"took over the lock left by pid {dead}" in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": host, "started": "now", "command": "y"}))
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()}"):
        with run_lock(tmp_path):
            pass
    assert read_holder(tmp_path)["pid"] == os.getppid()  # not ours: left alone


def test_cli_resume_of_a_folder_in_use_names_the_holder_before_reading_data(tmp_path, capsys, monkeypatch):
    from fastlearn import cli
    from fastlearn.app import commands as training  # where `fastlearn train` builds its learner
    monkeypatch.setattr(training, "learner_from_recipe", lambda *a, **k: pytest.fail("the data was read"))
    pid = _hold_in_child(tmp_path)
    try:
        code = cli.main(["train", "digits", "--data", "digits", "--run-dir", str(tmp_path), "--resume"])
    finally:
        _kill(pid)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"fastlearn: error: run folder {tmp_path} is in use: pid {pid}")


def test_cli_train_into_a_busy_folder_names_the_holder_without_resume(tmp_path, capsys, monkeypatch):
    "Not `already holds a run; pass --resume`: the folder is in use, and resuming would be refused too."
    from fastlearn import cli
    from fastlearn.app import commands as training  # where `fastlearn train` builds its learner
    monkeypatch.setattr(training, "learner_from_recipe", lambda *a, **k: pytest.fail("the data was read"))
    (tmp_path / "recipe.toml").write_text("# the holder's run\n")
    pid = _hold_in_child(tmp_path)
    try:
        code = cli.main(["train", "digits", "--data", "digits", "--run-dir", str(tmp_path)])
    finally:
        _kill(pid)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"fastlearn: error: run folder {tmp_path} is in use: pid {pid}")
    assert (tmp_path / "recipe.toml").read_text() == "# the holder's run\n"


def test_command_line_reads_as_typed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fastlearn", "train", "digits", "--data", "my data"])
    assert rl.command_line() == "fastlearn train digits --data 'my data'"
