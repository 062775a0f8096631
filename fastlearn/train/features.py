"""Frozen-body features, computed once per run: the head's LR sweep, the head stage, `auto`'s linear probe and
its BatchNorm-shift measure all read them instead of running the body again.

With a pretrained body frozen, the head sees the same pooled features for an image in every epoch (eval mode,
validation transforms), so training the head on cached features costs one forward pass over the data instead of
one per epoch. This is the first half of LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features
and Underperform Out-of-Distribution"): a well-trained linear head before the body is unfrozen, so fine-tuning
starts from a good solution instead of pushing gradients from a random head into the pretrained features.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.torch_core import no_random
from torch import nn
from torch.utils.data import TensorDataset

from ..core.models import bn_layers, unwrap_model
from ..core.optim import FixedSplit, split_decay
from ..fit.precision import learner_device


__all__ = ["FeatureCache", "extract_features", "feature_head", "supports_feature_head", "BNShift", "pooled_features",
           "subset_loader"]


@dataclass
class FeatureCache:
    "Pooled pre-logits features of the frozen body (eval mode, validation transforms) and their labels."
    train_x: torch.Tensor       # (n_train, d) float32, on the CPU
    train_y: torch.Tensor       # (n_train,) int64 (or (n_train, c) float for multi-label)
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    bn_shift: float             # mean normalised BN input-mean shift over the train images (nan: no BatchNorm)
    n_bn_layers: int
    seconds: float              # wall time of the extraction
    bn_adapted: bool = False    # the BN statistics were re-estimated on the training images (see extract_features)

    @property
    def dim(self) -> int:
        return int(self.train_x.shape[1])


class _Dropout(nn.Module):
    "Functional dropout whose rate is read at call time (timm applies `drop_rate` functionally in forward_head)."

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return nn.functional.dropout(x, self.p, self.training) if self.p else x


def feature_head(model: nn.Module) -> nn.Module:
    """The part of a timm model between its pooled pre-logits features and the logits: dropout at the model's
    `drop_rate` (a no-op in eval mode), then the classifier itself, whose parameters are shared with `model`."""
    m = unwrap_model(model)
    return nn.Sequential(_Dropout(float(getattr(m, "drop_rate", 0.0) or 0.0)), m.get_classifier())


def supports_feature_head(model: nn.Module, size: int = 32) -> bool:
    """True when the logits of `model` are `feature_head(model)` applied to `forward_head(pre_logits=True)`,
    checked numerically in eval mode on a random image, so training the head on cached features trains exactly
    the model's own classifier. False for models without a plain Linear classifier or timm's head API."""
    m = unwrap_model(model)
    if not all(hasattr(m, a) for a in ("forward_features", "forward_head", "get_classifier")):
        return False
    if not isinstance(m.get_classifier(), nn.Linear):
        return False
    was = m.training
    m.eval()
    try:
        p = next(m.parameters())
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
        with torch.no_grad():
            f = m.forward_features(x)
            full, pre = m.forward_head(f), m.forward_head(f, pre_logits=True)
            ok = pre.dim() == 2 and torch.allclose(feature_head(m).eval()(pre), full, atol=1e-5, rtol=1e-4)
    except Exception:  # a model whose head cannot take this input: not for the feature path
        ok = False
    finally:
        m.train(was)
    return bool(ok)


def extract_features(learn, bs: int = 64, max_train: int | None = None, seed: int = 0,
                     adapt_bn_above: float | None = None, channels_last: bool = False) -> FeatureCache:
    """One pass of the frozen body over the training and validation images, in eval mode with the validation
    transforms, without gradients; also the BatchNorm-statistics shift on the training images.

    For images far from the pretraining data (a shift above `adapt_bn_above`) the BN running statistics are
    re-estimated on the training images (AdaBN), the features computed again with them, and the model keeps those
    statistics: the head is fitted under the statistics fine-tuning starts from. Else the model is left as it was;
    the global random states always are. `max_train` caps the training images (a seeded random subset);
    `channels_last`: the model and batches in NHWC (the model stays so, as fine-tuning will run it)."""
    t0 = time.perf_counter()
    dls = learn.dls
    if len(dls.train_ds) == 0 or len(dls.valid_ds) == 0:
        raise ValueError(f"extracting features needs training and validation images; got {len(dls.train_ds)} and "
                         f"{len(dls.valid_ds)}; add images (or a validation split)")
    learn.model.to(learner_device(learn))  # where fit would put it; the batches come on dls.device
    model = unwrap_model(learn.model)
    fmt = torch.channels_last if channels_last else None
    if fmt is not None:
        model.to(memory_format=fmt)
    n_train = len(dls.train_ds)
    tr_idx = list(range(n_train))
    if max_train is not None and n_train > max_train:
        tr_idx = sorted(np.random.default_rng(seed).choice(n_train, size=max_train, replace=False).tolist())
    bn = BNShift(model)
    was = model.training
    model.eval()
    adapted = False
    try:
        with no_random(seed), torch.no_grad():  # DataLoader.new draws from the global RNGs: leave them as they were
            with bn:
                xtr, ytr = pooled_features(model, subset_loader(dls, dls.train_ds, tr_idx, bs), fmt)
            shift = bn.shift()
            if adapt_bn_above is not None and bn.layers and shift > adapt_bn_above:
                _adapt_bn(model, bn.layers, subset_loader(dls, dls.train_ds, tr_idx, bs), fmt)
                adapted = True
                xtr, ytr = pooled_features(model, subset_loader(dls, dls.train_ds, tr_idx, bs), fmt)
            xva, yva = pooled_features(model, subset_loader(dls, dls.valid_ds, list(range(len(dls.valid_ds))), bs),
                                       fmt)
    finally:
        model.train(was)
    return FeatureCache(xtr, ytr, xva, yva, shift, len(bn.layers), time.perf_counter() - t0, adapted)


def _adapt_bn(model: nn.Module, layers: list, dl, fmt=None) -> None:
    "AdaBN: the BN layers' running statistics re-estimated as the plain average over `dl` (other layers in eval)."
    moms = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        for xb, _ in dl:
            model.forward_features(_plain(xb, fmt))
    finally:
        for m, mom in zip(layers, moms):
            m.momentum = mom
            m.eval()


def subset_loader(dls, ds, idx: list[int], bs: int):
    "A DataLoader over `ds[idx]` with the validation transforms (no random crop or augmentation), in order."
    kw = dict(bs=bs, shuffle=False, drop_last=False)
    if hasattr(ds, "tls"):  # fastai Datasets: re-run the validation pipeline on the chosen items
        return dls.test_dl([ds.items[i] for i in idx], with_labels=True, **kw)
    return dls.valid.new(dataset=[ds[i] for i in idx], **kw)


def _plain(xb, fmt=None) -> torch.Tensor:
    "A batch as a plain tensor (fastai's TensorImage routes every op through __torch_function__: slow), in `fmt`."
    xb = xb.as_subclass(torch.Tensor)
    return xb if fmt is None else xb.contiguous(memory_format=fmt)


def pooled_features(model: nn.Module, dl, fmt=None) -> tuple[torch.Tensor, torch.Tensor]:
    "Pooled pre-logits features (timm) and labels for every batch of `dl`, on the CPU; batches in memory format `fmt`."
    xs, ys = [], []
    for xb, yb in dl:
        xb = _plain(xb, fmt)
        xs.append(model.forward_head(model.forward_features(xb), pre_logits=True).flatten(1).float().cpu())
        ys.append(torch.as_tensor(yb).as_subclass(torch.Tensor).cpu())
    y = torch.cat(ys)
    return torch.cat(xs), (y.flatten().long() if y.dim() == 1 or y.shape[-1] == 1 else y.float())


class BNShift:
    """Context manager: hooks every BatchNorm with running stats and accumulates the per-channel mean of
    its input; `shift()` compares it with the stored running mean in units of the running std."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in bn_layers(model).values() if m.track_running_stats and m.running_mean is not None]
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.handles = []

    def _hook(self, i: int):
        def hook(mod, args):
            x = args[0].detach().float()
            dims = [d for d in range(x.dim()) if d != 1]  # all but channels
            self.sums[i] = self.sums.get(i, 0) + x.sum(dims).cpu()
            self.counts[i] = self.counts.get(i, 0) + x.numel() // x.shape[1]
        return hook

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def shift(self) -> float:
        "Mean over layers of mean_c |mu_new - mu_run| / sqrt(var_run + eps); nan for a model without BN."
        per_layer = []
        for i, m in enumerate(self.layers):
            if i not in self.sums:
                continue
            mu = self.sums[i] / self.counts[i]
            d = (mu - m.running_mean.float().cpu()).abs() / torch.sqrt(m.running_var.float().cpu() + m.eps)
            per_layer.append(float(d.mean()))
        return float(np.mean(per_layer)) if per_layer else float("nan")


def head_learner(learn, cache: FeatureCache, bs: int, wd: float, seed: int = 0, cbs=None):
    """A fastai `Learner` that trains `learn`'s own classifier (shared parameters) on cached features, with the
    same loss function, metrics and optimizer; no weight decay on the bias. Its `fit`, `lr_find` and
    `ParamScheduler` are fastai's: only the inputs are features instead of images."""
    head = feature_head(learn.model)
    device = learner_device(learn)
    dls = DataLoaders.from_dsets(TensorDataset(cache.train_x, cache.train_y), TensorDataset(cache.valid_x, cache.valid_y),
                                 bs=bs, shuffle=True, device=device, num_workers=0)
    dls.train.rng = random.Random(seed)
    dls.c = getattr(learn.dls, "c", None)
    groups, gmap = split_decay(head, [list(head.parameters())])
    hl = Learner(dls, head, loss_func=learn.loss_func, opt_func=learn.opt_func, splitter=FixedSplit(groups),
                 metrics=learn.metrics, wd=np.array(gmap.wd(wd)), wd_bn_bias=True, train_bn=True, cbs=cbs)
    if ProgressCallback in [type(c) for c in hl.cbs]:
        hl.remove_cb(ProgressCallback)
    hl.logger = lambda *a, **k: None
    return hl
