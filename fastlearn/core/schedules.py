"""Pure schedule functions: every one is a function of numbers only, testable against its formula.

`pos` is the position in training in [0, 1): step t of T optimizer steps is at pos = t / T, as in
fastai's `ParamScheduler`, so the closed forms here and fastai's `combined_cos` agree exactly.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["half_cos", "one_cycle_lr", "one_cycle_mom", "one_cycle_scheds", "layer_lrs",
           "unfreeze_plan", "UnfreezeStage", "resize_size", "scale_lr"]


def half_cos(pos: float) -> float:
    "Half-cosine ramp from 0 at pos=0 to 1 at pos=1 with zero slope at both ends: (1 - cos(pi pos)) / 2."
    return (1 - math.cos(math.pi * pos)) / 2


def one_cycle_lr(pos: float, lr_max: float, div: float = 25.0, final_div: float = 1e5,
                 pct_start: float = 0.25) -> float:
    "One-cycle LR: lr_max/div -> lr_max on a half-cosine over pct_start, then -> lr_max/final_div."
    lo, hi, end = lr_max / div, lr_max, lr_max / final_div
    if pos < pct_start:
        return lo + (hi - lo) * half_cos(pos / pct_start)
    return end + (hi - end) * (1 - half_cos((pos - pct_start) / (1 - pct_start)))


def one_cycle_mom(pos: float, moms: Sequence[float] = (0.95, 0.85), pct_start: float = 0.25) -> float:
    "Inverse momentum: moms[0] -> moms[1] while the LR rises, back to moms[0] while it anneals."
    hi, lo = moms[0], moms[1]
    if pos < pct_start:
        return hi - (hi - lo) * half_cos(pos / pct_start)
    return lo + (hi - lo) * half_cos((pos - pct_start) / (1 - pct_start))


def one_cycle_scheds(lr_max, div: float = 25.0, final_div: float = 1e5, pct_start: float = 0.25,
                     moms: Sequence[float] = (0.95, 0.85)) -> dict:
    """{'lr': f(pos), 'mom': f(pos)} for fastai's `ParamScheduler`, `lr_max` a float or one per group: the closed
    forms in float64 (fastai's `combined_cos` stores the phase boundaries as float32, so its peak sits at
    float32(pct_start))."""
    lr_max = np.asarray(lr_max, dtype=float)
    scalar = lr_max.ndim == 0  # fastai's set_hyper takes a Python float or one value per param group

    def lr(pos: float):
        v = lr_max * one_cycle_lr(pos, 1.0, div, final_div, pct_start)
        return float(v) if scalar else v

    def mom(pos: float):
        return one_cycle_mom(pos, moms, pct_start)
    return {"lr": lr, "mom": mom}


def layer_lrs(n_groups: int, lr: float | slice, decay: float | None = None) -> np.ndarray:
    """Discriminative LRs, geometric across `n_groups` layer groups (input first, head last): `lr=slice(lo, hi)`
    spaces lo..hi geometrically; a float `lr` with `decay` gives the head `lr` and each group below it `decay` times
    its upper neighbour's; a float alone gives every group `lr`."""
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    if isinstance(lr, slice):
        lo, hi = lr.start, lr.stop
        if lo is None:  # fastai's slice(None, hi): hi/10 for all but the head
            return np.array([hi / 10] * (n_groups - 1) + [hi], dtype=float)
        _check_positive(lo, "lr slice start"), _check_positive(hi, "lr slice stop")
        if n_groups == 1:
            return np.array([hi], dtype=float)
        return np.geomspace(lo, hi, n_groups)
    _check_positive(lr, "lr")
    if decay is None:
        return np.full(n_groups, float(lr))
    if not 0 < decay <= 1:
        raise ValueError(f"lr decay must be in (0, 1], got {decay}")
    return lr * decay ** np.arange(n_groups - 1, -1, -1, dtype=float)


def _check_positive(x: float, what: str) -> None:
    if not (isinstance(x, (int, float, np.floating)) and math.isfinite(x) and x > 0):
        raise ValueError(f"{what} must be a positive finite number, got {x!r}")


class UnfreezeStage(tuple):
    "One stage of gradual unfreezing: (n_trainable top groups, epochs, peak LR multiplier)."
    __slots__ = ()

    def __new__(cls, n_trainable: int, epochs: int, lr_mult: float):
        return super().__new__(cls, (n_trainable, epochs, lr_mult))

    n_trainable = property(lambda s: s[0])
    epochs = property(lambda s: s[1])
    lr_mult = property(lambda s: s[2])


def unfreeze_plan(n_groups: int, head_epochs: int, unfreeze_epochs: int, epochs: int,
                  step: int = 1, unfreeze_to: int = -1, stage_lr_mult: float = 0.5) -> list[UnfreezeStage]:
    """Gradual unfreezing as data: stage 0 trains the head group only (`head_epochs`); each following stage adds
    `step` groups from the top and lowers the peak LR by `stage_lr_mult`; the last stage (`unfreeze_to` top groups,
    -1 = all) runs `epochs`, the intermediate ones `unfreeze_epochs`. Stages with 0 epochs are dropped."""
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    if step < 1:
        raise ValueError(f"unfreeze step must be >= 1 group, got {step}")
    last = n_groups if unfreeze_to in (-1, None) else min(unfreeze_to, n_groups)
    if last < 1:
        raise ValueError(f"unfreeze_to must be -1 (all) or >= 1, got {unfreeze_to}")
    counts, epochs_of = [1], [head_epochs]
    while counts[-1] < last:
        counts.append(min(counts[-1] + step, last))
        epochs_of.append(epochs if counts[-1] == last else unfreeze_epochs)
    if last == 1:  # linear probe: the final stage is the head stage itself
        epochs_of = [head_epochs + epochs]
    kept = [(n, e) for n, e in zip(counts, epochs_of) if e > 0]
    # each stage that runs lowers the peak LR once; stages skipped with 0 epochs do not count
    return [UnfreezeStage(n, e, stage_lr_mult ** k) for k, (n, e) in enumerate(kept)]


def resize_size(pos: float, start: int, final: int, ramp: tuple[float, float] = (0.0, 0.75),
                multiple: int = 32) -> int:
    """Progressive-resizing resolution at `pos`: `start` before ramp[0], `final` from ramp[1] on,
    linear in between, rounded down to `multiple` and never below `start`."""
    a, b = ramp
    if pos <= a or final <= start:
        return start if final > start else final
    if pos >= b:
        return final
    size = start + (final - start) * (pos - a) / (b - a)
    return int(max(start, min(final, (size // multiple) * multiple)))


def scale_lr(lr: float, global_bs: int, ref_bs: int | None, rule: str = "linear") -> float:
    "LR scaled with the global batch size: linear (Goyal et al.) or sqrt; unchanged when ref_bs is None."
    if ref_bs is None:
        return lr
    ratio = global_bs / ref_bs
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown LR scaling rule {rule!r}; use 'linear' or 'sqrt'")
