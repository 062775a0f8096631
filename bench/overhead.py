"""Training-loop overhead: a fastlearn `TransferLearner` (fastai's loop with our default callbacks) against
a hand-written PyTorch loop, same model, same in-memory data, same precision, same torch AdamW (foreach).

CPU (default): timm resnet10t at 64 px, fp32, one torch thread, median time per optimizer step (data
fetch from memory included), A/B runs interleaved; the ratio uses process CPU time per step, which other
jobs on a shared machine inflate far less than wall time (printed beside it). CUDA (when available):
ResNet-50 at 224 px, bf16, channels_last, images/s and an MFU estimate. Last line: `ratio=<fastlearn/raw>`
(CPU time per step on CPU, epoch time on CUDA), the median over rounds of the ratio within each round.
A last row gives the loop's fixed cost per step in ms, on a model so small that the loop dominates.

    python bench/overhead.py [--rounds 5] [--steps 6] [--threads 1] [--cpu]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name() (vendor datasheets).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
             ("RTX 4090", 165e12), ("RTX 3090", 71e12)]
# per 224 px image, forward: torch.utils.flop_counter.FlopCounterMode counts 8.18e9 FLOPs for timm resnet50,
# i.e. 2 x the 4.09e9 multiply-adds usually quoted as "4.1 GFLOPs"; forward + backward ~ 3 x forward
RESNET50_FWD_FLOPS_224 = 8.18e9


@dataclass
class Setup:
    device: torch.device
    arch: str
    size: int
    bs: int
    n_train: int
    precision: str        # "fp32" | "bf16"
    channels_last: bool


def _now() -> tuple[float, float]:
    "(wall, process CPU) time: on a shared CPU, CPU time measures the work done, wall time also others' load."
    return time.perf_counter(), time.process_time()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(s: Setup, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.n_train, 3, s.size, s.size, generator=g)
    y = torch.randint(0, 10, (s.n_train,), generator=g)
    return x, y


def make_model(s: Setup, seed: int = 0):
    from fastlearn.models import create_model
    torch.manual_seed(seed)
    m = create_model(s.arch, 10, pretrained=False).to(s.device)
    return m.to(memory_format=torch.channels_last) if s.channels_last else m


# -- A: hand-written PyTorch loop -------------------------------------------------------------------

class RawLoop:
    def __init__(self, s: Setup, x, y):
        self.s, self.x, self.y = s, x, y
        self.model = make_model(s)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
        self.g = torch.Generator().manual_seed(1)

    def epoch(self) -> tuple[list[float], float]:
        "One epoch; ((wall, cpu) seconds of each step after the first, wall seconds of the epoch)."
        s, model = self.s, self.model
        model.train()
        amp = torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
        idx = torch.randperm(len(self.x), generator=self.g)
        times: list[tuple[float, float]] = []
        _sync(s.device)
        t0, last = time.perf_counter(), _now()
        for i in range(len(self.x) // s.bs):
            b = idx[i * s.bs:(i + 1) * s.bs]
            xb, yb = self.x[b].to(s.device, non_blocking=True), self.y[b].to(s.device, non_blocking=True)
            if s.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with amp:
                loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            now = _now()
            if i:
                times.append((now[0] - last[0], now[1] - last[1]))
            last = now
        _sync(s.device)
        return times, time.perf_counter() - t0


# -- B: fastlearn TransferLearner -------------------------------------------------------------------

def _step_timer():
    from fastai.callback.core import Callback

    class StepTimes(Callback):
        "Time between consecutive training after_batch events (= one optimizer step incl. data fetch)."
        order = 1000   # after every other callback's after_batch

        def before_train(self):
            _sync(self.dls.device or torch.device("cpu"))
            self.t0, self.last, self.times = time.perf_counter(), None, []

        def after_batch(self):
            if not self.training:
                return
            now = _now()
            if self.last is not None:
                self.times.append((now[0] - self.last[0], now[1] - self.last[1]))
            self.last = now

        def after_train(self):
            _sync(self.dls.device or torch.device("cpu"))
            self.seconds = time.perf_counter() - self.t0
    return StepTimes()


class FastlearnLoop:
    def __init__(self, s: Setup, x, y, recipe_path: bool = False):
        from fastai.data.core import DataLoaders
        from fastai.vision.augment import Normalize
        from fastlearn.learner import transfer_learner
        from fastlearn.precision import amp_callbacks, ChannelsLastBatch
        from fastlearn.progress import EpochProgress
        nv = s.bs  # a token validation set: fastai validates every epoch, the timer excludes it
        g = torch.Generator().manual_seed(2)
        xv, yv = torch.randn(nv, 3, s.size, s.size, generator=g), torch.randint(0, 10, (nv,), generator=g)
        dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(xv, yv)), bs=s.bs, shuffle=True,
                                     device=s.device, num_workers=0)
        dls.c = 10
        self.learn = transfer_learner(dls, s.arch, pretrained=False, model=make_model(s), opt="adamw",
                                      wd=0.01, progress=False)
        for dl in dls.loaders:  # same input as the raw loop: no normalisation transform
            dl.after_batch.fs = dl.after_batch.fs.filter(lambda f: not isinstance(f, Normalize))
            assert not any(isinstance(f, Normalize) for f in dl.after_batch.fs)
        self.learn.add_cb(EpochProgress(live=False, stream=io.StringIO()))   # what a non-tty run has
        self.learn.freeze_top(-1)                                             # train everything, as raw does
        self.timer = _step_timer()
        self.cbs = [self.timer] + amp_callbacks(s.precision) + ([ChannelsLastBatch()] if s.channels_last else [])
        self.recipe_path = recipe_path
        if recipe_path:
            from fastlearn.training import HyperTrace
            self.cbs.append(HyperTrace())

    def epoch(self) -> tuple[list[float], float]:
        if self.recipe_path:   # what run_recipe does per stage: our one-cycle via ParamScheduler + HyperTrace
            self.learn.fit_stage(1, 1e-3, cbs=self.cbs)
        else:
            self.learn.fit(1, 1e-3, cbs=self.cbs)
        return self.timer.times, self.timer.seconds


# -- driver ----------------------------------------------------------------------------------------

def run(s: Setup, rounds: int, variants: dict) -> dict[str, dict]:
    x, y = make_data(s)
    loops = {name: make(s, x, y) for name, make in variants.items()}
    for loop in loops.values():   # warm-up epoch each (allocator, first-call costs); not timed
        loop.epoch()
    res = {n: {"steps": [], "rounds": [], "epochs": []} for n in loops}
    names = list(loops)
    for r in range(rounds):       # interleaved, order alternating, so drift in machine load hits all alike
        for n in (names if r % 2 == 0 else names[::-1]):
            times, secs = loops[n].epoch()
            res[n]["steps"] += times
            # the compared measure: CPU time per step on CPU; on CUDA, the epoch's wall time (1 / throughput)
            res[n]["rounds"].append(secs if s.device.type == "cuda" else statistics.median(c for _, c in times))
            res[n]["epochs"].append(secs)
    return res


def peak_bf16(name: str) -> float | None:
    return next((p for k, p in PEAK_BF16 if k in name), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per epoch")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads, both loops (1: no OpenMP spinning on a shared machine)")
    ap.add_argument("--cpu", action="store_true", help="CPU benchmark even when CUDA is available")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available() and not a.cpu
    if cuda:
        s = Setup(torch.device("cuda"), "resnet50", 224, 128, 128 * a.steps, "bf16", True)
        torch.backends.cudnn.benchmark = True
    else:
        s = Setup(torch.device("cpu"), "resnet10t", 64, 32, 32 * a.steps, "fp32", False)
    variants = {"raw": RawLoop, "fastlearn": FastlearnLoop,
                "fastlearn+recipe": lambda s, x, y: FastlearnLoop(s, x, y, recipe_path=True)}
    t0 = time.perf_counter()
    res = run(s, a.rounds, variants)
    hw = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, {a.threads} threads"
    print(f"overhead: {s.arch} {s.size}px bs {s.bs} {s.precision}{' channels_last' if s.channels_last else ''}, "
          f"{a.rounds} interleaved rounds x {a.steps} steps, torch {torch.__version__}, {hw}")
    med = {n: (statistics.median(w for w, _ in r["steps"]), statistics.median(c for _, c in r["steps"]))
           for n, r in res.items()}
    print(f"{'loop':<18}{'wall ms/step':>13}{'cpu ms/step':>12}{'images/s':>10}{'wall ratio':>11}"
          f"{'ratio':>8}{'per round':>16}" + (f"{'MFU':>7}" if cuda else ""))
    ratios = {}
    for n, r in res.items():
        ips = s.bs * a.steps / statistics.median(r["epochs"])
        wall_r = med[n][0] / med["raw"][0]
        # the ratio of the two loops within each round (adjacent in time, so slow drift in the load of a
        # shared machine cancels), then the median over rounds
        per_round = [m / m_raw for m, m_raw in zip(r["rounds"], res["raw"]["rounds"])]
        ratios[n] = statistics.median(per_round)
        line = (f"{n:<18}{med[n][0] * 1e3:>13.2f}{med[n][1] * 1e3:>12.2f}{ips:>10.1f}{wall_r:>11.3f}{ratios[n]:>8.3f}"
                f"{f'{min(per_round):.3f}-{max(per_round):.3f}':>16}")
        if cuda:
            peak = peak_bf16(hw)
            line += f"{ips * 3 * RESNET50_FWD_FLOPS_224 / peak:>7.1%}" if peak else "    n/a"
        print(line)
    if cuda and peak_bf16(hw) is None:
        print(f"(no bf16 peak known for {hw!r}: add it to PEAK_BF16 for an MFU estimate)")
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    print(f"total {time.perf_counter() - t0:.0f}s{load}; ratio = fastlearn / raw "
          f"(median over rounds of {'CPU time per step' if not cuda else 'epoch time, i.e. inverse images/s'}), "
          f"default callbacks, constant LR")
    # the loop's fixed cost per step, in ms, seen on a model so small that the loop is most of the step
    tiny = Setup(s.device, "test_resnet", 32, s.bs, s.bs * a.steps, s.precision, s.channels_last)
    tres = run(tiny, a.rounds, {"raw": RawLoop, "fastlearn": FastlearnLoop})
    tmed = {n: statistics.median(c for _, c in r["steps"]) for n, r in tres.items()}
    print(f"fixed loop cost (timm test_resnet {tiny.size}px bs {tiny.bs}, CPU ms/step): raw {tmed['raw'] * 1e3:.2f}, "
          f"fastlearn {tmed['fastlearn'] * 1e3:.2f}, difference {(tmed['fastlearn'] - tmed['raw']) * 1e3:.2f}")
    print(f"ratio={ratios['fastlearn']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
