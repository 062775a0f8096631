"""Ctrl-C (SIGINT) and SIGTERM during training: stop at the next batch boundary, write a checkpoint there, and
raise `TrainingInterrupted` naming it and how to resume.

    with interrupt_guard(run_dir):        # installs the handlers; puts the previous ones back on exit
        learn.fit(3, cbs=[Checkpointer(run_dir), StopOnSignal()])

- Inside a training fit that has a `Checkpointer`, the first signal only sets a flag. `StopOnSignal` sees it at
  the next training batch boundary, writes a mid-epoch checkpoint there (at an epoch's last batch: after that
  epoch's validation, an epoch-boundary one) and stops the fit; a resume from it is exact.
- Outside such a fit (lr_find, between stages, the final validation) the signal stops the run at once, and the
  latest checkpoint stays as it is.
- A second signal more than `REPEAT_S` after the first stops at once, even mid-write: checkpoint writes are
  atomic, so the previous checkpoint survives. Signals closer together count as one request: a scheduler
  signals every process of a job and torchrun forwards the signal to its workers as well.
- Under DDP every rank agrees on the flag at each batch boundary, so all ranks stop at the same batch; rank 0
  writes the checkpoint while the others wait at a barrier.
- Python installs signal handlers only on the main thread: elsewhere the guard does nothing. A signal the
  process was started ignoring (nohup, a background job) stays ignored.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastai.callback.core import Callback, CancelFitException

from ..base.errors import TrainingInterrupted
from ..base.ranks import all_reduce_max, barrier, is_distributed
from ..run.checkpoint import latest_checkpoint


__all__ = ["interrupt_guard", "StopOnSignal", "SIGNALS", "REPEAT_S"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 1.0  # seconds: a signal this soon after the first is the same request (launcher + scheduler)


@dataclass
class _Request:
    "What the handler saw; shared with `StopOnSignal`."
    signum: int = 0         # the first signal received (0: none)
    at: float = 0.0         # when (time.monotonic)
    armed: int = 0          # > 0 while a fit that can checkpoint at a batch boundary runs
    closing: bool = False   # the guard is restoring the handlers: record only


class _Stop(KeyboardInterrupt):
    """Unwinds the run; `interrupt_guard` turns it into `TrainingInterrupted`. A KeyboardInterrupt, so no
    `except Exception` on the way swallows it, and DataLoader worker processes (forked with these handlers)
    exit quietly on it, as torch's worker loop does on Ctrl-C."""

    def __init__(self, signum: int, where: str = "", checkpoint: Path | None = None, saved: bool = False,
                 forced: bool = False):
        super().__init__(signum)
        self.signum, self.where, self.checkpoint, self.saved, self.forced = signum, where, checkpoint, saved, forced


_active: _Request | None = None  # the guard in force (signal handlers are per process, so is this)


def _handler(signum: int, frame) -> None:
    req = _active
    if req is None:  # only installed while a guard is active; be a plain Ctrl-C otherwise
        raise KeyboardInterrupt
    now = time.monotonic()
    if req.signum:
        if req.closing or now - req.at < REPEAT_S:
            return
        raise _Stop(signum, forced=True)
    req.signum, req.at = signum, now
    if not req.armed and not req.closing:
        raise _Stop(signum)


def _restore(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h)
    previous.clear()


@contextmanager
def interrupt_guard(run_dir: str | Path):
    """Handle SIGINT/SIGTERM inside the block as the module docstring says; `TrainingInterrupted` comes out of it.
    The previous handlers are back when the block ends, however it ends; an inner guard leaves all to the outer."""
    global _active
    if _active is not None or threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = {}
    for s in SIGNALS:
        old = signal.getsignal(s)
        if old is not signal.SIG_IGN and old is not None:  # None: set outside Python, we could not put it back
            previous[s] = old
    req = _Request()
    _active = req
    try:
        for s in list(previous):
            signal.signal(s, _handler)
        yield req
    except _Stop as e:
        req.closing = True
        _restore(previous)
        raise _interrupted(e, run_dir) from None
    finally:
        req.closing = True
        _restore(previous)
        _active = None


def _interrupted(e: _Stop, run_dir) -> TrainingInterrupted:
    ckpt = e.checkpoint if e.checkpoint is not None else latest_checkpoint(run_dir)
    return TrainingInterrupted(e.signum, run_dir, ckpt, e.where, saved=e.saved and ckpt is not None, forced=e.forced)


class StopOnSignal(Callback):
    """Under `interrupt_guard`, in a fit with a `Checkpointer`: once a signal has come, checkpoint at the next
    training batch boundary and stop (fastai's CancelFitException, so every callback's after_fit runs); the
    guard then raises `TrainingInterrupted`. `n_stages` only labels the position in messages."""
    order = 99  # after Checkpointer (90), so a checkpoint it wrote at this batch is not written twice
    run_valid = False

    def __init__(self, n_stages: int | None = None):
        self.n_stages = n_stages
        self._req, self._stop, self._epoch_end = None, None, False

    def before_fit(self):
        self._stop, self._epoch_end = None, False
        self._req = _active if getattr(self.learn, "checkpointer", None) is not None else None
        if self._req is not None:
            self._req.armed += 1

    def _signal(self) -> int:
        "The signal every rank has agreed on (0: none yet)."
        n = self._req.signum
        if is_distributed():
            n = all_reduce_max(n)
            if n and not self._req.signum:  # another rank got it: this one stops too, as if it had
                self._req.signum, self._req.at = n, time.monotonic()
        return n

    def _clock(self) -> tuple[int, int]:
        "Epochs of the stage done before this fit (after a resume) and the stage's epochs in all."
        off = self.learn.checkpointer.epochs_before_fit()
        return off, self.n_epoch + off

    def _stage(self) -> str:
        i = self.learn.checkpointer.stage_index + 1
        return f"stage {i}/{self.n_stages}" if self.n_stages else f"stage {i}"

    def _save(self, **position) -> Path | None:
        "The checkpoint at this step: the Checkpointer's own if it just wrote one, else written now (rank 0)."
        ck = self.learn.checkpointer
        name = f"ckpt-{ck.global_step}.pt"
        path = ck.written[-1] if ck.written and ck.written[-1].name == name else ck.save(**position)
        barrier()  # the other ranks leave only once rank 0's checkpoint is complete
        return path

    def after_batch(self):
        if self._req is None or len(self.yb) == 0:  # not guarded, or a batch ResumeAt skipped
            return
        ga = getattr(self.learn, "gradient_accumulation", None)
        if ga is not None and ga.count:  # gradients mid-accumulation: no checkpoint can hold them; wait
            return
        signum = self._signal()
        if not signum:
            return
        done = self.iter + 1
        if done == self.n_iter:  # the epoch's last batch: stop after its validation, at the epoch boundary
            self._epoch_end = True
            return
        off, total = self._clock()
        path = self._save(epoch=self.epoch + off, iter=done)
        self._stop = _Stop(signum, f"{self._stage()} epoch {self.epoch + off + 1}/{total} batch {done}/{self.n_iter}",
                           path, saved=True)
        raise CancelFitException()

    def after_epoch(self):
        if self._req is None:
            return
        signum = self._req.signum if self._epoch_end else self._signal()
        if not signum:
            return
        off, total = self._clock()
        ck, epoch = self.learn.checkpointer, self.epoch + 1 + off
        path = self._save(epoch=epoch, iter=0, valid_loss=ck.epoch_valid_loss(), stage_epochs=total)
        self._stop = _Stop(signum, f"{self._stage()} after epoch {epoch}/{total}", path, saved=True)
        raise CancelFitException()

    def after_fit(self):
        if self._req is None:
            return
        self._req.armed -= 1
        if self._stop is None:  # came after the fit's last check: the stage-end checkpoint is the latest
            signum = self._signal()
            if signum:
                self._stop = _Stop(signum, f"the end of {self._stage()}")
        stop, self._stop, self._req = self._stop, None, None
        if stop is not None:
            raise stop
