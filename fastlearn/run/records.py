"""What a run records in its folder as it trains: the per-step hyper-parameter trace (`trace.csv`), the per-epoch
metrics (`metrics.csv`), the environment (`environment.json`), the plots (`loss.png`, `schedule.png`), and the
stage rows of the summary."""
from __future__ import annotations

import csv
import platform
import subprocess
import time
from collections import Counter
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from fastai.callback.core import Callback

from ..base.version import __version__
from ..base.progress import epoch_metrics

__all__ = ["HyperTrace", "MetricsLog", "new_run_dir", "environment", "plot_run", "score_key", "stage_row", "write_trace"]


class HyperTrace(Callback):
    """Records every optimizer group's LR and momentum/beta1 at each training step (what the optimizer used), and
    the step's loss. The losses stay device tensors until `rows` is read (at the end of each epoch, or by a
    checkpoint), then come over in one transfer: no step waits for the device."""
    order = 70

    def __init__(self):
        self._rows: list[dict] = []
        self._pending: list[tuple[dict, object]] = []  # (row, its loss as a detached tensor) not yet read
        self.stage = ""

    @property
    def rows(self) -> list[dict]:
        self._flush()
        return self._rows

    @rows.setter
    def rows(self, value: list[dict]):
        self._rows, self._pending = value, []

    def _flush(self) -> None:
        "Write the pending losses into their rows, read from the device in one transfer."
        if self._pending:
            losses = [t for _, t in self._pending]
            vals = torch.stack(losses).tolist() if len({(t.device, t.dtype) for t in losses}) == 1 else \
                [float(t) for t in losses]
            for (row, _), v in zip(self._pending, vals):
                row["loss"] = v
            self._pending = []

    def after_batch(self):
        if not self.training or len(self.yb) == 0:
            return
        if hasattr(self.opt, "hyper"):  # fastlearn's optimizers read one hyper-parameter without the others
            lr, mom = self.opt.hyper("lr"), self.opt.hyper("mom")
        else:
            hs = self.opt.hypers
            lr, mom = [h["lr"] for h in hs], [h["mom"] for h in hs if "mom" in h]
        row = {"step": len(self._rows), "stage": self.stage, "lr": [float(v) for v in lr],
               "mom": [float(v) for v in mom], "loss": None}
        self._rows.append(row)
        self._pending.append((row, self.learn.loss.detach()))

    def after_epoch(self):
        self._flush()


class MetricsLog(Callback):
    "Appends one row per epoch (stage, epoch, train/valid loss, metrics, seconds) to a CSV file."
    order = 66

    def __init__(self, path: Path, write: bool = True):
        self.path, self.rows, self.stage, self.write = Path(path), [], "", write

    def before_epoch(self):
        self._t = time.perf_counter()

    @staticmethod
    def epoch_row(learn, stage: str, epoch: int, t0: float) -> dict:
        "A metrics.csv row: the stage, the epoch, the recorder's losses and metrics, the seconds since `t0`."
        return {"stage": stage, "epoch": epoch, **{n: float(v) for n, v in epoch_metrics(learn.recorder).items()},
                "seconds": round(time.perf_counter() - t0, 3)}

    def after_epoch(self):
        self.rows.append(self.epoch_row(self.learn, self.stage, len(self.rows) + 1, self._t))
        if not self.write:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)


def new_run_dir(root: str | Path = "runs", name: str = "run") -> Path:
    "A fresh run folder `root/name-YYYYmmdd-HHMMSS[-k]`; never reuses (so never overwrites) an existing one."
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1000):
        p = root / (base if k == 0 else f"{base}-{k}")
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder under {root}")


def _git_commit(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(seed: int) -> dict:
    "What reproduces a run besides the recipe: seed, library and dependency versions, devices, git commits."
    vers = {}
    for pkg in ("torch", "torchvision", "fastai", "timm", "numpy", "rich", "scikit-learn"):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            vers[pkg] = None
    return {"seed": seed, "fastlearn": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "versions": vers,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(),
            "git_commit": {"cwd": _git_commit(Path.cwd()), "fastlearn": _git_commit(Path(__file__).parents[1])}}


def _epoch_end_steps(trace_rows: list[dict], epoch_rows: list[dict]) -> list[float]:
    "The optimizer step at which each logged epoch ended: stages differ in steps per epoch (the head on features)."
    steps_of, epochs_of = Counter(r["stage"] for r in trace_rows), Counter(r["stage"] for r in epoch_rows)
    first_of = {r["stage"]: r["step"] for r in reversed(trace_rows)}  # each stage's first step
    out, seen = [], Counter()
    for r in epoch_rows:
        st = r["stage"]
        seen[st] += 1
        per = steps_of[st] / max(1, epochs_of[st])
        out.append(first_of.get(st, out[-1] if out else 0) + per * seen[st])
    return out


def plot_run(trace_rows: list[dict], epoch_rows: list[dict], out: Path) -> None:
    "loss.png (training loss per step, validation loss per epoch) and schedule.png (LR and momentum)."
    from matplotlib.figure import Figure  # heavy, only for the two plots; no pyplot: never switches the user's backend
    if not trace_rows:
        return
    steps = [r["step"] for r in trace_rows]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, [r["loss"] for r in trace_rows], lw=0.8, label="train loss (per step)")
    if epoch_rows and "valid_loss" in epoch_rows[0]:
        ax.plot(_epoch_end_steps(trace_rows, epoch_rows), [r["valid_loss"] for r in epoch_rows], "o-",
                label="valid loss (per epoch)")
    ax.set_xlabel("optimizer step"); ax.set_ylabel("loss"); ax.legend(); ax.set_title("loss")
    fig.tight_layout(); fig.savefig(out / "loss.png", dpi=100)
    fig = Figure(figsize=(7, 5))
    a1, a2 = fig.subplots(2, 1, sharex=True)
    a1.plot(steps, [r["lr"][-1] for r in trace_rows], label="head LR")
    a1.plot(steps, [r["lr"][0] for r in trace_rows], label="first-group LR")
    a1.set_yscale("log"); a1.set_ylabel("learning rate"); a1.legend()
    if trace_rows[0]["mom"]:
        a2.plot(steps, [r["mom"][-1] for r in trace_rows], color="C3")
    a2.set_ylabel("momentum / beta1"); a2.set_xlabel("optimizer step")
    fig.suptitle("one-cycle schedule per stage"); fig.tight_layout()
    fig.savefig(out / "schedule.png", dpi=100)


def score_key(stage: dict) -> str:
    "The first metric's name in a stage row (after the losses)."
    return next((k for k in stage if k not in ("stage", "trainable_groups", "epochs", "peak_lr", "train_loss",
                                               "valid_loss", "seconds", "epoch")), "")


def stage_row(name: str, trainable: int, epochs: int, peak: float, vals: dict, seconds: float) -> dict:
    "A stage's row in the run summary (summary.json `stages`, the final table): its values in this column order."
    return {"stage": name, "trainable_groups": trainable, "epochs": epochs, "peak_lr": peak, **vals, "seconds": seconds}


def write_trace(rows: list[dict], path: Path) -> None:
    "trace.csv: per optimizer step, the head's and the first group's LR, the momentum and the loss."
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "stage", "lr_head", "lr_first", "mom", "loss"])
        for row in rows:
            w.writerow([row["step"], row["stage"], row["lr"][-1], row["lr"][0],
                        row["mom"][-1] if row["mom"] else "", row["loss"]])
