"""Layer groups (stem, stages, head) of any timm model from timm's own `group_matcher`, usable as a fastai splitter.

Groups run from input to output: timm's coarse groups (stem, then one per stage or block), then the classifier
alone as the last group, so `Learner.freeze()` trains only the new head. Parameters timm leaves unmatched (final norm,
`conv_head`, `fc_norm`, the norm inside a `NormMlpClassifierHead`) join the last stage, the same choice timm makes for
EfficientNet and ViT with MATCH_PREV_GROUP: they are pretrained, so they belong with the body, not the random head.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from timm.models import group_parameters
from timm.models._manipulate import MATCH_PREV_GROUP  # timm's "merge into the previous group" ordinal suffix
from torch import nn

from .models import classifier_param_names, unwrap_model


__all__ = ["layer_groups", "layer_group_names", "n_groups", "splitter", "group_index_of"]


def _matcher(model: nn.Module) -> dict | Callable | None:
    "timm's coarse group matcher for `model`, extended so unmatched names join the preceding group, or None."
    try:
        gm = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(gm, dict):
        # A catch-all entry after timm's own: it sorts last and MATCH_PREV_GROUP merges it into the last stage,
        # where timm would have put it in a group of its own (together with the classifier).
        return {**gm, "_fastlearn_unmatched": [(r"", MATCH_PREV_GROUP)]}
    if callable(gm):  # cait, inception_*: a function name -> ordinal, with inf for what it does not place
        def merged(name: str) -> tuple[float, ...]:
            o = gm(name)
            o = tuple(o) if isinstance(o, (tuple, list)) else (o,)
            return (math.inf, *MATCH_PREV_GROUP) if math.isinf(o[0]) else o
        return merged
    return None


def _head_names(model: nn.Module) -> list[str]:
    "Classifier parameter names: timm's get_classifier(), else the last module that owns parameters."
    names = classifier_param_names(model)
    if names or hasattr(model, "get_classifier"):
        return names
    owners = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners:
        return []
    last = owners[-1]
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] == last or (last == "" and "." not in n)]


def layer_group_names(model: nn.Module) -> list[list[str]]:
    "Parameter names of each layer group, input to output, classifier last; names are those of the unwrapped model."
    model = unwrap_model(model)
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    head = set(_head_names(model))
    gm = _matcher(model)
    if gm is None:
        body_groups = [[n for n in order if n not in head]]
    else:
        grouped = group_parameters(model, gm)  # {group id: names}, ids in timm's input-to-output order
        body_groups = [sorted((n for n in grouped[g] if n not in head), key=order.__getitem__) for g in sorted(grouped)]
    groups = [g for g in body_groups if g]
    head_group = sorted(head, key=order.__getitem__)
    return groups + [head_group] if head_group else groups


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    "Parameters of each layer group, input to output, classifier last; every parameter exactly once."
    params = dict(unwrap_model(model).named_parameters())
    return [[params[n] for n in g] for g in layer_group_names(model)]


def splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    "fastai splitter (`Learner(splitter=splitter)`): one optimizer param group per layer group, head last."
    return layer_groups(model)


def n_groups(model: nn.Module) -> int:
    "Number of layer groups of `model`."
    return len(layer_group_names(model))


def group_index_of(model: nn.Module) -> dict[str, int]:
    "Map each parameter name (of the unwrapped model) to the index of its layer group."
    return {n: i for i, g in enumerate(layer_group_names(model)) for n in g}
