"""A self-describing run folder: `model.json` says how to rebuild and feed the model; `load_run` gives it back.

`model.json` (written last, atomically, at the end of a run) holds everything needed to use the kept weights
without the training data: the timm architecture, the class names in the order of the model's outputs, the
validation preprocessing (fastai `Resize` of each image, then /255, `Normalize(mean, std)` and, when the recipe
evaluates at another size than it loads, an antialiased bilinear resize of the batch to `input_size`), and
whether the head is multi-label (sigmoid with a per-class threshold) or single-label (softmax).

    run = load_run("runs/digits-20250101-120000")
    run.predict(["a.png", "b.png"], topk=3)      # [Prediction(source='a.png', labels=('7',), top=...), ...]
    run.model                                    # the timm model, eval mode, weights loaded

Nothing is unpickled: the model is built by `timm.create_model(arch, pretrained=False)` with a new head and
its weights are read from `model.safetensors`.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch
from torch import nn

from .errors import RunFolderError

__all__ = ["MODEL_CARD", "CARD_FORMAT", "model_card", "write_model_card", "read_model_card", "load_run", "Run",
           "is_multi_label", "uses_valid_resize"]

MODEL_CARD = "model.json"
CARD_FORMAT = 1  # bump when a reader of an older format would misread a newer card
_REQUIRED = ("arch", "n_classes", "classes", "input_size", "mean", "std", "multi_label", "weights")


def is_multi_label(learn, recipe=None) -> bool:
    "Whether the run trains a multi-label head: the recipe says so, or the loss is fastai's BCE-with-logits."
    from fastai.losses import BCEWithLogitsLossFlat
    if recipe is not None and getattr(recipe, "multi_label", None) is not None:
        return bool(recipe.multi_label)
    return isinstance(getattr(learn, "loss_func", None), BCEWithLogitsLossFlat)


def _threshold(learn, recipe, n_classes: int) -> float | list[float] | None:
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
    return recipe is not None and bool(recipe.resize_start or (recipe.valid_size or recipe.size) != recipe.size)


def _item_resize(learn, recipe) -> dict:
    "The fastai `Resize` the validation loader applies to each image: size, method and pad mode."
    from fastai.vision.augment import Resize
    dl = learn.dls.valid
    tfm = next((t for t in getattr(getattr(dl, "after_item", None), "fs", []) if isinstance(t, Resize)), None)
    if tfm is None:  # tensors, not image files (e.g. a synthetic DataLoaders): the recipe's size
        size = max(recipe.size, recipe.valid_size or recipe.size) if recipe is not None else None
        return {"size": size, "method": "crop", "pad_mode": "reflection"}
    h, w = tfm.size
    return {"size": int(h) if h == w else [int(h), int(w)], "method": str(tfm.method), "pad_mode": str(tfm.pad_mode)}


def _stats(learn) -> tuple[list[float], list[float]]:
    "mean and std of the `Normalize` the validation loader applies (the arch's pretrained stats otherwise)."
    from fastai.data.transforms import Normalize
    dl = learn.dls.valid
    norm = next((t for t in getattr(getattr(dl, "after_batch", None), "fs", []) if isinstance(t, Normalize)), None)
    if norm is not None and norm.mean is not None:
        return [float(v) for v in norm.mean.flatten()], [float(v) for v in norm.std.flatten()]
    from .models import model_stats
    mean, std = model_stats(learn.arch)
    return list(mean), list(std)


def model_card(learn, recipe=None) -> dict:
    "What `model.json` holds for `learn`'s model: enough to rebuild it and feed it images without the data."
    from . import __version__
    from .models import model_n_out
    n = model_n_out(learn.model)
    vocab = getattr(learn.dls, "vocab", None)
    classes = [str(c) for c in vocab] if vocab is not None else [str(i) for i in range(n)]
    resize = _item_resize(learn, recipe)
    load_size = resize["size"] if isinstance(resize["size"], int) else max(resize["size"])
    input_size = (recipe.valid_size or recipe.size) if uses_valid_resize(recipe) else load_size
    mean, std = _stats(learn)
    multi = is_multi_label(learn, recipe)
    return {"format": CARD_FORMAT, "arch": getattr(learn, "arch", None) or (recipe.arch if recipe else None),
            "n_classes": n, "classes": classes, "input_size": int(input_size), "mean": mean, "std": std,
            "multi_label": multi, "threshold": _threshold(learn, recipe, n) if multi else None,
            "weights": "model.safetensors", "fastlearn_version": __version__,
            "resize": resize,  # applied to each image before ToTensor; then /255, Normalize, resize to input_size
            "decode": {"short_side": _decode_short_side(learn)},  # the loader's reduced decode (None: full size)
            "recipe": recipe.name if recipe is not None else None}


def _decode_short_side(learn) -> int | None:
    "The short side fastlearn's loader decodes images at (`loader.ImageDecoder`), None for full-size decoding."
    from .loader import ImageDecoder
    for tl in getattr(getattr(learn.dls, "valid_ds", None), "tls", [])[:1]:
        for f in getattr(tl.tfms, "fs", []):
            if isinstance(f, ImageDecoder) and f.short_side:
                return int(f.short_side)
    return None


def write_model_card(learn, run_dir: str | Path, recipe=None) -> Path:
    "Write `run_dir/model.json` atomically (after `model.safetensors`: its presence means the model is complete)."
    from .checkpoint import atomic_write
    card = model_card(learn, recipe)
    return atomic_write(Path(run_dir) / MODEL_CARD, lambda tmp: tmp.write_text(json.dumps(card, indent=2) + "\n"))


def _read_recipe(run_dir: Path) -> dict:
    "The run's resolved recipe as plain TOML data ({} if absent); not validated, so newer keys do not break reads."
    p = run_dir / "recipe.toml"
    try:
        return tomllib.loads(p.read_text()) if p.exists() else {}
    except tomllib.TOMLDecodeError as e:
        raise RunFolderError(f"{p} is not valid TOML ({e}); restore it from the run or delete it") from None


def _unfinished_hint(run_dir: Path) -> str:
    "What to do with a run folder that has no finished model."
    from .checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        recipe = _read_recipe(run_dir).get("name", "RECIPE")
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
                                 f"{_unfinished_hint(run_dir)}")
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


class Run:
    "A finished run loaded from its folder: the model (eval mode) and what is needed to feed it images."

    def __init__(self, run_dir: Path, card: dict, model: nn.Module, recipe: dict, device: torch.device):
        self.run_dir, self.card, self.model, self.recipe, self.device = run_dir, card, model, recipe, device
        self.classes: list[str] = list(card["classes"])
        self.multi_label: bool = bool(card["multi_label"])
        t = card.get("threshold")
        self.threshold = None if not self.multi_label else torch.as_tensor(0.5 if t is None else t, dtype=torch.float32)

    def __repr__(self) -> str:
        kind = "multi-label" if self.multi_label else "single-label"
        return (f"Run({str(self.run_dir)!r}: {self.card['arch']}, {len(self.classes)} classes ({kind}), "
                f"{self.card['input_size']} px, on {self.device})")

    def preprocess(self, images) -> torch.Tensor:
        "The model's input for `images` (paths, folders, globs or PIL images), exactly as validation fed it."
        from .predict import load_image, gather_images, preprocess
        return preprocess([load_image(img, self.decode_short_side) for _, img in gather_images(images)], self.card,
                          self.device)

    @property
    def decode_short_side(self) -> int | None:
        "The short side the run's loader decoded images at (model.json `decode`), None for full-size decoding."
        return (self.card.get("decode") or {}).get("short_side")

    def probs(self, images, tta: bool = False, bs: int = 64) -> torch.Tensor:
        "(N, n_classes) probabilities (softmax, or sigmoid when multi-label) for `images`, on the CPU."
        from .predict import gather_images, predict_probs
        return predict_probs(self, [img for _, img in gather_images(images)], tta=tta, bs=bs)

    def predict(self, images, topk: int = 3, tta: bool = False, bs: int = 64) -> list:
        "A `Prediction` per image: the predicted label(s) and the `topk` classes with their probabilities."
        from .predict import predict
        return predict(self, images, topk=topk, tta=tta, bs=bs)


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> Run:
    "Rebuild a finished run's model from `model.json` + `model.safetensors` (no pickle), ready to predict."
    from .checkpoint import load_weights
    from .models import create_model
    run_dir = Path(run_dir)
    card = read_model_card(run_dir)
    weights = run_dir / card["weights"]
    if not weights.exists():
        raise RunFolderError(f"run folder {run_dir} has {MODEL_CARD} but no weights file {card['weights']}: "
                             f"{_unfinished_hint(run_dir)}")
    if weights.suffix != ".safetensors":
        raise RunFolderError(f"{weights} is not a .safetensors file; fastlearn loads run weights only as safetensors")
    model = create_model(card["arch"], card["n_classes"], pretrained=False)
    try:
        load_weights(model, weights, strict=True)
    except RuntimeError as e:  # torch's load_state_dict: missing/unexpected keys or shape mismatches
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RunFolderError(f"{weights} does not fit {card['arch']!r} with {card['n_classes']} outputs as "
                             f"{MODEL_CARD} says ({first}); the folder mixes files of different runs") from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this torch sees no CUDA device; pass device='cpu' (--device cpu)")
    return Run(run_dir, card, model.to(device).eval(), _read_recipe(run_dir), device)
