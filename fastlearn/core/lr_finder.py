"""LR range test: an exponential LR sweep that stops at divergence, suggests a peak LR and a start LR, and leaves
the learner exactly as it found it. fastai's `Learner.lr_find` round-trips the model through a file and leaves the
RNG, the data order and the recorder changed (and fails once training has started, fastai #3658); ours snapshots
the learner in memory (`learner_snapshot`) and restores it bitwise.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.learner import AvgSmoothLoss

from ..base.rng import rng_state, set_rng_state

__all__ = ["lr_find", "LRFindResult", "suggest_lrs", "start_note", "lr_plot_ylim", "suggest", "SUGGESTERS", "LRSweep",
           "sweep_beta", "learner_snapshot"]


@dataclass
class LRFindResult:
    "What the range test measured and suggests."
    peak: float                 # one-cycle lr_max: end of the steepest useful descent, before blow-up
    start: float                # where the loss first clearly improves
    lrs: list[float] = field(repr=False)
    losses: list[float] = field(repr=False)   # smoothed (debiased EMA) training loss per step
    lr_min_loss: float = float("nan")         # LR at the lowest smoothed loss
    diverged: bool = False                    # the sweep stopped because the loss blew up
    plot: Path | None = None
    note: str = ""                            # why start == peak, when it is (`start_note`)

    def __iter__(self):  # `peak, start = learn.find_lr()`
        return iter((self.peak, self.start))


def _slopes(x: np.ndarray, y: np.ndarray, w: int) -> np.ndarray:
    "Least-squares slope of y on x over a centred window of 2w+1 points (robust to step noise)."
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        a, b = max(0, i - w), min(len(x), i + w + 1)
        if b - a >= 3:
            out[i] = np.polyfit(x[a:b], y[a:b], 1)[0]
    return out


def suggest_lrs(lrs, losses, improve: float = 0.02) -> tuple[float, float, float, bool]:
    """Suggested (peak, start, lr_at_min, diverged) from a range test's smoothed losses.

    The curve is cut where the loss becomes non-finite or exceeds 4x its minimum. peak: the end of the steepest part
    of the descent that reaches the minimum (where the windowed slope of log-loss vs log-LR is still at least half the
    steepest), never above lr_at_min / 3 so it stays clear of blow-up. start: the LR from which the loss stays
    `improve` (relative) below the plateau before the descent. The first 5% of points (the smoothed loss is still
    raw there) are never taken as the minimum, nor the first tenth as the steepest point.
    """
    return _suggest(lrs, losses, improve)[:4]


def start_note(lrs, losses, improve: float = 0.02) -> str:
    "Why `suggest_lrs` gives start == peak, in one line ('' when start is below peak)."
    return _suggest(lrs, losses, improve)[4]


def _blowup_cut(losses: np.ndarray) -> tuple[int, bool]:
    """Where a sweep's useful part ends: at the first non-finite (or non-positive) loss, or the first above 4x the
    lowest so far; and whether the loss blew up."""
    finite = np.isfinite(losses) & (losses > 0)
    cut = int(np.argmin(finite)) if not finite.all() else len(losses)
    run_min = np.minimum.accumulate(np.where(finite, losses, np.inf))
    blown = np.nonzero(losses[:cut] > 4 * run_min[:cut])[0]
    return (int(blown[0]) if len(blown) else cut), cut < len(losses) or len(blown) > 0


def _lowest(losses: np.ndarray, cut: int) -> tuple[int, int]:
    """(skip, i_min): the first 5% of a sweep's points (at least one), whose smoothed values are nearly raw losses and
    too noisy to be the minimum, and the index of the lowest loss after them and before `cut`."""
    skip = max(1, cut // 20)
    return skip, (skip + int(np.argmin(losses[skip:cut])) if cut > skip else cut - 1)


def _suggest(lrs, losses, improve: float) -> tuple[float, float, float, bool, str]:
    "suggest_lrs's (peak, start, lr_at_min, diverged) and start_note's line."
    lrs, losses = np.asarray(lrs, float), np.asarray(losses, float)
    if len(lrs) != len(losses) or len(lrs) < 6:
        raise ValueError(f"need at least 6 (lr, loss) points of equal length, got {len(lrs)} and {len(losses)}")
    cut, diverged = _blowup_cut(losses)
    if cut < 6:
        raise ValueError("the loss diverged within the first 5 steps of the sweep; lower start_lr")
    x, y = np.log10(lrs[:cut]), np.log(losses[:cut])
    skip, i_min = _lowest(losses, cut)
    lr_at_min = float(lrs[i_min])
    # nor the steepest point: slopes are fitted from the first tenth on (as fastai's suggesters drop it), so a short
    # sweep's first wiggle is not read as the descent
    s0 = max(skip, cut // 10)
    slope = np.concatenate([np.full(s0, np.nan), _slopes(x[s0:], y[s0:], w=max(2, cut // 20))])
    region = np.full(i_min + 1, np.nan)
    region[skip:] = slope[skip: i_min + 1]
    descent = not (i_min - skip < 3 or not np.isfinite(region).any() or np.nanmin(region) >= 0)
    if not descent:
        peak, i_steep = lr_at_min / 10, skip  # no descent seen: an order of magnitude below the minimum (Smith)
    else:
        # the steepest point of the descent that reaches the minimum: walk back from it while the slope is negative.
        # An earlier, separate dip (step noise with few sweep points, a random head's first drift) is not the descent
        # the run should ride
        k = i_min
        while k - 1 >= skip and region[k - 1] < 0:
            k -= 1
        final = region.copy()
        final[:k] = np.nan
        i_steep = j = int(np.nanargmin(final)) if np.nanmin(final) < 0 else int(np.nanargmin(region))
        while j + 1 <= i_min and region[j + 1] <= 0.5 * region[i_steep]:
            j += 1
        peak = float(min(lrs[j], lr_at_min / 3))
    # start: where the final descent leaves the plateau (the level before the steepest point) for good
    level = float(np.median(y[: i_steep + 1]))
    above = np.nonzero(y[: i_min + 1] >= level + math.log(1 - improve))[0]
    start = float(lrs[min(above[-1] + 1, i_min)]) if len(above) else float(lrs[0])
    note = ""
    if start >= peak:  # start is never above peak: it is set to peak
        where = (f"the loss first stays {improve:.0%} below its plateau at {start:.2e}" if len(above) else
                 f"the loss is {improve:.0%} below its plateau from the first LR, {start:.2e}")
        cap = f", capped at a third of the LR of the lowest loss, {lr_at_min:.2e}" if peak == lr_at_min / 3 else ""
        note = (f"start = peak: the sweep saw no descent before its lowest loss (at {lr_at_min:.2e}), so peak is a "
                f"tenth of that LR, and {where}, not below it; start is never above peak" if not descent else
                f"start = peak: {where}, not below peak ({peak:.2e}{cap}), and start is never above peak: in this "
                f"sweep the loss falls late and steeply")
    return peak, min(start, peak), lr_at_min, diverged, note


SUGGESTERS = ("peak", "valley", "slide", "steep", "minimum")


def suggest(lrs, losses, method: str = "valley") -> float:
    """One LR from a range test's smoothed losses by `method`: fastlearn's "peak" rule (`suggest_lrs`) or one of
    fastai's suggesters ("valley", "slide", "steep", "minimum", fastai.callback.schedule), called as fastai's
    `lr_find` calls them: the first tenth and the last 5 points dropped, and the curve cut at the first NaN."""
    if method == "peak":
        return suggest_lrs(lrs, losses)[0]
    if method not in SUGGESTERS:
        raise ValueError(f"unknown LR suggester {method!r}; choose one of {', '.join(SUGGESTERS)}")
    # lazy: its import patches Learner (fit_one_cycle, lr_find) and adds ProgressCallback to fastai's default callbacks
    from fastai.callback import schedule
    lrs, losses = torch.tensor(list(lrs), dtype=torch.float64), torch.tensor(list(losses), dtype=torch.float64)
    finite = torch.isfinite(losses)
    if not finite.all():
        cut = int(torch.nonzero(~finite)[0])
        lrs, losses = lrs[:cut], losses[:cut]
    n = len(lrs)
    lrs, losses = lrs[n // 10: n - 5], losses[n // 10: n - 5]
    need = 17 if method == "slide" else 3  # fastai's slide compares gradients 15 points apart
    if len(lrs) < need:
        raise ValueError(f"the LR sweep has {n} finite points, {len(lrs)} after trimming; the {method!r} suggester "
                         f"needs at least {need}")
    return float(getattr(schedule, method)(lrs, losses, n)[0])


def sweep_beta(num_it: int) -> float:
    """The smoothing of a sweep of `num_it` steps: fastai's debiased EMA of the loss, beta 0.98 (a memory of about 50
    steps) from 100 steps on, and a memory of num_it / 2 steps below (beta = 1 - 2 / num_it). With 0.98 a 22-step
    sweep's curve is nearly the running mean of all its batches, and one low early batch is read as the minimum
    (the digits quickstart at seed 6: peak 2.4e-8, accuracy 0.156)."""
    return min(0.98, 1 - 2 / num_it)


class LRSweep(Callback):
    "Sets an exponentially growing LR each step, records the smoothed loss (`sweep_beta`), stops at divergence."
    order = 60  # after Recorder (50): the step's loss is computed

    def __init__(self, start_lr: float, end_lr: float, num_it: int, stop_div: bool = True, ratios=None):
        self.start_lr, self.end_lr, self.num_it, self.stop_div = start_lr, end_lr, num_it, stop_div
        self.ratios = None if ratios is None else np.asarray(ratios, float) / np.max(ratios)
        self.smooth = AvgSmoothLoss(beta=sweep_beta(num_it))  # the Recorder's smoothing, over the sweep's length

    def before_fit(self):
        self.lrs, self.losses, self.best = [], [], math.inf
        self.smooth.reset()

    def _lr(self, i: int) -> float:
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / max(1, self.num_it - 1))

    def before_batch(self):
        if not self.training:
            return
        lr = self._lr(len(self.lrs))
        self.opt.set_hyper("lr", lr if self.ratios is None else self.ratios * lr)

    def after_batch(self):
        if not self.training:
            return
        self.smooth.accumulate(self.learn)
        loss = float(self.smooth.value)
        self.lrs.append(self._lr(len(self.lrs)))
        self.losses.append(loss)
        self.best = min(self.best, loss)
        if (self.stop_div and (not math.isfinite(loss) or loss > 4 * self.best)) or len(self.lrs) >= self.num_it:
            raise CancelFitException()

    def before_validate(self):
        raise CancelValidException()


class learner_snapshot:
    """Context manager that restores a Learner bitwise on exit: weights and buffers, optimizer
    state and hyper-parameters, RNG states, DataLoader shuffle RNGs and recorder history."""

    _recorder_attrs = ("lrs", "iters", "losses", "values")
    _learner_attrs = ("epoch", "n_epoch", "train_iter", "pct_train", "loss", "smooth_loss", "training")

    def __init__(self, learn):
        self.learn = learn

    def __enter__(self):
        L = self.learn
        self.model = copy.deepcopy(L.model.state_dict())
        self.training = L.model.training
        self.opt = None if L.opt is None else copy.deepcopy(L.opt.state_dict())
        self.rng = rng_state()
        self.dl_rng = [copy.deepcopy(getattr(dl, "rng", None)) for dl in L.dls.loaders]
        rec = getattr(L, "recorder", None)
        self.rec = {a: copy.deepcopy(getattr(rec, a)) for a in self._recorder_attrs if hasattr(rec, a)}
        self.attrs = {a: getattr(L, a) for a in self._learner_attrs if hasattr(L, a)}
        return self

    def __exit__(self, *exc):
        L = self.learn
        L.model.load_state_dict(self.model)
        L.model.train(self.training)
        if self.opt is None:
            L.opt = None
        else:
            L.opt.zero_grad()
            L.opt.load_state_dict(self.opt)
        set_rng_state(self.rng)
        for dl, r in zip(L.dls.loaders, self.dl_rng):
            if r is not None:
                dl.rng = r
        rec = getattr(L, "recorder", None)
        for a, v in self.rec.items():
            setattr(rec, a, v)
        for a, v in self.attrs.items():
            setattr(L, a, v)
        return False


def lr_find(learn, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
            stop_div: bool = True, plot: str | Path | None = None, ratios=None) -> LRFindResult:
    """Run the LR range test on `learn` (frozen or not, before or during training) and restore it; return the
    suggestions, and with `plot` save a PNG of loss vs LR with both marks. Every trainable group sweeps
    start_lr..end_lr, or, with per-group `ratios`, the largest does and the others keep their ratio to it."""
    for v, n in ((start_lr, "start_lr"), (end_lr, "end_lr")):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{n} must be a positive finite LR, got {v!r}")
    if end_lr <= start_lr:
        raise ValueError(f"end_lr ({end_lr}) must be larger than start_lr ({start_lr})")
    if num_it < 6:
        raise ValueError(f"num_it must be >= 6 steps, got {num_it}")
    sweep = LRSweep(start_lr, end_lr, num_it, stop_div, ratios)
    quiet = [cb for cb in learn.cbs if getattr(cb, "quiet_in_lr_find", False)]
    n_epoch = math.ceil(num_it / max(1, len(learn.dls.train)))
    with learner_snapshot(learn), learn.removed_cbs(quiet):
        if learn.opt is None:
            learn.create_opt()
        learn.fit(n_epoch, cbs=[sweep])
    if len(sweep.losses) < 6:
        raise ValueError(f"the LR sweep ran only {len(sweep.losses)} steps; it needs >= 6 "
                         f"(more training batches, or a lower start_lr if the loss blew up at once)")
    peak, start, at_min, diverged, note = _suggest(sweep.lrs, sweep.losses, 0.02)
    res = LRFindResult(peak, start, sweep.lrs, sweep.losses, at_min, diverged, note=note)
    if plot is not None:
        res.plot = plot_lr_find(res, plot)
    return res


def lr_plot_ylim(losses, margin: float = 0.1) -> tuple[float, float] | None:
    """y-limits of the LR plot: the smoothed loss before the blow-up (cut where `suggest_lrs` cuts it), from its lowest
    value to the highest it was before its minimum (the minimum taken after the first 5% of points, as
    `suggest_lrs` takes it): the starting level (its first points are as noisy as the raw loss), or above it where
    the loss rose before it fell, as a short sweep that starts on a lucky batch does; widened by `margin` of that
    span each side (not below 0). The blow-up runs off the top: scaled to it, the descent is a flat line. None when
    no point comes before the blow-up."""
    losses = np.asarray(losses, float)
    cut, _ = _blowup_cut(losses)
    if cut == 0:
        return None
    skip, i_min = _lowest(losses, cut)
    lo, top = float(losses[:cut].min()), float(losses[: max(skip, i_min) + 1].max())
    span = (top - lo) if top > lo else (0.1 * top or 1.0)
    return max(0.0, lo - margin * span), top + margin * span


def plot_lr_find(res: LRFindResult, path: str | Path) -> Path:
    """Save loss vs LR (log scale) with the start and peak suggestions marked, y-limits from `lr_plot_ylim`.

    Like fastai's `Recorder.plot_lr_find` (one colour per suggestion, a legend), except that fastai scales the y
    axis to the whole sweep, blow-up included, less its last 5 points; and the two marks sit on either side of the
    curve (start below, peak above, in points), so they stay apart when the LRs are equal or close."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _lr_find_figure(res).savefig(path, dpi=100)
    return path


def _lr_find_figure(res: LRFindResult):
    # lazy: matplotlib is heavy and only needed for this plot
    from matplotlib.figure import Figure  # no pyplot: never switches the user's (notebook's) backend
    from matplotlib.transforms import offset_copy
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(res.lrs, res.losses, color="C0", label="smoothed training loss")
    same = res.start == res.peak
    marks = ((res.start, "start" + (" = peak" if same else ""), "the loss starts to fall", "C2", "^", -9, ":"),
             (res.peak, "peak", "one-cycle lr_max", "C3", "v", 9, "--"))
    for lr, name, what, c, marker, dy, ls in marks:
        y = float(np.interp(math.log10(lr), np.log10(res.lrs), res.losses))
        ax.axvline(lr, color=c, lw=0.8, ls=ls)
        ax.plot([lr], [y], marker, color=c, ms=9, mec="black", mew=0.6, clip_on=False,
                transform=offset_copy(ax.transData, fig=fig, y=dy, units="points"), label=f"{name} {lr:.2e} ({what})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("smoothed loss (the blow-up off the top)")
    ylim = lr_plot_ylim(res.losses)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(loc="best")
    ax.set_title("LR range test")
    fig.tight_layout()
    return fig
