"""The transfer 2x2 table made measurable: how much data, and how ImageNet-like it is, choose the strategy.

                      similar to ImageNet          different from ImageNet
    small data        fine_tune_top (*)            full (gradual, discriminative LRs)
    large data        fine_tune_top                full
    (fewer than `tiny_per_class` images per class: linear_probe, whatever the similarity)

(*) The classic cell is the frozen probe. fastlearn keeps the best validated weights (fastlearn.keep): the probe
it trains first stays the floor and is kept unless fine-tuning the top groups beats it, so the cell fine-tunes.

"Small" is images per class in the training split. "Similar" is measured with the frozen pretrained body
(nothing is trained): a linear probe on its pooled features (can a linear classifier already separate the
classes?) and the shift of its BatchNorm statistics (do the new images look, to the network, like the data
its running statistics were collected on?). `decide` is the pure rule; `measure_dataset` takes the numbers.
"""
from __future__ import annotations

import math
from collections import Counter
import time
from dataclasses import dataclass

import numpy as np
import torch
from fastai.torch_core import no_random

from ..core.models import unwrap_model
from ..core.targets import class_counts, is_multi_label, multi_label_probe
from ..fit.precision import learner_device
from .features import BNShift as _BNShift, pooled_features, subset_loader


__all__ = ["DatasetStats", "Thresholds", "measure_dataset", "probe_accuracy", "decide", "choose_strategy",
           "stats_from_features", "STRATEGIES"]

STRATEGIES = ("linear_probe", "fine_tune_top", "full", "scratch")  # what `decide`/`choose_strategy` return


@dataclass(frozen=True)
class DatasetStats:
    "What `measure_dataset` found, all in plain numbers (see `decide` for how they are used)."
    n_train: int                          # training images
    n_classes: int
    images_per_class: float               # median training images per class
    min_per_class: int                    # training images of the rarest class
    probe_acc: float                      # valid accuracy of a linear classifier on frozen pooled features, [0, 1]
    bn_shift: float                       # mean over BN layers of mean_c |mu_new - mu_run| / sqrt(var_run + eps);
                                          # nan for a model without BatchNorm (ViT, ConvNeXt): no evidence
    probe_train: int = 0                  # images the probe was fit on (a capped subset)
    probe_valid: int = 0                  # images the probe was scored on
    n_bn_layers: int = 0                  # BatchNorm layers the shift was averaged over (0: model has none)
    seconds: float = 0.0                  # wall time of the measurement


@dataclass(frozen=True)
class Thresholds:
    """Where the 2x2 table's cells are cut. Heuristics, not laws: the CS231n table gives no numbers.

    - `small_per_class`: below ~100 images per class, tuning the body's millions of weights mostly
      fits noise; at and above it fine-tuning (top or all) reliably beats a frozen body.
    - `tiny_per_class`: below this even careful full fine-tuning is noise; the frozen probe is the only
      safe choice whatever the similarity.
    - `probe_similar`: a linear probe this accurate means the pretrained features already separate the
      classes; the body needs little change. Measured on a capped subset, so it under-estimates.
    - `bn_similar`: a mean normalised BN mean shift at or below this means the images look ImageNet-like
      to the network. Set at 64 px between photos and the digits sample or noise; deeper layers shift more at
      low resolution, so re-measure before trusting the cut at 224 px.
    """
    small_per_class: float = 100.0
    tiny_per_class: float = 20.0
    probe_similar: float = 0.90
    bn_similar: float = 0.45


def decide(stats: DatasetStats, thresholds: Thresholds = Thresholds()) -> tuple[str, str]:
    """(strategy, why) from measured `stats`: the 2x2 table, with the numbers that placed the data in its cell.

    Small and different is the hard cell: `full`, since the probe accuracy is the ceiling of a frozen body and
    only adapting the body can lift it; gradual unfreezing trains the head first, so the body is never updated
    through a random head, and body LRs `lr_ratio` times below the head's keep it near the pretrained weights.
    """
    t = thresholds
    small = stats.images_per_class < t.small_per_class
    size = f"{stats.images_per_class:g} images/class ({'small' if small else 'large'}, cut at {t.small_per_class:g})"
    no_bn = math.isnan(stats.bn_shift)
    probe_ok, bn_ok = stats.probe_acc >= t.probe_similar, no_bn or stats.bn_shift <= t.bn_similar
    similar = probe_ok and bn_ok
    probe = f"linear-probe accuracy {stats.probe_acc:.3f} ({'>=' if probe_ok else '<'} {t.probe_similar:g})"
    bn = ("no BatchNorm layers to compare (the probe decides)" if no_bn else
          f"BN shift {stats.bn_shift:.2f} ({'<=' if bn_ok else '>'} {t.bn_similar:g})")
    why_sim = f"{probe} and {bn}"
    sim = "similar to ImageNet" if similar else "different from ImageNet"
    if stats.images_per_class < t.tiny_per_class:
        return "linear_probe", (f"{size}, {why_sim} ({sim}); fewer than {t.tiny_per_class:g} images/class is too "
                                f"few to tune the body -> linear_probe")
    strategy = "fine_tune_top" if similar else "full"
    note = " (small and different: gradual unfreezing with low body LRs)" if small and not similar else ""
    return strategy, f"{size}, {why_sim} ({sim}) -> {strategy}{note}"


def stats_from_features(learn, feats, probe_acc: float) -> DatasetStats:
    """DatasetStats from the run's cached features (`fastlearn.features.extract_features`) and the validation
    accuracy of the head trained on them, which is the linear probe: nothing is computed twice."""
    y = feats.train_y
    if y.dim() == 1:
        counts = Counter(int(v) for v in y.tolist())
    else:  # multi-label one-hot rows: the images each label is present in
        counts = Counter({k: int(n) for k, n in enumerate(y.sum(0).round().long().tolist())})
    n_classes = int(getattr(learn.dls, "c", None) or len(counts))
    per_class = [counts.get(k, 0) for k in range(n_classes)]
    return DatasetStats(n_train=len(learn.dls.train_ds), n_classes=n_classes,
                        images_per_class=float(np.median(per_class)), min_per_class=int(min(per_class)),
                        probe_acc=float(probe_acc), bn_shift=feats.bn_shift, probe_train=len(feats.train_y),
                        probe_valid=len(feats.valid_y), n_bn_layers=feats.n_bn_layers, seconds=feats.seconds)


def choose_strategy(learn, recipe, thresholds: Thresholds = Thresholds(), max_images: int = 400) -> tuple[str, str]:
    "(strategy, why) for `learn`'s data and model: `scratch` without pretrained weights, else decide(measure_dataset)."
    if not recipe.pretrained:
        return "scratch", (f"recipe {recipe.name!r} sets pretrained = false: there are no pretrained features to "
                           "keep, so everything is trained in one one-cycle -> scratch")
    stats = measure_dataset(learn, max_images=max_images, seed=recipe.seed)
    strategy, why = decide(stats, thresholds)
    if is_multi_label(learn.dls):
        why += "; multi-label: the probe accuracy is the mean per-label balanced accuracy of one-vs-rest probes"
    return strategy, f"{why}; measured on {stats.probe_train}+{stats.probe_valid} images in {stats.seconds:.1f}s"


# -- measuring ------------------------------------------------------------------------------------

def measure_dataset(learn, max_images: int = 400, seed: int = 0, bs: int = 64) -> DatasetStats:
    """Images per class, and the similarity of the data to the pretraining data as seen by the frozen body, from
    at most `max_images` training and `max_images // 2` validation images (seeded) with the validation transforms,
    in eval mode. The model (weights, BN statistics, train/eval mode) and the global random states are left as
    they were, so the training that follows is the same with or without the measurement."""
    with no_random(seed):  # fastai: seeds, then restores python/numpy/torch RNG states (DataLoader.new draws)
        return _measure(learn, max_images, seed, bs)


def _measure(learn, max_images: int, seed: int, bs: int) -> DatasetStats:
    t0 = time.perf_counter()
    dls = learn.dls
    if len(dls.train_ds) == 0 or len(dls.valid_ds) == 0:
        raise ValueError(f"measure_dataset needs training and validation images; got {len(dls.train_ds)} and "
                         f"{len(dls.valid_ds)}; add images (or a validation split)")
    per_class = class_counts(dls)  # a multi-label image counts for each of its labels
    n_classes = len(per_class)
    learn.model.to(learner_device(learn))  # where fit would put it; the batches come on dls.device
    model = unwrap_model(learn.model)
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(f"measure_dataset needs a timm model (forward_features/forward_head); got "
                        f"{type(model).__name__}; build it with fastlearn.models.create_model")
    rng = np.random.default_rng(seed)
    tr_idx = _pick(len(dls.train_ds), max_images, rng)
    va_idx = _pick(len(dls.valid_ds), max(1, max_images // 2), rng)
    bn = _BNShift(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), bn:
            xtr, ytr = pooled_features(model, subset_loader(dls, dls.train_ds, tr_idx, bs))
            xva, yva = pooled_features(model, subset_loader(dls, dls.valid_ds, va_idx, bs))
    finally:
        model.train(was_training)
    acc = probe_accuracy(xtr.numpy(), ytr.numpy().astype(int), xva.numpy(), yva.numpy().astype(int))
    return DatasetStats(n_train=len(dls.train_ds), n_classes=n_classes, images_per_class=float(np.median(per_class)),
                        min_per_class=int(min(per_class)), probe_acc=acc, bn_shift=bn.shift(),
                        probe_train=len(ytr), probe_valid=len(yva), n_bn_layers=len(bn.layers),
                        seconds=time.perf_counter() - t0)


def probe_accuracy(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, C: float = 1.0) -> float:
    """Valid accuracy of an L2-regularised logistic regression on standardised features (sklearn).
    Multi-label (2-D 0/1 targets): the mean balanced accuracy of one probe per label (one-vs-rest)."""
    # scikit-learn (and its scipy) only for this probe, which `auto` alone runs: not loaded by every run
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    if ytr.ndim == 2:
        return multi_label_probe(xtr, ytr, xva, yva, C)
    if len(np.unique(ytr)) < 2:  # one class: the probe is a constant predictor
        return float(np.mean(yva == ytr[0]))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
    clf.fit(xtr, ytr)
    return float(clf.score(xva, yva))


def _pick(n: int, cap: int, rng: np.random.Generator) -> list[int]:
    return sorted(rng.choice(n, size=min(n, cap), replace=False).tolist())

