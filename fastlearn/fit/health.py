"""Training health monitor: per layer group update/weight ratio, gradient norm and LR, plus throughput.

The relative update ||w_after - w_before|| / ||w_before|| of a step should be about 1e-3 (Karpathy's rule of thumb):
far below, the group barely learns; far above, the LR is too high. fastai's `ActivationStats` records activations,
not updates, and nothing in fastai or timm measures the ratio, so this is ours; the verdict is `health_problems`.
"""
from __future__ import annotations

import csv
import math
import time
import warnings
from pathlib import Path

import torch
from fastai.callback.core import Callback

__all__ = ["HealthMonitor", "HealthWarning", "health_problems", "update_ratio"]

KINDS = ("non_finite", "ratio_high", "ratio_low", "grad_vanish", "grad_explode")
FIELDS = ["step", "epoch", "group", "lr", "grad_norm", "weight_norm", "update_ratio", "images_per_s"]


class HealthWarning(UserWarning):
    "A training-health problem: updates too small or too large, gradients vanishing, exploding or not finite."


def update_ratio(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float]:
    "(||after - before|| / ||before||, ||before||) over a list of tensors taken together."
    w = math.sqrt(sum(float(b.float().pow(2).sum()) for b in before))
    d = math.sqrt(sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(after, before)))
    return (d / w if w > 0 else (math.inf if d > 0 else 0.0)), w


def health_problems(row: dict, ratio_range: tuple[float, float] = (1e-5, 1e-1),
                    grad_range: tuple[float, float] = (1e-8, 1e3)) -> list[tuple[str, str]]:
    "The problems one measurement shows, as (kind, message); `row` has group, lr, grad_norm, update_ratio."
    g, r, lr, gn = row["group"], row["update_ratio"], row["lr"], row["grad_norm"]
    if not math.isfinite(gn) or not math.isfinite(r):
        return [("non_finite", f"group {g}: gradient norm {gn} / update ratio {r} is not finite; lower the LR "
                               "(or set grad_clip), check the inputs for NaN")]
    out = []
    if r > ratio_range[1]:
        out.append(("ratio_high", f"group {g}: update/weight ratio {r:.2e} > {ratio_range[1]:.0e} at lr {lr:.2e}: "
                                  "each step rewrites a large part of the weights; lower the LR (rerun lr_find)"))
    elif r < ratio_range[0]:
        out.append(("ratio_low", f"group {g}: update/weight ratio {r:.2e} < {ratio_range[0]:.0e} at lr {lr:.2e}: "
                                 "the group barely changes; raise its LR, or check it is meant to be frozen"))
    if gn < grad_range[0]:
        out.append(("grad_vanish", f"group {g}: gradient norm {gn:.2e} < {grad_range[0]:.0e}: gradients vanish "
                                   "(dead activations, saturated outputs or a detached loss)"))
    elif gn > grad_range[1]:
        out.append(("grad_explode", f"group {g}: gradient norm {gn:.2e} > {grad_range[1]:.0e}: gradients explode; "
                                    "lower the LR or set grad_clip = 1.0"))
    return out


class HealthMonitor(Callback):
    """Measures update/weight ratio, gradient norm (before the step) and LR per trainable layer group (its decay and
    no-decay optimizer groups together) every `every` steps, into `.rows` and `csv_path`; warns once per problem and
    group (a `HealthWarning`) when it lasts `patience` measurements."""
    order = 80  # after GradientClip (11) and MixedPrecision's unscale: the gradients the optimizer will use

    def __init__(self, every: int = 10, csv_path: str | Path | None = None,
                 ratio_range: tuple[float, float] = (1e-5, 1e-1), grad_range: tuple[float, float] = (1e-8, 1e3),
                 patience: int = 3, warn: bool = True):
        if every < 1 or patience < 1:
            raise ValueError(f"every={every} and patience={patience} must be >= 1 (steps, measurements)")
        self.every, self.patience = every, patience
        self.csv_path = None if csv_path is None else Path(csv_path)
        self.ratio_range, self.grad_range, self.warn = ratio_range, grad_range, warn
        self.rows: list[dict] = []
        self.problems: list[tuple[str, str]] = []   # (kind, message), each kind and group once
        self._steps, self._seen, self._streak, self._header = 0, set(), {}, False
        self._before, self._pending, self._t, self._n = None, [], time.perf_counter(), 0

    def _groups(self) -> list[tuple[str, list[torch.Tensor], list[float]]]:
        "(name, trainable params, their optimizer groups' LRs) per layer group; frozen groups left out."
        gmap = getattr(self.learn, "group_map", None)
        lists, hypers = self.opt.param_lists, self.opt.hypers
        index = gmap.layer_index() if gmap is not None and len(gmap) == len(lists) else list(range(len(lists)))
        merged: dict[int, tuple[list, list]] = {}
        for i, ps, h in zip(index, lists, hypers):
            ps = [p for p in ps if p.requires_grad]
            if ps:
                m = merged.setdefault(i, ([], []))
                m[0].extend(ps)
                m[1].append(float(h["lr"]))
        return [(str(i), ps, lrs) for i, (ps, lrs) in merged.items()]

    def before_fit(self):
        self._before, self._pending = None, []

    def before_train(self):  # throughput over training steps only, not validation
        self._t, self._n = time.perf_counter(), 0

    def before_step(self):
        self._before = None
        if self._steps % self.every:
            return
        self._before = [(name, [p.detach().clone() for p in ps], ps, lrs,
                         math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in ps if p.grad is not None)))
                        for name, ps, lrs in self._groups()]

    def after_step(self):
        if self._before is None:
            return
        for name, before, ps, lrs, gn in self._before:
            ratio, wn = update_ratio(before, [p.detach() for p in ps])
            self._pending.append({"step": self._steps, "epoch": int(getattr(self.learn, "epoch", 0)), "group": name,
                                  "lr": max(lrs), "grad_norm": gn, "weight_norm": wn, "update_ratio": ratio})
        self._before = None

    def after_batch(self):
        if not self.training:
            return
        self._steps += 1
        self._n += len(self.learn.yb[0]) if len(self.learn.yb) else 0
        if not self._pending:
            return
        elapsed = time.perf_counter() - self._t
        for row in self._pending:
            row["images_per_s"] = self._n / elapsed if elapsed > 0 else math.nan
            self.rows.append(row)
            self._report(row)
            self._write(row)
        self._pending = []
        self._t, self._n = time.perf_counter(), 0

    def _report(self, row: dict) -> None:
        found = dict(health_problems(row, self.ratio_range, self.grad_range))
        g = row["group"]
        for kind in KINDS:
            self._streak[(kind, g)] = self._streak.get((kind, g), 0) + 1 if kind in found else 0
        for kind, msg in found.items():
            # a problem must last `patience` measurements in a row (a fresh head's first steps are
            # legitimately large); non-finite values are reported at once
            if (kind, g) in self._seen or (kind != "non_finite" and self._streak[(kind, g)] < self.patience):
                continue
            self._seen.add((kind, g))
            self.problems.append((kind, msg))
            if self.warn:
                warnings.warn(msg, HealthWarning, stacklevel=2)

    def _write(self, row: dict) -> None:
        if self.csv_path is None:
            return
        with open(self.csv_path, "a" if self._header else "w", newline="") as f:  # a new monitor starts the file
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if not self._header:
                w.writeheader()
                self._header = True
            w.writerow(row)
