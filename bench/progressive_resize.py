"""Progressive resizing vs a fixed size: same model, data, epochs, batch size, LR schedule and seed, CPU.

Data: the bundled digits sample (1,437 train / 360 valid 32x32 scans, 10 classes), loaded once at the
final size by the library's own pipeline (`image_dls`, augmentation without flips). Model: a timm net
from scratch (default resnet10t), everything trainable, one one-cycle (`fit_stage`) at a fixed peak LR
(no lr_find, so both runs get the same schedule). The fixed run trains every step at `--size`; the
progressive run shrinks the training batches on the device from `--start` to `--size` over
`--ramp` of the run (`ProgressiveResize`), then full size; both validate at `--size`.

Prints the time per training step at each size (resize + forward + backward + optimizer step, without
data loading), each run's total time and accuracy; the last line is
`time_ratio=<progressive/fixed> acc_fixed=<..> acc_progressive=<..>`.

    python bench/progressive_resize.py [--arch resnet10t] [--size 64] [--start 32] [--ramp 0 0.6] [--epochs 4]
"""
import argparse
import time
from collections import defaultdict

import torch
from fastai.callback.core import Callback


class StepTimer(Callback):
    "Seconds per training batch (resize through optimizer step), grouped by the size the model saw."
    order = -20  # before ProgressiveResize's before_batch; its after_batch runs after the optimizer step

    def __init__(self):
        self.by_size = defaultdict(list)

    def before_batch(self):
        self._t = time.perf_counter()

    def after_batch(self):
        if self.training:
            self.by_size[int(self.learn.xb[0].shape[-1])].append(time.perf_counter() - self._t)


def run(args, progressive: bool):
    from fastai.torch_core import set_seed
    from fastlearn.data import image_dls
    from fastlearn.learner import transfer_learner
    from fastlearn.resize import ProgressiveResize
    from fastlearn.samples import sample
    set_seed(args.seed, reproducible=True)
    dls = image_dls(sample("digits"), size=args.size, bs=args.bs, seed=args.seed, arch=args.arch, flip=False,
                    num_workers=0)
    learn = transfer_learner(dls, args.arch, pretrained=False, progress=False)
    learn.freeze_top(-1)
    timer = StepTimer()
    total = args.epochs * len(dls.train)
    start = args.start if progressive else args.size
    resize = ProgressiveResize(start, args.size, tuple(args.ramp), args.multiple, valid_size=args.size,
                               total_steps=total)
    t = time.perf_counter()
    learn.fit_stage(args.epochs, args.lr, cbs=[resize, timer])
    seconds = time.perf_counter() - t
    _, acc = learn.validate()
    return float(acc), seconds, timer.by_size, resize.sizes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--start", type=int, default=32)
    p.add_argument("--ramp", type=float, nargs=2, default=(0.0, 0.6))
    p.add_argument("--multiple", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"digits sample, {args.arch} from scratch, {args.epochs} epochs, bs {args.bs}, peak lr {args.lr}, "
          f"fixed {args.size}px vs progressive {args.start}->{args.size}px over {tuple(args.ramp)} "
          f"(multiple {args.multiple}), valid at {args.size}px; CPU, {torch.get_num_threads()} thread(s)", flush=True)
    results = {}
    for name in ("fixed", "progressive"):
        acc, seconds, by_size, sizes = run(args, name == "progressive")
        results[name] = (acc, seconds)
        steps = ", ".join(f"{s}px: {len(v)} steps x {sum(v) / len(v) * 1000:.0f} ms"
                          for s, v in sorted(by_size.items()))
        print(f"{name:12s} total {seconds:6.1f}s  accuracy {acc:.4f}  per-step ({steps})", flush=True)
    (acc_f, t_f), (acc_p, t_p) = results["fixed"], results["progressive"]
    print(f"time_ratio={t_p / t_f:.3f} acc_fixed={acc_f:.3f} acc_progressive={acc_p:.3f}")


if __name__ == "__main__":
    main()
