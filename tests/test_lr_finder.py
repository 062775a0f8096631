"""LR range test: suggestions on synthetic curves, exact restore, works frozen and mid-training."""
import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.learner import Learner
from torch import nn

from fastlearn.core.lr_finder import LRSweep, learner_snapshot, lr_find, suggest_lrs, sweep_beta
from fastlearn.core.optim import opt_func
from conftest import synthetic_dls


def synthetic_curve(lrs, good=1e-2, blow=3e-1, noise=0.0, seed=0):
    "A range-test shaped loss: flat at 2.3, descends around `good`, blows up past `blow`."
    x = np.log10(lrs)
    base = 2.3 - 1.8 / (1 + np.exp(-(x - np.log10(good)) * 4))
    blowup = np.exp(np.clip((x - np.log10(blow)) * 6, -50, 50))
    rng = np.random.default_rng(seed)
    return base + blowup * 0.5 + noise * rng.standard_normal(len(lrs))


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_suggestions_bracket_the_descent(noise):
    lrs = np.geomspace(1e-6, 10, 100)
    losses = synthetic_curve(lrs, noise=noise)
    # smooth as the sweep does (debiased EMA, beta 0.98 in fastai's recorder; 0.8 here for 100 pts)
    sm, avg = [], 0.0
    for i, l in enumerate(losses):
        avg = 0.8 * avg + 0.2 * l
        sm.append(avg / (1 - 0.8 ** (i + 1)))
    peak, start, at_min, diverged = suggest_lrs(lrs, sm)
    assert diverged
    assert 3e-3 <= peak <= 2e-1, peak        # in the steep part, below the blow-up at 3e-1
    assert peak <= at_min / 3 + 1e-12
    assert 1e-4 <= start <= 1e-2, start      # where the loss first improves, before the peak
    assert start < peak


def test_no_improvement_falls_back_below_minimum():
    lrs = np.geomspace(1e-6, 1, 50)
    losses = np.full(50, 2.0) + np.linspace(0, 1e-3, 50)
    peak, start, at_min, _ = suggest_lrs(lrs, losses)
    assert peak == pytest.approx(at_min / 10) and start <= peak


def test_bad_input():
    with pytest.raises(ValueError):
        suggest_lrs([1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="diverged"):
        suggest_lrs(np.geomspace(1e-3, 1, 20), [1, 1, 1, np.nan] + [1.0] * 16)


def tiny_learner(freeze=False):
    dls = synthetic_dls(n=160, bs=16)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func("adamw"),
                    splitter=lambda m: [list(m[:2].parameters()), list(m[5].parameters())])
    learn.logger = lambda *a: None
    if freeze:
        learn.freeze()
    return learn


def state(learn):
    return ({k: v.clone() for k, v in learn.model.state_dict().items()},
            None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_opt_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for n, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][n]) if torch.is_tensor(v) else v == b["state"][k][n]


@pytest.mark.parametrize("freeze", [False, True])
def test_lr_find_after_training_restores_everything(tmp_path, freeze):
    torch.manual_seed(0)
    learn = tiny_learner(freeze)
    with learn.no_bar():
        learn.fit(1, lr=1e-3)  # training has started: optimizer has state, BN stats moved
    w0, o0 = state(learn)
    rng0 = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    dl_rng0 = learn.dls.train.rng.getstate()
    rec0 = list(learn.recorder.values)
    with learn.no_bar():
        res = lr_find(learn, num_it=40, plot=tmp_path / "lr.png")
    w1, o1 = state(learn)
    assert_bitwise_equal(w0, w1)           # weights and BatchNorm running stats
    assert_opt_equal(o0, o1)               # Adam moments and hyper-parameters
    assert torch.equal(torch.get_rng_state(), rng0[0]) and random.getstate() == rng0[1]
    assert (np.random.get_state()[1] == rng0[2]).all()
    assert learn.dls.train.rng.getstate() == dl_rng0
    assert learn.recorder.values == rec0
    assert 1e-7 <= res.start <= res.peak <= 10
    assert (tmp_path / "lr.png").stat().st_size > 5000
    with learn.no_bar():
        learn.fit(1, lr=1e-3)              # and training continues normally


def test_lr_find_then_fit_equals_fit_alone():
    "Running the range test does not change what training does afterwards (same data order, RNG, state)."
    def run(with_find):
        torch.manual_seed(1)
        learn = tiny_learner()
        learn.dls.train.rng.seed(1)
        with learn.no_bar():
            if with_find:
                lr_find(learn, num_it=20)
            learn.fit(1, lr=1e-3)
        return learn.model.state_dict()
    assert_bitwise_equal(run(False), run(True))


def test_lr_find_rejects_bad_arguments():
    learn = tiny_learner()
    with pytest.raises(ValueError, match="start_lr"):
        lr_find(learn, start_lr=-1)
    with pytest.raises(ValueError, match="end_lr"):
        lr_find(learn, start_lr=1e-3, end_lr=1e-4)


def test_snapshot_restores_on_exception():
    learn = tiny_learner()
    learn.create_opt()
    w0, _ = state(learn)
    with pytest.raises(RuntimeError):
        with learner_snapshot(learn):
            with torch.no_grad():
                learn.model[0].weight.add_(1.0)
            raise RuntimeError("boom")
    assert_bitwise_equal(w0, state(learn)[0])


def test_early_noise_is_not_the_minimum_nor_the_start():
    "A bump in the first smoothed points (as from a random head) must not pull the suggestions to start_lr."
    lrs = np.geomspace(1e-7, 10, 92)
    losses = synthetic_curve(lrs, good=2e-2, blow=5e-1)
    losses[:4] = [1.0, 2.5, 2.5, 2.45]          # first point happens to be low, then a bump
    peak, start, at_min, _ = suggest_lrs(lrs, losses)
    assert 1e-3 <= start < peak <= at_min / 3 and peak >= 5e-3


def test_an_early_dip_is_not_the_descent_to_ride():
    """A short sweep (22 points) whose first points dip as much as the real descent does (read off a 48-px digits
    sweep that picked 8e-6 and trained nothing): peak comes from the descent that reaches the minimum."""
    lrs = np.logspace(-7, 0, 22)
    losses = [2.428, 2.425, 2.404, 2.390, 2.366, 2.341, 2.345, 2.348, 2.355, 2.338, 2.340, 2.330, 2.322, 2.315,
              2.295, 2.269, 2.292, 2.337, 2.331, 2.60, 3.5, 12.0]
    peak, start, at_min, diverged = suggest_lrs(lrs, losses)
    assert diverged and at_min == pytest.approx(1e-2, rel=0.1)
    assert 1e-4 <= peak <= at_min / 3 + 1e-12, peak
    assert start <= peak


def test_a_short_sweeps_first_wiggle_is_not_the_descent():
    "The digits quickstart's real 22-step sweep at seed 42: the peak lies in the late descent, not in the first points."
    import json
    d = json.loads((Path(__file__).parent / "fixtures" / "digits_seed42_sweep.json").read_text())
    peak, start, at_min, _ = suggest_lrs(d["lrs"], d["losses"])
    assert at_min == pytest.approx(0.1245, rel=0.01)
    assert 3.7e-3 <= peak <= at_min / 3 + 1e-12, peak     # the loss falls from 3.7e-3 to its minimum
    assert start <= peak



def test_a_short_sweep_smooths_over_its_own_length():
    """The digits quickstart's real 22-step sweep at seed 6 (raw losses): with fastai's 0.98 smoothing the curve is
    nearly a running mean, its lowest point the second batch, and the peak 2.4e-8 (the run learnt nothing: 0.156);
    smoothed over half the sweep (`sweep_beta`), the peak lies in the descent the loss takes from 1e-3 on."""
    import json
    from types import SimpleNamespace
    from fastai.learner import AvgSmoothLoss
    assert sweep_beta(100) == 0.98 and sweep_beta(200) == 0.98 and sweep_beta(22) == pytest.approx(1 - 2 / 22)
    assert LRSweep(1e-7, 10, 22).smooth.beta == sweep_beta(22)
    d = json.loads((Path(__file__).parent / "fixtures" / "digits_seed6_sweep.json").read_text())

    def smoothed(beta):
        avg, out = AvgSmoothLoss(beta), []
        for x in d["raw_losses"]:
            avg.accumulate(SimpleNamespace(loss=torch.tensor(x)))
            out.append(float(avg.value))
        return out
    assert suggest_lrs(d["lrs"], smoothed(0.98))[0] < 1e-7
    assert 3e-3 <= suggest_lrs(d["lrs"], smoothed(sweep_beta(len(d["lrs"]))))[0] <= 5e-2


def test_a_sweep_of_100_steps_records_the_recorders_smoothed_loss():
    "From 100 steps on the sweep's curve is fastai's own smoothed loss, bitwise (its suggestions as before)."
    learn, sweep = tiny_learner(), LRSweep(1e-7, 10, 100, stop_div=False)
    learn.fit(20, cbs=[sweep])  # the sweep ends the fit at its 100th step
    assert len(sweep.losses) == 100 and sweep.losses == [float(v) for v in learn.recorder.losses]


# -- the fine-tuning LR rule on real sweep curves (tests/fixtures/lr_curves, from bench/lr_calibration.py) --------

CURVES = sorted((Path(__file__).parent / "fixtures" / "lr_curves").glob("*.json"))


def _good_range(ft_acc: dict) -> tuple[float, float]:
    """LRs of the fine-tuning grid within 2 points of its best accuracy, widened by half a grid step (x sqrt 3)
    on each side: where a rule's LR counts as right."""
    best = max(ft_acc.values())
    good = [float(lr) for lr, acc in ft_acc.items() if acc >= best - 0.02]
    return min(good) / 3 ** 0.5, max(good) * 3 ** 0.5


@pytest.mark.parametrize("path", CURVES, ids=[p.stem for p in CURVES])
def test_default_ft_lr_rule_lands_in_the_measured_good_range(path):
    import json
    from fastlearn.core.lr_finder import suggest
    from fastlearn.core.recipes import load_recipe
    d = json.loads(path.read_text())
    # these curves were measured fine-tuning with BatchNorm training (bench/lr_calibration.py), where the cap is 3e-3;
    # the preset's BN-in-inference-mode fine-tuning caps at 3e-4 (chosen on the corpus: 1e-3 collapsed there)
    r = load_recipe("transfer", {"ft_bn": "train", "ft_lr_max": 3e-3})
    lo, hi = _good_range(d["ft_acc"])
    head = suggest(d["lrs"], d["losses"], r.lr_suggester)
    ft = min(head * r.ft_lr_factor, r.ft_lr_max)            # what run_recipe uses for the first fine-tuning stage
    assert lo <= ft <= hi, f"{path.stem}: rule gives {ft:.2e}, measured good range {lo:.2e}..{hi:.2e}"
    # the rule this replaced (the sweep's divergence-side peak, used as is) lands far outside it
    assert suggest(d["lrs"], d["losses"], "peak") > 3 * hi


# -- the plot shows the region that matters; start == peak says why (issue 22) ------------------------------------

def test_plot_ylim_is_the_loss_before_the_blow_up():
    from fastlearn.core.lr_finder import lr_plot_ylim
    lrs = np.geomspace(1e-6, 10, 100)
    losses = synthetic_curve(lrs)                              # plateau 2.3, lowest ~0.5, then blows up to ~1e6
    cut = next(i for i in range(len(losses)) if losses[i] > 4 * losses[: i + 1].min())
    lo, top = losses[:cut].min(), losses[: cut // 20 + 1].max()
    assert lr_plot_ylim(losses) == pytest.approx((lo - 0.1 * (top - lo), top + 0.1 * (top - lo)))
    assert lr_plot_ylim(losses)[1] < 2.6 and losses.max() > 1e3  # the descent fills the plot, the blow-up runs off it
    assert lr_plot_ylim(losses, margin=0.5)[0] == 0.0          # never below 0
    flat = np.full(20, 2.0)
    assert lr_plot_ylim(flat) == pytest.approx((1.98, 2.02))   # no span: a tenth of the level, 10% of it each side
    # a short sweep that starts on a lucky batch (the digits quickstart, seed 6): the lowest point first, then the
    # loss rises before it falls late; the whole curve before its late minimum is in the plot, the blow-up is not
    lucky = np.array([2.247, 2.283, 2.30, 2.31, 2.33, 2.32, 2.31, 2.30, 2.29, 2.28, 2.27, 2.265, 2.40, 5.0, 20.0])
    lo, hi = lr_plot_ylim(lucky)
    assert lo < 2.247 and hi > 2.33 and hi < 2.40
    assert lr_plot_ylim([np.nan] * 8) is None


def _two_marks(fig):
    ax = fig.axes[0]
    marks = [ln for ln in ax.get_lines() if ln.get_marker() not in ("None", "", None) and len(ln.get_xdata()) == 1]
    where = [ln.get_transform().transform((ln.get_xdata()[0], ln.get_ydata()[0])) for ln in marks]
    return marks, where


@pytest.mark.parametrize("same", [True, False])
def test_plot_marks_start_and_peak_apart_and_in_the_legend(same):
    from fastlearn.core.lr_finder import LRFindResult, _lr_find_figure, lr_plot_ylim
    lrs = np.geomspace(1e-6, 10, 100)
    losses = synthetic_curve(lrs)
    res = LRFindResult(peak=3e-2, start=3e-2 if same else 2.9e-2, lrs=list(lrs), losses=list(losses))
    fig = _lr_find_figure(res)
    fig.canvas.draw()
    (start, peak), (a, b) = _two_marks(fig)
    assert start.get_marker() != peak.get_marker() and start.get_color() != peak.get_color()
    assert abs(a[1] - b[1]) >= 15 * fig.dpi / 72               # at least 15 points apart, even at the same LR
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("start = peak 3.00e-02" if same else "start 2.90e-02") for t in labels)
    assert any(t.startswith("peak 3.00e-02") for t in labels)
    assert fig.axes[0].get_ylim() == pytest.approx(lr_plot_ylim(losses))


def test_start_note_says_why_start_equals_peak():
    from fastlearn.core.lr_finder import start_note
    lrs = np.geomspace(1e-6, 10, 100)
    assert start_note(lrs, synthetic_curve(lrs)) == ""                 # start below peak: nothing to explain
    x = np.log10(lrs)                                                  # flat, then a short steep fall just below
    late = 2.3 - 1.8 / (1 + np.exp(-(x - np.log10(0.2)) * 30)) + 0.5 * np.exp(np.clip((x - np.log10(0.3)) * 6, -50, 50))
    peak, start, at_min, _ = suggest_lrs(lrs, late)                    # the blow-up at 0.3
    assert start == peak == pytest.approx(at_min / 3)
    assert start_note(lrs, late) == (f"start = peak: the loss first stays 2% below its plateau at 1.71e-01, not below "
                                     f"peak ({peak:.2e}, capped at a third of the LR of the lowest loss, {at_min:.2e}), "
                                     f"and start is never above peak: in this sweep the loss falls late and steeply")
    rising = np.full(50, 2.0) + np.linspace(0, 1e-3, 50)               # no descent at all
    lrs50 = np.geomspace(1e-6, 1, 50)
    assert start_note(lrs50, rising).startswith("start = peak: the sweep saw no descent before its lowest loss (at ")


def test_lr_find_result_carries_the_note(tmp_path):
    from fastlearn.core.lr_finder import start_note
    res = lr_find(tiny_learner(), num_it=40, plot=tmp_path / "lr.png")
    assert res.note == start_note(res.lrs, res.losses) and (res.note != "") == (res.start == res.peak)
