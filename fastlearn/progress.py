"""Progress: a rich live bar on a terminal, one plain line per epoch elsewhere (CI logs, files).

fastai's `ProgressCallback` (fastprogress) redraws its bar into non-terminal logs many times per
epoch; the learners fastlearn builds drop it for `EpochProgress`, which never redraws into a file.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Sequence

from fastai.callback.core import Callback

__all__ = ["EpochProgress", "summary_table", "is_terminal", "console", "console_width", "epoch_metrics"]


def is_terminal(stream: IO | None = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def console_width() -> int | None:
    "Columns to print in: $COLUMNS when set, else the terminal's (None: rich asks it), else 80 (piped, a file, CI)."
    import os
    cols = os.environ.get("COLUMNS", "").strip()
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    return None if is_terminal() else 80


def console():
    "The shared rich console, `console_width()` wide (plain text, no colour codes, when output is not a terminal)."
    from rich.console import Console
    return Console(highlight=False, soft_wrap=True, width=console_width()) if is_terminal() else \
        Console(highlight=False, soft_wrap=True, force_terminal=False, color_system=None, width=console_width())


def epoch_metrics(recorder) -> dict:
    "This epoch's logged values by name (train_loss, valid_loss, metrics), from fastai's `Recorder.log`."
    names = [n for n in list(recorder.metric_names)[1:] if n != "time"]
    return dict(zip(names, list(recorder.log)[1:]))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


class EpochProgress(Callback):
    "Live batch progress (terminal only) and one line per finished epoch (always)."
    order = 65            # after Recorder (50) has appended the epoch's values
    quiet_in_lr_find = True
    _t_loss = float("-inf")  # when the live bar last showed the loss

    def __init__(self, live: bool | None = None, stream: IO | None = None):
        self.stream = stream
        self.live = is_terminal(stream) if live is None else live
        self.stage = ""
        self._in_fit = False

    def before_fit(self):
        # fastai's validate()/get_preds() fire before_fit too, with `create_mbar` off (`no_mbar`)
        self.t_fit, self._in_fit = time.perf_counter(), getattr(self.learn, "create_mbar", True)
        self._progress = None
        if self.live and self._in_fit:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"),
                                      TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                      transient=True)
            self._progress.start()

    def _stage_clock(self) -> tuple[int, int]:
        "Epochs of the stage before this fit (a resumed stage goes on from its checkpoint) and the stage's total."
        r = getattr(self.learn, "resume_at", None)  # fastlearn.checkpoint.ResumeAt, during a resumed stage
        off = r.epoch_offset if r is not None else 0
        return off, (r.stage_epochs if r is not None else self.n_epoch)

    def before_epoch(self):
        self.t_epoch = time.perf_counter()
        if self._in_fit and self._progress is not None:
            off, total = self._stage_clock()
            self._task = self._progress.add_task(f"{self.stage} epoch {self.epoch + 1 + off}/{total}",
                                                 total=len(self.dls.train), loss="-")

    def after_batch(self):
        if self._in_fit and self._progress is not None and self.training:
            now = time.perf_counter()
            if now - self._t_loss < 0.5:  # reading the loss waits for the device: twice a second is enough
                self._progress.update(self._task, advance=1)
                return
            self._t_loss = now
            self._progress.update(self._task, advance=1, loss=f"{float(self.learn.smooth_loss):.4f}")

    def after_epoch(self):
        if not self._in_fit:
            return
        if self._progress is not None:
            self._progress.remove_task(self._task)
        parts = [f"{n} {_fmt(v)}" for n, v in epoch_metrics(self.learn.recorder).items()]
        stage = f"[{self.stage}] " if self.stage else ""
        off, total = self._stage_clock()
        now = time.perf_counter()
        timing = f" time {now - self.t_epoch:.1f}s"  # this epoch's (training and validation)
        if self.epoch > 0:  # and the stage's so far, labelled (since the resume, for a resumed stage)
            timing += f" ({'stage since resume' if off else 'stage'} {now - self.t_fit:.1f}s)"
        line = f"{stage}epoch {self.epoch + 1 + off}/{total} " + " ".join(parts) + timing
        print(line, file=self.stream or sys.stdout, flush=True)

    def after_fit(self):
        self._in_fit = False
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def summary_table(rows: Sequence[dict], title: str = "fastlearn run") -> str:
    "Render rows (dicts with the same keys) as a rich table; returns the text it printed."
    from rich.table import Table
    t = Table(title=title)
    keys = list(rows[0]) if rows else []
    cells = [[_fmt(r[k]) for k in keys] for r in rows]
    for j, k in enumerate(keys):  # values are never cut; in a narrow console the headers fold instead
        t.add_column(k, justify="right" if rows and isinstance(rows[0][k], (int, float)) else "left",
                     min_width=max((len(c[j]) for c in cells), default=1), overflow="fold")
    for c in cells:
        t.add_row(*c)
    c = console()
    with c.capture() as cap:
        c.print(t)
    text = cap.get()
    print(text, end="", flush=True)
    return text
