"""What the model gets wrong, at the end of a run: confusion matrix, top losses, per-class precision/recall/F1.

One `get_preds` over the validation set (with per-item losses) feeds everything: fastai's
`ClassificationInterpretation` is built from those losses, not `from_learner`, which would run the validation set
again. The PNGs (`confusion_matrix.png`, `top_losses.png`) are drawn on matplotlib `Figure`s, since fastai's
`plot_*` methods use pyplot, which would switch a notebook's backend. `summary.json` gains `per_class`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from fastai.distributed import DistributedTrainer
from fastai.interpret import ClassificationInterpretation
from fastai.vision.core import PILImage

from ..base.files import atomic_write
from ..base.progress import summary_table
from ..core.models import model_n_out
from ..core.targets import learner_multi_label
from ..fit.distributed import RankZeroRecord
from ..fit.resize import ProgressiveResize
from .card import decision_threshold, uses_valid_resize

__all__ = ["Interpretation", "interpret", "interpret_run", "per_class_metrics", "plot_confusion_matrix",
           "plot_top_losses"]

_MAX_ROWS = 30  # per-class rows printed at the end of a run; summary.json has them all


class Interpretation:
    "Validation predictions, targets and per-item losses of a learner, with what is derived from them."

    def __init__(self, learn, preds: torch.Tensor, targs: torch.Tensor, losses: torch.Tensor, classes: list[str],
                 multi_label: bool = False, threshold=None, dl=None):
        self.learn, self.preds, self.targs, self.losses, self.classes = learn, preds, targs, losses, classes
        self.multi_label, self.dl = multi_label, dl
        self.threshold = torch.as_tensor(0.5 if threshold is None else threshold, dtype=preds.dtype)

    @property
    def decided(self) -> torch.Tensor:
        "Predicted class per item, or a 0/1 matrix (N, C) of classes over the threshold when multi-label."
        return (self.preds >= self.threshold).long() if self.multi_label else self.preds.argmax(1)

    def per_class(self) -> dict[str, dict]:
        return per_class_metrics(self.targs, self.decided, self.classes, self.multi_label)

    def confusion_matrix(self) -> np.ndarray:
        "(actual, predicted) counts, scikit-learn's confusion_matrix over all classes (single-label runs)."
        from sklearn.metrics import confusion_matrix  # lazy: scikit-learn is heavy, only for this report
        return confusion_matrix(self.targs.numpy(), self.decided.numpy(), labels=list(range(len(self.classes))))

    def top_losses(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        "The `k` largest losses and their validation indices, by fastai's ClassificationInterpretation."
        return ClassificationInterpretation(self.learn, self.dl, self.losses).top_losses(k)

    def images(self, idxs: Sequence[int]) -> list[np.ndarray] | None:
        "The validation images at `idxs` as the model saw them before normalisation (HWC uint8); None if not images."
        ds = getattr(self.dl, "dataset", None)
        if ds is None or getattr(self.dl, "vocab", None) is None:
            return None
        out = []
        for i in idxs:
            item = ds[int(i)]
            if not isinstance(item[0], PILImage):
                return None
            x = self.dl.after_item(item)[0]  # the validation item transforms: Resize (centre crop), ToTensor
            out.append(x.permute(1, 2, 0).numpy())
        return out


def per_class_metrics(targs: torch.Tensor, decided: torch.Tensor, classes: Sequence[str],
                      multi_label: bool = False) -> dict[str, dict]:
    "{class: precision, recall, f1, support} by scikit-learn (0 where undefined: a class never predicted)."
    from sklearn.metrics import precision_recall_fscore_support  # lazy: scikit-learn is heavy, only for this report
    labels = None if multi_label else list(range(len(classes)))
    # fastai's multi-label targets are float one-hot rows; scikit-learn wants one indicator type on both sides
    p, r, f, s = precision_recall_fscore_support(targs.long().numpy(), decided.long().numpy(), labels=labels,
                                                 average=None, zero_division=0)
    return {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)}


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "confusion matrix"):
    "Save the confusion matrix (rows actual, columns predicted) as a PNG; counts in the cells up to 30 classes."
    # lazy: matplotlib is heavy and only needed for this plot
    from matplotlib.figure import Figure  # no pyplot: never switches the user's (notebook's) backend
    n = len(classes)
    side = min(16.0, 3.0 + 0.45 * n)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    im = ax.imshow(cm, interpolation="nearest", cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images")
    if n <= 60:
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=90 if sum(len(str(c)) for c in classes) > 40 else 0)
        ax.set_yticks(range(n), [str(c) for c in classes])
    if n <= 30:
        hi = cm.max() / 2 if cm.size else 0
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=9, color="white" if v > hi else "black")
    ax.set_xlabel("predicted"); ax.set_ylabel("actual")
    acc = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"{title} ({int(cm.sum())} validation images, accuracy {acc:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _names(row: torch.Tensor, classes: Sequence[str]) -> str:
    "The classes set in a 0/1 multi-label row."
    return " ".join(classes[j] for j in torch.nonzero(row).flatten().tolist()) or "(none)"


def plot_top_losses(interp: Interpretation, path: str | Path, k: int = 9) -> Path | None:
    "Save a grid of the `k` highest-loss validation images, titled predicted / actual / loss / probabilities."
    from matplotlib.figure import Figure  # lazy: matplotlib is heavy and only needed for this plot
    k = min(k, len(interp.losses))
    if k == 0 or getattr(interp.dl, "vocab", None) is None:  # no labelled images to show (e.g. tensor data)
        return None
    losses, idx = interp.top_losses(k)
    images = interp.images(idx.tolist())
    if images is None:
        return None
    cols = min(3, k)
    rows = (k + cols - 1) // cols
    # one axes showing a mosaic: matplotlib's setup cost is per axes
    h, w = images[0].shape[:2]
    cell_in = 2.4  # inches per image: three 8-pt caption lines take about 0.5 in above each
    gap, band = max(2, w // 16), int(np.ceil(0.55 / cell_in * w))  # pixels between images, above each for captions
    cell_h, cell_w = h + band, w + gap
    mosaic = np.full((rows * cell_h, cols * cell_w - gap, 3), 255, dtype=np.uint8)
    decided = interp.decided
    captions = []
    for n, (i, loss, img) in enumerate(zip(idx.tolist(), losses.tolist(), images)):
        r, c = divmod(n, cols)
        top, left = r * cell_h + band, c * cell_w
        mosaic[top:top + h, left:left + w] = img
        p = interp.preds[i]
        if interp.multi_label:
            text = (f"predicted: {_names(decided[i], interp.classes)}\n"
                    f"actual: {_names(interp.targs[i], interp.classes)}\nloss {loss:.2f}")
        else:
            pred, act = int(decided[i]), int(interp.targs[i])
            text = (f"predicted: {interp.classes[pred]} ({float(p[pred]):.2f})\n"
                    f"actual: {interp.classes[act]} ({float(p[act]):.2f})\nloss {loss:.2f}")
        captions.append((left + w / 2, top - 1, text))
    width = cell_in * cols
    height = width * mosaic.shape[0] / mosaic.shape[1]
    fig = Figure(figsize=(width, height + 0.35))  # 0.35 in for the title
    ax = fig.add_axes((0, 0, 1, height / (height + 0.35)))
    ax.imshow(mosaic)
    for x, y, text in captions:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=8)
    ax.set_axis_off()
    fig.suptitle("top losses: predicted classes (over the threshold) / actual classes" if interp.multi_label
                 else "top losses: predicted (probability) / actual (probability)", fontsize=10)
    fig.savefig(path, dpi=100)
    return Path(path)


def interpret(learn, recipe=None, dl=None) -> Interpretation:
    "One `get_preds` over the validation set (at the run's evaluation size), with per-item losses."
    dl = dl if dl is not None else learn.dls.valid
    cbs = []
    if uses_valid_resize(recipe):  # evaluate where run_recipe's final validate() did: at valid_size
        cbs.append(ProgressiveResize(recipe.size, recipe.size, valid_size=recipe.valid_size or recipe.size))
    # rank 0 alone calls this at the end of a DDP run: without the DDP callbacks, no collective can wait on others
    solo = [cb for cb in learn.cbs if isinstance(cb, (DistributedTrainer, RankZeroRecord))]
    with learn.removed_cbs(solo):
        preds, targs, losses = learn.get_preds(dl=dl, with_loss=True, cbs=cbs)
    n = model_n_out(learn.model) or preds.shape[1]
    vocab = getattr(learn.dls, "vocab", None)
    classes = [str(c) for c in vocab] if vocab is not None else [str(i) for i in range(n)]
    multi = learner_multi_label(learn, recipe)
    return Interpretation(learn, preds.float(), targs, losses.float(), classes, multi,
                          decision_threshold(learn, recipe, n) if multi else None, dl=dl)


def interpret_run(learn, run_dir: str | Path, recipe=None, k: int = 9, show: bool = True) -> dict[str, dict]:
    """At the end of a run: `confusion_matrix.png` (single-label), `top_losses.png`, `per_class` in `summary.json`,
    and the per-class table printed. Returns the per-class metrics."""
    d = Path(run_dir)
    interp = interpret(learn, recipe)
    per_class = interp.per_class()
    if not interp.multi_label:
        plot_confusion_matrix(interp.confusion_matrix(), interp.classes, d / "confusion_matrix.png")
    plot_top_losses(interp, d / "top_losses.png", k)
    path = d / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary["per_class"] = per_class
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, default=float)))
    if show:
        rows = [{"class": c, **m} for c, m in per_class.items()]
        title = f"per class, {len(interp.losses)} validation images"
        if len(rows) > _MAX_ROWS:  # a 1000-class table helps no one: the classes that need attention
            rows = sorted(rows, key=lambda r: r["f1"])[:_MAX_ROWS]
            title = (f"the {_MAX_ROWS} classes with the lowest F1 of {len(per_class)}, "
                     f"{len(interp.losses)} validation images")
        summary_table(rows, title=title)
    return per_class
