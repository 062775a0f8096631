"""An exponential moving average of the weights (timm's `ModelEmaV3`) kept across all the fits of a run.

timm does the averaging; fastai has no EMA callback, so this one drives it from the training loop. At the end of the
run `finish` keeps whichever of raw and EMA weights has the lower validation loss.
"""
from __future__ import annotations

import torch
from fastai.callback.core import Callback
from timm.utils.model_ema import ModelEmaV3

__all__ = ["EMA"]


class EMA(Callback):
    """EMA of the model weights, updated after every optimizer step, created once and kept across fits. With `warmup`
    the decay grows with the step count as in timm (capped at `decay`), so short runs still average recent weights."""
    order = 65

    def __init__(self, decay: float = 0.9998, warmup: bool = True):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), e.g. 0.9998, got {decay}")
        self.decay, self.warmup = decay, warmup
        self.ema: ModelEmaV3 | None = None
        self.steps = 0                     # optimizer steps seen across all fits
        self.chosen: str | None = None     # "raw" or "ema" once `finish` ran
        self.valid_losses: dict[str, float] = {}
        self._pending: dict | None = None  # averaged weights from load_state_dict, applied at the first fit

    def before_fit(self):
        # the model is on the dls device by now (TrainEvalCallback.before_fit, order -10)
        if self.ema is None:
            self.ema = ModelEmaV3(self.learn.model, decay=self.decay, use_warmup=self.warmup, device=None)
        if self._pending is not None:
            self.ema.module.load_state_dict(self._pending)
            self._pending = None

    def state_dict(self) -> dict:
        "The averaged weights and the step count, for a checkpoint (None weights before the first fit)."
        return {"steps": self.steps, "ema": None if self.ema is None else self.ema.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        "Continue from a checkpoint; the weights are loaded now or, before the first fit, when it starts."
        self.steps, self._pending = int(state["steps"]), state["ema"]
        if self.ema is not None and self._pending is not None:
            self.ema.module.load_state_dict(self._pending)
            self._pending = None

    def after_cancel_step(self):
        # fastai calls after_step even when GradientAccumulation or MixedPrecision cancelled the step
        self._cancelled = True

    def after_step(self):
        if getattr(self, "_cancelled", False):
            self._cancelled = False
            return
        self.steps += 1
        self.ema.update(self.learn.model, step=self.steps)

    @property
    def module(self) -> torch.nn.Module:
        "The averaged model."
        if self.ema is None:
            raise RuntimeError("EMA has no averaged weights yet: it is created at the start of the first fit")
        return self.ema.module

    def finish(self, learn) -> str:
        "Validate raw and EMA weights, keep the one with the lower valid loss in `learn.model`; returns which."
        raw = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
        raw_loss = float(learn.validate()[0])
        learn.model.load_state_dict(self.module.state_dict())
        ema_loss = float(learn.validate()[0])
        self.valid_losses = {"raw": raw_loss, "ema": ema_loss}
        self.chosen = "ema" if ema_loss < raw_loss else "raw"
        if self.chosen == "raw":
            learn.model.load_state_dict(raw)
        print(f"EMA: valid loss raw {raw_loss:.4f}, ema {ema_loss:.4f} (decay {self.decay}, {self.steps} steps)"
              f" -> keeping {self.chosen}", flush=True)
        return self.chosen
