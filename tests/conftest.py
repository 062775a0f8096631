"""Shared tiny fixtures: synthetic image data as fastai DataLoaders, deterministic settings."""
import random

import numpy as np
import pytest
import torch
import fastlearn.base.fastai_quiet  # noqa: F401  (first: fastai without torch's torch.jit.script FutureWarning)
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
from fastai.data.core import DataLoaders


needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device (run on a GPU machine)")]


def make_blobs(n: int = 96, c: int = 3, size: int = 32, seed: int = 0):
    "n images of `c` separable classes: each class a different mean colour plus noise."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    for k in range(c):
        x[y == k, k % 3] += 1.5 * (1 + k // 3)
    return x, y


def synthetic_dls(n: int = 96, c: int = 3, size: int = 32, bs: int = 16, seed: int = 0,
                  device: str = "cpu") -> DataLoaders:
    "fastai DataLoaders over tensors (no files), shuffled with a fixed seed, with a `c` attribute."
    x, y = make_blobs(n, c, size, seed)
    nv = n // 4
    train = list(zip(x[nv:], y[nv:]))
    valid = list(zip(x[:nv], y[:nv]))
    dls = DataLoaders.from_dsets(train, valid, bs=bs, shuffle=True, device=device, num_workers=0)
    dls.c = c
    dls.train.rng.seed(seed)
    return dls


# Tiny models: one intra-op thread beats two (thread start-up dominates); also keeps parallel CI steady.
torch.set_num_threads(1)


@pytest.fixture
def seeded():
    random.seed(0); np.random.seed(0); torch.manual_seed(0)
    yield


@pytest.fixture
def dls():
    return synthetic_dls()


def write_image_folder(root, n_per_class: int = 16, classes=("a", "b", "c"), size: int = 32, valid: int = 4,
                       seed: int = 0, width: int | None = None):
    "A tiny train/ + valid/ folder of PNGs (size x width, default square) whose classes differ by colour."
    from pathlib import Path
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(root)
    for k, c in enumerate(classes):
        for split, n in (("train", n_per_class), ("valid", valid)):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (size, width or size, 3), dtype=np.uint8)
                a[..., k % 3] += 160
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"))


COLOURS = ("red", "green", "blue")


def write_csv_dataset(root, n: int = 48, multi_label: bool = False, size: int = 32, seed: int = 0,
                      is_valid: bool = False, folder: str = "images", columns=("filename", "label")):
    """Images in `root/folder` and `root/labels.csv` (file name relative to root, label). Single-label: one
    colour per image (class = its colour, image i has colour i % 3). Multi-label: 2 of the 3 colours in every
    third image, else 1, one band each on dark noise, labels space-separated (each label in ~4/9 of the
    images). `is_valid`: every fourth row is a validation row."""
    import csv
    from pathlib import Path
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        present = sorted(rng.choice(3, size=1 + (i % 3 == 0), replace=False).tolist()) if multi_label else [i % 3]
        a = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
        band = size // len(present)
        for j, c in enumerate(present):
            a[j * band:(j + 1) * band, :, c] += 180
        Image.fromarray(a).save(root / folder / f"{i}.png")
        row = [f"{folder}/{i}.png", " ".join(COLOURS[c] for c in present)]
        rows.append(row + (["true" if i % 4 == 0 else "false"] if is_valid else []))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(columns) + (["is_valid"] if is_valid else []))
        w.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished tiny run (timm test_resnet at 32 px, three colour classes, 40x52 images so the validation crop
    matters): (learn, recipe, run_dir). Shared by the run-folder, predict, export and interpret tests."""
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
    root = write_image_folder(tmp_path_factory.mktemp("run_imgs"), n_per_class=8, size=40, width=52)
    learn, r = learner_from_recipe(root, "transfer", {"arch": "test_resnet", "pretrained": False, "size": 32, "bs": 8,
                                                       "lr": 3e-3, "head_epochs": 1, "unfreeze_epochs": 0,
                                                       "epochs": 1, "num_workers": 0}, progress=False)
    run_dir = tmp_path_factory.mktemp("run") / "run"
    run_recipe(learn, r, run_dir=run_dir)
    return learn, r, run_dir
