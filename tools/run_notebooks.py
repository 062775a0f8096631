"""Execute every notebook in nbs/ offline on CPU and fail if any cell raises (CI does this through the docs build,
`tools/build_docs.sh`, which executes the same notebooks once and renders them; this tool is for --save).

    python tools/run_notebooks.py           # run them (outputs are not written back)
    python tools/run_notebooks.py --save    # also store the fresh outputs in nbs/ (then nbdev-clean them)

nbdev's runner (`nbdev-test`) executes the notebooks in-process (no Jupyter kernel needed) and skips cells
marked `#| eval: false` (downloads, GPUs, several processes). It runs NB_WORKERS notebooks at once (default
2), each with one torch thread: more threads than cores make torch's OpenMP workers spin against each other.
Extra arguments go to `nbdev-test` (e.g. `--file-re '0[12]_.*'`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} not found; install the dev extras: pip install -e '.[dev]'")
    return path


def main(args: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [_tool("nbdev-test"), "nbs", "--n-workers", os.environ.get("NB_WORKERS", "2"), "--timing", *args]
    print("+", " ".join(cmd[1:]), flush=True)
    rc = subprocess.call(cmd, env=env, cwd=root)
    if rc == 0 and "--save" in args:  # nbdev's runner stores per-cell timings that nbformat's schema rejects
        rc = subprocess.call([_tool("nbdev-clean"), "--fname", "nbs"], cwd=root)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
