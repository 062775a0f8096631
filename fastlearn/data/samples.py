"""Bundled offline samples, written once as image-folder datasets so every recipe can run without a download."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

__all__ = ["SAMPLES", "sample", "is_sample_name", "samples_root"]

_MARKER = ".fastlearn-complete"  # written last inside the temp folder; its presence means the dataset is whole
_STALE_TMP_S = 3600  # seconds: older temp folders are from killed writes


def samples_root() -> Path:
    "Where samples are cached: `$FASTLEARN_HOME/samples`, else `~/.cache/fastlearn/samples`."
    home = os.environ.get("FASTLEARN_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "fastlearn") / "samples"


def _write_digits(dest: Path) -> int:
    "Write scikit-learn's 1,797 8x8 digits as 32x32 grayscale PNGs under `dest/{train,valid}/<digit>/<i>.png`."
    # lazy: heavy (scikit-learn's datasets and model selection), only to build the digits sample once
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # 0..16 -> 0..255
    idx = np.arange(len(pixels))
    train_idx, valid_idx = train_test_split(idx, test_size=0.2, random_state=0, stratify=digits.target)
    for split, split_idx in (("train", train_idx), ("valid", valid_idx)):
        for cls in range(10):
            (dest / split / str(cls)).mkdir(parents=True, exist_ok=True)
        for i in split_idx:
            # bilinear: a smooth 32x32 digit suits pretrained convnets better than nearest's 4x4 blocks
            img = Image.fromarray(pixels[i]).resize((32, 32), Image.Resampling.BILINEAR)
            img.save(dest / split / str(digits.target[i]) / f"{i}.png")
    return len(pixels)


SAMPLES: dict[str, Callable[[Path], int]] = {  # name -> builder writing the dataset into a folder, returning its count
    "digits": _write_digits,
}


def is_sample_name(s: object) -> bool:
    "True when `s` names a bundled sample (so `--data digits` means the sample, not a folder)."
    return isinstance(s, str) and s in SAMPLES


def _is_complete(dest: Path) -> bool:
    "True when `dest` holds a finished sample: its marker exists and records a positive image count."
    try:
        return json.loads((dest / _MARKER).read_text()).get("n_images", 0) > 0
    except (OSError, ValueError, AttributeError):
        return False


def sample(name: str = "digits", root: str | Path | None = None) -> Path:
    "Path of the bundled sample `name` as an image folder (train/ + valid/), building it once on first use."
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; known samples: {', '.join(sorted(SAMPLES))}")
    root = Path(root).expanduser() if root is not None else samples_root()
    dest = root / name
    if _is_complete(dest): return dest
    root.mkdir(parents=True, exist_ok=True)
    for tmp in root.glob(f".{name}.tmp-*"):  # remove those of killed writes: old enough that no live writer owns them
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_S: shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
    # build beside `dest` (same filesystem) so os.replace is atomic: readers see no dataset or a whole one
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        n = SAMPLES[name](tmp)
        (tmp / _MARKER).write_text(json.dumps({"name": name, "n_images": n}))
        if dest.exists() and not _is_complete(dest):
            shutil.rmtree(dest)  # an unmarked folder is not ours to trust (e.g. copied in by hand, half-deleted)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _is_complete(dest): raise  # otherwise a concurrent call finished first; use its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
