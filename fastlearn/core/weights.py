"""Weights files: safetensors written atomically and refused when non-finite; loads that never unpickle code."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..base.errors import CheckpointError
from ..base.files import atomic_write
from .models import unwrap_model


__all__ = ["save_weights", "load_weights", "load_learner", "cpu_state_dict", "mix_weights"]


def load_learner(path: str | Path, trust: bool = False, cpu: bool = True):
    """Load a Learner exported with `learn.export()`. That file is a pickle, and unpickling runs whatever
    code the file names, so it is refused unless `trust=True` (only for files you made yourself);
    `load_weights` loads plain weights safely."""
    path = Path(path)
    if not trust:
        raise CheckpointError(f"{path} is a pickled Learner: loading it can run arbitrary code. Load plain weights "
                              f"with load_weights(model, 'model.safetensors'), or pass trust=True only for a file "
                              f"you exported yourself")
    if not path.exists():
        raise CheckpointError(f"exported learner {path} does not exist")
    # lazy: heavy (fastai.learner brings fastai.data and scikit-learn: seconds), only for a pickled Learner
    from fastai.learner import load_learner as fastai_load_learner
    return fastai_load_learner(path, cpu=cpu)


def save_weights(model: nn.Module, path: str | Path) -> Path:
    "Save the model's state_dict as safetensors, atomically."
    # lazy: looked up at each call, so a patched safetensors.torch.save_file takes effect (tests/test_checkpoint.py)
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous().cpu() for k, v in unwrap_model(model).state_dict().items()}
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
        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} is not a plain weights file ({type(e).__name__}: {e}); "
                                  f"refusing to unpickle arbitrary objects") from None
    unwrap_model(model).load_state_dict(sd, strict=strict)
    return model


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    "A CPU copy of the (unwrapped) model's weights and buffers: what later training of the model cannot change."
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap_model(model).state_dict().items()}


def mix_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The weight-space mix (1 - alpha) a + alpha b of two state dicts of one architecture (WiSE-FT: a = the weights
    fine-tuning started from, b = where it ended). Floating tensors (parameters, BN statistics) are interpolated in
    b's dtype, on b's device; integer buffers (BN's batch counters) are b's."""
    if a.keys() != b.keys():
        raise ValueError(f"cannot mix state dicts with different keys: {sorted(a.keys() ^ b.keys())[:5]}")
    return {k: torch.lerp(a[k].to(b[k]), b[k], alpha) if b[k].is_floating_point() else b[k].clone() for k in b}
