"""Optimizers: torch's fused/foreach implementations behind fastai's `OptimWrapper`, with layer groups
split into weight-decay and no-decay (norm and bias) param groups, as timm's `param_groups_weight_decay`.

fastai's own optimizers step every parameter in a Python loop; torch's foreach/fused kernels do not,
and `OptimWrapper` still receives fastai's per-group LR and momentum/beta1 schedule (tested).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from fastai.optimizer import OptimWrapper
from torch import nn

__all__ = ["OPTIMIZERS", "opt_func", "OptFunc", "split_decay", "GroupMap"]

OPTIMIZERS: dict[str, tuple[type, dict]] = {
    "adamw": (torch.optim.AdamW, {}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "sgd_nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": 0.9}),
}


def _kernel_kwargs(cls: type, device: torch.device | None) -> dict:
    "fused on CUDA where the optimizer has it, foreach otherwise (both are torch's own kernels)."
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda and cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        return {"fused": True}
    return {"foreach": True}


def opt_func(name: str = "adamw", lookahead: bool = False, device: torch.device | None = None,
             kernels: bool = True) -> Callable:
    """A fastai `opt_func` building torch's optimizer `name` wrapped in `OptimWrapper`.

    `kernels=False` uses torch's plain per-parameter loop (for comparisons); `lookahead` wraps the
    optimizer in timm's Lookahead (k=6, alpha=0.5).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    cls, extra = OPTIMIZERS[name]
    return OptFunc(name, {**extra, **(_kernel_kwargs(cls, device) if kernels else {"foreach": False})}, lookahead)


class OptFunc:
    "A picklable fastai `opt_func` (so `Learner.export` works): torch optimizer `name` in `OptimWrapper`."

    def __init__(self, name: str, kw: dict, lookahead: bool = False):
        self.name, self.kw, self.lookahead = name, kw, lookahead
        self.__name__ = f"{name}{'+lookahead' if lookahead else ''}"

    def __call__(self, params, lr, **kwargs):
        wrapper = OptimWrapper(params, OPTIMIZERS[self.name][0], lr=lr, **self.kw, **kwargs)
        if self.lookahead:
            from timm.optim import Lookahead
            wrapper = OptimWrapper(opt=Lookahead(wrapper.opt))
        return wrapper


class GroupMap(list):
    "For each optimizer param group: (layer group index, decays?). Built by `split_decay`."

    @property
    def n_layer_groups(self) -> int:
        return max(i for i, _ in self) + 1 if self else 0

    def layer_index(self) -> list[int]:
        return [i for i, _ in self]

    def wd(self, wd: float) -> list[float]:
        "Per optimizer group weight decay: `wd` where it decays, 0 on norm and bias parameters."
        return [wd if d else 0.0 for _, d in self]

    def first_group_of(self, layer: int) -> int:
        "Index of the first optimizer group belonging to layer group `layer` (for fastai `freeze_to`)."
        for j, (i, _) in enumerate(self):
            if i >= layer:
                return j
        return len(self)


def _no_decay(name: str, p: nn.Parameter, norm_ids: set[int]) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or id(p) in norm_ids


def split_decay(model: nn.Module, groups: Sequence[Sequence[nn.Parameter]], decay_norm_bias: bool = False
                ) -> tuple[list[list[nn.Parameter]], GroupMap]:
    """Split each layer group into [decay, no-decay] optimizer groups (empty halves dropped).

    Norm layers' parameters and every bias / 1-d tensor go to no-decay unless `decay_norm_bias`.
    """
    if decay_norm_bias:
        return [list(g) for g in groups], GroupMap((i, True) for i in range(len(groups)))
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    names = {id(p): n for n, p in model.named_parameters()}
    out, gmap = [], GroupMap()
    for i, g in enumerate(groups):
        dec = [p for p in g if not _no_decay(names.get(id(p), ""), p, norm_ids)]
        nod = [p for p in g if _no_decay(names.get(id(p), ""), p, norm_ids)]
        for ps, d in ((dec, True), (nod, False)):
            if ps:
                out.append(ps)
                gmap.append((i, d))
    return out, gmap
