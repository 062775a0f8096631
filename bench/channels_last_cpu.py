"""channels_last (NHWC) against the default NCHW layout for convolutional timm models on the CPU.

`precision.use_channels_last` turns NHWC on by default for convolutional models; this bench is the measurement
behind doing so on the CPU as well as on CUDA. For each arch and image size: one training step (forward,
cross-entropy, backward, AdamW step) and one inference forward at batch 32, the two layouts interleaved
(NCHW, NHWC, NCHW, ...) over `--rounds` rounds in one process, each round the median of `--steps` steps of
process CPU time (other jobs on a shared machine inflate CPU time far less than wall time). Random weights
(speed does not depend on them), random data. Prints one row per (arch, size) and the ratio NCHW / NHWC
(above 1: channels_last is faster); the last line `ratio=` is the geometric mean of the training ratios.

    python bench/channels_last_cpu.py [--threads 2] [--rounds 3] [--steps 5] [--sizes 64 128]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import timm
import torch
import torch.nn.functional as F

ARCHS = ("tf_efficientnet_lite0", "resnet18", "convnext_atto", "mobilenetv3_large_100")


def _steps(model, opt, x, y, n: int, train: bool) -> float:
    "Median process CPU seconds of `n` steps (one warm-up step first)."
    times = []
    for i in range(n + 1):
        t = time.process_time()
        if train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)
        if i:
            times.append(time.process_time() - t)
    return statistics.median(times)


def measure(arch: str, size: int, bs: int, rounds: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x, y = torch.randn(bs, 3, size, size), torch.randint(0, 10, (bs,))
    res = {"nchw": {"train": [], "eval": []}, "nhwc": {"train": [], "eval": []}}
    for _ in range(rounds):
        for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            model.to(memory_format=fmt)
            xb = x.contiguous(memory_format=fmt)
            model.train()
            res[layout]["train"].append(_steps(model, opt, xb, y, steps, True))
            model.eval()
            res[layout]["eval"].append(_steps(model, opt, xb, y, steps, False))
    return {lay: {k: statistics.median(v) for k, v in d.items()} for lay, d in res.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, bs {a.bs}; CPU ms per step (median), NCHW / NHWC")
    print(f"{'arch':<24}{'size':>5}{'train NCHW':>12}{'NHWC':>8}{'ratio':>7}{'eval NCHW':>11}{'NHWC':>8}{'ratio':>7}",
          flush=True)
    ratios = []
    for arch in a.archs:
        for size in a.sizes:
            r = measure(arch, size, a.bs, a.rounds, a.steps)
            tr = r["nchw"]["train"] / r["nhwc"]["train"]
            ev = r["nchw"]["eval"] / r["nhwc"]["eval"]
            ratios.append(tr)
            print(f"{arch:<24}{size:>5}{r['nchw']['train'] * 1e3:>12.0f}{r['nhwc']['train'] * 1e3:>8.0f}{tr:>7.2f}"
                  f"{r['nchw']['eval'] * 1e3:>11.0f}{r['nhwc']['eval'] * 1e3:>8.0f}{ev:>7.2f}", flush=True)
    print(f"ratio={math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}  (geometric mean of training NCHW / NHWC)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
