"""Checkpoints and weights: atomic writes (temp file in the same folder, fsync, os.replace) and safe loads."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["atomic_write", "save_weights", "load_weights"]


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


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)      # DDP


def save_weights(model: nn.Module, path: str | Path) -> Path:
    "Save the model's state_dict as safetensors, atomically."
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"refusing to write non-finite weights ({k!r} has NaN/Inf) to {path}")
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp)))


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    "Load weights from safetensors, or from a torch file with `weights_only=True` (no code runs)."
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} is not a plain weights file ({type(e).__name__}: {e}); "
                                  f"refusing to unpickle arbitrary objects") from None
    _unwrap(model).load_state_dict(sd, strict=strict)
    return model
