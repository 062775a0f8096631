"""Image folders: the layout (train/ + valid/, or class folders split at random), the classes, and that every
image decodes, checked before any compute is spent."""
from __future__ import annotations

import mimetypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..base.errors import CorruptImageError, DataError, EmptyClassError, SingleClassError


__all__ = ["FolderReport", "check_image_folder", "IMAGE_SUFFIXES", "VALID_NAMES", "BAD_IMAGES", "MAX_LISTED",
           "walk_files", "decode_problem", "decode_problems", "bad_listing", "random_splitter"]

VALID_NAMES = ("valid", "val", "validation")  # the validation split's folder name next to train/
_LAYOUT_HINT = ("expected class subfolders: <folder>/train/<class>/*.jpg with <folder>/valid/<class>/*.jpg "
                "(or val/, validation/), or <folder>/<class>/*.jpg for a random split")
BAD_IMAGES = ("error", "skip")
MAX_LISTED = 10  # bad paths spelled out in an error message; all of them are on `.paths`


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


def walk_files(folder: Path) -> list[Path]:
    "All non-hidden files under `folder`, recursively (like torchvision's ImageFolder)."
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return out


def decode_problem(path: Path) -> str | None:
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


def decode_problems(paths: Sequence[Path]) -> list[str | None]:
    "`decode_problem` of each path, on threads: decoding is I/O and C code that releases the GIL."
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        return list(pool.map(decode_problem, paths))


def bad_listing(bad: Sequence[tuple[Path, str]]) -> str:
    "The first `MAX_LISTED` undecodable files with why, one per line, for an error message."
    more = f"\n  ... and {len(bad) - MAX_LISTED} more (see .paths)" if len(bad) > MAX_LISTED else ""
    return "\n".join(f"  {p} ({why})" for p, why in bad[:MAX_LISTED]) + more


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
    if bad_images not in BAD_IMAGES:
        raise ValueError(f"bad_images={bad_images!r}; use one of {', '.join(map(repr, BAD_IMAGES))}")
    root = Path(path).expanduser()
    if not root.exists(): raise DataError(f"data folder {root} does not exist; {_LAYOUT_HINT}")
    if not root.is_dir(): raise DataError(f"data folder {root} is not a directory; {_LAYOUT_HINT}")
    layout, split_dirs, valid_name = _find_layout(root)

    # split -> class -> its files (any suffix)
    listing = {split: {c.name: walk_files(c) for c in _visible_dirs(d)} for split, d in split_dirs.items()}
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

    problems = decode_problems([p for _, _, p in candidates])
    bad = sorted((p, why) for (_, _, p), why in zip(candidates, problems) if why is not None)
    if bad and bad_images == "error":
        raise CorruptImageError(f"{len(bad)} file(s) under {root} cannot be decoded as images:\n{bad_listing(bad)}\n"
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


def random_splitter(valid_pct: float, seed: int):
    "Seeded random split like fastai's RandomSplitter, but with a private generator: fastai's reseeds torch globally."
    def _inner(items: Sequence[Path]):
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = int(valid_pct * len(items))
        return sorted(perm[cut:]), sorted(perm[:cut])
    return _inner
