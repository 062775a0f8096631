"""Checkpoints: atomic writes (temp file in the same folder, fsync, os.replace) and safe loads.

A run's checkpoints live in `run_dir/checkpoints/`: for each global step `N` a weights file `ckpt-N.safetensors`
and a state file `ckpt-N.pt` of plain data only (it loads with `torch.load(weights_only=True)`: no code runs),
plus a `latest` pointer written last, so a crash or a full disk at any moment leaves the previous checkpoint
intact. The state holds the position in the run plan (stage, epoch, batch), the optimizer, every RNG the run
draws from (the train/valid DataLoaders' own included), the recipe and the library version.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from fastai.callback.core import Callback, CancelBatchException
from fastai.torch_core import rank_distrib

from ..base.errors import CheckpointError
from ..base.progress import epoch_metrics
from ..base.ranks import is_main_process
from ..base.version import __version__
from ..fit.precision import learner_device
from ..base.files import atomic_write
from ..base.rng import rng_state, set_rng_state
from ..core.weights import load_weights, save_weights


__all__ = ["Checkpointer", "ResumeAt", "CheckpointState",
           "resume_state", "resume_or_restart", "read_state", "plain", "latest_checkpoint", "recipe_diff", "library_version", "prune_finished", "link_in_place"]

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)\.(pt|safetensors)$")
# recipe keys that do not change what a run computes: a resumed run may change them
_BOOKKEEPING = ("description", "source", "expected", "checkpoint_every", "keep_last", "keep_checkpoints",
                "cache_images", "deterministic")  # kernel choice only: a fast run may be resumed deterministically and back


def _has_state(cb) -> bool:
    "True when the callback's own class defines state_dict/load_state_dict (fastai forwards unknown attributes"
    " to the learner and the model, so `hasattr` is true for every callback)."
    return all(callable(getattr(type(cb), m, None)) for m in ("state_dict", "load_state_dict"))


# -- plain-data helpers (pure, tested on their own) ---------------------------------------------

def library_version() -> str:
    return __version__


def recipe_diff(saved: dict, current: dict) -> list[str]:
    "Keys whose values differ between two recipe dicts (bookkeeping keys ignored), as 'key: saved -> current'."
    keys = [k for k in dict.fromkeys([*saved, *current]) if k not in _BOOKKEEPING]
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (TOML/torch round trip: tuple -> list)
    return [f"{k}: {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
            for k in keys if norm(saved.get(k, "(absent)")) != norm(current.get(k, "(absent)"))]


def plain(x, where: str = "state"):
    """`x` as data `torch.load(weights_only=True)` accepts: numpy scalars to Python numbers, numpy arrays and
    tensor subclasses (fastai's `TensorBase`) to plain tensors; anything else not plain raises `CheckpointError`."""
    if isinstance(x, np.generic):  # before float: np.float64 is a float subclass that pickles as numpy
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return type(x)(x) if x is not None else x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().as_subclass(torch.Tensor)
    if isinstance(x, dict):
        return {plain(k, where): plain(v, f"{where}[{k!r}]") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(plain(v, f"{where}[{i}]") for i, v in enumerate(x))
    raise CheckpointError(f"{where} holds a {type(x).__name__}, which a weights_only checkpoint cannot store; "
                          f"give that state as plain numbers, strings, tensors, lists and dicts")


def _ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    "The state file the `latest` pointer names, or None when the run has no checkpoint yet."
    ptr = _ckpt_dir(run_dir) / "latest"
    return ptr.parent / f"{ptr.read_text().strip()}.pt" if ptr.exists() else None


def read_state(path: str | Path) -> dict:
    "Load a checkpoint state file with `weights_only=True`: plain data only, no code runs."
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint state file {path} does not exist; the `latest` pointer names a "
                              f"checkpoint that was removed; resume from another run or start afresh")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a plain checkpoint state file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); refusing to unpickle arbitrary "
                              f"objects. Delete it and resume from an older checkpoint") from None
    if not isinstance(st, dict) or "position" not in st:
        raise CheckpointError(f"{path} loads but is not a fastlearn checkpoint state (no 'position')")
    return st


@dataclass
class CheckpointState:
    "A checkpoint as read back: where in the run plan it stands and what to restore."
    path: Path                          # the state file
    weights: Path                       # the safetensors file beside it
    step: int                           # training batches done in the whole run
    stage: int                          # index in the run's stage plan
    epoch: int                          # epochs finished within that stage
    iter: int                           # batches finished within the current epoch (0 at an epoch boundary)
    stage_epochs: int                   # epochs the stage has in total
    valid_loss: float | None
    recipe: dict = field(repr=False)
    version: str = ""
    state: dict = field(default_factory=dict, repr=False)

    @property
    def extra(self) -> dict:
        return self.state.get("extra", {})

    @property
    def stage_done(self) -> bool:
        return self.epoch >= self.stage_epochs and self.iter == 0

    def restore(self, learn, cbs=()) -> None:
        """Load the weights, the optimizer state and the state of callbacks (`learn.cbs` and `cbs`) that
        have `load_state_dict` into `learn`; the RNGs are put back by `ResumeAt`, at the right moment."""
        load_weights(learn.model, self.weights)
        self.restore_optimizer(learn)
        cb_states = self.state.get("callbacks", {})
        for cb in [*learn.cbs, *cbs]:
            if type(cb).__name__ in cb_states and _has_state(cb):
                cb.load_state_dict(cb_states[type(cb).__name__])

    def restore_optimizer(self, learn) -> None:
        "Load the optimizer state. Call it after the stage's freeze: fastai's `freeze_to` clears it."
        if self.state.get("optimizer") is not None:
            # torch puts each state tensor on its parameter's device: move the model to the data's device
            # first (fastai moves it only at the start of fit), or Adam's moments stay on the CPU
            learn.model.to(learner_device(learn))
            if learn.opt is None:
                learn.create_opt()
            learn.opt.load_state_dict(self.state["optimizer"])


def resume_state(run_dir: str | Path, recipe=None) -> CheckpointState:
    """The latest checkpoint of `run_dir`, checked: it must come from this fastlearn version and, when
    `recipe` (a `Recipe` or dict) is given, from the same recipe; otherwise `CheckpointError` names the difference."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {_ckpt_dir(run_dir)} (no `latest` pointer): nothing to resume; "
                              f"run without resume to start this run afresh")
    st = read_state(path)
    version = library_version()
    if st.get("version") != version:
        raise CheckpointError(f"checkpoint {path} was written by fastlearn {st.get('version')!r}, this is "
                              f"{version!r}; resume it with that version or start a new run")
    if recipe is not None:
        current = recipe.to_dict() if hasattr(recipe, "to_dict") else dict(recipe)
        if diff := recipe_diff(st["recipe"], current):
            raise CheckpointError(f"checkpoint {path} is from a different recipe ({'; '.join(diff)}); "
                                  f"resume with the recipe saved in {Path(run_dir) / 'recipe.toml'} or start a new run")
    p = st["position"]
    weights = path.with_suffix(".safetensors")
    if not weights.exists():
        raise CheckpointError(f"checkpoint {path} has no weights file {weights.name}; resume from an older one")
    return CheckpointState(path, weights, p["step"], p["stage"], p["epoch"], p["iter"], p["stage_epochs"],
                           st.get("valid_loss"), st["recipe"], st["version"], st)


def resume_or_restart(run_dir: str | Path) -> bool:
    """Whether a resume of `run_dir` goes on from a checkpoint (True) or starts the run from the beginning (False,
    with a note): a run that started there (its `data.json` is written first) but stopped before its first
    checkpoint has nothing to lose. A folder where no run started raises `CheckpointError`."""
    if latest_checkpoint(run_dir) is not None:
        return True
    if not (Path(run_dir) / "data.json").exists():
        resume_state(run_dir)  # raises: no checkpoint, nothing started here
    if is_main_process():
        print(f"fastlearn: {run_dir} has no checkpoint yet (the run stopped before its first one): starting it from "
              f"the beginning", flush=True)
    return False


def prune_finished(run_dir: str | Path, keep: tuple[str, ...] = ()) -> list[Path]:
    """A finished run's checkpoints folder down to what a resume or an inspection of the run reads: the `latest`
    pointer and the checkpoint it names (weights and state). The rest goes: the older checkpoints `keep_last` kept,
    the best by validation loss, step checkpoints, temp files a crash left; files named in `keep` stay too.
    Returns the paths deleted (none when no checkpoint was written)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return []
    stay = {"latest", latest.name, latest.with_suffix(".safetensors").name, *keep}
    gone = [p for p in sorted(_ckpt_dir(run_dir).iterdir()) if p.name not in stay and p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def link_in_place(src: str | Path, dst: str | Path) -> bool:
    """Make `dst` a hard link to `src` (same bytes, stored once), atomically; False, `dst` untouched, where the
    filesystem has no hard links. Safe because every writer here replaces files (`atomic_write`), never edits one."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


# -- callbacks --------------------------------------------------------------------------------

class Checkpointer(Callback):
    """Writes a checkpoint every `every_epochs` epochs, at the end of each stage (fit) and, if `every_steps`,
    every that many training batches mid-epoch; keeps the last `keep_last` plus the best by valid_loss. It saves
    the state of callbacks with `state_dict`/`load_state_dict` and `extra_state()`, plain data the caller wants
    back on resume; whoever runs the stages sets `stage_index`, the position in the run plan."""
    order = 90  # after Recorder (50), MetricsLog (66) and HyperTrace (70) have recorded the step/epoch
    run_valid = False

    def __init__(self, run_dir: str | Path, every_epochs: int = 1, keep_last: int = 2, every_steps: int = 0,
                 recipe=None, extra_state: Callable[[], dict] | None = None):
        self.dir = _ckpt_dir(run_dir)
        self.every_epochs, self.keep_last, self.every_steps = every_epochs, keep_last, every_steps
        self.recipe = recipe.to_dict() if hasattr(recipe, "to_dict") else dict(recipe or {})
        self.extra_state = extra_state
        self.stage_index, self.global_step = 0, 0
        self.history: list[int] = []     # steps of the checkpoints written, oldest first
        self.best: tuple[float, int] | None = None  # (valid_loss, step)
        self.written: list[Path] = []

    def load_history(self, st: CheckpointState) -> None:
        "Continue numbering, retention and best-tracking from a resumed checkpoint."
        self.global_step = st.step
        self.history = list(st.state.get("history", []))
        b = st.state.get("best")
        self.best = (float(b[0]), int(b[1])) if b else None

    def epochs_before_fit(self) -> int:
        "Epochs of the current stage done before this fit (ResumeAt runs a stage's remaining epochs)."
        r = getattr(self.learn, "resume_at", None)
        return r.epoch_offset if r is not None else 0

    def before_train(self):
        # the train DataLoader's rng as the epoch starts: a mid-epoch resume replays this epoch's shuffle
        self._epoch_rng = (self.dls.train.rng.getstate(), self.dls.valid.rng.getstate())

    def after_batch(self):
        if len(self.yb) == 0:   # a batch ResumeAt skipped
            return
        self.global_step += 1
        done = self.iter + 1
        ga = getattr(self.learn, "gradient_accumulation", None)
        if ga is not None and ga.count:  # gradients are mid-accumulation: not a state a checkpoint can hold
            return
        if self.every_steps and self.global_step % self.every_steps == 0 and done < self.n_iter:
            self.save(epoch=self.epoch + self.epochs_before_fit(), iter=done)

    def after_epoch(self):
        off = self.epochs_before_fit()
        epoch, total = self.epoch + 1 + off, self.n_epoch + off
        last = self.epoch + 1 == self.n_epoch
        if last or (self.every_epochs and epoch % self.every_epochs == 0):
            self.save(epoch=epoch, iter=0, valid_loss=self.epoch_valid_loss(), stage_epochs=total)

    def epoch_valid_loss(self) -> float | None:
        "The validation loss of the epoch that just ended (None before any validation)."
        rec = getattr(self.learn, "recorder", None)
        v = None if rec is None else epoch_metrics(rec).get("valid_loss")
        return float(v) if v is not None else None

    def save(self, epoch: int, iter: int, valid_loss: float | None = None, stage_epochs: int | None = None) -> Path | None:
        "Write checkpoint `ckpt-<global_step>` (weights, then state, then the `latest` pointer), then prune."
        if not is_main_process():  # one writer (fastai #3836: every rank wrote the same files)
            return None
        step = self.global_step
        name = f"ckpt-{step}"
        better = valid_loss is not None and np.isfinite(valid_loss) and (self.best is None or valid_loss < self.best[0])
        best = (float(valid_loss), step) if better else self.best
        history = [s for s in self.history if s != step] + [step]
        rng = rng_state()
        rng["dl_train"], rng["dl_valid"] = (self._epoch_rng if iter else
                                            (self.dls.train.rng.getstate(), self.dls.valid.rng.getstate()))
        rec = getattr(self.learn, "recorder", None)
        state = plain({
            "position": {"step": step, "stage": self.stage_index, "epoch": epoch, "iter": iter,
                         "stage_epochs": stage_epochs if stage_epochs is not None else self.n_epoch + self.epochs_before_fit()},
            "valid_loss": valid_loss, "best": list(best) if best else None, "history": history,
            "optimizer": self.opt.state_dict() if self.opt is not None else None,
            "rng": rng,
            # (no smoothed loss yet before the learner's first fit: a checkpoint after the head stage on features)
            "smooth_loss": ({"val": rec.smooth_loss.val.detach().cpu().clone(), "count": rec.smooth_loss.count}
                            if rec is not None and hasattr(rec.smooth_loss, "val") else None),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.learn.cbs
                          if _has_state(cb) and cb is not self},
            "recipe": self.recipe, "version": library_version(),
            "extra": self.extra_state() if self.extra_state else {},
        })
        if rank_distrib() != 0:  # one writer; every rank keeps the same counters
            self.history, self.best = history, best
            return self.dir / f"{name}.pt"
        try:
            save_weights(self.model, self.dir / f"{name}.safetensors")
            atomic_write(self.dir / f"{name}.pt", lambda tmp: torch.save(state, tmp))
            atomic_write(self.dir / "latest", lambda tmp: tmp.write_text(name + "\n"))
        except OSError as e:
            prev = self.dir / "latest"
            kept = prev.read_text().strip() if prev.exists() else "none"
            what = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
            raise CheckpointError(f"could not write checkpoint {self.dir / name} at step {step} ({what}); "
                                  f"the previous checkpoint ({kept}) is intact: free space and resume") from e
        self.history, self.best = history, best
        self.written.append(self.dir / f"{name}.pt")
        self._prune()
        return self.dir / f"{name}.pt"

    def _prune(self) -> None:
        "Delete checkpoint files that are neither among the last `keep_last` written nor the best (and temp leftovers)."
        keep = set(self.history[-self.keep_last:]) | ({self.best[1]} if self.best else set())
        self.history = [s for s in self.history if s in keep]
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if (m and int(m.group(1)) not in keep) or (p.name.startswith((".ckpt-", ".latest."))
                                                         and p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)


class ResumeAt(Callback):
    """Continue a stage from a checkpoint's position: the caller fits the stage's remaining epochs
    (`stage_epochs - epoch`) with this callback, which keeps fastai's `pct_train` on the whole stage's clock
    (the one-cycle LR/momentum per step of the uninterrupted run), replays the interrupted epoch's shuffle,
    skips its finished batches and puts every RNG back. Not fastai's `fit(start_epoch=...)`: it still fires
    `after_epoch` for the epochs it skips (empty log rows, checkpoints of epochs never run) and cannot resume
    inside an epoch."""
    order = -5  # after TrainEvalCallback (-10) sets pct_train, before ParamScheduler (60) reads it
    run_valid = False

    def __init__(self, st: CheckpointState, epoch: int | None = None, stage_epochs: int | None = None):
        "`epoch`/`stage_epochs` override the checkpoint's (a checkpoint at a stage's end resumes the next stage at 0)."
        self.st = st
        self.epoch_offset = st.epoch if epoch is None else epoch
        self.stage_epochs = st.stage_epochs if stage_epochs is None else stage_epochs
        self.skip = st.iter if epoch is None else 0

    @property
    def mid_stage(self) -> bool:
        "True when the stage had started (its optimizer state must be restored after the stage's freeze)."
        return bool(self.epoch_offset or self.skip)

    def before_train(self):
        # TrainEvalCallback.before_train sets pct_train = epoch / n_epoch with the local n_epoch
        self._pct = (self.epoch + self.epoch_offset) / self.stage_epochs
        self.learn.pct_train = self._pct
        if self.epoch == 0:
            set_rng_state(self.st.state["rng"], self.dls, globals_=self.skip == 0)
            sl = self.st.state.get("smooth_loss")
            rec = getattr(self.learn, "recorder", None)
            if sl is not None and rec is not None and (self.skip or self.epoch_offset):
                rec.smooth_loss.val, rec.smooth_loss.count = sl["val"].clone(), int(sl["count"])

    def before_batch(self):
        if self.epoch == 0 and self.iter < self.skip:
            # empty yb: Recorder, HyperTrace and Checkpointer ignore the batch; TrainEvalCallback still counts it
            self.learn.xb, self.learn.yb = (), ()
            raise CancelBatchException()

    def after_batch(self):
        # the same float operation as TrainEvalCallback.after_batch, on the stage's clock
        self._pct += 1. / (self.n_iter * self.stage_epochs)
        self.learn.pct_train = self._pct
        if self.epoch == 0 and self.iter == self.skip - 1:
            # the last skipped batch: from here the run draws exactly what the interrupted run drew
            set_rng_state(self.st.state["rng"])
