"""fastlearn: the best known training practice for fastai + timm as one-line presets.

    from fastlearn import *
    dls = image_dls(sample("digits"), size=64, flip=False, arch="tf_efficientnet_lite0")
    learn = transfer_learner(dls, "tf_efficientnet_lite0"); learn.fit_preset("digits")
"""
__version__ = "0.1.0"

from .data import check_image_folder, image_dls
from .errors import (CheckpointError, CorruptImageError, DataError, EmptyClassError, FastlearnError,
                     LabelRangeError, NonFiniteError, RecipeError, SingleClassError, UnknownArchError, WeightsError)
from .layer_groups import layer_groups, n_groups
from .learner import TransferLearner, transfer_learner
from .lr_finder import LRFindResult, lr_find
from .models import create_model, model_stats
from .recipes import Recipe, list_recipes, load_recipe
from .sample import sample
from .schedules import layer_lrs, one_cycle_lr, one_cycle_mom, unfreeze_plan
from .training import RunResult, learner_from_recipe, run_recipe

__all__ = [
    # data
    "image_dls", "check_image_folder", "sample",
    # models and layer groups
    "create_model", "model_stats", "layer_groups", "n_groups",
    # training
    "transfer_learner", "TransferLearner", "lr_find", "LRFindResult", "run_recipe", "learner_from_recipe",
    "RunResult",
    # schedules
    "one_cycle_lr", "one_cycle_mom", "layer_lrs", "unfreeze_plan",
    # recipes
    "Recipe", "load_recipe", "list_recipes",
    # errors
    "FastlearnError", "DataError", "EmptyClassError", "SingleClassError", "CorruptImageError", "LabelRangeError",
    "UnknownArchError", "WeightsError", "RecipeError", "CheckpointError", "NonFiniteError",
]
