"""README command 1 (`fastlearn train digits --data digits`) over seeds and CPU thread counts.

Each run is the exact CLI command in a fresh process (`seed=N` as an override, the thread count through
OMP_NUM_THREADS, which torch reads at start-up), its wall time measured from outside, its accuracy read back
from the run folder's summary.json. Prints one row per run, the grid's min/mean/max, and PASS/MISS against
the target (accuracy >= 0.97 and wall time <= 60 s on every run).

    python bench/quickstart_grid.py [--seeds 0 1 2 3 4] [--threads 1 2] [--out runs/quickstart_grid]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TARGET_ACC, TARGET_S = 0.97, 60.0


def one(seed: int, threads: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"seed{seed}-t{threads}"
    cmd = [sys.executable, "-m", "fastlearn.cli", "train", "digits", "--data", "digits", "--run-dir", str(run_dir),
           f"seed={seed}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    (out / f"seed{seed}-t{threads}.log").write_text(p.stdout + p.stderr)  # what the user would have read
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-2000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"seed {seed}, {threads} threads: exit {p.returncode}")
    s = json.loads((run_dir / "summary.json").read_text())
    return {"seed": seed, "threads": threads, "accuracy": float(s["accuracy"]), "wall_s": wall,
            "strategy": s.get("strategy"), "kept": (s.get("kept") or {}).get("stage"),
            "lr_find_s": (s.get("timings") or {}).get("lr_find")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="runs/quickstart_grid")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides passed to every run")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        out = out / time.strftime("%Y%m%d-%H%M%S")
    rows = []
    print(f"{'seed':>4} {'threads':>7} {'accuracy':>9} {'wall s':>7} {'kept':>8}", flush=True)
    for threads in a.threads:
        for seed in a.seeds:
            r = one(seed, threads, out, a.overrides)
            rows.append(r)
            print(f"{r['seed']:>4} {r['threads']:>7} {r['accuracy']:>9.4f} {r['wall_s']:>7.1f} {str(r['kept']):>8}",
                  flush=True)
    accs, walls = [r["accuracy"] for r in rows], [r["wall_s"] for r in rows]
    print(f"accuracy min {min(accs):.4f} mean {sum(accs) / len(accs):.4f} max {max(accs):.4f}; "
          f"wall s min {min(walls):.1f} mean {sum(walls) / len(walls):.1f} max {max(walls):.1f}")
    ok = min(accs) >= TARGET_ACC and max(walls) <= TARGET_S
    print(f"{'PASS' if ok else 'MISS'} quickstart: every run >= {TARGET_ACC:.0%} (min {min(accs):.4f}) "
          f"in <= {TARGET_S:.0f} s (max {max(walls):.1f} s)")
    (out / "grid.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
