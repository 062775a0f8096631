"""The lean training step (fastlearn/hotpath.py, LeanOptimWrapper): what fastai's step computes, on plain tensors."""
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import AvgSmoothLoss, Learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.optimizer import OptimWrapper
from fastai.torch_core import TensorBase, TensorCategory, TensorImage, set_seed

from fastlearn.core.hotpath import DeviceSmoothLoss, EventTable, LeanLearner, event_handlers, flat_loss
from fastlearn.train.learner import TransferLearner, transfer_learner
from fastlearn.core.optim import LeanOptimWrapper, OptFunc
from fastlearn.run.records import HyperTrace
from conftest import synthetic_dls


class _FastaiStep(TransferLearner):
    "The same learner with fastai's own event dispatch and loss (the path before fastlearn's hot path)."
    __call__ = Learner.__call__
    _do_one_batch = Learner._do_one_batch


class _FastaiOpt(OptFunc):
    def __call__(self, params, lr, **kwargs):
        return OptimWrapper(params, torch.optim.AdamW, lr=lr, **self.kw, **kwargs)


def _train(lean: bool, epochs: int = 2):
    set_seed(0, reproducible=True)
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    if not lean:
        learn.__class__ = _FastaiStep
        learn.recorder.smooth_loss = AvgSmoothLoss(beta=learn.recorder.smooth_loss.beta)
        learn.opt_func = _FastaiOpt(learn.opt_func.name, learn.opt_func.kw)
        learn.create_opt()
    learn.freeze_top(-1)
    trace = HyperTrace()
    learn.fit_stage(epochs, slice(1e-4, 1e-3), cbs=[trace])
    return learn, trace.rows


@pytest.fixture(scope="module")
def both():
    return _train(lean=True), _train(lean=False)


def test_lean_step_gives_fastais_losses_hypers_and_weights(both):
    (lean, rows), (ref, ref_rows) = both
    assert isinstance(lean, LeanLearner) and isinstance(lean.opt, LeanOptimWrapper) and type(ref.opt) is OptimWrapper
    assert len(rows) == len(ref_rows) == 2 * len(lean.dls.train)
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=0, atol=1e-6)
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref_rows]
    assert [r["mom"] for r in rows] == [r["mom"] for r in ref_rows]
    np.testing.assert_allclose(lean.recorder.losses, ref.recorder.losses, atol=1e-6)  # the smoothed loss
    np.testing.assert_allclose(np.array(lean.recorder.values, dtype=float),
                               np.array(ref.recorder.values, dtype=float), atol=1e-6)  # valid loss, accuracy
    a, b = lean.model.state_dict(), ref.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_lean_step_runs_the_model_and_loss_on_plain_tensors():
    seen = {}

    class Spy(Callback):
        def after_loss(self):
            seen["xb"], seen["pred"], seen["loss"] = type(self.xb[0]), type(self.pred), type(self.learn.loss_grad)
    set_seed(0)
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False, cbs=[Spy()])
    learn.fit(1)
    assert seen == {"xb": torch.Tensor, "pred": torch.Tensor, "loss": torch.Tensor}
    assert isinstance(learn.recorder.smooth_loss, DeviceSmoothLoss)


@pytest.mark.parametrize("loss_func", [CrossEntropyLossFlat(), LabelSmoothingCrossEntropyFlat(eps=0.1),
                                       CrossEntropyLossFlat(reduction="none")])
def test_flat_loss_equals_fastais_loss(loss_func):
    g = torch.Generator().manual_seed(0)
    pred = TensorBase(torch.randn(8, 5, generator=g))
    targ = TensorCategory(torch.randint(0, 5, (8,), generator=g))
    got = flat_loss(loss_func, pred, targ)
    assert type(got) is torch.Tensor
    assert torch.allclose(got, loss_func(pred, targ).as_subclass(torch.Tensor), atol=1e-7)


def test_flat_loss_multi_label_and_plain_functions():
    g = torch.Generator().manual_seed(0)
    pred, targ = torch.randn(6, 4, generator=g), (torch.rand(6, 4, generator=g) > 0.5).float()
    bce = BCEWithLogitsLossFlat()
    assert torch.allclose(flat_loss(bce, TensorImage(pred), targ), bce(pred, targ).as_subclass(torch.Tensor))
    mse = torch.nn.functional.mse_loss
    assert type(flat_loss(mse, TensorImage(pred), targ)) is torch.Tensor


def test_event_table_keeps_only_handlers_in_order():
    class A(Callback):
        order = 5
        def after_batch(self): pass

    class B(Callback):
        order = 1
        def after_batch(self): pass
        def before_fit(self): pass

    class C(Callback):
        order = 3
    a, b, c = A(), B(), C()
    assert event_handlers([a, b, c], "after_batch") == [b, a]
    assert event_handlers([a, b, c], "after_loss") == []
    t = EventTable()
    assert t.handlers([a, b, c], "before_fit") == [b]
    assert t.handlers([a, b, c], "after_fit") == [b, c, a]  # every callback: fastai resets `run` there
    assert t.handlers([a, c], "before_fit") == []            # a changed list rebuilds the table
    with pytest.raises(Exception, match="missing before_nothing"):
        t.handlers([a], "before_nothing")


def test_lean_learner_reports_callback_errors_as_fastai_does():
    class Boom(Callback):
        def after_loss(self): raise ValueError("boom")
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False, cbs=[Boom()])
    with pytest.raises(ValueError, match="Exception occured in `Boom` when calling event `after_loss`"):
        learn.fit(1)


def test_lean_optim_wrapper_matches_fastais_hypers():
    def groups():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
        return [list(m[0].parameters()), list(m[1].parameters())]
    lean = LeanOptimWrapper(groups(), torch.optim.AdamW, lr=1e-3)
    ref = OptimWrapper(groups(), torch.optim.AdamW, lr=1e-3)
    for w in (lean, ref):
        w.set_hyper("lr", np.array([1e-4, 1e-3]))
        w.set_hyper("mom", 0.9)
        w.set_hyper("wd", [0.0, 0.01])
    assert list(lean.hypers) == list(ref.hypers)
    assert lean.hyper("lr") == [1e-4, 1e-3] and lean.hyper("mom") == [0.9, 0.9]
    assert [pg["betas"] for pg in lean.opt.param_groups] == [pg["betas"] for pg in ref.opt.param_groups]
    with pytest.raises(AssertionError, match="3 values for lr"):
        lean.set_hyper("lr", [1e-3] * 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_device_smooth_loss_never_syncs_per_step():
    learn = transfer_learner(synthetic_dls(device="cuda"), "test_resnet", pretrained=False, progress=False)
    learn.fit(1)
    assert learn.recorder.smooth_loss.val.device.type == "cuda"
