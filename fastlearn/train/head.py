"""The head stage on cached features: the frozen body computes every image's features once, then the head gets an
LR sweep and a one-cycle on them (and `auto` its linear probe), in seconds instead of epochs over images."""
from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist
from fastai.callback.schedule import ParamScheduler

from ..base.console import say
from ..base.ranks import broadcast_object, is_distributed, is_main_process
from ..core.budget import feature_batch_size, feature_epochs
from ..core.lr_finder import lr_find, plot_lr_find, suggest
from ..core.schedules import one_cycle_scheds
from ..fit.precision import learner_device, use_channels_last
from .features import extract_features, head_learner, supports_feature_head
from .strategy import decide, stats_from_features
from ..base.progress import epoch_metrics, first_metric
from ..core.recipes import Recipe
from ..run.records import score_key, stage_row

__all__ = ["use_feature_head", "head_on_features"]


def use_feature_head(learn, r: Recipe, strategy: str) -> bool:
    "Whether the head stage trains on cached frozen-body features: pretrained weights and a plain linear head."
    if not (r.head_features and r.pretrained) or strategy == "scratch" or r.mixup or r.cutmix:
        return False  # mixup/cutmix mix images, which cached features cannot do
    return supports_feature_head(learn.model, size=min(64, r.size))


def head_on_features(learn, r: Recipe, run) -> None:
    """The head stage on cached features: one frozen-body pass, an LR sweep of the head, the head's one-cycle and,
    for `auto`, the 2x2 decision from the head's validation accuracy (the linear probe) and the BN shift. Sets the
    run's (a `RunState`) strategy, head peak LR and probe, and adds the head's stage row."""
    timings = run.timings
    ts = time.perf_counter()
    feats = extract_features(learn, bs=max(32, r.bs or 32), seed=r.seed, adapt_bn_above=r.adapt_bn_shift,
                             channels_last=use_channels_last(r.channels_last, learn.model, learner_device(learn)))
    timings["features"] = time.perf_counter() - ts
    n = len(feats.train_y)
    bs = feature_batch_size(n)
    epochs = feature_epochs(n, bs, r.head_steps)
    hl = head_learner(learn, feats, bs, r.wd, seed=r.seed)
    peak = r.lr
    if peak is None:
        if not r.lr_find:
            raise ValueError("recipe sets lr_find = false but gives no lr; set lr = <peak LR>")
        ts = time.perf_counter()
        found = lr_find(hl, num_it=200)
        peak = suggest(found.lrs, found.losses, r.lr_suggester)
        timings["lr_find"] = time.perf_counter() - ts
        if is_main_process():
            found.peak = peak  # the plot marks the LR the run uses
            plot_lr_find(found, Path(run.run_dir) / "lr_find.png")
    peak = broadcast_object(peak)
    run.log.stage = run.trace.stage = "head"
    ts = time.perf_counter()
    hl.fit(epochs, cbs=[ParamScheduler(one_cycle_scheds(peak, r.div, r.final_div, r.pct_start, r.moms)), run.trace,
                        run.log])
    if is_distributed():  # every rank trained the same head on the same features; make it bitwise rank 0's
        for p in hl.model.parameters():
            dist.broadcast(p.data, src=0)
    valid_loss, score = first_metric(hl)
    vals = {k: float(v) for k, v in epoch_metrics(hl.recorder).items()}
    timings["head"] = time.perf_counter() - ts
    run.stages.append(stage_row("head", 1, epochs, peak, vals,
                                round(timings["features"] + timings.get("lr_find", 0) + timings["head"], 1)))
    metric = f" {score_key(run.stages[-1])} {score:.4f}" if score == score else ""
    say(f"[head] on cached features: {n} train / {len(feats.valid_y)} valid images, {epochs} epochs x "
        f"{n // bs} steps at peak LR {peak:.2e}: valid_loss {valid_loss:.4f}{metric} "
        f"(features {timings['features']:.1f}s, sweep {timings.get('lr_find', 0):.1f}s, "
        f"head {timings['head']:.1f}s)" + (f"; BN statistics re-estimated on the training images first (BN "
                                           f"shift {feats.bn_shift:.2f} > {r.adapt_bn_shift:g})"
                                           if feats.bn_adapted else ""))
    run.strategy, run.why, run.peak, run.probe = r.strategy, "", peak, score
    if r.strategy == "auto":
        run.strategy, run.why = broadcast_object(decide(stats_from_features(learn, feats, score)))
        say(f"auto strategy: {run.strategy} ({run.why})")
