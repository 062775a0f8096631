"""The callbacks a recipe switches on, built from the recipe in one place (fastai's where they exist)."""
from __future__ import annotations

from pathlib import Path

from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.callback.training import GradientAccumulation, GradientClip

from ..fit.ema import EMA
from ..fit.health import HealthMonitor
from ..fit.resize import ProgressiveResize
from ..run.loggers import logger_callbacks
from ..fit.precision import speed_callbacks
from .plan import stage_plan

__all__ = ["recipe_callbacks"]


def recipe_callbacks(learn, r, run_dir: Path, total_steps: int | None = None) -> list[Callback]:
    """Callbacks for the recipe's regularisers, averaging, early stopping, resizing and precision.

    `total_steps`: training batches of the whole run (all stages), so progressive resizing follows the
    run rather than each stage; None works it out from the stage plan unless the strategy is 'auto'."""
    cbs: list[Callback] = []
    if r.mixup:
        cbs.append(MixUp(r.mixup))
    if r.cutmix:
        cbs.append(CutMix(r.cutmix))
    if r.grad_clip:
        cbs.append(GradientClip(r.grad_clip))  # order 11: after MixedPrecision unscales the grads
    if r.grad_accum > 1:  # fastai counts samples, the recipe counts micro-batches
        cbs.append(GradientAccumulation(n_acc=r.grad_accum * learn.dls.train.bs))
    # precision (AMP, TF32 on CUDA fp32), channels_last, torch.compile (which waits for the last stage's groups)
    plan = stage_plan(r, learn.n_layer_groups, r.strategy) if r.strategy != "auto" else None
    cbs += speed_callbacks(learn, r, plan[-1].n_trainable if plan else None)
    if r.resizes_on_device:
        if total_steps is None and plan:
            total_steps = sum(st.epochs for st in plan) * len(learn.dls.train)
        cbs.append(ProgressiveResize(start=r.resize_start or r.size, final=r.size, ramp=r.resize_ramp,
                                     multiple=r.resize_multiple, valid_size=r.valid_size or r.size,
                                     total_steps=total_steps))
    if r.ema:
        cbs.append(EMA(r.ema_decay))
    if r.early_stop:
        # best over the whole run, not per stage (reset_on_fit=False): each stage gets `early_stop` epochs to beat
        # it, then the best weights so far are loaded back. fastai saves to learn.path/model_dir: run_dir/best.pth
        learn.model_dir = Path(run_dir).absolute()
        cbs.append(SaveModelCallback(monitor="valid_loss", fname="best", with_opt=False, reset_on_fit=False))
        stop = EarlyStoppingCallback(monitor="valid_loss", patience=r.early_stop, reset_on_fit=False)
        # last among after_epoch handlers: at fastai's order 63 its CancelFitException would skip the after_epoch
        # of MetricsLog (66) and Checkpointer (90), leaving the stopping epoch out of metrics.csv and the checkpoints
        stop.order = 100
        cbs.append(stop)
    if r.health_every:
        cbs.append(HealthMonitor(every=r.health_every, csv_path=Path(run_dir) / "health.csv"))
    cbs += logger_callbacks(r, run_dir)
    return cbs
