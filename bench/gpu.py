"""The GPU bench, one script sized for a 10-minute device call: the training loops, the loader, the quickstart.

1. Training throughput, ResNet-50 224 px bf16 channels_last bs 256 on in-memory data (bench/overhead.py's loops):
   the hand-written loop tuned as one would (fused AdamW, cuDNN autotuner, non_blocking copies), fastlearn's
   `fit_stage` with the callbacks `run_recipe` runs, and fastai's plain `Learner.fit` (MixedPrecision bf16);
   eager and `torch.compile`. images/s (median over interleaved rounds), MFU (3 x forward FLOPs / bf16 peak)
   and peak memory, and fastlearn / raw.
2. The loader (bench/loader.py): photo-sized JPEGs written here, images/s by worker count and with GPU decoding,
   beside the raw loop's step rate.
3. The quickstart (`fastlearn train digits --data digits`) wall time with `deterministic=true` and `=false`.

Without CUDA, `--cpu-smoke` runs every part at toy size on the CPU (test_resnet, 32 px, a few steps, no compile,
a tiny JPEG folder, no quickstart) so the script is checked before device time is spent on it. `--json F` writes
the numbers (e.g. to $OUT/gpu.json on the device machine).

    python bench/gpu.py [--rounds 3] [--steps 12] [--parts train,loader,quickstart] [--no-compile] [--json F]
    python bench/gpu.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import loader as loader_bench  # noqa: E402  (bench/loader.py)
import overhead  # noqa: E402  (bench/overhead.py: the raw and fastlearn loops)


class FastaiLoop:
    "fastai's own `Learner.fit` with MixedPrecision (bf16) and channels_last: no fastlearn callbacks or learner."

    def __init__(self, s: overhead.Setup, x, y, clock=None):
        from fastai.callback.fp16 import MixedPrecision
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner
        from fastai.losses import CrossEntropyLossFlat
        from fastai.optimizer import Adam
        g = torch.Generator().manual_seed(2)
        xv, yv = torch.randn(s.bs, 3, s.size, s.size, generator=g), torch.randint(0, 10, (s.bs,), generator=g)
        dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(xv, yv)), bs=s.bs, shuffle=True, device=s.device,
                                     num_workers=0, pin_memory=s.device.type == "cuda")
        self.timer = overhead._step_timer()
        cbs = [self.timer] + ([MixedPrecision(amp_mode="bf16")] if s.precision == "bf16" else [])
        self.learn = Learner(dls, overhead.make_model(s), loss_func=CrossEntropyLossFlat(), opt_func=Adam, cbs=cbs)
        if s.channels_last:
            from fastai.callback.channelslast import ChannelsLast
            self.learn.add_cb(ChannelsLast())
        self.learn.remove_cbs([c for c in self.learn.cbs if type(c).__name__ == "ProgressCallback"])  # no bar
        self.learn.logger = lambda *a, **k: None  # nor the per-epoch lists

    def epoch(self):
        self.learn.fit(1, 1e-3)
        return self.timer.times, self.timer.seconds


def _compiled(make):
    "The loop `make` builds, with its model through torch.compile (the same parameters, so the optimizer is unchanged)."
    def build(s, x, y):
        loop = make(s, x, y)
        if hasattr(loop, "learn"):
            loop.learn.model = torch.compile(loop.learn.model)
        else:
            loop.model = torch.compile(loop.model)
        return loop
    return build


def train_part(s: overhead.Setup, rounds: int, compile_: bool, hw: str) -> list[dict]:
    "images/s, MFU and peak memory of each loop, eager (and compiled), interleaved rounds."
    variants = {"raw": overhead.RawLoop, "fastlearn": overhead.FastlearnLoop, "fastai fit": FastaiLoop}
    if compile_:
        variants.update({f"{n} compile": _compiled(m) for n, m in list(variants.items()) if n != "fastai fit"})
    peak = overhead.peak_bf16(hw) if s.device.type == "cuda" else None
    flops = 3 * overhead.RESNET50_FWD_FLOPS_224 * (s.size / 224) ** 2 if s.arch == "resnet50" else None
    rows = []
    for name, make in variants.items():  # one at a time: peak memory per loop, compile warm-up apart
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            res = overhead.run(s, rounds, {name: make})[name]
        except Exception as e:  # noqa: BLE001 - one loop failing must not cost the rest of the device call
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            rows.append({"loop": name, "error": f"{type(e).__name__}: {e}"})
            continue
        ips = s.n_train / statistics.median(res["epochs"])
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if s.device.type == "cuda" else None
        rows.append({"loop": name, "images_s": ips, "mfu": ips * flops / peak if peak and flops else None,
                     "peak_gib": mem, "seconds": time.perf_counter() - t0})
        print(f"  {name}: {ips:.0f} images/s ({time.perf_counter() - t0:.0f}s incl. warm-up)", flush=True)
    raw = {r["loop"]: r.get("images_s") for r in rows}
    for r in rows:
        base = raw.get("raw compile" if "compile" in r["loop"] else "raw")
        r["vs_raw"] = r["images_s"] / base if r.get("images_s") and base else None
    return rows


def quickstart_part(timeout: float) -> list[dict]:
    "Wall seconds of README command 1's training, in both deterministic modes, in fresh processes."
    rows = []
    for det in ("false", "true"):
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "fastlearn.cli", "train", "digits", "--data", "digits", "--run-dir",
                   f"{d}/run", f"deterministic={det}"]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            secs = time.perf_counter() - t0
            summary = Path(d, "run", "summary.json")
            summ = json.loads(summary.read_text()) if summary.exists() else {}
            acc = summ.get("accuracy")
        rows.append({"deterministic": det, "seconds": secs, "run_seconds": summ.get("seconds"), "rc": p.returncode,
                     "accuracy": acc,
                     "tail": p.stderr[-500:] if p.returncode else ""})
        print(f"  quickstart deterministic={det}: {secs:.1f}s wall (run {summ.get('seconds')}s) rc={p.returncode} "
              f"accuracy={acc}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per timed epoch")
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--parts", default="train,loader,quickstart")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--loader-n", type=int, default=3000, help="JPEGs for the loader part")
    ap.add_argument("--cpu-smoke", action="store_true", help="every part at toy size on the CPU")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    if not cuda and not a.cpu_smoke:
        print("bench/gpu.py needs a CUDA device; run `python bench/gpu.py --cpu-smoke` to check it on the CPU")
        return 2
    import fastlearn
    parts = set(a.parts.split(","))
    dev = torch.device("cuda" if cuda else "cpu")
    hw = torch.cuda.get_device_name() if cuda else "CPU (smoke run)"
    print(f"fastlearn {fastlearn.__version__} from {os.path.dirname(fastlearn.__file__)}; torch {torch.__version__}; {hw}")
    out: dict = {"hardware": hw, "torch": torch.__version__}
    t0 = time.perf_counter()
    if "train" in parts:
        if cuda:
            torch.backends.cudnn.benchmark = True  # the tuned raw loop's setting; fastlearn's fast mode sets the same
            s = overhead.Setup(dev, "resnet50", 224, a.bs, a.bs * a.steps, "bf16", True)
        else:
            s = overhead.Setup(dev, "test_resnet", 32, 16, 16 * 4, "fp32", False)
        print(f"\n1. training: {s.arch} {s.size}px bs {s.bs} {s.precision}{' channels_last' if s.channels_last else ''}, "
              f"{a.rounds if cuda else 1} rounds x {s.n_train // s.bs} steps", flush=True)
        rows = train_part(s, a.rounds if cuda else 1, cuda and not a.no_compile, hw)
        print(f"{'loop':<18}{'images/s':>10}{'vs raw':>8}{'MFU':>7}{'peak GiB':>10}")
        for r in rows:
            if "error" in r:
                print(f"{r['loop']:<18}  failed: {r['error'][:80]}")
                continue
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
            mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
            print(f"{r['loop']:<18}{r['images_s']:>10.0f}{r['vs_raw'] or 0:>8.3f}{mfu:>7}{mem:>10}")
        out["train"] = rows
    if "loader" in parts:
        n = a.loader_n if cuda else 48
        with tempfile.TemporaryDirectory(prefix="fastlearn-loader-") as d:
            step = next((r["images_s"] for r in out.get("train", []) if r["loop"] == "raw" and "images_s" in r), None)
            print("\n2. loader", flush=True)
            args = ["--n", str(n), "--dir", d] + ([] if cuda else ["--workers", "0,2", "--size", "32", "--bs", "8"])
            rates = loader_bench.main(args + (["--step-rate", str(step)] if step else []))
        out["loader"] = [{"decode": k[0], "workers": k[1], "images_s": v} for k, v in rates.items()]
    if "quickstart" in parts and cuda:
        print("\n3. quickstart (README command 1)", flush=True)
        out["quickstart"] = quickstart_part(timeout=240)
    elif "quickstart" in parts:
        print("\n3. quickstart: skipped in the CPU smoke run (minutes on a CPU; README command 1 times it)")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
