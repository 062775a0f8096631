"""Optimizers: torch's fused/foreach implementations (fastai's own step every parameter in a Python loop) behind
fastai's `OptimWrapper`, which still receives fastai's per-group LR and momentum/beta1 schedule, with layer groups
split into weight-decay and no-decay (norm and bias) param groups, as timm's `param_groups_weight_decay`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch
from fastai.optimizer import OptimWrapper
from fastcore.foundation import L
from timm.optim import Lookahead
from torch import nn

__all__ = ["OPTIMIZERS", "opt_func", "OptFunc", "split_decay", "GroupMap", "LeanOptimWrapper", "FixedSplit"]

OPTIMIZERS: dict[str, tuple[type, dict]] = {
    "adamw": (torch.optim.AdamW, {}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "sgd_nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": 0.9}),
}


def _kernel_kwargs(cls: type, device: torch.device | None) -> dict:
    """fused where the optimizer has a fused kernel for the device (torch 2.4+: Adam/AdamW/SGD on CPU too, one kernel
    per param group instead of ~10 foreach passes), foreach otherwise."""
    dev = (device or torch.device("cpu")).type
    if dev in ("cuda", "cpu") and cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        return {"fused": True}
    return {"foreach": True}


def opt_func(name: str = "adamw", lookahead: bool = False, device: torch.device | None = None,
             kernels: bool = True) -> Callable:
    """A fastai `opt_func` building torch's optimizer `name` wrapped in `OptimWrapper`. `kernels=False` uses torch's
    plain per-parameter loop (for comparisons); `lookahead` wraps the optimizer in timm's Lookahead (k=6, alpha=0.5)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    cls, extra = OPTIMIZERS[name]
    return OptFunc(name, {**extra, **(_kernel_kwargs(cls, device) if kernels else {"foreach": False})}, lookahead)


class _Hypers(Sequence):
    "fastai's `hypers` list (one dict per param group), each group's dict built when it is read."

    def __init__(self, wrapper: "LeanOptimWrapper"):
        self._w, self._groups = wrapper, wrapper.opt.param_groups

    def __len__(self):
        return len(self._groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._w._group_hypers(pg) for pg in self._groups[i]]
        return self._w._group_hypers(self._groups[i])

    def __eq__(self, other):
        return isinstance(other, (Sequence, L)) and list(self) == list(other)

    def __repr__(self):
        return repr(list(self))

    def __reduce__(self):  # copies and pickles are plain lists of dicts, as fastai's
        return list, (list(self),)


class LeanOptimWrapper(OptimWrapper):
    """fastai's `OptimWrapper` with its per-step hyper-parameter reads (`hypers`) and writes (`set_hyper`) in plain
    loops: fastai rebuilds every group's dict through fastcore helpers several times per step. Same keys, values
    and stored objects; a group's dict is built when it is read (Recorder and ParamScheduler read only the last)."""

    @property
    def hypers(self):
        return _Hypers(self)

    def _group_hypers(self, pg: dict) -> dict:
        "fastai's hyper-parameter dict of one param group (`detuplify_pg`, then the names mapped to fastai's)."
        fwd, h = self.fwd_map, {}
        for k, v in pg.items():
            if k == "params":
                continue
            if isinstance(v, (tuple, list, L)):  # betas -> betas__0 (mom), betas__1 (sqr_mom)
                for i, v_ in enumerate(v):
                    h[fwd.get(f"{k}__{i}", f"{k}__{i}")] = v_
            else:
                h[fwd.get(k, k)] = v
        return h

    def hyper(self, k: str) -> list:
        "Hyper-parameter `k` (fastai's name, e.g. 'lr', 'mom') of every param group; [] when the optimizer has none."
        name = self.bwd_map.get(k, k)
        base, _, idx = name.partition("__")
        groups = self.opt.param_groups
        if not groups or base not in groups[0]:
            return []
        return [pg[base][int(idx)] for pg in groups] if idx else [pg[base] for pg in groups]

    def set_hyper(self, k, v):
        groups = self.opt.param_groups
        if isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool):
            vs = [v] * len(groups)
        elif isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim == 1):
            vs = list(v)
            if len(vs) == 1:
                vs = vs * len(groups)
        else:  # slices, tensors, anything else: fastai's own conversion
            return super().set_hyper(k, v)
        if len(vs) != len(groups):
            raise AssertionError(f"Trying to set {len(vs)} values for {k} but there are "
                                 f"{len(groups)} parameter groups.")
        name = self.bwd_map[k]
        if "__" not in name:
            for pg, v_ in zip(groups, vs):
                pg[name] = v_
        else:  # a tuple entry, e.g. Adam's betas[0] for 'mom' (fastai's set_item_pg)
            base, idx = name.split("__")
            i = int(idx)
            for pg, v_ in zip(groups, vs):
                pg[base] = tuple(v_ if j == i else old for j, old in enumerate(pg[base]))


class OptFunc:
    "A picklable fastai `opt_func` (so `Learner.export` works): torch optimizer `name` in `OptimWrapper`."

    def __init__(self, name: str, kw: dict, lookahead: bool = False):
        self.name, self.kw, self.lookahead = name, kw, lookahead
        self.__name__ = f"{name}{'+lookahead' if lookahead else ''}"

    def __call__(self, params, lr, **kwargs):
        wrapper = LeanOptimWrapper(params, OPTIMIZERS[self.name][0], lr=lr, **self.kw, **kwargs)
        if self.lookahead:
            wrapper = LeanOptimWrapper(opt=Lookahead(wrapper.opt))
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
        return next((j for j, (i, _) in enumerate(self) if i >= layer), len(self))


def _no_decay(name: str, p: nn.Parameter, norm_ids: set[int]) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or id(p) in norm_ids


def split_decay(model: nn.Module, groups: Sequence[Sequence[nn.Parameter]], decay_norm_bias: bool = False
                ) -> tuple[list[list[nn.Parameter]], GroupMap]:
    """Split each layer group into [decay, no-decay] optimizer groups (empty halves dropped): norm layers' parameters
    and every bias / 1-d tensor go to no-decay unless `decay_norm_bias`."""
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


class FixedSplit:
    "A picklable fastai splitter returning precomputed optimizer groups (so `Learner.export` works)."

    def __init__(self, groups):
        self.groups = groups

    def __call__(self, model):
        return self.groups
