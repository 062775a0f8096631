"""Predict with a finished run: images in (files, folders, globs, PIL images), top-k classes with probabilities out.

Images are prepared exactly as the run's validation set was (as `model.json` describes), in batches, on the GPU
when there is one. Test-time augmentation (`tta=True`) averages the probabilities over deterministic views the run
trained for: the image, its mirror (only if the recipe trained with `flip`) and a centre zoom. Not fastai's
`Learner.tta`: it draws random training augmentations and needs the training DataLoaders, which a run folder lacks.

    fastlearn predict runs/digits-1 scans/ --topk 3 --csv predictions.csv
"""
from __future__ import annotations

import csv
import glob
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from fastai.vision.augment import Resize
from fastai.vision.core import image2tensor, PILImage
from rich.table import Table
from torch import nn
from PIL import Image

from ..base.console import console
from ..base.errors import CorruptImageError, DataError
from ..base.files import atomic_write
from ..core.models import Ensemble, create_model
from ..core.weights import load_weights
from ..data.folders import IMAGE_SUFFIXES, walk_files
from ..data.loader import decode_image, reduce_short_side
from ..fit.resize import resize_batch
from ..base.errors import RunFolderError
from .card import MODEL_CARD, read_model_card, read_recipe, unfinished_hint


__all__ = ["Run", "load_run", "Prediction", "predict", "predict_probs", "preprocess", "find_images", "gather_images", "tta_views",
           "predict_main", "load_image", "TTA_ZOOM"]

TTA_ZOOM = 1.1  # the zoom view: fastai aug_transforms' default max_zoom, the largest zoom training saw
_GLOB = set("*?[")


@dataclass(frozen=True)
class Prediction:
    "One image's prediction: the decided label(s) and the top-k classes with their probabilities."
    source: str                               # the file, or "image <i>" for an in-memory image
    labels: tuple[str, ...]                   # the predicted class; for multi-label, every class over its threshold
    top: tuple[tuple[str, float], ...]        # (class, probability), most probable first

    @property
    def label(self) -> str:
        "The most probable class."
        return self.top[0][0]


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    "Image files from files, folders (recursively, image suffixes only) and glob patterns, in the order given."
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in walk_files(p) if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"folder {p} holds no image files (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}); "
                                f"pass image files or a folder with images")
            out += found
        elif p.exists():
            out.append(p)
        elif _GLOB & set(str(raw)):
            hits = [Path(h) for h in sorted(glob.glob(str(p), recursive=True))]
            files = find_images([h for h in hits if h.is_dir()]) + \
                [h for h in hits if h.is_file() and h.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise DataError(f"pattern {str(raw)!r} matches no image file")
            out += files
        else:
            raise DataError(f"image {raw} does not exist; pass image files, folders or glob patterns")
    return out


def gather_images(images) -> list[tuple[str, Path | Image.Image]]:
    "(source name, file or PIL image) for one image, a folder, a glob, or a sequence of those."
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    out: list[tuple[str, Path | Image.Image]] = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            out.append((f"image {i}", im))
        else:
            out += [(str(p), p) for p in find_images([im])]
    return out


def load_image(item: Path | Image.Image, short_side: int | None = None):
    """An RGB fastai PILImage, opened as the run's loader opened it (fastai's ImageBlock, or, with `short_side`,
    fastlearn's reduced decode `loader.decode_image`); CorruptImageError names a file that fails."""
    try:
        if isinstance(item, Image.Image):
            im = item.convert("RGB") if item.mode not in ("L", "RGB") else item
            return PILImage.create(reduce_short_side(im, short_side).convert("RGB"))
        return PILImage.create(decode_image(item, short_side).convert("RGB") if short_side else item)
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError (truncated), SyntaxError, ... per codec
        name = str(item) if not isinstance(item, Image.Image) else "an in-memory image"
        raise CorruptImageError(f"cannot read {name} as an image ({type(e).__name__}: {e}); pass image files only",
                                paths=[] if isinstance(item, Image.Image) else [item]) from None


def _item_tensor(img, card: dict) -> torch.Tensor:
    "uint8 (3, H, W): the validation item transform (fastai Resize, validation split = centre crop), then ToTensor."
    # a card with only the shared-design fields (no "resize"): fastai's default Resize at the input size
    r = card.get("resize") or {"size": card["input_size"], "method": "crop", "pad_mode": "reflection"}
    return image2tensor(Resize(r["size"], method=r["method"], pad_mode=r["pad_mode"])(img, split_idx=1))


def preprocess(images: Sequence, card: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    "The model's input batch for loaded images (PIL), as fastai's validation loader and fastlearn's resize build it."
    x = torch.stack([_item_tensor(im, card) for im in images]).to(device)
    x = x.float().div_(255.0)  # fastai IntToFloatTensor
    mean = torch.tensor(card["mean"], dtype=torch.float32, device=x.device)[None, :, None, None]
    std = torch.tensor(card["std"], dtype=torch.float32, device=x.device)[None, :, None, None]
    x = (x - mean) / std  # fastai Normalize
    return resize_batch(x, card["input_size"])  # ProgressiveResize's validation resize; a no-op at the same size


def tta_views(recipe: dict) -> list[str]:
    "The TTA views the run's training augmentations allow: 'original', 'hflip' (only if it trained with flips), 'zoom'."
    if not recipe.get("augment", False):  # no recipe.toml, or augment = false: nothing the model was taught
        return ["original"]
    return ["original"] + (["hflip"] if recipe.get("flip", False) else []) + ["zoom"]


def _view(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "original":
        return x
    if name == "hflip":
        return x.flip(-1)
    h, w = x.shape[-2:]  # zoom: the centre 1/TTA_ZOOM of the image, scaled back to the input size
    ch, cw = round(h / TTA_ZOOM), round(w / TTA_ZOOM)
    top, left = (h - ch) // 2, (w - cw) // 2
    return F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)


def predict_probs(run, items: Sequence, tta: bool = False, bs: int = 64) -> torch.Tensor:
    "(N, n_classes) probabilities on the CPU for files or PIL images, in batches of `bs` on the run's device."
    if bs < 1:
        raise ValueError(f"bs={bs}; pass a batch size >= 1")
    views = tta_views(run.recipe) if tta else ["original"]
    if tta and len(views) == 1:
        raise ValueError(f"tta: run {run.run_dir} trained without augmentation (augment = false in its recipe.toml, or "
                         f"no recipe.toml), so there is no view the model learned to handle; predict without --tta")
    act = torch.sigmoid if run.multi_label else (lambda z: torch.softmax(z, dim=1))
    out = [torch.empty(0, len(run.classes))]
    with ThreadPoolExecutor(max_workers=4) as pool, torch.inference_mode():  # decoding releases the GIL
        for i in range(0, len(items), bs):
            x = preprocess(list(pool.map(lambda it: load_image(it, run.decode_short_side), items[i:i + bs])), run.card,
                           run.device)
            probs = torch.stack([act(run.model(_view(x, v)).float()) for v in views]).mean(0)
            out.append(probs.cpu())
    return torch.cat(out)


def predict(run, images, topk: int = 3, tta: bool = False, bs: int = 64) -> list[Prediction]:
    "A `Prediction` per image (files, folders, globs or PIL images) of a run from `load_run`."
    if topk < 1:
        raise ValueError(f"topk={topk}; pass the number of classes to show, >= 1")
    items = gather_images(images)
    probs = predict_probs(run, [it for _, it in items], tta=tta, bs=bs)
    top_p, top_i = probs.topk(min(topk, probs.shape[1]), dim=1)
    out = []
    for (src, _), p, tp, ti in zip(items, probs, top_p.tolist(), top_i.tolist()):
        if run.multi_label:
            on = [int(j) for j in torch.nonzero(p >= run.threshold).flatten()]
            labels = tuple(run.classes[j] for j in sorted(on, key=lambda j: -float(p[j])))
        else:
            labels = (run.classes[ti[0]],)
        out.append(Prediction(src, labels, tuple((run.classes[j], float(v)) for j, v in zip(ti, tp))))
    return out


def _write_csv(preds: list[Prediction], path: Path, topk: int) -> Path:
    k = max((len(p.top) for p in preds), default=topk)
    header = ["path", "prediction"] + [f"{w}_{i}" for i in range(1, k + 1) for w in ("class", "prob")]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for p in preds:
                w.writerow([p.source, " ".join(p.labels)] + [x for c, v in p.top for x in (c, f"{v:.6f}")])
    return atomic_write(path, write)


def _display_base(sources: list[str]) -> str | None:
    """The folder the table shows image paths relative to: the parent of the images' deepest common folder (so
    that folder's own name stays in every row), or None for a single image or paths with nothing in common."""
    if len(sources) < 2:
        return None
    try:
        common = os.path.commonpath([os.path.abspath(s) for s in sources])
    except ValueError:  # different drives
        return None
    base = os.path.dirname(common)
    return base if base not in ("", os.sep) else None


def predict_main(run_dir: str | Path, images: Sequence[str], topk: int = 3, bs: int = 64, tta: bool = False,
                 csv_path: str | Path | None = None, device: str | None = None, max_rows: int = 20) -> int:
    "`fastlearn predict`: a table of the top-k classes per image; with `csv_path`, every prediction in a CSV file."
    run = load_run(run_dir, device=device)
    preds = run.predict(images, topk=topk, tta=tta, bs=bs)
    shown = preds if csv_path is None else preds[:max_rows]
    how = [f"multi-label, threshold {run.card.get('threshold')}" if run.multi_label else "softmax"]
    if tta:
        how.append("TTA: " + " + ".join(tta_views(run.recipe)))
    base = _display_base([p.source for p in shown])
    where = f"; images under {base}" if base else ""
    t = Table(title=f"{run.card['arch']} from {run_dir} ({', '.join(how)}){where}")
    t.add_column("image", overflow="fold")
    t.add_column("prediction")
    for i in range(min(topk, len(run.classes))):
        t.add_column(f"top {i + 1}", justify="left")
    for p in shown:
        t.add_row(os.path.relpath(p.source, base) if base else p.source, " ".join(p.labels) or "-", *[f"{c} {v:.3f}" for c, v in p.top])
    c = console()
    c.print(t)
    if csv_path is not None:
        _write_csv(preds, Path(csv_path), topk)
        more = f" ({len(preds) - len(shown)} not shown above)" if len(preds) > len(shown) else ""
        c.print(f"wrote {len(preds)} predictions to {csv_path}{more}")
    return 0


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
        return preprocess([load_image(img, self.decode_short_side) for _, img in gather_images(images)], self.card,
                          self.device)

    @property
    def decode_short_side(self) -> int | None:
        "The short side the run's loader decoded images at (model.json `decode`), None for full-size decoding."
        return (self.card.get("decode") or {}).get("short_side")

    def probs(self, images, tta: bool = False, bs: int = 64) -> torch.Tensor:
        "(N, n_classes) probabilities (softmax, or sigmoid when multi-label) for `images`, on the CPU."
        return predict_probs(self, [img for _, img in gather_images(images)], tta=tta, bs=bs)

    def predict(self, images, topk: int = 3, tta: bool = False, bs: int = 64) -> list:
        "A `Prediction` per image: the predicted label(s) and the `topk` classes with their probabilities."
        return predict(self, images, topk=topk, tta=tta, bs=bs)


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> Run:
    "Rebuild a finished run's model from `model.json` + `model.safetensors` (no pickle), ready to predict."
    run_dir = Path(run_dir)
    card = read_model_card(run_dir)
    weights = run_dir / card["weights"]
    if not weights.exists():
        raise RunFolderError(f"run folder {run_dir} has {MODEL_CARD} but no weights file {card['weights']}: "
                             f"{unfinished_hint(run_dir)}")
    if weights.suffix != ".safetensors":
        raise RunFolderError(f"{weights} is not a .safetensors file; fastlearn loads run weights only as safetensors")
    nets = [create_model(card["arch"], card["n_classes"], pretrained=False) for _ in range(card.get("ensemble") or 1)]
    # more than one: the probe and the fine-tuned network, as the run kept them (recipe key `ensemble`)
    model = Ensemble(nets, multi_label=bool(card.get("multi_label"))) if len(nets) > 1 else nets[0]
    try:
        load_weights(model, weights, strict=True)
    except RuntimeError as e:  # torch's load_state_dict: missing/unexpected keys or shape mismatches
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RunFolderError(f"{weights} does not fit {card['arch']!r} with {card['n_classes']} outputs as "
                             f"{MODEL_CARD} says ({first}); the folder mixes files of different runs") from None
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this torch sees no CUDA device; pass device='cpu' (--device cpu)")
    return Run(run_dir, card, model.to(device).eval(), read_recipe(run_dir), device)
