"""fastlearn: the best known training practice for fastai + timm as one-line presets.

    from fastlearn import *
    dls = image_dls(sample("digits"), size=64, bs=32, flip=False, arch="tf_efficientnet_lite0")
    learn = transfer_learner(dls, "tf_efficientnet_lite0"); learn.fit_preset("digits")
"""
__version__ = "0.1.0"  # the one place the version is defined (setup.cfg reads it)

from . import _fastai  # noqa: F401  (first: imports fastai without its torch.jit.script FutureWarning)
from .data import check_image_folder, image_dls
from .errors import (CheckpointError, CorruptImageError, DataChangedError, DataError, EmptyClassError, ExportError,
                     FastlearnError, LabelRangeError, MissingExtraError, NonFiniteError, RecipeError,
                     RecipeMismatchError, RunFolderError, RunLockedError, SingleClassError, TrainingInterrupted,
                     UnknownArchError, WeightsError)
from .layer_groups import layer_groups, n_groups
from .learner import TransferLearner, transfer_learner
from .lr_finder import LRFindResult, lr_find
from .models import create_model, model_stats
from .recipes import Recipe, list_recipes, load_recipe
from .samples import sample
from .schedules import layer_lrs, one_cycle_lr, one_cycle_mom, unfreeze_plan
from .training import RunResult, learner_from_recipe, run_recipe
from .checkpoint import load_weights, save_weights
from .diagnostics import diagnose, sanity_check
from .distributed import distributed_ctx, is_main_process
from .ema import EMA
from .health import HealthMonitor
from .resize import ProgressiveResize
from .search import search
from .strategy import choose_strategy
from .run_folder import Run, load_run
from .predict import Prediction
from .export import export_run
from .interpret import interpret

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
