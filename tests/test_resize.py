"""Progressive resizing: the per-step size follows `resize_size` over the whole run, the model sees it,
validation runs at `valid_size`, and low-resolution steps cost fewer FLOPs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastlearn.train.recipe_callbacks import recipe_callbacks
from fastlearn.train.learner import transfer_learner
from fastlearn.core.recipes import load_recipe
from fastlearn.fit.resize import ProgressiveResize, resize_batch
from fastlearn.core.schedules import resize_size

from conftest import synthetic_dls

RAMP, START, FINAL, MULT = (0.0, 0.5), 16, 32, 8


def _learner(size=32):
    torch.manual_seed(0)
    return transfer_learner(synthetic_dls(size=size), "test_resnet", pretrained=False, progress=False)


def _first_conv_shapes(model):
    "Records (training?, input H, W) of every call of the model's first conv."
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append((m.training, tuple(a[0].shape[-2:]))))
    return seen


def test_size_per_step_follows_resize_size_across_fits():
    learn = _learner()
    n = len(learn.dls.train)
    total = 3 * n  # two fits (stages): 2 epochs + 1 epoch
    cb = ProgressiveResize(START, FINAL, RAMP, MULT, total_steps=total)
    seen = _first_conv_shapes(learn.model)
    learn.fit(2, 1e-3, cbs=[cb])
    learn.freeze_top(-1)
    learn.fit(1, 1e-3, cbs=[cb])
    expected = [resize_size(i / total, START, FINAL, RAMP, MULT) for i in range(total)]
    assert cb.sizes == expected
    assert len(set(expected)) >= 3  # the ramp really passes through intermediate sizes
    # the model saw exactly these sizes in training
    assert [hw for tr, hw in seen if tr] == [(s, s) for s in expected]
    # everything from ramp[1] of the whole run on is at full size, and the second fit did not restart
    assert all(s == FINAL for i, s in enumerate(cb.sizes) if i / total >= RAMP[1])
    assert cb.sizes[0] == START and cb.sizes[2 * n] == FINAL


def test_resumed_callback_continues_the_ramp():
    learn = _learner()
    n = len(learn.dls.train)
    total = 2 * n
    a = ProgressiveResize(START, FINAL, RAMP, MULT, total_steps=total)
    learn.fit(1, 1e-3, cbs=[a])
    b = ProgressiveResize(START, FINAL, RAMP, MULT, total_steps=total)
    b.load_state_dict(a.state_dict())
    learn.fit(1, 1e-3, cbs=[b])
    assert a.sizes + b.sizes == [resize_size(i / total, START, FINAL, RAMP, MULT) for i in range(total)]


def test_without_total_steps_each_fit_follows_its_own_pct_train():
    learn = _learner()
    n = len(learn.dls.train)
    cb = ProgressiveResize(START, FINAL, RAMP, MULT)
    learn.fit(1, 1e-3, cbs=[cb])
    learn.fit(1, 1e-3, cbs=[cb])
    per_fit = [resize_size(i / n, START, FINAL, RAMP, MULT) for i in range(n)]
    assert cb.sizes == per_fit + per_fit


@pytest.mark.parametrize("valid_size", [24, 48])
def test_validation_batches_at_valid_size(valid_size):
    learn = _learner()
    cb = ProgressiveResize(START, FINAL, RAMP, MULT, valid_size=valid_size, total_steps=len(learn.dls.train))
    seen = _first_conv_shapes(learn.model)
    learn.fit(1, 1e-3, cbs=[cb])
    valid = [hw for tr, hw in seen if not tr]
    assert len(valid) == len(learn.dls.valid)
    assert set(valid) == {(valid_size, valid_size)}


def test_loaded_size_larger_than_final_is_shrunk_to_final():
    learn = _learner(size=48)  # the dls load at max(size, valid_size) = 48; training runs at 32
    cb = ProgressiveResize(FINAL, FINAL, valid_size=48, total_steps=len(learn.dls.train))
    seen = _first_conv_shapes(learn.model)
    learn.fit(1, 1e-3, cbs=[cb])
    assert {hw for tr, hw in seen if tr} == {(FINAL, FINAL)}
    assert {hw for tr, hw in seen if not tr} == {(48, 48)}


def test_low_resolution_run_costs_fewer_flops():
    "Same epochs, same batches: the progressive run's total training FLOPs are below the fixed-size run's."
    flops = {}
    for name, start in [("fixed", FINAL), ("progressive", START)]:
        learn = _learner()
        total = 2 * len(learn.dls.train)
        cb = ProgressiveResize(start, FINAL, RAMP, MULT, total_steps=total)
        with FlopCounterMode(display=False) as fc:
            learn.fit(2, 1e-3, cbs=[cb])
        flops[name] = fc.get_total_flops()
    # per-step FLOPs of a conv net scale with pixels: predict the ratio from the recorded sizes
    steps = [resize_size(i / total, START, FINAL, RAMP, MULT) for i in range(total)]
    assert flops["progressive"] < 0.85 * flops["fixed"]
    pixel_ratio = sum(s * s for s in steps) / (len(steps) * FINAL * FINAL)
    assert flops["progressive"] / flops["fixed"] > pixel_ratio * 0.9  # validation runs at full size in both


def test_resizes_before_mixup_mixes():
    "MixUp (order 0) gets the already shrunk batch: mixing full-size images would cost full-size memory."
    from fastai.callback.core import Callback
    from fastai.callback.mixup import MixUp

    class Probe(Callback):
        order = MixUp.order - 0.5

        def __init__(self):
            self.hw = []

        def before_batch(self):
            if self.training:
                self.hw.append(self.learn.xb[0].shape[-1])

    learn = _learner()
    probe = Probe()
    cb = ProgressiveResize(START, START, total_steps=len(learn.dls.train))
    learn.fit(1, 1e-3, cbs=[MixUp(0.4), probe, cb])
    assert probe.hw == [START] * len(learn.dls.train)


def test_resize_batch():
    x = torch.rand(2, 3, 32, 32)
    assert resize_batch(x, 32) is x
    y = resize_batch(x, 16)
    assert y.shape == (2, 3, 16, 16)
    # antialiased downsampling of a constant image stays constant
    assert torch.allclose(resize_batch(torch.full((1, 3, 32, 32), 0.7), 12), torch.tensor(0.7))
    with pytest.raises(ValueError, match="N, C, H, W"):
        resize_batch(torch.rand(3, 32, 32), 16)


def test_recipe_callbacks_builds_resize_over_the_whole_stage_plan(tmp_path):
    learn = _learner()
    r = load_recipe("transfer", {"size": 32, "resize_start": 16, "resize_multiple": 8, "valid_size": 48,
                                 "strategy": "full"})
    cb = next(c for c in recipe_callbacks(learn, r, tmp_path) if isinstance(c, ProgressiveResize))
    from fastlearn.train.plan import stage_plan
    epochs = sum(st.epochs for st in stage_plan(r, learn.n_layer_groups, "full"))
    assert cb.total_steps == epochs * len(learn.dls.train)
    assert (cb.start, cb.final, cb.valid_size, cb.multiple) == (16, 32, 48, 8)
    passed = next(c for c in recipe_callbacks(learn, r, tmp_path, total_steps=7) if isinstance(c, ProgressiveResize))
    assert passed.total_steps == 7
    plain = load_recipe("transfer", {"size": 32})
    assert not any(isinstance(c, ProgressiveResize) for c in recipe_callbacks(learn, plain, tmp_path))
