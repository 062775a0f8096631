"""Exception types: each names the problem, the value and what to do, before any compute is spent."""

import signal

__all__ = ["FastlearnError", "DataError", "EmptyClassError", "SingleClassError", "CorruptImageError",
           "UnknownArchError", "RecipeError", "CheckpointError", "NonFiniteError", "LabelRangeError",
           "WeightsError", "MissingExtraError", "RecipeMismatchError", "RunLockedError", "DataChangedError",
           "TrainingInterrupted", "RunFolderError", "ExportError"]


class FastlearnError(Exception):
    "Base class of every error fastlearn raises on purpose."


class DataError(FastlearnError, ValueError):
    "The data folder is missing, empty or not laid out as class subfolders."


class EmptyClassError(DataError):
    "A class folder holds no image."


class SingleClassError(DataError):
    "Classification needs at least two classes."


class CorruptImageError(DataError):
    "One or more files cannot be decoded as images; `.paths` lists them."

    def __init__(self, msg, paths=()):
        super().__init__(msg)
        self.paths = list(paths)


class LabelRangeError(DataError):
    "The data has more classes than the model has outputs."


class UnknownArchError(FastlearnError, ValueError):
    "timm does not know this architecture name."


class WeightsError(FastlearnError, RuntimeError):
    "Pretrained weights could not be found or loaded."


class RecipeError(FastlearnError, ValueError):
    "A recipe has an unknown key, a wrong type or an out-of-range value."


class RecipeMismatchError(RecipeError):
    "A learner built outside the recipe cannot run it as written (e.g. its images are smaller than the recipe's sizes)."


class MissingExtraError(FastlearnError, ImportError):
    "An optional dependency is not installed; the message names the pip extra that installs it."


class CheckpointError(FastlearnError, RuntimeError):
    "A checkpoint is missing, unreadable or from an incompatible run."


class NonFiniteError(FastlearnError, FloatingPointError):
    "Training produced a NaN or Inf loss or gradient."


class RunLockedError(FastlearnError, RuntimeError):
    "Another process is training in this run folder (it holds `run.lock`)."


class DataChangedError(FastlearnError, ValueError):
    "A resume was pointed at other data than the run folder's `data.json` records."


class TrainingInterrupted(FastlearnError):
    """Training stopped on Ctrl-C (SIGINT) or SIGTERM. `.checkpoint` is the checkpoint to resume from (None when
    none exists yet), `.saved` says whether it was written at the stop, `.exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, run_dir, checkpoint=None, where: str = "", saved: bool = False,
                 forced: bool = False):
        self.signum, self.run_dir, self.checkpoint = int(signum), run_dir, checkpoint
        self.where, self.saved, self.forced = where, saved, forced
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def describe(self, resume_command: str | None = None) -> str:
        "One line: where it stopped, what was saved and the command that resumes (the Python call by default)."
        cmd = resume_command or f"run_recipe(learn, recipe, run_dir={str(self.run_dir)!r}, resume=True)"
        ckpt = None if self.checkpoint is None else str(self.checkpoint).removesuffix(".pt")
        if self.forced:
            head = f"stopped at once on a second {self.signal_name}"
        else:
            head = f"interrupted ({self.signal_name})" + (f" at {self.where}" if self.where else "")
        if ckpt is None:
            return f"{head}: nothing saved yet (no checkpoint); start again with: {cmd}"
        if self.saved:
            return f"{head}: checkpoint {ckpt} saved; resume with: {cmd}"
        return f"{head}: no new checkpoint, the latest ({ckpt}) is intact; resume with: {cmd}"

    def __str__(self) -> str:  # fastai rewrites args[0] of exceptions raised in callbacks; the fields stay
        return self.describe()


class RunFolderError(FastlearnError, ValueError):
    "A run folder is missing, unfinished (no model.json / model.safetensors) or inconsistent."


class ExportError(FastlearnError, RuntimeError):
    "Exporting a run's model failed, or the exported model disagrees with PyTorch."
