"""Keep the best: the weights a run ends with are never clearly worse on validation than a stage end it passed.

Each stage end (the head on cached features included: `auto`'s linear probe) and the final model after EMA/SWA (and
the soup) are candidates. A later one replaces the best only when `clearly_better`: a validation score (the first
metric) higher by more than one binomial standard error of the validation set, at least one item; without a metric,
a lower loss. Choosing on the validation set is what fastai's `SaveModelCallback` does; on a small one the plain
order (`better`) keeps whichever candidate was luckiest on those images, hence the margin. `StopWhenWorse` is the
same rule the other way: an epoch clearly worse ends fine-tuning.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelFitException

from ..base.progress import first_metric
from ..core.models import unwrap_model
from ..core.weights import cpu_state_dict, load_weights, save_weights

__all__ = ["Candidate", "better", "clearly_better", "KeepBest", "clearly_worse", "StopWhenWorse"]


@dataclass(frozen=True)
class Candidate:
    "A point in the run whose weights could be kept."
    stage: str          # stage name: "head", "top3", "all", "swa", "final"...
    score: float        # first validation metric, higher is better (nan when the learner has no metric)
    valid_loss: float
    step: int = 0       # optimizer steps of the run so far (trace rows)

    def to_dict(self) -> dict:
        return asdict(self)


def _key(c: Candidate) -> tuple[float, float]:
    score = c.score if math.isfinite(c.score) else -math.inf
    loss = c.valid_loss if math.isfinite(c.valid_loss) else math.inf
    return score, -loss


def better(a: Candidate, b: Candidate | None) -> bool:
    "True when `a` should replace `b`: a higher score, or the same score and a lower-or-equal validation loss."
    return b is None or _key(a) >= _key(b)


def _noise(p: float, n: int) -> float:
    "One binomial standard error of an accuracy `p` on `n` validation items, and at least one item."
    n = max(1, n)
    return max(math.sqrt(max(p * (1 - p), 0.0) / n), 1 / n)


def clearly_better(a: Candidate, b: Candidate | None, n_valid: int | None) -> bool:
    """Whether `a` should replace `b` on a validation set of `n_valid` items: a score higher by more than the noise of
    that set (`_noise` of b's); without a metric, a lower loss. A candidate better by an image or two is as likely to
    be worse on new data, so the earlier one stays. `n_valid=None` falls back to `better`."""
    if b is None or n_valid is None:
        return better(a, b)
    if not (math.isfinite(a.score) and math.isfinite(b.score)):
        return a.valid_loss < b.valid_loss
    return a.score > b.score + _noise(b.score, n_valid)


class KeepBest:
    """Tracks the best candidate and a CPU copy of its weights; with `path`, also writes them there (atomically,
    main process only) so a resumed run still knows them."""

    def __init__(self, path: str | Path | None = None, write: bool = True, n_valid: int | None = None):
        self.path, self.write, self.n_valid = (Path(path) if path is not None else None), write, n_valid
        self.best: Candidate | None = None
        self._weights: dict[str, torch.Tensor] | None = None

    def offer(self, model: torch.nn.Module, cand: Candidate) -> bool:
        "Remember `cand` and `model`'s weights if it beats the best so far; returns whether it did."
        if not clearly_better(cand, self.best, self.n_valid):
            return False
        self.best = cand
        self._weights = cpu_state_dict(model)
        if self.path is not None and self.write:
            save_weights(model, self.path)
        return True

    def restore(self, model: torch.nn.Module) -> None:
        "Load the best candidate's weights into `model` (from memory, else from `path`)."
        if self._weights is not None:
            unwrap_model(model).load_state_dict(self._weights)
        elif self.path is not None and self.path.exists():
            load_weights(model, self.path)
        else:
            raise RuntimeError("KeepBest has no weights to restore: no candidate was offered in this process and "
                               f"{self.path} does not exist")

    def state_dict(self) -> dict:
        return {"best": None if self.best is None else self.best.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        "Continue after a resume: the best candidate's record (its weights stay on disk at `path`)."
        b = state.get("best")
        self.best = None if b is None else Candidate(**b)
        self._weights = None


def clearly_worse(score: float, loss: float, best: Candidate, n_valid: int) -> bool:
    """Whether an epoch's validation (`score`: first metric, `loss`) is worse than `best` beyond the noise of `n_valid`
    items: a higher loss and a score lower by more than `_noise` of the best's (without a metric, a higher loss
    alone). A dip of an item or two at a one-cycle's peak LR is no reason to stop; a stage that unlearns is."""
    if not loss > best.valid_loss:
        return False
    if not (math.isfinite(score) and math.isfinite(best.score)):
        return True
    return score < best.score - _noise(best.score, n_valid)


class StopWhenWorse(Callback):
    """Validation-guided fine-tuning: an epoch `clearly_worse` than keep-best's best so far stops the fit. The network
    goes back to the weights of this fit's last epoch that was not clearly worse (a CPU copy; none when the first
    epoch is the worse one, or the fit resumed mid-way), so that what keep-best and the probe+FT ensemble judge at the
    end is fine-tuning before it went wrong, not after (bench/real_data.py: brain_mri at 80 images per class, stopped
    after epoch 2, scored 4 points more on test with epoch 1's network in the ensemble). The stage's row and its
    keep-best offer keep the stopped epoch's numbers; the run's final validation scores the weights put back. It stops
    before the `Checkpointer` (order 90) saves that epoch, so no checkpoint holds a state the run walked away from.
    Every epoch's (seconds on `clock`, score) goes to `reached`."""
    order = 85  # after Recorder (50), the progress line (65), MetricsLog (66) and HyperTrace (70)

    def __init__(self, keep: KeepBest | None, clock, enabled: bool = True):
        self.keep, self.clock, self.enabled = keep, clock, enabled
        self.stage = ""
        self.reached: list[tuple[float, float]] = []  # (run clock at the epoch's end, its score)
        self.stopped = ""                              # why the run stopped early ("" while it has not)
        self._last_good: tuple[int, dict] | None = None  # (epoch, CPU weights) of this fit's last accepted epoch

    def before_fit(self):
        self._last_good = None

    def after_epoch(self):
        loss, score = first_metric(self.learn)
        self.reached.append((round(self.clock(), 3), score))
        best = self.keep.best if self.keep is not None else None
        if not self.enabled or best is None or not clearly_worse(score, loss, best, self.keep.n_valid):
            if self.enabled and best is not None and self.epoch + 1 < self.n_epoch:  # a later epoch may go wrong
                self._last_good = (self.epoch + 1, cpu_state_dict(self.learn.model))
            return
        back = ""
        if self._last_good is not None:
            epoch, weights = self._last_good
            unwrap_model(self.learn.model).load_state_dict(weights)
            back = f", back at epoch {epoch}'s weights"
        self.stopped = (f"{self.stage} epoch {self.epoch + 1} ended at validation {_text(score, loss)}, clearly worse "
                        f"than {best.stage}'s {_text(best.score, best.valid_loss)}: fine-tuning stops here{back} "
                        f"(stage_guard = false trains every planned epoch)")
        raise CancelFitException()


def _text(score: float, loss: float) -> str:
    return f"accuracy {score:.4f}, loss {loss:.4f}" if math.isfinite(score) else f"loss {loss:.4f}"
