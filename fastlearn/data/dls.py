"""Image-folder checks and fastai DataLoaders: every data problem is reported before any compute is spent."""

import os
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.torch_core import TensorImage, cast, default_device
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.core import PILImage, PILMask
from fasttransform import Transform
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing

from ..base.errors import DataError
from ..core.models import model_input_size, model_stats
from ..core.targets import set_label_info
from .labels import csv_parts, label_report
from .loader import gpu_decode_block, image_cache_for, ImageDecoder, PersistentDL, read_cpu_max, usable_cpus
from .folders import random_splitter


__all__ = ["image_dls", "default_num_workers"]

IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # used when neither stats nor arch given


def default_num_workers() -> int:
    """DataLoader workers for this machine: 0 on <=2 usable CPUs (`usable_cpus`) or macOS/Windows (spawn is slow),
    else min(8, CPUs-1)."""
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


def _resolve_stats(arch: str | None, mean, std) -> tuple[Sequence[float], Sequence[float]]:
    "Normalisation stats: explicit mean/std win, then the arch's pretrained config, then ImageNet's."
    if (mean is None) != (std is None):
        raise ValueError(f"mean={mean!r}, std={std!r}: pass both or neither (neither uses the arch's or ImageNet's)")
    if mean is not None: return tuple(mean), tuple(std)
    return model_stats(arch) if arch is not None else (IMAGENET_MEAN, IMAGENET_STD)


class _RandomErasing(Transform):
    "timm's RandomErasing as a train-only fastai batch transform on normalised images (labels untouched)."
    order, split_idx = 100, 0  # after Normalize (99): timm's per-pixel normal noise assumes normalised pixels

    def __init__(self, probability: float):
        super().__init__()
        self.probability = probability

    def encodes(self, x: TensorImage):
        return RandomErasing(self.probability, mode="pixel", device=x.device)(x)


# timm's parser silently ignores sections it cannot split ("rand-mabc") and unknown op-set names after "t", and fails
# on others with a bare AssertionError; so each "-" section is checked against what timm 1.0 reads
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
    # after Resize (1), before ToTensor (5): timm's own train order (crop, flip, RandAugment), cheaper on the item size
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


class _Resize(Resize):
    """fastai's `Resize` (crop mode: the largest box of the target's aspect, at a random place on train, centred on
    valid, resized bilinearly), the same pixels in fewer steps: fastai's `crop_pad` also pads every crop that touches
    the image's right or bottom edge (every square image's) by zero pixels, through torchvision and NumPy, which was
    the largest single cost of the digits quickstart's item pipeline. Only images: points and boxes are not used here."""

    def __init__(self, size: int): super().__init__(size)

    def encodes(self, x: Image.Image):
        (w, h), (sw, sh) = x.size, self.size  # fastai keeps the target as (width, height)
        m = min(w / sw, h / sh)
        cw, ch = int(m * sw), int(m * sh)
        left, top = int(self.pcts[0] * (w - cw)), int(self.pcts[1] * (h - ch))
        if (left, top, cw, ch) != (0, 0, w, h):
            x = x.crop((left, top, left + cw, top + ch))
        return x.resize(tuple(self.size), self.mode_mask if isinstance(x, PILMask) else self.mode)


class _CenterResize(_Resize):
    "Resize that centre-crops on train too (fastai's Resize crops at a random place on train)."

    def before_call(self, b, split_idx: int): super().before_call(b, split_idx=1)


def image_dls(path: str | Path,
              size: int | None = 224,  # training/validation image side in pixels; None -> the arch's input size
              bs: int = 64,
              valid_pct: float = 0.2,  # only for the flat layout
              seed: int = 42,  # split and shuffle order
              arch: str | None = None,  # timm name, for normalisation stats and default size
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              augment: bool = True, flip: bool = True,
              max_rotate: float = 10.,  # degrees
              max_zoom: float = 1.1, max_lighting: float = 0.2,
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
        size = model_input_size(arch)
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
        splitter, label = random_splitter(valid_pct, seed), _ClassFolderLabel(report.root, 0)
        n_valid = int(valid_pct * report.n_images)  # the cut fastai's RandomSplitter makes
        if n_valid == 0:
            raise DataError(f"valid_pct={valid_pct} of {report.n_images} images in {report.root} leaves no validation "
                            f"image; add images or raise valid_pct")
    n_train = report.n_images - n_valid
    if bs > n_train:  # fastai drops the last partial training batch, so fit() would silently do nothing
        raise DataError(f"bs={bs} is larger than the {n_train} training images in {report.root}, so no full batch "
                        f"can be drawn; pass bs <= {n_train} or add images")

    mean, std = _resolve_stats(arch, mean, std)
    item_side = item_size or size
    if augment:
        item_tfms = [_Resize(item_side)]  # random crop on train, centre crop on valid
        batch_tfms = aug_transforms(size=size, do_flip=flip, max_rotate=max_rotate, max_zoom=max_zoom,
                                    max_lighting=max_lighting, min_scale=min_scale)
    else:
        item_tfms, batch_tfms = [_CenterResize(size)], []  # item_size is only for presizing before augmentation
    if rand_augment is not None: item_tfms.append(_RandAugment(rand_augment, item_side, mean))
    batch_tfms.append(Normalize.from_stats(mean, std, cuda=False))  # DataLoaders moves it to `device`
    if random_erasing > 0: batch_tfms.append(_RandomErasing(random_erasing))

    workers = default_num_workers() if num_workers is None else num_workers
    target = torch.device(device) if device is not None else default_device()
    if decode != "cpu":  # the workers only read the files; decode, resize and crop run on the device
        images, item_tfms, extra = gpu_decode_block(decode, target, item_side if augment else size, rand_augment)
        cache = None
    else:
        cache, extra = image_cache_for(report.files, item_side, cache_images), {}
        images = TransformBlock(type_tfms=ImageDecoder(item_side, cache), batch_tfms=IntToFloatTensor)
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
