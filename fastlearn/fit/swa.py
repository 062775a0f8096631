"""Stochastic weight averaging (Izmailov et al. 2018) after the last unfreezing stage.

fastai has no SWA callback; torch's `swa_utils` averages the weights and recomputes the BatchNorm statistics, and
this module drives them from a fastai fit.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler
from torch.optim.swa_utils import AveragedModel, update_bn

__all__ = ["SWA", "constant_scheds", "fit_swa", "keep_better", "run_swa"]


def constant_scheds(lr, mom: float) -> dict:
    "{'lr': f(pos), 'mom': f(pos)} for fastai's `ParamScheduler`, both constant; `lr` a float or one per group."
    lr = np.asarray(lr, dtype=float)
    lr = float(lr) if lr.ndim == 0 else lr  # fastai's set_hyper takes a scalar or a sized list, not a 0-d array
    return {"lr": lambda pos: lr, "mom": lambda pos: mom}


class SWA(Callback):
    "Average the model weights (parameters only) into torch's `AveragedModel` at the end of every epoch."
    order = 65

    def __init__(self, model: torch.nn.Module):
        # use_buffers=False: BN running stats are not averaged; `run_swa` recomputes them with `update_bn`
        self.averaged = AveragedModel(model, use_buffers=False)

    def after_epoch(self):
        self.averaged.update_parameters(self.learn.model)


def fit_swa(learn, epochs: int, lr: float | Sequence[float] | np.ndarray, cbs=(), mom: float = 0.95) -> torch.nn.Module:
    """Train `epochs` more epochs at constant `lr` (a float or one per optimizer group) and momentum `mom`; returns the
    average of the per-epoch weights with BatchNorm statistics recomputed (a copy: `learn.model` keeps the raw ones)."""
    if epochs < 1:
        raise ValueError(f"SWA needs at least 1 epoch to average, got {epochs}")
    lrs = np.asarray(lr, dtype=float)
    if not np.all(lrs > 0):
        raise ValueError(f"SWA learning rate must be > 0, got {lr}; set swa_lr = e.g. <last stage's peak> / 10")
    swa = SWA(learn.model)
    # ParamScheduler with constant schedules (not fit's `lr=`): it sets lr and momentum on every batch,
    # so the SWA epochs do not inherit whatever momentum the last one-cycle left behind
    learn.fit(epochs, cbs=[ParamScheduler(constant_scheds(lrs, mom)), swa] + list(cbs))
    avg = swa.averaged.module
    update_bn((b[0] for b in learn.dls.train), avg)
    return avg


def keep_better(learn, averaged: torch.nn.Module) -> dict:
    "Validate raw `learn.model` and the `averaged` weights, leave the one with the lower valid loss in `learn.model`."
    raw = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    raw_loss = float(learn.validate()[0])
    # copy into learn.model (not replace it): layer groups, optimizer and hooks keep pointing at its tensors
    learn.model.load_state_dict(averaged.state_dict())
    swa_loss = float(learn.validate()[0])
    kept = "swa" if swa_loss < raw_loss else "raw"
    if kept == "raw":
        learn.model.load_state_dict(raw)
    return {"swa_valid_loss": swa_loss, "raw_valid_loss": raw_loss, "kept": kept}


def run_swa(learn, epochs: int, lr: float | Sequence[float] | np.ndarray, cbs=(), mom: float = 0.95) -> dict:
    """SWA after normal training: `fit_swa` then `keep_better`; prints and returns both valid losses and which weights
    were kept. `epochs=0` does nothing and returns {}."""
    if epochs < 0:
        raise ValueError(f"swa_epochs must be >= 0, got {epochs}; use 0 to skip SWA")
    if epochs == 0:
        return {}
    res = keep_better(learn, fit_swa(learn, epochs, lr, cbs, mom))
    print(f"swa: valid loss raw {res['raw_valid_loss']:.4f}, swa {res['swa_valid_loss']:.4f} "
          f"after {epochs} epochs; kept {res['kept']}", flush=True)
    return res
