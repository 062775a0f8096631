"""Image-folder checks and fastai DataLoaders: every data problem is reported before any compute is spent."""

import mimetypes
import os
import random
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.torch_core import TensorImage, cast, default_device
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.core import PILImage
from fasttransform import Transform
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing

from .errors import CorruptImageError, DataError, EmptyClassError, SingleClassError

__all__ = ["FolderReport", "check_image_folder", "image_dls", "default_num_workers", "IMAGE_SUFFIXES", "label_info"]

IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # used when neither stats nor arch given
VALID_NAMES = ("valid", "val", "validation")  # the validation split's folder name next to train/
_LAYOUT_HINT = ("expected class subfolders: <folder>/train/<class>/*.jpg with <folder>/valid/<class>/*.jpg "
                "(or val/, validation/), or <folder>/<class>/*.jpg for a random split")
_BAD_IMAGES = ("error", "skip")
_MAX_LISTED = 10  # bad paths spelled out in an error message; all of them are on `.paths`


def _image_suffixes() -> frozenset[str]:
    "Suffixes that are images (mimetypes) and that Pillow can decode, so a file we keep is one fastai can open."
    Image.init()
    by_mime = {k for k, v in mimetypes.types_map.items() if v.startswith("image/")} | {".webp", ".jfif"}
    decodable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset(by_mime & decodable - {".emf", ".wmf"})  # Pillow decodes these only on Windows


IMAGE_SUFFIXES = _image_suffixes()


@dataclass(frozen=True)
class FolderReport:
    "What `check_image_folder` found: layout, classes, per-split counts, and the files kept or skipped."
    root: Path
    layout: str  # "train_valid" or "flat"
    classes: tuple[str, ...]  # sorted, the order of fastai's vocab
    counts: dict[str, dict[str, int]]  # split ("train"/"valid", or "all" when flat) -> class -> good images
    n_images: int  # good images in all splits
    skipped: tuple[Path, ...] = ()  # undecodable files left out (bad_images="skip")
    n_ignored: int = 0  # files without an image suffix (e.g. .txt, .csv), left out
    valid_name: str | None = None  # "valid" or "val" for the train_valid layout
    files: tuple[Path, ...] = field(default=(), repr=False)  # the good images, sorted

    def n_train(self, valid_pct: float = 0.2) -> int:
        "Training images: the train/ split, or what a `valid_pct` random split of a flat folder leaves."
        if self.layout == "train_valid":
            return sum(self.counts["train"].values())
        return self.n_images - int(valid_pct * self.n_images)

    def summary(self) -> str:
        "One line for logs: classes, images per split, skipped and ignored files."
        splits = ", ".join(f"{s} {sum(c.values())}" for s, c in self.counts.items())
        extra = f"; skipped {len(self.skipped)} bad file(s)" if self.skipped else ""
        extra += f"; ignored {self.n_ignored} non-image file(s)" if self.n_ignored else ""
        return f"{self.root}: {len(self.classes)} classes, {self.n_images} images ({splits}){extra}"


def _visible_dirs(path: Path) -> list[Path]:
    "Subfolders of `path`, without hidden ones (.ipynb_checkpoints, .git)."
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _walk_files(folder: Path) -> list[Path]:
    "All non-hidden files under `folder`, recursively (like torchvision's ImageFolder)."
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return out


def _decode_problem(path: Path) -> str | None:
    "Why `path` cannot be used as an image (zero bytes, truncated, not an image...), or None when it decodes."
    try:
        if path.stat().st_size == 0: return "zero bytes"
        with Image.open(path) as im:
            # JPEG draft decodes at 1/8 scale: the whole bitstream is still read, so truncation is still caught
            if im.format == "JPEG": im.draft("RGB", (64, 64))
            im.load()  # full decode; truncation raises because LOAD_TRUNCATED_IMAGES stays False
        return None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError... per codec
        return f"{type(e).__name__}: {e}"


def _split_classes(split_dir: Path) -> dict[str, list[Path]]:
    "Class name -> files (any suffix) under each class subfolder of `split_dir`."
    return {d.name: _walk_files(d) for d in _visible_dirs(split_dir)}


def _find_layout(root: Path) -> tuple[str, dict[str, Path], str | None]:
    "Layout name, split name -> folder, and the valid folder's name; raises DataError on an ambiguous layout."
    train = root / "train"
    if not train.is_dir(): return "flat", {"all": root}, None
    valids = [n for n in VALID_NAMES if (root / n).is_dir()]
    if not valids:
        raise DataError(f"data folder {root} has train/ but no valid/, val/ or validation/ folder; add one with the "
                        f"same class subfolders, or pass {train} itself to split it at random")
    if len(valids) > 1:
        raise DataError(f"data folder {root} has {' and '.join(n + '/' for n in valids)}; keep one of them as the "
                        f"validation split")
    return "train_valid", {"train": train, "valid": root / valids[0]}, valids[0]


def check_image_folder(path: str | Path, bad_images: str = "error") -> FolderReport:
    "Validate a folder of class subfolders before training: layout, classes, and that every image decodes."
    if bad_images not in _BAD_IMAGES:
        raise ValueError(f"bad_images={bad_images!r}; use one of {', '.join(map(repr, _BAD_IMAGES))}")
    root = Path(path).expanduser()
    if not root.exists(): raise DataError(f"data folder {root} does not exist; {_LAYOUT_HINT}")
    if not root.is_dir(): raise DataError(f"data folder {root} is not a directory; {_LAYOUT_HINT}")
    layout, split_dirs, valid_name = _find_layout(root)

    listing = {split: _split_classes(d) for split, d in split_dirs.items()}
    if layout == "flat" and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in listing["all"].get("models", [])):
        listing["all"].pop("models", None)  # fastai's Learner saves weights to <path>/models; not a class
    for split, d in split_dirs.items():
        if not listing[split]:
            loose = sum(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir() if p.is_file())
            found = f" (found {loose} image(s) directly in it, which belong in class subfolders)" if loose else ""
            raise DataError(f"data folder {d} has no class subfolders{found}; {_LAYOUT_HINT}")

    candidates, n_ignored = [], 0
    for split, classes in listing.items():
        for cls, files in classes.items():
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            n_ignored += len(files) - len(images)
            candidates += [(split, cls, p) for p in images]
    if not candidates:
        raise DataError(f"data folder {root} holds no image files (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}); "
                        f"{_LAYOUT_HINT}")

    # decoding is I/O and C code that releases the GIL, so threads give a near-linear speed-up
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        problems = list(pool.map(_decode_problem, [p for _, _, p in candidates]))
    bad = sorted((p, why) for (_, _, p), why in zip(candidates, problems) if why is not None)
    if bad and bad_images == "error":
        listed = "\n".join(f"  {p} ({why})" for p, why in bad[:_MAX_LISTED])
        more = f"\n  ... and {len(bad) - _MAX_LISTED} more (see .paths)" if len(bad) > _MAX_LISTED else ""
        raise CorruptImageError(f"{len(bad)} file(s) under {root} cannot be decoded as images:\n{listed}{more}\n"
                                f"delete or replace them, or pass bad_images='skip' to train without them",
                                paths=[p for p, _ in bad])

    good = [(s, c, p) for (s, c, p), why in zip(candidates, problems) if why is None]
    counts = {split: {cls: 0 for cls in classes} for split, classes in listing.items()}
    for split, cls, _ in good: counts[split][cls] += 1
    empty = [split_dirs[s] / c for s, cs in counts.items() for c, n in cs.items() if n == 0]
    if empty:
        why = " after skipping bad files" if bad else ""
        raise EmptyClassError(f"{len(empty)} class folder(s) hold no usable image{why}: "
                              f"{', '.join(map(str, empty))}; add images or remove the folder(s)")
    if layout == "train_valid":
        unknown = sorted(set(counts["valid"]) - set(counts["train"]))
        if unknown:
            raise DataError(f"{split_dirs['valid']} has class folder(s) {unknown} that {split_dirs['train']} lacks; "
                            f"the model can only learn classes it trains on: add them to train/ or remove them")
    classes = tuple(sorted(counts["train"] if layout == "train_valid" else counts["all"]))
    if len(classes) < 2:
        raise SingleClassError(f"data folder {root} has one class {list(classes)}; classification needs at least two "
                               f"class subfolders")
    return FolderReport(root=root, layout=layout, classes=classes, counts=counts, n_images=len(good),
                        skipped=tuple(p for p, _ in bad), n_ignored=n_ignored, valid_name=valid_name,
                        files=tuple(sorted(p for _, _, p in good)))


def default_num_workers() -> int:
    """DataLoader workers for this machine: 0 on <=2 usable CPUs or macOS/Windows (spawn is slow), else
    min(8, CPUs-1); usable CPUs are the affinity mask's, capped by the cgroup CPU quota (fastlearn.loader)."""
    from .loader import read_cpu_max, usable_cpus
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = usable_cpus(affinity, read_cpu_max())
    if cores <= 2 or sys.platform in ("darwin", "win32"): return 0
    return min(8, cores - 1)


class _ClassFolderLabel:
    "Label of an image: the class folder it sits in, at any depth below it (picklable, for `Learner.export`)."

    def __init__(self, root: Path, depth: int):
        self.root, self.depth = root, depth  # depth 1 under train/valid, 0 when flat
        self.__name__ = "class_folder_label"  # else fasttransform wraps it in a local, unpicklable function

    def __call__(self, p: Path) -> str: return Path(p).relative_to(self.root).parts[self.depth]


def _folder_splitter(root: Path, valid_name: str):
    "Split items by their top folder: train/ vs valid/ (fastai's GrandparentSplitter needs images one level deep)."
    def _inner(items: Sequence[Path]):
        tops = [Path(p).relative_to(root).parts[0] for p in items]
        return [i for i, t in enumerate(tops) if t != valid_name], [i for i, t in enumerate(tops) if t == valid_name]
    return _inner


def _random_splitter(valid_pct: float, seed: int):
    "Seeded random split like fastai's RandomSplitter, but with a private generator: fastai's reseeds torch globally."
    def _inner(items: Sequence[Path]):
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = int(valid_pct * len(items))
        return sorted(perm[cut:]), sorted(perm[:cut])
    return _inner


def _resolve_stats(arch: str | None, mean, std) -> tuple[Sequence[float], Sequence[float]]:
    "Normalisation stats: explicit mean/std win, then the arch's pretrained config, then ImageNet's."
    if (mean is None) != (std is None):
        raise ValueError(f"mean={mean!r}, std={std!r}: pass both or neither (neither uses the arch's or ImageNet's)")
    if mean is not None: return tuple(mean), tuple(std)
    if arch is not None:
        from .models import model_stats  # lazy: models pulls in timm's registry
        return model_stats(arch)
    return IMAGENET_MEAN, IMAGENET_STD


class _RandomErasing(Transform):
    "timm's RandomErasing as a train-only fastai batch transform on normalised images (labels untouched)."
    order, split_idx = 100, 0  # after Normalize (99): timm's per-pixel normal noise assumes normalised pixels

    def __init__(self, probability: float):
        super().__init__()
        self.probability = probability

    def encodes(self, x: TensorImage):
        return RandomErasing(self.probability, mode="pixel", device=x.device)(x)


# timm's parser skips sections it cannot split ("rand-mabc" silently means the defaults) and fails on others with a
# bare AssertionError, and an unknown op-set name after "t" silently means the default set; so we check each "-"
# section against what timm 1.0 reads: m, n, p, mstd, mmax, inc with a number, or tweights / t3aw / t3a
_RAND_AUGMENT_SECTION = re.compile(r"(?:(?:mstd|mmax|inc|m|n|p)\d+(?:\.\d+)?|t(?:weights|3aw|3a))")
_RAND_AUGMENT_HINT = "use timm's format 'rand-<key><value>-...', e.g. 'rand-m9-mstd0.5' (keys m, n, p, mstd, mmax, inc, t)"


def _check_rand_augment(config: str) -> None:
    "Raise ValueError naming `config` unless it is a timm RandAugment config string timm reads fully."
    parts = config.split("-") if isinstance(config, str) else []
    bad = [p for p in parts[1:] if not _RAND_AUGMENT_SECTION.fullmatch(p)]
    if not parts or parts[0] != "rand" or bad:
        why = f"unknown section(s) {bad}" if parts and parts[0] == "rand" else "it must start with 'rand'"
        raise ValueError(f"rand_augment={config!r}: {why}; {_RAND_AUGMENT_HINT}")


class _RandAugment(Transform):
    "timm's RandAugment as a train-only fastai item transform on PIL images."
    # After Resize (order 1) and before ToTensor (order 5): like timm's own train pipeline (crop, flip, then
    # RandAugment), and cheaper, since the ops run on the item-size image rather than the full-size file.
    order, split_idx = 2, 0

    def __init__(self, config: str, size: int, mean: Sequence[float]):
        super().__init__()
        _check_rand_augment(config)
        # hparams as timm's create_transform sets them: translation relative to the image, fill = mean colour
        hparams = dict(translate_const=int(size * 0.45), img_mean=tuple(round(255 * m) for m in mean))
        try:
            self.config, self.tfm = config, rand_augment_transform(config, hparams)  # a picklable timm object
        except (AssertionError, ValueError, KeyError) as e:  # e.g. an unknown op name after 't'
            raise ValueError(f"rand_augment={config!r}: timm rejected it ({type(e).__name__}: {e}); "
                             f"{_RAND_AUGMENT_HINT}") from e

    def encodes(self, x: PILImage): return cast(self.tfm(x), type(x))


class _CenterResize(Resize):
    "Resize that centre-crops on train too (fastai's Resize crops at a random place on train)."

    def before_call(self, b, split_idx: int): super().before_call(b, split_idx=1)


def image_dls(path: str | Path,
              size: int | None = 224,  # training/validation image side in pixels; None -> the arch's input size
              bs: int = 64,
              valid_pct: float = 0.2,  # only for the flat layout
              seed: int = 42,  # split and shuffle order
              arch: str | None = None,  # timm name, for normalisation stats and default size
              mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None,
              augment: bool = True,
              flip: bool = True,
              max_rotate: float = 10.,  # degrees
              max_zoom: float = 1.1,
              max_lighting: float = 0.2,
              min_scale: float = 1.0,  # <1 adds a RandomResizedCrop keeping at least this fraction of the area
              item_size: int | None = None,  # per-item resize before batch augmentation (presizing); default size
              bad_images: str = "error",  # "error" or "skip"
              num_workers: int | None = None,  # None -> default_num_workers()
              device: torch.device | str | int | None = None,  # None -> fastai's default device
              random_erasing: float = 0.0,  # probability per training image
              rand_augment: str | None = None,  # timm RandAugment config on training items, e.g. "rand-m9-mstd0.5"
              report=None,  # `check_image_folder(path)`'s (or `labels.label_report`'s) result, if already computed
              multi_label: bool = False,  # CSV only: space-separated labels per image (fastlearn/labels.py)
              threshold: float = 0.5,  # multi-label: sigmoid threshold of a predicted class
              cache_images: bool | str = "auto",  # decoded images in RAM: "auto" (when they fit), True, False
              decode: str = "cpu",  # "cpu": Pillow in the workers; "cuda": nvJPEG on the device (JPEG files only)
              **csv_args,  # CSV only: fn_col, label_col, valid_col, folder (see fastlearn.labels.check_csv)
              ) -> DataLoaders:
    """fastai DataLoaders for a folder of class subfolders (checked first by `check_image_folder`), or for a
    CSV of file names and labels: a .csv path or a folder holding labels.csv (checked by `labels.check_csv`)."""
    if not 0 < valid_pct < 1: raise ValueError(f"valid_pct={valid_pct}; use a fraction in (0, 1), e.g. 0.2")
    if not 0 <= random_erasing <= 1: raise ValueError(f"random_erasing={random_erasing}; use a probability in [0, 1]")
    if rand_augment is not None: _check_rand_augment(rand_augment)  # before the folder is scanned
    if size is None:
        if arch is None: raise ValueError("size=None needs arch= to look up the model's input size; or pass size=224")
        from .models import model_input_size
        size = model_input_size(arch)
    from .labels import csv_parts, label_report, set_label_info
    if report is None:
        report = label_report(path, bad_images=bad_images, valid_pct=valid_pct, seed=seed, multi_label=multi_label,
                              threshold=threshold, **csv_args)
    y_block = CategoryBlock
    if report.skipped:
        warnings.warn(f"skipping {len(report.skipped)} undecodable file(s) under {report.root}, "
                      f"e.g. {report.skipped[0]}", stacklevel=2)
    if report.layout == "train_valid":
        splitter, label = _folder_splitter(report.root, report.valid_name), _ClassFolderLabel(report.root, 1)
        n_valid = sum(report.counts["valid"].values())
    elif report.layout == "csv":
        label, splitter, y_block = csv_parts(report)
        n_valid = len(report.valid_files)
    else:
        splitter, label = _random_splitter(valid_pct, seed), _ClassFolderLabel(report.root, 0)
        n_valid = int(valid_pct * report.n_images)  # the cut fastai's RandomSplitter makes
        if n_valid == 0:
            raise DataError(f"valid_pct={valid_pct} of {report.n_images} images in {report.root} leaves no validation "
                            f"image; add images or raise valid_pct")
    n_train = report.n_images - n_valid
    if bs > n_train:  # fastai drops the last partial training batch, so fit() would silently do nothing
        raise DataError(f"bs={bs} is larger than the {n_train} training images in {report.root}, so no full batch "
                        f"can be drawn; pass bs <= {n_train} or add images")

    mean, std = _resolve_stats(arch, mean, std)
    batch_tfms = []
    if augment:
        item_tfms = Resize(item_size or size)  # random crop on train, centre crop on valid
        batch_tfms += aug_transforms(size=size, do_flip=flip, max_rotate=max_rotate, max_zoom=max_zoom,
                                     max_lighting=max_lighting, min_scale=min_scale)
    else:
        item_tfms = _CenterResize(size)  # item_size is only for presizing before augmentation
    item_tfms = [item_tfms]
    if rand_augment is not None: item_tfms.append(_RandAugment(rand_augment, item_size or size, mean))
    batch_tfms.append(Normalize.from_stats(mean, std, cuda=False))  # DataLoaders moves it to `device`
    if random_erasing > 0: batch_tfms.append(_RandomErasing(random_erasing))

    workers = default_num_workers() if num_workers is None else num_workers
    target = torch.device(device) if device is not None else default_device()
    # --- loader (fastlearn/loader.py): decode once at the size the run needs, workers that live for the run ---
    from .loader import ImageDecoder, PersistentDL, image_cache_for, gpu_decode_block
    extra = {}
    if decode != "cpu":  # the workers only read the files; decode, resize and crop run on the device
        images, item_tfms, extra = gpu_decode_block(decode, target, (item_size or size) if augment else size,
                                                      rand_augment)
        cache = None
    else:
        cache = image_cache_for(report.files, item_size or size, cache_images)
        images = TransformBlock(type_tfms=ImageDecoder(item_size or size, cache), batch_tfms=IntToFloatTensor)
    # --- end loader ---
    block = DataBlock(blocks=(images, y_block), get_items=lambda _: list(report.files), get_y=label,
                      splitter=splitter, item_tfms=item_tfms, batch_tfms=batch_tfms)
    dls = block.dataloaders(report.root, path=report.root, bs=bs, device=device, num_workers=workers,
                            pin_memory=target.type == "cuda", dl_type=PersistentDL, persistent=True,
                            image_cache=cache, **extra)
    # fastai seeds each DataLoader's shuffle rng from the global `random`; seed it so the order follows `seed`
    dls.train.rng = random.Random(seed)
    dls.folder_report = report
    set_label_info(dls, multi_label, threshold)
    dls.image_cache = cache  # None when off
    return dls


def label_info(dls) -> dict:
    "{'multi_label', 'threshold', 'classes'} of DataLoaders: what a model trained on them predicts (fastlearn.labels)."
    from .labels import label_info as info
    return info(dls)

