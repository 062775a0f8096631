"""The stage plan: which layer groups each stage trains, for how many epochs, at which peak LR; computed once,
shown to the user before the stages train."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.recipes import Recipe
from ..core.schedules import UnfreezeStage, unfreeze_plan

__all__ = ["Stage", "stage_plan", "stage_name", "stage_peak", "first_ft_mult", "with_lrs", "plan_text"]


def stage_plan(recipe: Recipe, n_groups: int, strategy: str) -> list[UnfreezeStage]:
    "The unfreezing stages a strategy runs (the 2x2 table made concrete)."
    r = recipe
    if strategy == "linear_probe":    # small data, similar to ImageNet: a classifier on frozen features
        return unfreeze_plan(n_groups, r.head_epochs, 0, r.epochs, unfreeze_to=1)
    if strategy == "fine_tune_top":   # large data, similar: the later groups only
        top = r.unfreeze_to if r.unfreeze_to != -1 else max(2, (n_groups + 1) // 2)
        return unfreeze_plan(n_groups, r.head_epochs, r.unfreeze_epochs, r.epochs, r.unfreeze_step, top,
                             r.stage_lr_mult)
    if strategy == "full":            # different data: gradually everything, discriminative LRs
        return unfreeze_plan(n_groups, r.head_epochs, r.unfreeze_epochs, r.epochs, r.unfreeze_step,
                             r.unfreeze_to, r.stage_lr_mult)
    if strategy == "scratch":         # no pretrained weights: one one-cycle over everything
        return [UnfreezeStage(n_groups, r.epochs, 1.0)]
    raise ValueError(f"unknown strategy {strategy!r}")


def stage_name(n_trainable: int, n_groups: int) -> str:
    return "head" if n_trainable == 1 else f"top{n_trainable}" if n_trainable < n_groups else "all"


def stage_peak(st, plan, peak: float, ft_peak: float) -> float:
    "A stage's peak LR: the head's is the sweep's; fine-tuning stages start at ft_peak, scaled by their lr_mult."
    return peak * st.lr_mult if st.n_trainable == 1 else ft_peak * st.lr_mult / first_ft_mult(plan)


def first_ft_mult(plan) -> float:
    "The LR multiplier of the first fine-tuning stage (the one ft_peak applies to)."
    return next((st.lr_mult for st in plan if st.n_trainable > 1 and st.epochs), 1.0)


@dataclass(frozen=True)
class Stage:
    "One stage of a run: its name, the top layer groups it trains, its epochs and its peak LR."
    name: str
    trainable: int
    epochs: int
    peak: float
    lr_mult: float = 1.0

    def lrs(self, lr_ratio: float) -> float | slice:
        "The stage's LR per group: one LR for the head alone, else discriminative from peak / lr_ratio up to peak."
        return slice(self.peak / lr_ratio, self.peak) if self.trainable > 1 else self.peak


def with_lrs(plan: list[UnfreezeStage], n_groups: int, peak: float, ft_peak: float) -> list[Stage]:
    "The plan with each stage's name and peak LR (the head's is `peak`, fine-tuning starts at `ft_peak`)."
    return [Stage(stage_name(st.n_trainable, n_groups), st.n_trainable, st.epochs, stage_peak(st, plan, peak, ft_peak),
                  st.lr_mult) for st in plan]


def plan_text(plan: list[Stage], n_groups: int, steps_per_epoch: int, lr_ratio: float) -> str:
    "What the stages will train, a line each: epochs, steps, layer groups and LRs (lowest group..head)."
    def lr(st: Stage) -> str:
        lrs = st.lrs(lr_ratio)
        return f"LR {lrs.start:.2e}..{lrs.stop:.2e}" if isinstance(lrs, slice) else f"LR {lrs:.2e}"
    return "\n".join(f"plan: {st.name}, {st.epochs} epoch{'s' if st.epochs > 1 else ''} x {steps_per_epoch} steps, "
                     f"{st.trainable}/{n_groups} layer groups, {lr(st)}" for st in plan if st.epochs)
