"""Optional dependencies: import one, or fail in one line naming the pip extra that installs it.

    optuna = require("optuna", "search")
    # MissingExtraError: search needs optuna: pip install 'fastlearn[search]'
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError


__all__ = ["require", "EXTRAS"]

# extra -> the distributions it installs (pip names): setup.cfg's [options.extras_require] (tests/test_optional.py)
EXTRAS: dict[str, tuple[str, ...]] = {
    "search": ("optuna",),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow-skinny",),
    "wandb": ("wandb",),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
}


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import `module`, or raise `MissingExtraError` saying `feature` (default: the extra's name) needs it and
    which `pip install 'fastlearn[extra]'` adds it. A module that is installed but fails to import re-raises."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; fastlearn's extras are {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the module is there but one of its own dependencies is missing: show torch/pip's message
        what = f"{feature or extra} needs {top}" if (feature or extra) != top else f"{top} is not installed"
        raise MissingExtraError(f"{what}: pip install 'fastlearn[{extra}]'") from None
