"""Training-loop overhead: a fastlearn `TransferLearner` running the callbacks `run_recipe` runs on every step
(fastai's loop, our one-cycle `ParamScheduler`, `HyperTrace`, `MetricsLog`, `Checkpointer`, `NonFiniteGuard`,
`EpochProgress`) against a hand-written PyTorch loop: same model, same in-memory data, same precision, same
torch AdamW (foreach).

Three parts, each A/B interleaved (raw, fastlearn, raw, fastlearn...) in one process:
1. Fixed cost per step, on a model so small that the loop is most of the step (timm test_resnet, 32 px,
   bs 32, fp32, CPU): CPU ms/step of both loops (process CPU time, median over steps: other jobs on a shared
   machine inflate it far less than wall time) and their difference.
2. Where each millisecond goes: an instrumented run of both loops (wall time per step, median over rounds of
   the per-round mean) split into data fetch, forward, loss, backward, optimizer step, zero_grad, each
   callback's handlers, fastai's event dispatch and the rest of the loop.
3. A bigger model (CPU: timm resnet10t at 64 px; CUDA: ResNet-50 224 px bf16 channels_last): the ratio
   fastlearn / raw of CPU time per step (CPU) or epoch time (CUDA, with images/s and an MFU estimate).

Run it against another checkout (e.g. the commit before a change) with `PYTHONPATH=<checkout>`; the first
line says which fastlearn it imported. Last line: `ratio=<fastlearn/raw>` of part 3.

    python bench/overhead.py [--rounds 7] [--steps 40] [--threads 1] [--cpu] [--arch resnet10t --size 64]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
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
    from fastlearn.core.models import create_model
    torch.manual_seed(seed)
    m = create_model(s.arch, 10, pretrained=False).to(s.device)
    return m.to(memory_format=torch.channels_last) if s.channels_last else m


class Clock:
    "Wall seconds per named component, summed over the steps of an epoch (the breakdown's instrument)."

    def __init__(self):
        self.on, self.t, self.steps = False, defaultdict(float), 0

    def reset(self):
        self.t, self.steps = defaultdict(float), 0

    def add(self, name: str, seconds: float):
        self.t[name] += seconds

    def per_step(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.t.items()}


# -- A: hand-written PyTorch loop -------------------------------------------------------------------

def param_groups(model, one_group: bool) -> list[dict]:
    """The optimizer's param groups: fastlearn's (each timm layer group split into decay / no-decay, so that
    each can have its own LR and weight decay), or one group (what a plain loop without discriminative LRs has)."""
    if one_group:
        return [{"params": list(model.parameters()), "weight_decay": 0.01}]
    from fastlearn.core.layer_groups import layer_groups
    from fastlearn.core.optim import split_decay
    groups, gmap = split_decay(model, layer_groups(model))
    return [{"params": g, "weight_decay": wd} for g, wd in zip(groups, gmap.wd(0.01))]


class RawLoop:
    "The hand-written loop: fused AdamW (torch's fastest kernel on CPU and CUDA), fastlearn's param groups or one."

    def __init__(self, s: Setup, x, y, clock: Clock | None = None, one_group: bool = False):
        self.s, self.x, self.y, self.clock = s, x, y, clock
        self.model = make_model(s)
        self.opt = torch.optim.AdamW(param_groups(self.model, one_group), lr=1e-3, fused=True)
        self.g = torch.Generator().manual_seed(1)

    def epoch(self) -> tuple[list[tuple[float, float]], float]:
        "One epoch; ((wall, cpu) seconds of each step after the first, wall seconds of the epoch)."
        s, model, c = self.s, self.model, self.clock
        timed = c is not None and c.on
        pc = time.perf_counter
        model.train()
        amp = torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
        idx = torch.randperm(len(self.x), generator=self.g)
        times: list[tuple[float, float]] = []
        _sync(s.device)
        t0, last = time.perf_counter(), _now()
        for i in range(len(self.x) // s.bs):
            t = pc()
            b = idx[i * s.bs:(i + 1) * s.bs]
            xb, yb = self.x[b].to(s.device, non_blocking=True), self.y[b].to(s.device, non_blocking=True)
            if s.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if timed: c.add("data fetch", pc() - t); t = pc()
            with amp:
                out = model(xb)
                if timed: c.add("forward", pc() - t); t = pc()
                loss = F.cross_entropy(out, yb)
            if timed: c.add("loss", pc() - t); t = pc()
            loss.backward()
            if timed: c.add("backward", pc() - t); t = pc()
            self.opt.step()
            if timed: c.add("optimizer step", pc() - t); t = pc()
            self.opt.zero_grad(set_to_none=True)
            if timed: c.add("zero_grad", pc() - t); c.steps += 1
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


def _instrumented(cls, clock: Clock):
    """`cls` (the learner's class) with timers around each part of a training step. fastai's `_do_one_batch`
    is restated here with timers between its lines; the rest calls the real code (so the event dispatch
    measured is whatever the learner class does)."""
    pc = time.perf_counter
    from fastai.callback.core import Callback

    def _handler_names(cb):
        base = set(vars(Callback))
        return [n for n in dir(type(cb)) if n.startswith(("before_", "after_")) and n not in base
                and callable(getattr(type(cb), n, None))]

    try:  # fastlearn's own loss path, where this fastlearn has it (the bench also runs against older commits)
        from fastlearn.core.hotpath import LeanLearner, flat_loss
        lean = issubclass(cls, LeanLearner)
    except ImportError:
        lean, flat_loss = False, None

    class Timed(cls):
        def all_batches(self):
            self.n_iter = len(self.dl)
            it, i = iter(self.dl), 0
            while True:
                t = pc()
                try:
                    b = next(it)
                except StopIteration:
                    break
                if clock.on and self.training: clock.add("data fetch", pc() - t)
                self.one_batch(i, b)
                i += 1

        def one_batch(self, i, b):
            t = pc()
            self.iter = i
            b = self._set_device(b)
            self._split(b)
            if clock.on and self.training: clock.add("data fetch", pc() - t)
            from fastai.callback.core import CancelBatchException
            self._with_events(self._do_one_batch, "batch", CancelBatchException)
            if clock.on and self.training: clock.steps += 1

        def _do_one_batch(self):
            on = clock.on and self.training
            t = pc()
            self.pred = self.model(*self.xb)
            if on: clock.add("forward", pc() - t)
            self("after_pred")
            if len(self.yb):
                t = pc()
                self.loss_grad = (flat_loss(self.loss_func, self.pred, *self.yb) if lean
                                  else self.loss_func(self.pred, *self.yb))
                self.loss = self.loss_grad.clone()
                if on: clock.add("loss", pc() - t)
            self("after_loss")
            if not self.training or not len(self.yb):
                return
            self._do_grad_opt()

        def _backward(self):
            t = pc(); super()._backward(); clock.add("backward", pc() - t) if clock.on else None

        def _step(self):
            t = pc(); super()._step(); clock.add("optimizer step", pc() - t) if clock.on else None

        def _do_grad_opt(self):
            from fastai.callback.core import CancelBackwardException, CancelStepException
            self._with_events(self._backward, "backward", CancelBackwardException)
            self._with_events(self._step, "step", CancelStepException)
            t = pc(); self.opt.zero_grad(); clock.add("zero_grad", pc() - t) if clock.on else None

        def __call__(self, event_name):
            if not (clock.on and self.training and event_name not in ("before_fit", "after_fit")):
                return super().__call__(event_name)
            t = pc()
            try:
                return super().__call__(event_name)
            finally:
                clock.add("events", pc() - t)

        def add_cb(self, cb):
            super().add_cb(cb)
            cb = self.cbs[-1]
            for n in _handler_names(cb):
                if n in vars(cb):
                    continue
                f, name = getattr(cb, n), type(cb).__name__

                def timed(f=f, name=name):
                    if not (clock.on and self.training):
                        return f()
                    t = pc()
                    try:
                        return f()
                    finally:
                        clock.add(f"cb {name}", pc() - t)
                object.__setattr__(cb, n, timed)
            return self
    Timed.__name__ = cls.__name__
    return Timed


class FastlearnLoop:
    "What run_recipe runs per stage: `fit_stage` (one-cycle) with its per-step callbacks, default recipe, fp32/bf16."

    def __init__(self, s: Setup, x, y, clock: Clock | None = None):
        from fastai.data.core import DataLoaders
        from fastai.vision.augment import Normalize
        from fastlearn.run.checkpoint import Checkpointer
        from fastlearn.fit.guard import NonFiniteGuard
        from fastlearn.train.learner import transfer_learner
        from fastlearn.fit.precision import amp_callbacks, ChannelsLastBatch
        from fastlearn.base.progress import EpochProgress
        from fastlearn.run.records import HyperTrace, MetricsLog
        nv = s.bs  # a token validation set: fastai validates every epoch, the timer excludes it
        g = torch.Generator().manual_seed(2)
        xv, yv = torch.randn(nv, 3, s.size, s.size, generator=g), torch.randint(0, 10, (nv,), generator=g)
        dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(xv, yv)), bs=s.bs, shuffle=True,
                                     device=s.device, num_workers=0, pin_memory=s.device.type == "cuda")
        dls.c = 10
        self.tmp = tempfile.TemporaryDirectory()
        self.learn = transfer_learner(dls, s.arch, pretrained=False, model=make_model(s), opt="adamw",
                                      wd=0.01, progress=False)
        for dl in dls.loaders:  # same input as the raw loop: no normalisation transform
            dl.after_batch.fs = dl.after_batch.fs.filter(lambda f: not isinstance(f, Normalize))
            assert not any(isinstance(f, Normalize) for f in dl.after_batch.fs)
        if clock is not None:
            self.learn.__class__ = _instrumented(type(self.learn), clock)
            for cb in list(self.learn.cbs):  # wrap the learner's own callbacks too
                self.learn.remove_cb(cb)
                self.learn.add_cb(cb)
        self.learn.add_cb(EpochProgress(live=False, stream=io.StringIO()))   # what a non-tty run has
        self.learn.freeze_top(-1)                                             # train everything, as raw does
        self.timer = _step_timer()
        ckpt = Checkpointer(self.tmp.name, every_epochs=0, keep_last=1)
        self.cbs = ([self.timer, HyperTrace(), MetricsLog(os.path.join(self.tmp.name, "metrics.csv")), ckpt,
                     NonFiniteGuard()] + amp_callbacks(s.precision) + ([ChannelsLastBatch()] if s.channels_last else []))

    def epoch(self) -> tuple[list[tuple[float, float]], float]:
        self.learn.fit_stage(1, 1e-3, cbs=self.cbs)
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


def breakdown(s: Setup, rounds: int) -> dict[str, dict[str, float]]:
    "Per component wall ms/step of both loops: median over rounds of each round's mean per step."
    x, y = make_data(s)
    clocks = {"raw": Clock(), "fastlearn": Clock()}
    loops = {"raw": RawLoop(s, x, y, clocks["raw"]), "fastlearn": FastlearnLoop(s, x, y, clocks["fastlearn"])}
    for loop in loops.values():
        loop.epoch()
    per: dict[str, list[dict]] = {n: [] for n in loops}
    for r in range(rounds):
        for n in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
            c = clocks[n]
            c.reset(); c.on = True
            t0 = time.perf_counter()
            loops[n].epoch()
            c.on = False
            row = c.per_step()
            # the whole step: the epoch's training time (timer from before_train to after_train) per step
            total = (loops[n].timer.seconds if n == "fastlearn" else time.perf_counter() - t0) / max(1, c.steps)
            ev = row.pop("events", 0.0)
            cbs = sum(v for k, v in row.items() if k.startswith("cb "))
            row["event dispatch"] = max(0.0, ev - cbs)
            row["other (loop)"] = max(0.0, total - sum(row.values()))
            row["total"] = total
            per[n].append(row)
    out = {}
    for n, rows in per.items():
        keys = list(dict.fromkeys(k for r in rows for k in r))
        out[n] = {k: statistics.median(r.get(k, 0.0) for r in rows) * 1e3 for k in keys}
    return out


def print_breakdown(b: dict[str, dict[str, float]]) -> float:
    "Print the table; returns the loop's overhead: the extra of every row but the model's and the bench's timer."
    order = ["data fetch", "forward", "loss", "backward", "optimizer step", "zero_grad"]
    keys = order + sorted(k for k in b["fastlearn"] if k.startswith("cb ")) + ["event dispatch", "other (loop)", "total"]
    print(f"{'component (wall ms/step)':<34}{'raw':>8}{'fastlearn':>11}{'extra':>8}")
    overhead = 0.0
    for k in keys:
        r, f = b["raw"].get(k, 0.0), b["fastlearn"].get(k, 0.0)
        print(f"{k:<34}{r:>8.3f}{f:>11.3f}{f - r:>8.3f}")
        if k not in ("forward", "backward", "total", "cb StepTimes"):
            overhead += f - r
    print(f"{'loop overhead (rows but forward, backward and the bench timer StepTimes)':<53}{overhead:>8.3f}")
    return overhead


def peak_bf16(name: str) -> float | None:
    return next((p for k, p in PEAK_BF16 if k in name), None)


def fixed_cost(device: torch.device, rounds: int, steps: int, precision: str = "fp32", channels_last=False):
    "CPU ms/step of both loops on timm test_resnet 32 px bs 32, and the difference."
    tiny = Setup(device, "test_resnet", 32, 32, 32 * steps, precision, channels_last)
    tres = run(tiny, rounds, {"raw": RawLoop, "fastlearn": FastlearnLoop,
                              "raw, 1 group": lambda s, x, y: RawLoop(s, x, y, one_group=True)})
    tmed = {n: statistics.median(c for _, c in r["steps"]) * 1e3 for n, r in tres.items()}
    wmed = {n: statistics.median(w for w, _ in r["steps"]) * 1e3 for n, r in tres.items()}
    return tiny, tmed, wmed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads, both loops (1: no OpenMP spinning on a shared machine)")
    ap.add_argument("--cpu", action="store_true", help="CPU benchmark even when CUDA is available")
    ap.add_argument("--arch", default=None, help="the bigger model of part 3 (CPU default resnet10t)")
    ap.add_argument("--size", type=int, default=None, help="its image size (CPU default 64)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: fixed,breakdown,big")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import fastlearn
    skip = set(a.skip.split(",")) - {""}
    cuda = torch.cuda.is_available() and not a.cpu
    dev = torch.device("cuda" if cuda else "cpu")
    hw = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, {a.threads} threads"
    print(f"fastlearn {fastlearn.__version__} from {os.path.dirname(fastlearn.__file__)}; torch {torch.__version__}; {hw}")
    t0 = time.perf_counter()
    if "fixed" not in skip:
        tiny, tmed, wmed = fixed_cost(dev, a.rounds, a.steps)
        print(f"\n1. fixed loop cost: timm {tiny.arch} {tiny.size}px bs {tiny.bs} {tiny.precision}, {a.rounds} interleaved "
              f"rounds x {a.steps} steps")
        print(f"{'loop':<12}{'cpu ms/step':>12}{'wall ms/step':>13}")
        for n in tmed:
            print(f"{n:<12}{tmed[n]:>12.3f}{wmed[n]:>13.3f}")
        print(f"fixed cost (fastlearn - raw): {tmed['fastlearn'] - tmed['raw']:.3f} CPU ms/step, "
              f"{wmed['fastlearn'] - wmed['raw']:.3f} wall ms/step; fastlearn's param groups (discriminative LRs, "
              f"no decay on norm/bias) vs one: {tmed['raw'] - tmed['raw, 1 group']:.3f} CPU ms/step")
    if "breakdown" not in skip:
        tiny = Setup(dev, "test_resnet", 32, 32, 32 * a.steps, "fp32", False)
        print(f"\n2. where the time goes (instrumented; wall ms/step, median over {a.rounds} rounds of the round mean):")
        print_breakdown(breakdown(tiny, a.rounds))
    if "big" in skip:
        return
    if cuda:
        s = Setup(dev, a.arch or "resnet50", a.size or 224, 128, 128 * min(a.steps, 10), "bf16", True)
        torch.backends.cudnn.benchmark = True
    else:
        s = Setup(dev, a.arch or "resnet10t", a.size or 64, 32, 32 * min(a.steps, 10), "fp32", False)
    res = run(s, a.rounds, {"raw": RawLoop, "fastlearn": FastlearnLoop})
    print(f"\n3. {s.arch} {s.size}px bs {s.bs} {s.precision}{' channels_last' if s.channels_last else ''}, "
          f"{a.rounds} interleaved rounds x {s.n_train // s.bs} steps")
    med = {n: (statistics.median(w for w, _ in r["steps"]), statistics.median(c for _, c in r["steps"]))
           for n, r in res.items()}
    print(f"{'loop':<12}{'wall ms/step':>13}{'cpu ms/step':>12}{'images/s':>10}{'wall ratio':>11}"
          f"{'ratio':>8}{'per round':>16}" + (f"{'MFU':>7}" if cuda else ""))
    ratios = {}
    for n, r in res.items():
        ips = s.n_train / statistics.median(r["epochs"])
        wall_r = med[n][0] / med["raw"][0]
        per_round = [m / m_raw for m, m_raw in zip(r["rounds"], res["raw"]["rounds"])]
        ratios[n] = statistics.median(per_round)
        line = (f"{n:<12}{med[n][0] * 1e3:>13.2f}{med[n][1] * 1e3:>12.2f}{ips:>10.1f}{wall_r:>11.3f}{ratios[n]:>8.3f}"
                f"{f'{min(per_round):.3f}-{max(per_round):.3f}':>16}")
        if cuda:
            peak = peak_bf16(hw)
            line += f"{ips * 3 * RESNET50_FWD_FLOPS_224 / peak:>7.1%}" if peak and s.arch == "resnet50" else "    n/a"
        print(line)
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    print(f"total {time.perf_counter() - t0:.0f}s{load}; ratio = fastlearn / raw "
          f"(median over rounds of {'CPU time per step' if not cuda else 'epoch time, i.e. inverse images/s'})")
    print(f"ratio={ratios['fastlearn']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
