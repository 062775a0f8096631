"""A self-describing run folder: `model.json` says how to rebuild and feed the model (`predict.load_run` reads it).

`model.json`, written last (atomically) at the end of a run, holds everything needed to use the kept weights
without the training data and without unpickling anything: the timm architecture (built with `pretrained=False`,
weights from `model.safetensors`), the class names in the order of the model's outputs, the validation
preprocessing (fastai `Resize` of each image, /255, `Normalize(mean, std)` and, when the recipe evaluates at
another size than it loads, an antialiased bilinear resize of the batch to `input_size`), and whether the head is
multi-label (sigmoid with a per-class threshold) or single-label (softmax).
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

from fastai.data.transforms import Normalize
from fastai.vision.augment import Resize

from ..base.errors import RunFolderError
from ..base.files import atomic_write
from ..base.version import __version__
from ..core.models import Ensemble, model_n_out, model_stats
from ..data.loader import ImageDecoder
from .checkpoint import latest_checkpoint
from ..core.targets import learner_multi_label


__all__ = ["MODEL_CARD", "CARD_FORMAT", "model_card", "write_model_card", "read_model_card", "read_recipe", "unfinished_hint",
           "uses_valid_resize"]

MODEL_CARD = "model.json"
CARD_FORMAT = 1  # bump when a reader of an older format would misread a newer card
_REQUIRED = ("arch", "n_classes", "classes", "input_size", "mean", "std", "multi_label", "weights")


def decision_threshold(learn, recipe, n_classes: int) -> float | list[float] | None:
    "The multi-label decision threshold(s): the recipe's `threshold`, else the loss's `thresh` (fastai: 0.5)."
    t = getattr(recipe, "threshold", None) if recipe is not None else None
    if t is None:
        t = getattr(getattr(learn, "loss_func", None), "thresh", 0.5)
    if isinstance(t, (list, tuple)):
        if len(t) != n_classes:
            raise ValueError(f"threshold has {len(t)} values for {n_classes} classes; give one per class or one number")
        return [float(v) for v in t]
    return float(t)


def uses_valid_resize(recipe) -> bool:
    "Whether a run with `recipe` resizes validation batches on the device (as `recipe_callbacks` decides)."
    return recipe is not None and recipe.resizes_on_device


def _item_resize(learn, recipe) -> dict:
    "The fastai `Resize` the validation loader applies to each image: size, method and pad mode."
    dl = learn.dls.valid
    tfm = next((t for t in getattr(getattr(dl, "after_item", None), "fs", []) if isinstance(t, Resize)), None)
    if tfm is None:  # tensors, not image files (e.g. a synthetic DataLoaders): the recipe's size
        size = max(recipe.size, recipe.valid_size or recipe.size) if recipe is not None else None
        return {"size": size, "method": "crop", "pad_mode": "reflection"}
    h, w = tfm.size
    return {"size": int(h) if h == w else [int(h), int(w)], "method": str(tfm.method), "pad_mode": str(tfm.pad_mode)}


def _stats(learn) -> tuple[list[float], list[float]]:
    "mean and std of the `Normalize` the validation loader applies (the arch's pretrained stats otherwise)."
    dl = learn.dls.valid
    norm = next((t for t in getattr(getattr(dl, "after_batch", None), "fs", []) if isinstance(t, Normalize)), None)
    if norm is not None and norm.mean is not None:
        return [float(v) for v in norm.mean.flatten()], [float(v) for v in norm.std.flatten()]
    mean, std = model_stats(learn.arch)
    return list(mean), list(std)


def model_card(learn, recipe=None) -> dict:
    "What `model.json` holds for `learn`'s model: enough to rebuild it and feed it images without the data."
    n = model_n_out(learn.model)
    vocab = getattr(learn.dls, "vocab", None)
    classes = [str(c) for c in vocab] if vocab is not None else [str(i) for i in range(n)]
    resize = _item_resize(learn, recipe)
    load_size = resize["size"] if isinstance(resize["size"], int) else max(resize["size"])
    input_size = (recipe.valid_size or recipe.size) if uses_valid_resize(recipe) else load_size
    mean, std = _stats(learn)
    multi = learner_multi_label(learn, recipe)
    return {"format": CARD_FORMAT, "arch": getattr(learn, "arch", None) or (recipe.arch if recipe else None),
            "n_classes": n, "classes": classes, "input_size": int(input_size), "mean": mean, "std": std,
            "multi_label": multi, "threshold": decision_threshold(learn, recipe, n) if multi else None,
            "weights": "model.safetensors", "fastlearn_version": __version__,
            "resize": resize,  # applied to each image before ToTensor; then /255, Normalize, resize to input_size
            "decode": {"short_side": _decode_short_side(learn)},  # the loader's reduced decode (None: full size)
            "recipe": recipe.name if recipe is not None else None,
            "ensemble": len(learn.model.members) if isinstance(learn.model, Ensemble) else None}  # networks averaged


def _decode_short_side(learn) -> int | None:
    "The short side fastlearn's loader decodes images at (`loader.ImageDecoder`), None for full-size decoding."
    for tl in getattr(getattr(learn.dls, "valid_ds", None), "tls", [])[:1]:
        for f in getattr(tl.tfms, "fs", []):
            if isinstance(f, ImageDecoder) and f.short_side:
                return int(f.short_side)
    return None


def write_model_card(learn, run_dir: str | Path, recipe=None) -> Path:
    "Write `run_dir/model.json` atomically (after `model.safetensors`: its presence means the model is complete)."
    card = model_card(learn, recipe)
    return atomic_write(Path(run_dir) / MODEL_CARD, lambda tmp: tmp.write_text(json.dumps(card, indent=2) + "\n"))


def read_recipe(run_dir: Path) -> dict:
    "The run's resolved recipe as plain TOML data ({} if absent); not validated, so newer keys do not break reads."
    p = run_dir / "recipe.toml"
    try:
        return tomllib.loads(p.read_text()) if p.exists() else {}
    except tomllib.TOMLDecodeError as e:
        raise RunFolderError(f"{p} is not valid TOML ({e}); restore it from the run or delete it") from None


def unfinished_hint(run_dir: Path) -> str:
    "What to do with a run folder that has no finished model."
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        recipe = read_recipe(run_dir).get("name", "RECIPE")
        return (f"the run did not finish (its last checkpoint is {ckpt.name}); continue it with `fastlearn train "
                f"{recipe} --data DATA --run-dir {run_dir} --resume`")
    return "the run did not finish and has no checkpoint; train it again"


def read_model_card(run_dir: str | Path) -> dict:
    "`run_dir/model.json`, checked; `RunFolderError` says what is missing and what to do."
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise RunFolderError(f"run folder {run_dir} {what}; pass the folder `fastlearn train` printed "
                             f"(`run folder: runs/...`)")
    path = run_dir / MODEL_CARD
    if not path.exists():
        if (run_dir / "model.safetensors").exists():
            raise RunFolderError(f"run folder {run_dir} has model.safetensors but no {MODEL_CARD} (the class names, "
                                 f"arch and preprocessing): it was trained by a fastlearn older than 0.1.0's "
                                 f"{MODEL_CARD}, or stopped while writing its outputs; train it again")
        if (run_dir / "recipe.toml").exists():
            raise RunFolderError(f"run folder {run_dir} has no finished model (no {MODEL_CARD}, no model.safetensors): "
                                 f"{unfinished_hint(run_dir)}")
        raise RunFolderError(f"{run_dir} is not a fastlearn run folder (no {MODEL_CARD}); pass a folder written by "
                             f"`fastlearn train`")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path} is not valid JSON ({e}); train the run again") from None
    missing = [k for k in _REQUIRED if k not in card] if isinstance(card, dict) else list(_REQUIRED)
    if missing:
        raise RunFolderError(f"{path} lacks {missing}; it was not written by fastlearn's write_model_card")
    if card.get("format", 1) > CARD_FORMAT:
        raise RunFolderError(f"{path} has format {card['format']}, newer than this fastlearn reads ({CARD_FORMAT}); "
                             f"upgrade fastlearn")
    if len(card["classes"]) != card["n_classes"]:
        raise RunFolderError(f"{path} names {len(card['classes'])} classes for a {card['n_classes']}-output model")
    t = card.get("threshold")
    if isinstance(t, list) and len(t) != card["n_classes"]:
        raise RunFolderError(f"{path} has {len(t)} thresholds for {card['n_classes']} classes; give one per class "
                             f"or one number")
    return card


