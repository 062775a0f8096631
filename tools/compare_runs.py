"""Are two run folders the same training, bit for bit? (A refactor's proof that behaviour did not change.)

Compares `model.safetensors` and `trace.csv` byte for byte, and `metrics.csv` byte for byte once its `seconds`
column (wall time, never reproducible) is dropped. Prints one line per file and exits 1 on any difference.

    python tools/compare_runs.py RUN_A RUN_B

Typical use: the digits quickstart at seed 0 on one thread (deterministic on the CPU) from two checkouts:
    OMP_NUM_THREADS=1 PYTHONPATH=<checkout> python -m fastlearn.cli train digits --data digits --run-dir A seed=0
"""
from __future__ import annotations

import csv
import hashlib
import io
import sys
from pathlib import Path

WALL_CLOCK = {"seconds"}  # columns that measure time, not training


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _metrics_without_time(path: Path) -> bytes:
    rows = list(csv.reader(io.StringIO(path.read_text())))
    keep = [i for i, name in enumerate(rows[0]) if name not in WALL_CLOCK]
    return "\n".join(",".join(row[i] for i in keep) for row in rows).encode()


def compare(a: Path, b: Path) -> list[tuple[str, bool, str]]:
    "(file, identical, detail) for each compared file."
    out = []
    for name, read in (("model.safetensors", Path.read_bytes), ("trace.csv", Path.read_bytes),
                       ("metrics.csv", _metrics_without_time)):
        pa, pb = a / name, b / name
        missing = [str(p) for p in (pa, pb) if not p.is_file()]
        if missing:
            out.append((name, False, f"missing: {', '.join(missing)}"))
            continue
        da, db = read(pa), read(pb)
        same = da == db
        detail = f"sha256 {_digest(da)}" + ("" if same else f" vs {_digest(db)}") + f", {len(da)} bytes"
        if name == "metrics.csv":
            detail += " (without the wall-clock column `seconds`)"
        out.append((name, same, detail))
    return out


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__)
        return 2
    results = compare(Path(args[0]), Path(args[1]))
    for name, same, detail in results:
        print(f"{'identical' if same else 'DIFFERENT'}  {name}: {detail}")
    return 0 if all(same for _, same, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
