"""Files a run writes: atomically (temp file in the same folder, fsync, os.replace) and with the mode `open()`
would give them (the process umask), so that a crash never leaves half a file and a colleague can read the run."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["file_mode", "atomic_write"]


_PROC_STATUS = "/proc/self/status"


def file_mode() -> int:
    "The mode `open()` gives a new file: 0o666 less the process umask (0644 under umask 022, 0640 under 027)."
    try:  # Linux >= 4.7 shows the umask without changing it
        with open(_PROC_STATUS) as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o077)  # elsewhere: set it and put it back; 0o077 meanwhile, so never looser
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write `path` via `write(tmp)` into a temp file beside it, fsync, then `os.replace`: a crash or a
    full disk mid-write leaves the previous file untouched and no partial file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        # mkstemp creates 0600 (so does safetensors >= 0.8, renaming its temp over ours): give the mode open() would
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
