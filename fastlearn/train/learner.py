"""`TransferLearner`: a fastai `Learner` that knows the model's timm layer groups.

It adds methods (`freeze_top`, `layer_lrs`, `fit_stage`, `find_lr`, `fit_preset`) and shadows none of fastai's.
`fit_stage` runs fastai's `ParamScheduler` on closed-form schedules (fastai's `combined_cos` rounds the phase
boundary to float32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler
from fastai.data.core import DataLoaders
from fastai.metrics import accuracy
from fastai.vision.augment import Normalize

from ..base.progress import EpochProgress
from ..core.budget import batch_size_for
from ..core.hotpath import LeanLearner
from ..core.layer_groups import layer_groups
from ..core.losses import make_loss
from ..core.lr_finder import lr_find, LRFindResult
from ..core.models import check_arch, check_head, create_model, model_stats
from ..core.optim import FixedSplit, GroupMap, opt_func as make_opt_func, split_decay
from ..core.schedules import layer_lrs, one_cycle_scheds
from ..core.targets import is_multi_label, label_info, multi_label_metrics
from ..data.dls import image_dls
from ..data.labels import label_args, label_report
from ..data.loader import check_decode
from ..data.samples import is_sample_name, sample
from ..fit.precision import choose_precision, seed_and_mode
from ..run.loggers import check_loggers
from .runner import run_recipe
from ..core.recipes import load_recipe


__all__ = ["TransferLearner", "transfer_learner", "learner_from_recipe", "ensure_normalized"]


class TransferLearner(LeanLearner):
    """A fastai Learner over a timm model whose optimizer groups map onto the model's layer groups (a
    `LeanLearner`: fastai's loop without its fixed per-step costs, fastlearn/hotpath.py)."""

    def __init__(self, dls, model, *, arch: str, group_map: GroupMap, weight_decay: float = 0.01, **kwargs):
        super().__init__(dls, model, wd=np.array(group_map.wd(weight_decay)), **kwargs)
        self.arch, self.group_map, self.weight_decay = arch, group_map, weight_decay
        self.logger = lambda *a, **k: None  # EpochProgress prints; fastai's Recorder would print raw lists

    @property
    def n_layer_groups(self) -> int:
        return self.group_map.n_layer_groups

    def freeze_top(self, k: int, train_bn: bool | None = None) -> None:
        """Train only the top `k` layer groups (k=1: the head; -1: all). With `train_bn` (fastai's default, and this
        learner's until told otherwise) the BatchNorm layers of frozen groups keep training their affine weights and
        running statistics. `train_bn=False` freezes their affine weights too (the running statistics still follow
        the data in train mode), so the backward pass stops at the lowest trainable group: a cheaper step."""
        n = self.n_layer_groups
        k = n if k in (-1, None) else k
        if not 1 <= k <= n:
            raise ValueError(f"freeze_top: k must be -1 or in [1, {n}] (this model has {n} layer groups), got {k}")
        if train_bn is not None and bool(train_bn) != bool(self.train_bn):
            self.train_bn = bool(train_bn)
            if self.opt is not None:  # fastai marks BN params 'force_train' when it creates the optimizer
                for st in self._bn_bias_state(False):
                    st["force_train"] = self.train_bn
        self.freeze_to(self.group_map.first_group_of(n - k))

    def layer_lrs(self, lr: float | slice | Sequence[float], decay: float | None = None) -> np.ndarray:
        "Per optimizer group LRs from a float, a slice(lo, hi) geometric over the layer groups, or a list per layer group."
        if isinstance(lr, (list, tuple, np.ndarray)):
            per_layer = np.asarray(lr, dtype=float)
            if len(per_layer) != self.n_layer_groups:
                raise ValueError(f"got {len(per_layer)} LRs for {self.n_layer_groups} layer groups")
        else:
            per_layer = layer_lrs(self.n_layer_groups, lr, decay)
        return per_layer[self.group_map.layer_index()]

    def fit_stage(self, epochs: int, lr: float | slice, div: float = 25.0, final_div: float = 1e5,
                  pct_start: float = 0.25, moms: Sequence[float] = (0.95, 0.85), cbs=None, **kw) -> None:
        "One one-cycle over `epochs` with discriminative LRs; momentum/beta1 moves inversely."
        scheds = one_cycle_scheds(self.layer_lrs(lr), div, final_div, pct_start, moms)
        self.fit(epochs, cbs=[ParamScheduler(scheds)] + list(cbs or []), **kw)

    def find_lr(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                plot: str | Path | None = None) -> LRFindResult:
        "LR range test on the currently trainable groups; the learner is restored exactly afterwards."
        return lr_find(self, start_lr, end_lr, num_it, plot=plot)

    def fit_preset(self, recipe="transfer", run_dir: str | Path | None = None, cbs=None, **overrides):
        """Run a named recipe (or a `Recipe`) on this learner: lr_find, head, gradual unfreezing; returns a `RunResult`.
        The learner's own arch, optimizer, weight decay, loss, image size and batch size are used where they differ
        from the recipe (one warning lists them; recipe.toml records them). `cbs`: extra fastai callbacks for the
        training stages, as `fit(cbs=...)`."""
        return run_recipe(self, recipe, run_dir=run_dir, overrides=overrides, cbs=cbs)


def ensure_normalized(dls: DataLoaders, mean, std) -> DataLoaders:
    "Append `Normalize(mean, std)` to the batch transforms unless the DataLoaders already normalise."
    if not any(isinstance(t, Normalize) for t in dls.after_batch.fs):
        dls.add_tfms([Normalize.from_stats(mean, std)], "after_batch")
    return dls


def transfer_learner(dls: DataLoaders, arch: str = "tf_efficientnet_lite0", pretrained: bool = True,
                     n_out: int | None = None, opt: str = "adamw", lookahead: bool = False, wd: float = 0.01,
                     wd_norm_bias: bool = False, label_smoothing: float = 0.0, drop_rate: float | None = None,
                     drop_path: float | None = None, metrics=accuracy, loss_func=None, cbs=None,
                     progress: bool = True, path: str | Path | None = None, model=None, loss: str = "ce",
                     focal_gamma: float = 2.0) -> TransferLearner:
    """A `TransferLearner` for timm architecture `arch` with a new head for the data's classes. The body starts
    frozen, inputs are normalised as the weights were pretrained, and weight decay skips norm and bias parameters
    unless `wd_norm_bias`."""
    n_classes = getattr(dls, "c", None)
    if model is None:
        model = create_model(arch, n_out or n_classes, pretrained=pretrained, drop_rate=drop_rate,
                             drop_path_rate=drop_path)
    if n_classes is not None:
        check_head(model, n_classes)
    mean, std = model_stats(arch, pretrained=pretrained)
    ensure_normalized(dls, mean, std)
    groups, gmap = split_decay(model, layer_groups(model), decay_norm_bias=wd_norm_bias)
    if loss_func is None:
        loss_func = make_loss(loss, dls, label_smoothing=label_smoothing, gamma=focal_gamma)
    if metrics is accuracy and is_multi_label(dls):  # the default metric, for multi-label targets
        metrics = multi_label_metrics(label_info(dls)["threshold"])
    device = getattr(dls, "device", None) or torch.device("cpu")
    learn = TransferLearner(dls, model, arch=arch, group_map=gmap, weight_decay=wd, loss_func=loss_func,
                            opt_func=make_opt_func(opt, lookahead=lookahead, device=torch.device(device)),
                            splitter=FixedSplit(groups), metrics=metrics, cbs=cbs, path=path,
                            wd_bn_bias=True, train_bn=True)  # wd on norm/bias is handled by the groups
    if ProgressCallback in [type(c) for c in learn.cbs]:
        learn.remove_cb(ProgressCallback)
    if progress:
        learn.add_cb(EpochProgress())
    learn.freeze_top(1)
    return learn


def learner_from_recipe(data: str | Path, recipe="transfer", overrides: dict | list[str] | None = None,
                        progress: bool = True):
    """A `TransferLearner` (with its DataLoaders) and the recipe, exactly as recipe `recipe` says, for a folder or a
    sample name; the recipe, the data, the architecture and the number of classes are checked before any compute."""
    r = load_recipe(recipe, overrides)
    check_arch(r.arch)
    check_loggers(r.loggers)  # a logger's missing package fails here, before the data is read
    choose_precision(r.precision, None)  # a bf16/fp16 recipe on a CPU fails here, before the data is read
    check_decode(r.decode)  # decode="cuda" without CUDA fails here too
    path = sample(str(data)) if is_sample_name(str(data)) and not Path(data).exists() else Path(data)
    seed_and_mode(r.seed, r.deterministic)  # fastai's set_seed, then the deterministic/fast switch (precision.py)
    report = None
    if r.bs is None:  # schedules sized in steps: the batch size follows the number of training images
        report = label_report(path, bad_images=r.bad_images, valid_pct=r.valid_pct, seed=r.seed, **label_args(r))
        r = r.replace(bs=batch_size_for(report.n_train(r.valid_pct), r.epochs, r.min_steps))
    # images load at the largest size the run needs; ProgressiveResize shrinks training batches on the device
    dls = image_dls(path, size=max(r.size, r.valid_size or r.size), bs=r.bs, valid_pct=r.valid_pct, seed=r.seed,
                    report=report, arch=r.arch, augment=r.augment, flip=r.flip, bad_images=r.bad_images,
                    random_erasing=r.random_erasing, rand_augment=r.rand_augment, num_workers=r.num_workers,
                    cache_images=r.cache_images, decode=r.decode, **label_args(r))
    learn = transfer_learner(dls, r.arch, pretrained=r.pretrained, opt=r.opt, lookahead=r.lookahead, wd=r.wd,
                             wd_norm_bias=r.wd_norm_bias, label_smoothing=r.label_smoothing, drop_rate=r.drop_rate,
                             drop_path=r.drop_path, progress=progress, loss=r.loss, focal_gamma=r.focal_gamma)
    return learn, r
