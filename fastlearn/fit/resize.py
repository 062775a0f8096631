"""Progressive resizing on the device: low-resolution steps early in the run, full size at the end.

The dataloader loads every image at the largest size the run needs; this callback shrinks each training batch on
the device, so a low-resolution step really costs fewer FLOPs. fastai's own progressive resizing rebuilds the
DataLoaders between fits, which cannot change the size within one one-cycle and re-runs the CPU pipeline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from ..core.schedules import resize_size


__all__ = ["ProgressiveResize", "resize_batch"]


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    "`x` (N, C, H, W) resized to `size` x `size` with antialiased bilinear interpolation; unchanged if already so."
    if x.ndim != 4:
        raise ValueError(f"progressive resizing needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class ProgressiveResize(Callback):
    """Training batches at `resize_size(pos, start, final, ramp, multiple)`, validation batches at `valid_size`.
    `pos` is the position in the whole run of `total_steps` training batches, across its fits (None: fastai's
    `pct_train`, within the current fit). `sizes` holds the size of every training batch, in order."""
    order = -1  # before MixUp/CutMix (0): they mix the smaller batch; after ResumeAt (-5) skips finished batches

    def __init__(self, start: int, final: int, ramp: tuple[float, float] = (0.0, 0.75), multiple: int = 32,
                 valid_size: int | None = None,  # px; None = final
                 total_steps: int | None = None):  # training batches in the whole run; None = per fit
        if start < 1 or final < 1:
            raise ValueError(f"resize sizes must be positive pixels, got start={start}, final={final}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 training batch or None, got {total_steps}")
        self.start, self.final, self.ramp, self.multiple = start, final, tuple(ramp), multiple
        self.valid_size = valid_size or final
        self.total_steps = total_steps
        self.step = 0                     # training batches seen across all fits
        self.sizes: list[int] = []

    def state_dict(self) -> dict:
        "What a resumed run needs to continue the ramp where it stopped."
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def pos(self) -> float:
        "Position in the run in [0, 1]: own batch counter over `total_steps`, else fastai's per-fit pct_train."
        return float(self.learn.pct_train) if self.total_steps is None else min(self.step / self.total_steps, 1.0)

    def size_now(self) -> int:
        "The training resolution at the current position."
        return resize_size(self.pos(), self.start, self.final, self.ramp, self.multiple)

    def before_batch(self):
        self._counted = False
        if len(self.learn.xb) == 0:
            return
        x = self.learn.xb[0]
        if self.training:
            size = self.size_now()
            self.sizes.append(size)
            self._counted = True
        else:
            size = self.valid_size
        self.learn.xb = (resize_batch(x, size), *self.learn.xb[1:])

    def after_batch(self):
        # only batches resized here count: fastai calls after_batch for batches cancelled before us too
        # (e.g. the finished batches a resumed run skips), and those are in the restored `step` already
        if getattr(self, "_counted", False):
            self.step += 1
            self._counted = False
