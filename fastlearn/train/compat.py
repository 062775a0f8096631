"""A recipe on a learner it did not build: what differs, and the recipe of what will actually run.

`learn.fit_preset("digits")` on the user's own learner trains with the learner's model, optimizer, weight
decay, loss and DataLoaders; only the schedule (lr_find, stages, LRs, callbacks) comes from the recipe.
`reconcile` compares the two on the keys a learner fixes when it is built, warns once listing each difference,
and returns the recipe with the learner's values, so `recipe.toml` records what ran and the LR scaling
(`lr_ref_bs`) uses the batch size that runs. Keys a learner does not expose (pretrained, dropout, augmentation,
the split) are taken from the recipe as they are.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastai.losses import FocalLoss, LabelSmoothingCrossEntropy
from torch import nn

from ..base.errors import RecipeError, RecipeMismatchError
from ..base.ranks import is_main_process
from ..core.optim import OptFunc
from ..core.recipes import Recipe


__all__ = ["Difference", "LearnerRecipeWarning", "learner_settings", "dls_image_size", "differences", "reconcile"]


class LearnerRecipeWarning(UserWarning):
    "The learner differs from the recipe it runs; the run uses the learner's values (recipe.toml records them)."


@dataclass(frozen=True)
class Difference:
    "One recipe key on which the learner differs: the recipe's value and the learner's (what runs)."
    key: str
    recipe: Any
    learner: Any
    recordable: bool = True   # False: no recipe value describes the learner's (e.g. a custom loss class)

    def __str__(self) -> str:
        note = "" if self.recordable else " (no recipe value for it)"
        return f"{self.key}: learner {_show(self.learner)}, recipe {_show(self.recipe)}{note}"


def _show(v: Any) -> str:
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return f"{v[0]}x{v[1]} px"
    return repr(v)


# -- reading a learner (each reader returns {} when the learner does not say) --------------------------

def _opt_settings(learn) -> dict:
    of = getattr(learn, "opt_func", None)
    if of is None:
        return {}
    if isinstance(of, OptFunc):
        return {"opt": of.name, "lookahead": of.lookahead}
    return {"opt": f"<{getattr(of, '__name__', type(of).__name__)}>"}


def _loss_settings(learn) -> dict:
    lf = getattr(learn, "loss_func", None)
    if lf is None:
        return {}
    f = getattr(lf, "func", lf)  # fastai's *Flat losses wrap the torch/fastai loss in `.func`
    if isinstance(f, nn.CrossEntropyLoss):
        return {"loss": "weighted_ce" if f.weight is not None else "ce", "label_smoothing": float(f.label_smoothing)}
    if isinstance(f, LabelSmoothingCrossEntropy):
        return {"loss": "weighted_ce" if f.weight is not None else "ce", "label_smoothing": float(f.eps)}
    if isinstance(f, FocalLoss):
        return {"loss": "focal", "label_smoothing": 0.0, "focal_gamma": float(f.gamma)}
    return {"loss": f"<{type(lf).__name__}>"}


def _square(size) -> int | tuple[int, int]:
    if isinstance(size, int):
        return size
    h, w = (int(s) for s in size)
    return h if h == w else (h, w)


def dls_image_size(dls) -> int | tuple[int, int] | None:
    """The side (px) of the images the DataLoaders yield: from the last transform that sets a size (batch
    transforms after item transforms), else from one validation batch; None when neither tells."""
    dl = getattr(dls, "train", None)
    for pipe in (getattr(dl, "after_batch", None), getattr(dl, "after_item", None)):
        for t in reversed(list(getattr(pipe, "fs", []) or [])):
            if getattr(t, "size", None) is not None:
                return _square(t.size)
    try:  # DataLoaders without a sizing transform (tensors, a custom pipeline): look at one batch
        xb = dls.valid.one_batch()[0]
        return _square(tuple(xb.shape[-2:])) if getattr(xb, "ndim", 0) == 4 else None
    except Exception:  # an unusual DataLoaders: the size is simply not compared
        return None


def learner_settings(learn) -> dict:
    "What a learner will train with, as recipe keys (a key is absent where the learner does not say)."
    s: dict = {}
    if getattr(learn, "arch", None):
        s["arch"] = learn.arch
    s.update(_opt_settings(learn))
    if getattr(learn, "weight_decay", None) is not None:
        s["wd"] = float(learn.weight_decay)
    gmap = getattr(learn, "group_map", None)
    if gmap:  # every optimizer group decays only when norm and bias parameters decay too
        s["wd_norm_bias"] = all(decays for _, decays in gmap)
    s.update(_loss_settings(learn))
    dls = getattr(learn, "dls", None)
    if dls is not None:
        size = dls_image_size(dls)
        if size is not None:
            s["size"] = size
        bs = getattr(getattr(dls, "train", None), "bs", None)
        if bs is not None:
            s["bs"] = int(bs)
    return s


# -- the rule (pure) -----------------------------------------------------------------------------------

def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def differences(settings: dict, r: Recipe) -> list[Difference]:
    """Each recipe key on which `settings` (from `learner_settings`) differs from `r`. `RecipeMismatchError` where
    the recipe resizes batches on the device to sizes larger than the images the DataLoaders yield."""
    out = []
    for key in ("arch", "opt", "lookahead", "wd", "wd_norm_bias", "loss", "label_smoothing", "bs"):
        if key == "bs" and r.bs is None:  # the recipe derives it from the data: whatever the learner has runs
            continue
        if key in settings and not _same(settings[key], getattr(r, key)):
            v = settings[key]
            out.append(Difference(key, getattr(r, key), v, not (isinstance(v, str) and v.startswith("<"))))
    if settings.get("loss") == "focal" and "focal_gamma" in settings and \
            not _same(settings["focal_gamma"], r.focal_gamma):
        out.append(Difference("focal_gamma", r.focal_gamma, settings["focal_gamma"]))
    size = settings.get("size")
    if size is not None:
        valid = r.valid_size or r.size
        if r.resizes_on_device:
            need = max(r.size, valid)
            have = size if isinstance(size, int) else min(size)
            if have < need:
                raise RecipeMismatchError(
                    f"recipe {r.name!r} resizes batches on the device up to {need} px (size {r.size}, valid_size "
                    f"{valid}, resize_start {r.resize_start}) but the DataLoaders yield {_show(size)} images, "
                    f"which would be upsampled; build them at {need} px (image_dls(..., size={need})), or pass "
                    f"size, valid_size and resize_start of at most {have}")
        elif not _same(size, r.size):
            out.append(Difference("size", r.size, size, isinstance(size, int)))
    return out


def _as_run(r: Recipe, diffs: list[Difference]) -> Recipe:
    "The recipe with the learner's values where they differ (a note in `source` for the ones no key can hold)."
    if not diffs:
        return r
    changes = {d.key: d.learner for d in diffs if d.recordable}
    if "size" in changes and r.valid_size is not None:  # valid_size == size here (else `differences` raised)
        changes["valid_size"] = changes["size"]
    note = f"[run on the caller's learner, whose values replace the recipe's: {'; '.join(map(str, diffs))}]"
    if note not in r.source:  # reconciling twice adds nothing
        changes["source"] = f"{r.source} {note}" if r.source else note
    try:
        return r.replace(**changes)
    except RecipeError as e:
        raise RecipeMismatchError(f"recipe {r.name!r} on this learner: {e}") from None


def _caller_stacklevel() -> int:
    "The stacklevel that points a warning at the first frame outside fastlearn (the user's call)."
    here = Path(__file__).resolve().parents[1]  # the fastlearn package, every subpackage of it
    frame, level = sys._getframe(1), 1
    while frame is not None and here in Path(frame.f_code.co_filename).resolve().parents:
        frame, level = frame.f_back, level + 1
    return level


def reconcile(learn, r: Recipe, warn: bool = True) -> Recipe:
    """The recipe of what will run when `r` runs on `learn`: the learner's values where they differ (with one
    `LearnerRecipeWarning` listing each difference). `RecipeMismatchError` where the run cannot honour the recipe:
    a learner without fastlearn's layer groups, or images the recipe would upsample (see `differences`)."""
    if not all(hasattr(learn, a) for a in ("n_layer_groups", "freeze_top", "fit_stage")):
        raise RecipeMismatchError(f"a recipe runs on a fastlearn TransferLearner (layer groups, stages), not on "
                                  f"{type(learn).__name__}; build it with transfer_learner(dls, arch)")
    diffs = differences(learner_settings(learn), r)
    if diffs and warn and is_main_process():
        lines = "\n".join(f"  {d}" for d in diffs)
        warnings.warn(f"recipe {r.name!r} runs with this learner's own settings where they differ; "
                      f"recipe.toml records them:\n{lines}", LearnerRecipeWarning, stacklevel=_caller_stacklevel())
    return _as_run(r, diffs)
