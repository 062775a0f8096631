"""Progress: a rich live bar on a terminal, one plain line per epoch elsewhere (CI logs, files).

fastai's `ProgressCallback` (fastprogress) redraws its bar into non-terminal logs many times per
epoch; the learners fastlearn builds drop it for `EpochProgress`, which never redraws into a file.
"""
from __future__ import annotations

import time
from typing import IO, Sequence

from . import fastai_quiet  # noqa: F401  (fastai first, with its one import-time warning silenced)
from fastai.callback.core import Callback  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .console import console, console_width, is_terminal, say


__all__ = ["EpochProgress", "summary_table", "is_terminal", "console", "console_width", "epoch_metrics"]


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
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"),
                                      TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                      transient=True)
            self._progress.start()

    def _stage_clock(self) -> tuple[int, int]:
        "Epochs of the stage before this fit (a resumed stage goes on from its checkpoint) and the stage's total."
        r = getattr(self.learn, "resume_at", None)  # fastlearn.checkpoint.ResumeAt, during a resumed stage
        return (0, self.n_epoch) if r is None else (r.epoch_offset, r.stage_epochs)

    def before_epoch(self):
        self.t_epoch = time.perf_counter()
        if self._in_fit and self._progress is not None:
            off, total = self._stage_clock()
            self._task = self._progress.add_task(f"{self.stage} epoch {self.epoch + 1 + off}/{total}",
                                                 total=len(self.dls.train), loss="-")

    def after_batch(self):
        if not (self._in_fit and self._progress is not None and self.training):
            return
        now = time.perf_counter()
        # reading the loss waits for the device: twice a second is enough. A batch a resume skips (ResumeAt
        # empties its yb: it ran before the interruption) only moves the bar
        if len(self.yb) == 0 or now - self._t_loss < 0.5:
            self._progress.update(self._task, advance=1)
            return
        self._t_loss = now
        # the Recorder's own value, not `learn.smooth_loss`: the Recorder sets that only after a batch it recorded,
        # and until then (a resumed process's first batches) Learner forwards the name to the model, which raises
        loss = self.learn.recorder.smooth_loss.value
        self._progress.update(self._task, advance=1, loss=f"{float(loss):.4f}")

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
        say(f"{stage}epoch {self.epoch + 1 + off}/{total} " + " ".join(parts) + timing, self.stream)

    def after_fit(self):
        self._in_fit = False
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# short headers for the run summary's long keys, so that its table fits 80 columns (a CI log, `| tee`); other keys
# get underscores as spaces, so that a narrow table wraps between words
_HEADERS = {"trainable_groups": "groups", "peak_lr": "peak LR", "train_loss": "train loss", "valid_loss": "valid loss"}


def _cell(key: str, v) -> str:
    return f"{v:.1f}" if key == "seconds" and isinstance(v, (int, float)) else _fmt(v)


def _fitted_widths(headers: list[str], cells: list[list[str]], avail: int) -> list[int]:
    """Each column's width in a table `avail` characters wide: its header on one line where that fits, else headers
    wrapped between words, the columns that save the most first; never narrower than a value or a header word.
    rich shrinks the widest columns first, whatever their words, so it would split `accuracy` to keep `peak LR`."""
    need = [max([len(h)] + [len(c[j]) for c in cells]) for j, h in enumerate(headers)]
    least = [max([len(w) for w in h.split()] + [len(c[j]) for c in cells]) for j, h in enumerate(headers)]
    widths = list(need)
    over = sum(widths) + 3 * len(widths) + 1 - avail  # rich's box: a border and two padding spaces per column
    for j in sorted(range(len(widths)), key=lambda j: need[j] - least[j], reverse=True):
        cut = max(0, min(over, need[j] - least[j]))
        widths[j], over = widths[j] - cut, over - cut
    return widths


def summary_table(rows: Sequence[dict], title: str = "fastlearn run", caption: str | None = None) -> str:
    "Render rows (dicts with the same keys) as a rich table, `caption` under it; returns the text it printed."
    t = Table(title=title, caption=caption, caption_justify="left")
    keys = list(rows[0]) if rows else []
    headers = [_HEADERS.get(k, k.replace("_", " ")) for k in keys]
    cells = [[_cell(k, r[k]) for k in keys] for r in rows]
    con = console()
    widths = _fitted_widths(headers, cells, con.width)
    for j, k in enumerate(keys):
        wrapped = widths[j] < len(headers[j])
        # values are never cut; headers wrap between words (rich folds a word only where even that cannot fit)
        t.add_column(headers[j], justify="right" if rows and isinstance(rows[0][k], (int, float)) else "left",
                     min_width=max((len(row[j]) for row in cells), default=1), width=widths[j] if wrapped else None,
                     overflow="fold")
    for row in cells:
        t.add_row(*row)
    with con.capture() as cap:
        con.print(t)
    text = cap.get()
    print(text, end="", flush=True)
    return text


def first_metric(learn) -> tuple[float, float]:
    "(valid_loss, first metric) of the last epoch fastai recorded; the metric is nan when there is none."
    vals = epoch_metrics(learn.recorder)
    names = [k for k in vals if k not in ("epoch", "train_loss", "valid_loss")]
    score = float(vals[names[0]]) if names else float("nan")
    return float(vals.get("valid_loss", float("nan"))), score
