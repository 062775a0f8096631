"""Exception types: each names the problem, the value and what to do, before any compute is spent."""

__all__ = ["FastlearnError", "DataError", "EmptyClassError", "SingleClassError", "CorruptImageError",
           "UnknownArchError", "RecipeError", "CheckpointError", "NonFiniteError", "LabelRangeError",
           "WeightsError", "RunFolderError", "ExportError"]


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


class CheckpointError(FastlearnError, RuntimeError):
    "A checkpoint is missing, unreadable or from an incompatible run."


class NonFiniteError(FastlearnError, FloatingPointError):
    "Training produced a NaN or Inf loss or gradient."


class RunFolderError(FastlearnError, ValueError):
    "A run folder is missing, unfinished (no model.json / model.safetensors) or inconsistent."


class ExportError(FastlearnError, RuntimeError):
    "Exporting a run's model failed, or the exported model disagrees with PyTorch."
