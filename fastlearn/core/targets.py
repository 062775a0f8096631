"""What kind of targets a DataLoaders or learner holds (single- or multi-label, classes, threshold), and the
multi-label loss, metrics and probe that follow from it: one rule, read by the learner, the strategy and model.json."""
from __future__ import annotations

from collections import Counter
from functools import partial

import numpy as np
import torch
from fastai.data.transforms import EncodedMultiCategorize, MultiCategorize
from fastai.losses import BCEWithLogitsLossFlat
from fastai.metrics import ActivationType, accuracy_multi, skm_to_fastai
from sklearn.metrics import f1_score

__all__ = ["is_multi_label", "learner_multi_label", "label_info", "set_label_info", "class_counts",
           "multi_label_loss", "multi_label_metrics", "multi_label_probe"]


def is_multi_label(dls) -> bool:
    "True when `dls` holds multi-label targets: image_dls' flag, else a fastai MultiCategorize in its label pipeline."
    flag = getattr(dls, "multi_label", None)
    if isinstance(flag, bool):
        return flag
    tls = getattr(getattr(dls, "train_ds", None), "tls", None)
    return bool(tls) and any(isinstance(t, (MultiCategorize, EncodedMultiCategorize)) for t in tls[-1].tfms.fs)


def label_info(dls) -> dict:
    """{"multi_label": bool, "threshold": float or None, "classes": [...]} in vocab order: what a model trained
    on `dls` predicts (the run folder's model.json). `image_dls` sets it as `dls.label_info`."""
    info = getattr(dls, "label_info", None)
    if isinstance(info, dict):
        return {**info, "classes": list(info["classes"]) if info.get("classes") is not None else None}
    multi = is_multi_label(dls)
    vocab = getattr(dls, "vocab", None)
    return {"multi_label": multi, "threshold": 0.5 if multi else None,
            "classes": [str(c) for c in vocab] if vocab is not None else None}


def set_label_info(dls, multi_label: bool, threshold: float) -> None:
    "Put `multi_label` and `label_info` on DataLoaders built by image_dls."
    dls.multi_label = bool(multi_label)
    dls.label_info = {"multi_label": bool(multi_label), "threshold": float(threshold) if multi_label else None,
                      "classes": [str(c) for c in dls.vocab]}


def class_counts(dls) -> list[int]:
    """Training images per class, read through the label pipeline only (no image decoded); a multi-label
    image counts once for each of its labels."""
    ds = dls.train_ds
    tls = getattr(ds, "tls", None)  # fastai Datasets: tls[-1] runs only get_y + Categorize
    if tls is not None and len(tls) > 1:
        ys = [tls[-1][i] for i in range(len(ds))]
    else:
        ys = [ds[i][-1] for i in range(len(ds))]
    n = int(getattr(dls, "c", 0) or len(getattr(dls, "vocab", None) or []))
    counts: Counter = Counter()
    for y in ys:
        t = torch.as_tensor(y)
        if t.ndim == 0:
            counts[int(t)] += 1
        else:  # one-hot (multi-label)
            n = max(n, t.numel())
            counts.update(t.flatten().nonzero().flatten().tolist())
    n = max(n, max(counts, default=-1) + 1)
    return [counts.get(k, 0) for k in range(n)]


def multi_label_loss(name: str = "ce", label_smoothing: float = 0.0, threshold: float = 0.5):
    "fastai's BCEWithLogitsLossFlat (a sigmoid per class); the single-label losses' variants are refused by name."
    if name != "ce" or label_smoothing:
        what = f"loss={name!r}" if name != "ce" else f"label_smoothing={label_smoothing}"
        raise ValueError(f"{what} is a single-label (softmax) option; multi-label data trains a sigmoid per class "
                         f"with binary cross-entropy: use loss='ce' and label_smoothing=0")
    return BCEWithLogitsLossFlat(thresh=threshold)


def multi_label_metrics(threshold: float = 0.5) -> list:
    "accuracy_multi (per label, at `threshold`) and macro F1 over classes: fastai's metrics, named for the CSV."
    # fastai's F1ScoreMulti(thresh, average='macro') with zero_division=0: a class never predicted scores 0
    # instead of sklearn warning every epoch until the model first predicts it
    f1 = skm_to_fastai(f1_score, thresh=threshold, activation=ActivationType.Sigmoid, flatten=False,
                       average="macro", zero_division=0, name="f1_macro")
    return [partial(accuracy_multi, thresh=threshold, sigmoid=True), f1]


def multi_label_probe(xtr, ytr, xva, yva, C: float = 1.0) -> float:
    """`auto`'s linear probe for multi-label targets: one logistic regression per label on standardised
    features, scored by balanced accuracy (chance 0.5 however rare the label, so the single-label cut at
    0.90 still means 'the frozen features separate it'), averaged over the labels that have both values in
    training and validation; accuracy over all labels when none has."""
    # lazy: heavy (scikit-learn's linear models and scipy), only for this probe, which `auto` alone runs
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    scores = []
    for k in range(ytr.shape[1]):
        if len(np.unique(ytr[:, k])) < 2 or len(np.unique(yva[:, k])) < 2:
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(xtr, ytr[:, k])
        scores.append(balanced_accuracy_score(yva[:, k], clf.predict(xva)))
    if scores:
        return float(np.mean(scores))
    return float(np.mean(yva == (ytr.mean(0, keepdims=True) > 0.5)))  # constant majority guess per label


def learner_multi_label(learn, recipe=None) -> bool:
    "Whether a learner trains a multi-label head: the recipe says so, or the loss is fastai's BCE-with-logits."
    if recipe is not None and getattr(recipe, "multi_label", None) is not None:
        return bool(recipe.multi_label)
    return isinstance(getattr(learn, "loss_func", None), BCEWithLogitsLossFlat)
