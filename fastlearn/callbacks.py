"""The callbacks a recipe switches on, built from the recipe in one place (fastai's where they exist)."""
from __future__ import annotations

from pathlib import Path

from fastai.callback.core import Callback

__all__ = ["recipe_callbacks"]


def recipe_callbacks(learn, r, run_dir: Path) -> list[Callback]:
    "Callbacks for the recipe's regularisers, averaging, early stopping, resizing and precision."
    from fastai.callback.mixup import CutMix, MixUp
    from fastai.callback.training import GradientAccumulation, GradientClip
    cbs: list[Callback] = []
    if r.mixup:
        cbs.append(MixUp(r.mixup))
    if r.cutmix:
        cbs.append(CutMix(r.cutmix))
    if r.grad_clip:
        cbs.append(GradientClip(r.grad_clip))  # order 11: after MixedPrecision unscales the grads
    if r.grad_accum > 1:  # fastai counts samples, the recipe counts micro-batches
        cbs.append(GradientAccumulation(n_acc=r.grad_accum * learn.dls.train.bs))
    return cbs
