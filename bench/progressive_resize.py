"""Progressive resizing vs a fixed size: same model, data, epochs, batch size, LR schedule and seeds.

Data: the bundled digits sample (1,437 train / 360 valid scans, 10 classes), loaded once at the final
size by the library's own pipeline (`image_dls`, augmentation without flips). Model: a timm net from
scratch (default resnet10t), everything trainable, one one-cycle (`fit_stage`) at a fixed peak LR (no
lr_find, so both runs get the same schedule). The fixed run trains every step at `--size`; the
progressive run trains at `--start` px until `--ramp[0]` of the run, grows to `--size` by `--ramp[1]`
(`ProgressiveResize`, on the device, after the dataloader), then stays at full size; both validate at
`--size`. On CUDA both runs use the library's precision/channels_last callbacks (bf16 where supported).

One valid image is 0.28 points of accuracy here, and two seeds of the same run differ by more than the
0.3-point goal, so the bench runs each setting on several seeds (`--seeds`), alternating which of the two
goes first, and compares mean accuracy and summed wall time. It prints each run with the wall time of each
epoch and the sizes it trained at, the median time per training step at each size (resize + forward +
backward + optimizer step, without data loading) and, last,
`time_ratio=<progressive/fixed> acc_fixed=<mean> acc_progressive=<mean>`.

    python bench/progressive_resize.py [--arch resnet10t] [--size 96] [--start 64] [--ramp 0.25 0.75]
                                       [--multiple 16] [--epochs 6] [--seeds 0 1 2 3 4] [--threads 1]
                                       [--device auto] [--precision auto]
"""
import argparse
import statistics
import time
from collections import defaultdict

import torch
from fastai.callback.core import Callback


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Seconds per training batch (resize through optimizer step), grouped by the size the model saw, and
    wall seconds of each epoch (training with its data loading, then validation) with the sizes it trained at."""
    order = -20  # before ProgressiveResize's before_batch; its after_batch runs after the optimizer step

    def __init__(self, device: torch.device):
        self.by_size, self.device = defaultdict(list), device
        self.epochs: list[tuple[float, list[int]]] = []

    def before_epoch(self):
        _sync(self.device)
        self._e, self._sizes = time.perf_counter(), set()

    def after_epoch(self):
        _sync(self.device)
        self.epochs.append((time.perf_counter() - self._e, sorted(self._sizes)))

    def before_batch(self):
        _sync(self.device)
        self._t = time.perf_counter()

    def after_batch(self):
        if self.training:
            _sync(self.device)
            self.by_size[int(self.learn.xb[0].shape[-1])].append(time.perf_counter() - self._t)
            self._sizes.add(int(self.learn.xb[0].shape[-1]))


def run(args, progressive: bool, seed: int):
    from fastai.torch_core import set_seed
    from fastlearn.data.dls import image_dls
    from fastlearn.train.learner import transfer_learner
    from fastlearn.fit.precision import speed_callbacks
    from fastlearn.core.recipes import Recipe
    from fastlearn.fit.resize import ProgressiveResize
    from fastlearn.data.samples import sample
    set_seed(seed, reproducible=True)
    dls = image_dls(sample("digits"), size=args.size, bs=args.bs, seed=seed, arch=args.arch, flip=False,
                    device=args.device, num_workers=args.workers)
    learn = transfer_learner(dls, args.arch, pretrained=False, progress=False)
    learn.freeze_top(-1)
    timer = StepTimer(args.device)
    total = args.epochs * len(dls.train)
    start = args.start if progressive else args.size
    resize = ProgressiveResize(start, args.size, tuple(args.ramp), args.multiple, valid_size=args.size,
                               total_steps=total)
    speed = speed_callbacks(learn, Recipe(arch=args.arch, precision=args.precision))
    _sync(args.device)
    t = time.perf_counter()
    learn.fit_stage(args.epochs, args.lr, cbs=[resize, timer, *speed])
    _sync(args.device)
    seconds = time.perf_counter() - t
    _, acc = learn.validate(cbs=speed)
    return float(acc), seconds, timer.by_size, timer.epochs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--size", type=int, default=96, help="final (and validation) size, px")
    p.add_argument("--start", type=int, default=64, help="first training size, px")
    p.add_argument("--ramp", type=float, nargs=2, default=(0.25, 0.75),
                   help="fractions of the run where the size starts and stops growing")
    p.add_argument("--multiple", type=int, default=16)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--precision", default="auto", help="auto: bf16/fp16 on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the library's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                               else "cpu" if args.device == "auto" else args.device)
    where = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} thread(s)")
    print(f"digits sample, {args.arch} from scratch, {args.epochs} epochs, bs {args.bs}, peak lr {args.lr}, "
          f"fixed {args.size}px vs progressive {args.start}->{args.size}px over {tuple(args.ramp)} "
          f"(multiple {args.multiple}), valid at {args.size}px; seeds {args.seeds}; {where}, "
          f"torch {torch.__version__}", flush=True)
    acc, secs = defaultdict(list), defaultdict(list)
    steps = {name: defaultdict(list) for name in ("fixed", "progressive")}
    for i, seed in enumerate(args.seeds):
        order = ("fixed", "progressive") if i % 2 == 0 else ("progressive", "fixed")
        for name in order:
            a, s, by_size, epochs = run(args, name == "progressive", seed)
            acc[name].append(a)
            secs[name].append(s)
            for size, v in by_size.items():
                steps[name][size].extend(v)
            per_epoch = " ".join(f"{t:.1f}s@{'/'.join(map(str, sz))}" for t, sz in epochs)
            print(f"seed {seed:<3d} {name:12s} {s:7.1f}s  accuracy {a:.4f}  epochs (s@px): {per_epoch}", flush=True)
    print(f"\n{'run':12s} {'total s':>8s} {'mean acc':>9s} {'min':>7s} {'max':>7s}  median ms per step at each size")
    for name in ("fixed", "progressive"):
        per = ", ".join(f"{s}px {len(v)}x{statistics.median(v) * 1000:.1f}" for s, v in sorted(steps[name].items()))
        print(f"{name:12s} {sum(secs[name]):8.1f} {statistics.mean(acc[name]):9.4f} {min(acc[name]):7.4f} "
              f"{max(acc[name]):7.4f}  {per}")
    ratio = sum(secs["progressive"]) / sum(secs["fixed"])
    acc_f, acc_p = statistics.mean(acc["fixed"]), statistics.mean(acc["progressive"])
    step_ratio = (sum(sum(v) for v in steps["progressive"].values()) /
                  sum(sum(v) for v in steps["fixed"].values()))
    met = ratio <= 0.75 and (acc_f - acc_p) * 100 <= 0.3
    print(f"training-step time ratio {step_ratio:.3f}; wall time ratio {ratio:.3f}; accuracy change "
          f"{(acc_p - acc_f) * 100:+.2f} points; goal (>= 25% less time, accuracy within 0.3 points): "
          f"{'met' if met else 'not met'}")
    print(f"time_ratio={ratio:.3f} acc_fixed={acc_f:.4f} acc_progressive={acc_p:.4f}")


if __name__ == "__main__":
    main()
