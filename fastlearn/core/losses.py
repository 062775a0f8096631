"""Classification losses by name (recipe key `loss`): cross-entropy, class-weighted cross-entropy, focal."""

from collections import Counter

import torch
from fastai.losses import CrossEntropyLossFlat, FocalLossFlat, LabelSmoothingCrossEntropyFlat

from ..base.errors import DataError
from .targets import is_multi_label, label_info, multi_label_loss


__all__ = ["LOSSES", "class_weights", "make_loss"]

LOSSES = ("ce", "weighted_ce", "focal")


def _train_labels(dls) -> list[int]:
    "Integer labels of the training set, without loading any image."
    ds = dls.train_ds
    tls = getattr(ds, "tls", None)  # fastai Datasets: tls[1] runs only get_y + Categorize, never opens an image
    labels = tls[1] if tls is not None and len(tls) > 1 else (y for _, y in ds)  # e.g. a list of (x, y) tuples
    return [int(y) for y in labels]


def _n_classes(dls) -> int:
    n = getattr(dls, "c", None)
    if n is None and getattr(dls, "vocab", None) is not None: n = len(dls.vocab)
    if n is None: raise ValueError("class weights need the number of classes: the DataLoaders have no .c or .vocab; "
                                   "set dls.c = <number of classes>")
    return int(n)


def class_weights(dls) -> torch.Tensor:
    "Per-class weights n_samples / (n_classes * count_c) from the training labels (sklearn's 'balanced'), float32."
    labels, n = _train_labels(dls), _n_classes(dls)
    counts = Counter(labels)
    outside = sorted(k for k in counts if not 0 <= k < n)
    if outside:
        raise DataError(f"training labels {outside} are outside 0..{n - 1} for {n} classes; check the labels or dls.c")
    missing = [k for k in range(n) if counts[k] == 0]
    if missing:
        names = [dls.vocab[k] for k in missing] if getattr(dls, "vocab", None) is not None else missing
        raise DataError(f"class(es) {names} have no training sample, so their weight is infinite; add training "
                        f"images for them or use loss='ce' or 'focal'")
    return torch.tensor([len(labels) / (n * counts[k]) for k in range(n)], dtype=torch.float32)


def make_loss(name: str, dls=None, label_smoothing: float = 0.0, gamma: float = 2.0):
    """fastai loss for `name`: "ce" (label-smoothed when `label_smoothing` > 0), "weighted_ce" (needs `dls`) or "focal".

    `label_smoothing` works with "ce" and "weighted_ce" (torch's `label_smoothing`), not with "focal": its
    p_t = exp(-CE) assumes a one-hot target, so a smoothed target would give a different loss than Lin et al.'s.
    Multi-label `dls` (fastlearn.labels) get binary cross-entropy for "ce"; the other losses are refused.
    """
    if name not in LOSSES:
        raise ValueError(f"loss={name!r}; use one of {', '.join(map(repr, LOSSES))}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing={label_smoothing}; use a fraction in [0, 1), e.g. 0.1")
    if label_smoothing and name == "focal":
        raise ValueError(f"label_smoothing={label_smoothing} with loss='focal': the focal loss has no label smoothing; "
                         f"set label_smoothing=0, or use loss='ce' or 'weighted_ce'")
    if dls is not None and is_multi_label(dls):  # BCE with a sigmoid per class; refuses the single-label variants
        return multi_label_loss(name, label_smoothing, threshold=label_info(dls)["threshold"])
    if name == "ce":
        return LabelSmoothingCrossEntropyFlat(eps=label_smoothing) if label_smoothing else CrossEntropyLossFlat()
    if name == "focal":
        if gamma < 0: raise ValueError(f"gamma={gamma}; the focal loss needs gamma >= 0 (0 is cross-entropy), e.g. 2")
        return FocalLossFlat(gamma=gamma)
    if dls is None: raise ValueError("loss='weighted_ce' needs dls= to count the training labels")
    # nn.CrossEntropyLoss takes weight and label_smoothing together (fastai's LabelSmoothingCrossEntropy has no weight)
    loss = CrossEntropyLossFlat(weight=class_weights(dls), label_smoothing=label_smoothing)
    # fastai's Learner moves the model, not the loss: put the weight buffer where the batches will be
    device = getattr(dls, "device", None)
    if device is not None: loss.to(device)
    return loss
