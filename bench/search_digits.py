"""Random search with successive-halving pruning vs the same number of trials run in full, on the digits sample.

Both arms search LR, weight decay, batch size and dropout of a from-scratch `test_resnet` at 32 px (a tiny
timm ResNet, so an epoch takes seconds on a CPU) in two rounds with the same sampler seed: round 1 draws
the same configurations in both arms, round 2 narrows around each arm's own best finished trials.
Prints each arm's best validation accuracy, epochs trained, wall and CPU time; the last line is
`pruned best=<acc> time=<s> | full best=<acc> time=<s>`.

    python bench/search_digits.py [--trials 8] [--epochs 3] [--threads 1]

One intra-op thread by default: on a shared 2-core machine torch's OpenMP threads spin against other
processes and a step runs many times slower than with one thread.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from fastlearn.app.search import SearchSpace, search

RECIPE = "digits"
BASE = {"arch": "test_resnet", "pretrained": False, "strategy": "scratch", "size": 32, "augment": False}
SPACE = SearchSpace(lr=(1e-4, 3e-2), wd=(1e-5, 1e-1), bs=(32, 64, 128), drop_rate=(0.0, 0.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    over = {**BASE, "epochs": a.epochs}
    print(f"digits sample, recipe {RECIPE} + {over}; {a.trials} trials in 2 rounds, seed {a.seed}; {SPACE}; "
          f"torch {torch.__version__}, {a.threads} thread(s), {platform.processor() or platform.machine()}",
          flush=True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, prune in (("pruned", True), ("full", False)):
            t, c = time.perf_counter(), time.process_time()
            res = search("digits", RECIPE, n_trials=a.trials, rounds=2, space=SPACE, overrides=over, prune=prune,
                         out_dir=Path(tmp) / name, seed=a.seed)
            secs, cpu = time.perf_counter() - t, time.process_time() - c
            out[name] = (res.best_value, secs)
            print(f"{name}: best accuracy {res.best_value:.4f} (trial {res.best_trial}: lr {res.best.lr:.2e}, "
                  f"wd {res.best.wd:.2e}, bs {res.best.bs}, drop_rate {res.best.drop_rate:.2f}); "
                  f"{res.n_pruned} of {len(res.rows)} trials pruned; {res.epochs_run} epochs; "
                  f"{secs:.1f}s wall, {cpu:.1f}s CPU", flush=True)
            for r in res.rows:
                print(f"  trial {r['trial']} round {r['round']} {r['state']:8s} lr {r['lr']:.2e} wd {r['wd']:.2e} "
                      f"bs {r['bs']} drop {r['drop_rate']:.2f} epochs {r['epochs']} acc {r['accuracy']:.4f} "
                      f"{r['seconds']}s", flush=True)
    (pa, pt), (fa, ft) = out["pruned"], out["full"]
    print(f"time ratio pruned/full = {pt / ft:.2f}; accuracy difference pruned-full = {pa - fa:+.4f}")
    print(f"pruned best={pa:.4f} time={pt:.1f} | full best={fa:.4f} time={ft:.1f}")


if __name__ == "__main__":
    main()
