"""The data pipeline alone: JPEG decode + resize + augment, images/s by DataLoader worker count, on a folder of
photo-sized JPEGs the bench writes itself (no download). Set beside the training step rate to see whether the
loader keeps the accelerator fed; with CUDA, also GPU decoding (recipe `decode="cuda"`: nvJPEG on the device).

What is timed: `fastlearn.data.image_dls` (the loader `fastlearn train` builds: Pillow decode at a reduced DCT scale,
resize, random crop in the workers; flip/rotate/zoom/lighting and normalisation as batch transforms on `--device`),
its training loader iterated over one epoch after a warm-up epoch (the persistent workers are started by then), the
image cache off (every epoch decodes every file, as a dataset too big for RAM does). images/s = images / wall s.

    python bench/loader.py [--n 3000] [--workers 0,1,2,4,8] [--size 224] [--bs 64] [--device cpu|cuda]
    python bench/loader.py --step-rate 3100   # the GPU bench's training images/s, for the comparison line
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

PHOTO = (500, 375)  # px (w, h): about the median ImageNet training image


def _write_one(args) -> int:
    "One JPEG: smooth colour fields plus noise (so it compresses like a photo, ~40-80 KB at quality 90)."
    from PIL import Image
    path, seed, (w, h) = args
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    a = np.asarray(im, dtype=np.int16) + rng.integers(-20, 20, (h, w, 3), dtype=np.int16)
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def write_jpegs(root: Path, n: int, classes: int = 4, size=PHOTO, valid_frac: float = 0.1, procs: int | None = None) -> int:
    "`n` JPEGs in root/train/<class>/ and root/valid/<class>/; returns the bytes written."
    jobs = []
    for i in range(n):
        split = "valid" if i % round(1 / valid_frac) == 0 else "train"
        d = root / split / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d / f"{i}.jpg", i, size))
    with ProcessPoolExecutor(max_workers=procs or max(1, (os.cpu_count() or 2) - 1)) as pool:
        return sum(pool.map(_write_one, jobs, chunksize=32))


def loader_rate(root: Path, workers: int, size: int, bs: int, device: str, decode: str = "cpu",
                epochs: int = 1) -> float:
    "Training images/s of `image_dls(root)` with `workers` workers, after a warm-up epoch."
    from fastlearn.data.dls import image_dls
    dls = image_dls(root, size=size, bs=bs, num_workers=workers, device=device, cache_images=False, decode=decode,
                    seed=0)
    dl = dls.train
    sync = (lambda: torch.cuda.synchronize()) if torch.device(device).type == "cuda" else (lambda: None)
    for _ in dl:  # warm-up: workers start, first-call costs
        pass
    sync()
    t0, n = time.perf_counter(), 0
    for _ in range(epochs):
        for xb, _ in dl:
            n += len(xb)
    sync()
    secs = time.perf_counter() - t0
    if hasattr(dl, "close"):
        dl.close()
    return n / secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="JPEGs to write")
    ap.add_argument("--workers", default=None, help="comma-separated worker counts (default 0,1,2,4,... up to the CPUs)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the batch transforms run (the training device)")
    ap.add_argument("--step-rate", type=float, default=None, help="training images/s to compare the loader with")
    ap.add_argument("--dir", default=None, help="write the JPEGs here (kept) instead of a temporary folder")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import fastlearn
    from fastlearn.data.loader import read_cpu_max, usable_cpus
    cpus = usable_cpus(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                       read_cpu_max())
    counts = ([int(w) for w in a.workers.split(",")] if a.workers
              else sorted({0, 1, 2, *[2 ** k for k in range(2, 5) if 2 ** k < cpus], max(1, cpus - 1)}))
    tmp = None if a.dir else tempfile.TemporaryDirectory(prefix="fastlearn-loader-")
    root = Path(a.dir or tmp.name)
    print(f"fastlearn {fastlearn.__version__} from {os.path.dirname(fastlearn.__file__)}; torch {torch.__version__}; "
          f"{cpus} usable CPUs; device {a.device}")
    t = time.perf_counter()
    nbytes = write_jpegs(root, a.n) if not any(root.glob("train/*/*.jpg")) else 0
    n_train = sum(1 for _ in root.glob("train/*/*.jpg"))
    print(f"{a.n} JPEGs {PHOTO[0]}x{PHOTO[1]} written in {time.perf_counter() - t:.1f}s "
          f"({nbytes / max(1, a.n) / 1e3:.0f} KB each) to {root}; {n_train} train images, bs {a.bs}, {a.size} px\n")
    print(f"{'decode':<8}{'workers':>8}{'images/s':>10}{'per worker':>12}")
    rates = {}
    for w in counts:
        r = loader_rate(root, w, a.size, a.bs, a.device)
        rates[("cpu", w)] = r
        print(f"{'cpu':<8}{w:>8}{r:>10.0f}{r / max(1, w):>12.0f}", flush=True)
    if torch.cuda.is_available() and torch.device(a.device).type == "cuda":
        for w in (0, min(4, max(counts))):
            r = loader_rate(root, w, a.size, a.bs, a.device, decode="cuda")
            rates[("cuda", w)] = r
            print(f"{'cuda':<8}{w:>8}{r:>10.0f}{'':>12}", flush=True)
    else:
        print("cuda decode: skipped (no CUDA device; decode='cuda' needs one)")
    best = max(rates, key=rates.get)
    print(f"\nbest: {rates[best]:.0f} images/s ({best[0]} decode, {best[1]} workers)")
    if a.step_rate:
        print(f"training step rate {a.step_rate:.0f} images/s: loader / step = {rates[best] / a.step_rate:.2f} "
              f"({'keeps up' if rates[best] >= a.step_rate else 'the loader is the bottleneck'})")
    if tmp is not None:
        tmp.cleanup()
    return rates


if __name__ == "__main__":
    main()
    sys.exit(0)
