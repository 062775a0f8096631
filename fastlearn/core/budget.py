"""Schedules sized in optimizer steps: batch sizes and head-stage length derived from the number of training images.

A one-cycle needs steps, not epochs: its warm-up, peak and annealing are fractions of the steps it has, and a small
folder at a large batch gives too few. On a CPU an image costs about the same at batch 16 as at 64, so the lever is
the batch size, never below `bs_min` (BatchNorm's batch statistics get noisy under ~16 images).
"""
from __future__ import annotations

import math

__all__ = ["batch_size_for", "feature_epochs", "feature_batch_size", "ft_lr_cap"]


def batch_size_for(n_train: int, epochs: int, min_steps: int = 100, bs_max: int = 64, bs_min: int = 16) -> int:
    """Largest power of two in [bs_min, bs_max] whose `epochs` epochs of full batches give at least `min_steps`
    optimizer steps; `bs_min` when none does; never more than `n_train` (there must be one full batch)."""
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    if not 1 <= bs_min <= bs_max:
        raise ValueError(f"need 1 <= bs_min <= bs_max, got bs_min={bs_min}, bs_max={bs_max}")
    epochs = max(1, epochs)
    bs = 1 << int(math.log2(bs_max))
    while bs > bs_min and epochs * (n_train // bs) < min_steps:
        bs //= 2
    bs = max(bs, bs_min)
    while bs > 1 and bs > n_train:
        bs //= 2
    return bs


def feature_batch_size(n_train: int, bs_max: int = 64, min_steps_per_epoch: int = 8) -> int:
    "Batch size for the head on cached features: at least `min_steps_per_epoch` steps an epoch, at most `bs_max`."
    bs = max(1, min(bs_max, n_train // min_steps_per_epoch))
    return 1 << int(math.log2(bs))


def feature_epochs(n_train: int, bs: int, steps: int, max_epochs: int = 200) -> int:
    "Epochs of the head on cached features that give at least `steps` optimizer steps (at most `max_epochs`)."
    per_epoch = max(1, n_train // bs)
    return int(min(max_epochs, max(1, math.ceil(steps / per_epoch))))


def ft_lr_cap(ft_lr_max: float, ft_lr_max_small: float | None, small_per_class: float, n_train: int,
              n_classes: int) -> float:
    """The cap on the fine-tuning peak LR for `n_train` training images in `n_classes` classes: `ft_lr_max_small`
    when they average fewer than `small_per_class` images per class, else `ft_lr_max`. A few images per class overfit
    a step size that more of them need (chosen on the corpus by leave-one-dataset-out: bench/real_data.py,
    02_fine_tuning). `ft_lr_max_small=None`: `ft_lr_max` at every size."""
    if ft_lr_max_small is None or n_train >= small_per_class * max(1, n_classes):
        return ft_lr_max
    return ft_lr_max_small
