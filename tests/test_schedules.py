"""Schedules against their closed forms, and fastai's scheduler as applied to torch optimizers."""
import math

import numpy as np
import pytest
from fastai.callback.schedule import ParamScheduler
from fastai.learner import Learner
from torch import nn

from fastlearn.core.optim import opt_func
from fastlearn.core.schedules import layer_lrs, one_cycle_lr, one_cycle_mom, one_cycle_scheds, resize_size, scale_lr, unfreeze_plan
from conftest import synthetic_dls


def seed_formula_lr(t, T, lr_max, div, final_div, p):
    "The lecture's equation, written independently of fastlearn.schedules."
    lo, end = lr_max / div, lr_max / final_div
    if t <= p * T:
        return lo + (lr_max - lo) * (1 - math.cos(math.pi * t / (p * T))) / 2
    return end + (lr_max - end) * (1 + math.cos(math.pi * (t - p * T) / ((1 - p) * T))) / 2


def seed_formula_mom(t, T, m_max, m_min, p):
    if t <= p * T:
        return m_max - (m_max - m_min) * (1 - math.cos(math.pi * t / (p * T))) / 2
    return m_min + (m_max - m_min) * (1 - math.cos(math.pi * (t - p * T) / ((1 - p) * T))) / 2


@pytest.mark.parametrize("p", [0.25, 0.3, 0.5])
def test_one_cycle_matches_seed_formula(p):
    T = 200
    for t in range(T + 1):
        assert one_cycle_lr(t / T, 1e-2, 25, 1e4, p) == pytest.approx(seed_formula_lr(t, T, 1e-2, 25, 1e4, p), rel=1e-12)
        assert one_cycle_mom(t / T, (0.95, 0.85), p) == pytest.approx(seed_formula_mom(t, T, 0.95, 0.85, p), rel=1e-12)


def test_one_cycle_anchors():
    assert one_cycle_lr(0, 1.0, div=10) == pytest.approx(0.1)
    assert one_cycle_lr(0.25, 1.0, pct_start=0.25) == pytest.approx(1.0)
    assert one_cycle_lr(1.0, 1.0, final_div=1e4) == pytest.approx(1e-4)
    assert one_cycle_mom(0.25, (0.95, 0.85)) == pytest.approx(0.85)
    assert one_cycle_mom(1.0, (0.95, 0.85)) == pytest.approx(0.95)


def test_scheds_are_the_formula_and_fastai_combined_cos_agrees_to_float32():
    from fastai.callback.schedule import combined_cos
    s = one_cycle_scheds(np.array([1e-3, 1e-2]), div=25, final_div=1e5, pct_start=0.3)
    fa_lr = combined_cos(0.3, np.array([1e-3, 1e-2]) / 25, np.array([1e-3, 1e-2]), np.array([1e-3, 1e-2]) / 1e5)
    fa_mom = combined_cos(0.3, 0.95, 0.85, 0.95)
    for pos in np.linspace(0, 0.999, 97):
        assert np.allclose(s["lr"](pos), [one_cycle_lr(pos, lr, 25, 1e5, 0.3) for lr in (1e-3, 1e-2)], rtol=1e-14)
        assert s["mom"](pos) == one_cycle_mom(pos, (0.95, 0.85), 0.3)
        # fastai keeps the phase boundary pct_start as float32: equal to ~1e-7, not bitwise
        assert np.allclose(fa_lr(pos), s["lr"](pos), rtol=1e-6)
        assert fa_mom(pos) == pytest.approx(s["mom"](pos), rel=1e-6)


class _Trace:
    "Reads the torch optimizer's own param_groups at every step (what the update actually used)."
    def __init__(self, opt):
        self.rows = []
        opt.register_step_pre_hook(lambda o, a, k: self.rows.append(
            [(g["lr"], g["betas"][0] if "betas" in g else g["momentum"]) for g in o.param_groups]))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fit_one_cycle_drives_torch_optimizer_exactly(name):
    dls = synthetic_dls(n=80, bs=10)  # 6 train batches per epoch
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 3))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func(name),
                    splitter=lambda m: [list(m[1].parameters()), list(m[3].parameters())])
    learn.create_opt()
    tr = _Trace(learn.opt.opt)
    lrs = np.array([1e-3, 1e-2])
    with learn.no_bar(), learn.no_logging():
        learn.fit(3, cbs=ParamScheduler(one_cycle_scheds(lrs, 25, 1e5, 0.3, (0.95, 0.85))))
    T = 3 * len(dls.train)
    assert len(tr.rows) == T
    for t, row in enumerate(tr.rows):
        for g, (lr, mom) in enumerate(row):
            assert lr == pytest.approx(seed_formula_lr(t, T, lrs[g], 25, 1e5, 0.3), rel=1e-12)
            assert mom == pytest.approx(seed_formula_mom(t, T, 0.95, 0.85, 0.3), rel=1e-12)


def test_layer_lrs_geometric():
    lrs = layer_lrs(5, slice(1e-5, 1e-3))
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-3)
    assert np.allclose(lrs[1:] / lrs[:-1], 10 ** 0.5)
    d = layer_lrs(4, 1e-2, decay=0.5)
    assert np.allclose(d, [1.25e-3, 2.5e-3, 5e-3, 1e-2])
    assert np.allclose(layer_lrs(3, 1e-3), 1e-3)
    for bad in (-1e-3, 0.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            layer_lrs(3, bad)
    with pytest.raises(ValueError, match="decay"):
        layer_lrs(3, 1e-3, decay=1.5)


def test_unfreeze_plan_head_first_then_deeper():
    plan = unfreeze_plan(6, head_epochs=1, unfreeze_epochs=1, epochs=3, step=2, stage_lr_mult=0.5)
    assert [s.n_trainable for s in plan] == [1, 3, 5, 6]
    assert [s.epochs for s in plan] == [1, 1, 1, 3]
    assert [s.lr_mult for s in plan] == [1.0, 0.5, 0.25, 0.125]  # lower peak LR for deeper stages
    top = unfreeze_plan(6, 1, 2, 2, step=1, unfreeze_to=2)
    assert [s.n_trainable for s in top] == [1, 2] and top[-1].epochs == 2
    probe = unfreeze_plan(6, 1, 1, 3, unfreeze_to=1)
    assert [(s.n_trainable, s.epochs) for s in probe] == [(1, 4)]
    with pytest.raises(ValueError):
        unfreeze_plan(6, 1, 1, 1, step=0)


def test_resize_size_ramp():
    sizes = [resize_size(p, 128, 224, (0.0, 0.75), 32) for p in np.linspace(0, 1, 41)]
    assert sizes[0] == 128 and sizes[-1] == 224
    assert all(b >= a for a, b in zip(sizes, sizes[1:]))
    assert set(sizes) <= {128, 160, 192, 224}
    assert resize_size(0.8, 128, 224, (0.0, 0.75)) == 224  # the last part at full size


def test_scale_lr():
    assert scale_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert scale_lr(0.1, 1024, 256, "sqrt") == pytest.approx(0.2)
    assert scale_lr(0.1, 1024, None) == 0.1


def test_unfreeze_plan_skipped_stages_do_not_lower_the_lr():
    plan = unfreeze_plan(6, head_epochs=1, unfreeze_epochs=0, epochs=2, step=2, stage_lr_mult=0.5)
    assert [(s.n_trainable, s.epochs, s.lr_mult) for s in plan] == [(1, 1, 1.0), (6, 2, 0.5)]
