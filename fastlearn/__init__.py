"""fastlearn: the best known training practice for fastai + timm as one-line presets.

    from fastlearn import *
    dls = image_dls(sample("digits"), size=64, bs=32, flip=False, arch="tf_efficientnet_lite0")
    learn = transfer_learner(dls, "tf_efficientnet_lite0"); learn.fit_preset("digits")
"""
import importlib

from .base.version import __version__  # noqa: F401  (defined in base/version.py, which setup.cfg reads)

# Where each public name lives. Names are imported from their module on first use (PEP 562 `__getattr__`), so the
# commands that only print (`--help`, `--version`, `recipes`) answer without loading torch and fastai.
_WHERE = {
    "data.dls": ("image_dls",),
    "data.folders": ("check_image_folder",),
    "data.samples": ("sample",),
    "core.models": ("create_model", "model_stats"),
    "core.layer_groups": ("layer_groups", "n_groups"),
    "train.learner": ("transfer_learner", "TransferLearner", "learner_from_recipe"),
    "core.lr_finder": ("lr_find", "LRFindResult"),
    "train.runner": ("run_recipe", "RunResult"),
    "fit.resize": ("ProgressiveResize",),
    "fit.ema": ("EMA",),
    "fit.health": ("HealthMonitor",),
    "train.strategy": ("choose_strategy",),
    "fit.distributed": ("distributed_ctx",),
    "base.ranks": ("is_main_process",),
    "app.diagnostics": ("sanity_check", "diagnose"),
    "app.search": ("search",),
    "core.weights": ("save_weights", "load_weights"),
    "run.predict": ("load_run", "Run", "Prediction"),
    "run.export": ("export_run",),
    "run.interpret": ("interpret",),
    "core.schedules": ("one_cycle_lr", "one_cycle_mom", "layer_lrs", "unfreeze_plan"),
    "core.recipes": ("Recipe", "load_recipe", "list_recipes"),
    "base.errors": ("FastlearnError", "DataError", "EmptyClassError", "SingleClassError", "CorruptImageError",
                   "LabelRangeError", "UnknownArchError", "WeightsError", "RecipeError", "CheckpointError",
                   "NonFiniteError", "RecipeMismatchError", "MissingExtraError", "RunLockedError", "DataChangedError",
                   "TrainingInterrupted", "RunFolderError", "ExportError"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f"{__name__}.base.fastai_quiet")  # fastai first, with its one import-time warning silenced
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
