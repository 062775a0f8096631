"""NonFiniteGuard: the first NaN/Inf loss, gradient or running statistic stops training before it reaches the model."""
import hashlib
import math
import re

import pytest
import torch
from fastai.callback.core import Callback, CancelStepException
from fastai.torch_core import set_seed

from fastlearn.run.checkpoint import Checkpointer, latest_checkpoint, read_state
from fastlearn.core.weights import load_weights
from fastlearn.base.errors import NonFiniteError
from fastlearn.fit.guard import NonFiniteGuard, grad_norm, is_finite
from fastlearn.train.learner import transfer_learner
from conftest import synthetic_dls


def _learner(**kw):
    set_seed(0, reproducible=True)
    return transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False, **kw)


def _state(learn_or_model):
    model = getattr(learn_or_model, "model", learn_or_model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _all_finite(sd):
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Snapshot(Callback):
    "Keeps the model state as each training batch starts (what the model must still be after a refused batch)."
    order = -20

    def before_batch(self):
        if self.training:
            self.sd = _state(self.learn)


class NaNLossAt:
    "Cross-entropy, but NaN on the `at`-th training call."
    def __init__(self, at):
        self.at, self.n = at, 0

    def __call__(self, pred, y):
        loss = torch.nn.functional.cross_entropy(pred, y)
        if torch.is_grad_enabled():
            self.n += 1
            if self.n == self.at:
                return loss * float("nan")
        return loss


def test_grad_norm_and_is_finite():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    assert float(grad_norm([a, b])) == 5.0 and is_finite(grad_norm([a, b]))
    b.grad[0] = float("inf")
    assert not is_finite(grad_norm([a, b]))
    assert grad_norm([torch.zeros(1)]) is None
    assert not is_finite(float("nan")) and is_finite(1.0)


def test_nan_loss_stops_before_the_step_and_names_step_stage_lr(tmp_path):
    learn = _learner(loss_func=NaNLossAt(6))
    guard, ck, snap = NonFiniteGuard(), Checkpointer(tmp_path, every_steps=2), Snapshot()
    guard.stage = "head"
    with pytest.raises(NonFiniteError) as e:
        learn.fit_stage(2, 1e-3, cbs=[guard, ck, snap])
    msg = str(e.value)
    assert "non-finite training loss (nan) at step 6 (stage 'head', epoch 2, batch 2/4) with lr" in msg
    lr = float(re.search(r"with lr ([0-9.e+-]+)", msg).group(1))
    assert math.isclose(lr, learn.opt.hypers[-1]["lr"], rel_tol=1e-3)
    # the refused batch changed nothing: not the weights, not the BatchNorm statistics
    after = _state(learn)
    assert all(torch.equal(after[k], snap.sd[k]) for k in after)
    # the last checkpoint (step 4, end of epoch 1) is untouched and loads
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "ckpt-4.pt" and read_state(latest)["position"]["step"] == 4
    assert _all_finite(_state(load_weights(_learner().model, latest.with_suffix(".safetensors"))))


def test_huge_lr_stops_training_with_finite_weights(tmp_path):
    learn = _learner()
    ck = Checkpointer(tmp_path, every_steps=1, keep_last=1)
    with pytest.raises(NonFiniteError, match=r"at step \d+ .* with lr [0-9.]+e\+0[45]"):
        learn.fit_stage(3, 1e6, cbs=[NonFiniteGuard(), ck])
    assert _all_finite(_state(learn))
    latest = latest_checkpoint(tmp_path)
    digest = _sha(latest.with_suffix(".safetensors"))
    assert _all_finite(_state(load_weights(_learner().model, latest.with_suffix(".safetensors"))))
    assert _sha(latest.with_suffix(".safetensors")) == digest and ck.written[-1] == latest


class InfGradAt(Callback):
    "Puts an Inf into one gradient after the backward pass of training batch `at`."
    order = 1

    def __init__(self, at):
        self.at, self.n = at, 0

    def after_backward(self):
        self.n += 1
        if self.n == self.at:
            p = next(p for p in self.model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")


def test_non_finite_gradient_stops_before_the_step():
    learn, snap = _learner(), Snapshot()
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(inf\) at step 3 "):
        learn.fit_stage(1, 1e-3, cbs=[NonFiniteGuard(), InfGradAt(3), snap])
    after = _state(learn)
    assert all(torch.equal(after[k], snap.sd[k]) for k in after if "running" not in k and "num_batches" not in k)
    assert _all_finite(after)


class ScalerLike(Callback):
    "Stands in for fastai's MixedPrecision fp16 GradScaler (order 10): cancels steps whose gradients overflowed."
    order = 10

    def __init__(self):
        self.skipped = 0

    def before_step(self):
        if not is_finite(grad_norm(p for pg in self.opt.param_lists for p in pg)):
            self.skipped += 1
            raise CancelStepException()


def test_steps_the_scaler_skips_are_not_errors():
    learn, scaler = _learner(), ScalerLike()
    learn.fit_stage(1, 1e-3, cbs=[NonFiniteGuard(), InfGradAt(2), scaler])
    assert scaler.skipped == 1 and _all_finite(_state(learn))
