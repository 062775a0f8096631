"""fastlearn: the best known training practice for fastai + timm as one-line presets.

    from fastlearn import *
    dls = image_dls(sample("digits"), size=64, bs=32, flip=False, arch="tf_efficientnet_lite0")
    learn = transfer_learner(dls, "tf_efficientnet_lite0"); learn.fit_preset("digits")
"""
__version__ = "0.1.0"  # the one place the version is defined (setup.cfg reads it)

import importlib
import sys
import types

# Where each public name lives. The package face imports nothing heavy itself: a name is imported from its
# module on first use (PEP 562 `__getattr__`), so the commands that only print (`fastlearn --help`,
# `--version`, `recipes`) answer without loading torch and fastai (seconds of start-up), while
# `from fastlearn import *` and `fastlearn.image_dls` work as if everything were imported here.
_WHERE = {
    "data": ("image_dls", "check_image_folder"),
    "samples": ("sample",),
    "models": ("create_model", "model_stats"),
    "layer_groups": ("layer_groups", "n_groups"),
    "learner": ("transfer_learner", "TransferLearner"),
    "lr_finder": ("lr_find", "LRFindResult"),
    "training": ("run_recipe", "learner_from_recipe", "RunResult"),
    "resize": ("ProgressiveResize",),
    "ema": ("EMA",),
    "health": ("HealthMonitor",),
    "strategy": ("choose_strategy",),
    "distributed": ("distributed_ctx", "is_main_process"),
    "diagnostics": ("sanity_check", "diagnose"),
    "search": ("search",),
    "checkpoint": ("save_weights", "load_weights"),
    "run_folder": ("load_run", "Run"),
    "predict": ("Prediction",),
    "export": ("export_run",),
    "interpret": ("interpret",),
    "schedules": ("one_cycle_lr", "one_cycle_mom", "layer_lrs", "unfreeze_plan"),
    "recipes": ("Recipe", "load_recipe", "list_recipes"),
    "errors": ("FastlearnError", "DataError", "EmptyClassError", "SingleClassError", "CorruptImageError",
               "LabelRangeError", "UnknownArchError", "WeightsError", "RecipeError", "CheckpointError",
               "NonFiniteError", "RecipeMismatchError", "MissingExtraError", "RunLockedError", "DataChangedError",
               "TrainingInterrupted", "RunFolderError", "ExportError"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    # data
    "image_dls", "check_image_folder", "sample",
    # models and layer groups
    "create_model", "model_stats", "layer_groups", "n_groups",
    # training
    "transfer_learner", "TransferLearner", "lr_find", "LRFindResult", "run_recipe", "learner_from_recipe",
    "RunResult",
    # callbacks and techniques
    "ProgressiveResize", "EMA", "HealthMonitor", "choose_strategy", "distributed_ctx", "is_main_process",
    # diagnostics and tuning
    "sanity_check", "diagnose", "search",
    # weights
    "save_weights", "load_weights",
    # using a finished run: load, predict, export, interpret
    "load_run", "Run", "Prediction", "export_run", "interpret",
    # schedules
    "one_cycle_lr", "one_cycle_mom", "layer_lrs", "unfreeze_plan",
    # recipes
    "Recipe", "load_recipe", "list_recipes",
    # errors
    "FastlearnError", "DataError", "EmptyClassError", "SingleClassError", "CorruptImageError", "LabelRangeError",
    "UnknownArchError", "WeightsError", "RecipeError", "CheckpointError", "NonFiniteError", "RecipeMismatchError",
    "MissingExtraError", "RunLockedError", "DataChangedError", "TrainingInterrupted",
    "RunFolderError", "ExportError",
]

assert sorted(__all__) == sorted(_MODULE_OF), "every public name has one home in _WHERE"


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f"{__name__}._fastai")  # fastai first, with its one import-time warning silenced
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    "The package module: a submodule loaded later must not replace the public name it shares (`search`, `interpret`)."

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _MODULE_OF and value.__name__ == f"{__name__}.{name}":
            return  # the import system binds `fastlearn.<name>` to the submodule; the public function keeps it
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
