"""Precision, channels_last and compile policies, and the callbacks that apply them (CPU, tiny models)."""
import io

import pytest
import timm
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientClip
from fastcore.foundation import L
from torch.amp import GradScaler

from fastlearn.train.learner import transfer_learner
from fastlearn.fit.precision import ChannelsLastBatch, CompileAfterUnfreeze, LossScaleState, SkippedSteps, TF32, amp_callbacks, choose_precision, precision_callbacks, set_tf32, speed_callbacks, trainable_layer_groups, use_channels_last
from fastlearn.core.recipes import load_recipe
from conftest import needs_cuda, synthetic_dls


def _fake_cuda(monkeypatch, bf16: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake T4")


# -- precision policy ----------------------------------------------------------------------------

@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_follows_bf16_support(monkeypatch, bf16, expected):
    _fake_cuda(monkeypatch, bf16)
    assert choose_precision("auto", "cuda") == expected
    assert choose_precision("auto", None) == expected      # None: CUDA when available
    assert choose_precision("fp16", "cuda:0") == "fp16"
    assert choose_precision("fp32", "cuda") == "fp32"


def test_bf16_request_on_gpu_without_bf16_says_what_to_use(monkeypatch):
    _fake_cuda(monkeypatch, bf16=False)
    with pytest.raises(ValueError, match=r"bf16.*Fake T4.*fp16"):
        choose_precision("bf16", "cuda")


def test_cpu_is_fp32_and_mixed_requests_fail(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_precision("auto", "cpu") == "fp32"
    assert choose_precision("auto", None) == "fp32"
    assert choose_precision("fp32", "cpu") == "fp32"
    for req in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=rf"precision='{req}' needs a CUDA device.*'cpu'"):
            choose_precision(req, "cpu")
    with pytest.raises(ValueError, match="'int8'"):
        choose_precision("int8", "cpu")


def test_amp_callbacks_reuse_fastai_mixed_precision():
    assert amp_callbacks("fp32") == []
    (bf,) = amp_callbacks("bf16")
    assert isinstance(bf, MixedPrecision) and bf.amp_mode.value == "bf16"
    mp, sk, ls = amp_callbacks("fp16")
    assert isinstance(mp, MixedPrecision) and mp.amp_mode.value == "fp16" and isinstance(sk, SkippedSteps)
    assert isinstance(ls, LossScaleState) and ls.order > MixedPrecision.order
    # GradientClip must see unscaled grads: it runs after MixedPrecision's before_step
    assert GradientClip.order > MixedPrecision.order and SkippedSteps.order > MixedPrecision.order


def test_precision_callbacks_for_a_cpu_learner():
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    assert precision_callbacks(learn, load_recipe("transfer", {"precision": "auto"})) == []
    with pytest.raises(ValueError, match="needs a CUDA device"):
        precision_callbacks(learn, load_recipe("transfer", {"precision": "bf16"}))


def test_set_tf32_sets_and_restores():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    prev = set_tf32(True)
    try:
        assert prev == before
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    cb = TF32()
    cb.before_fit()
    assert torch.get_float32_matmul_precision() == "high"
    cb.after_fit()
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


# -- SkippedSteps: fastai's MixedPrecision with a real GradScaler ---------------------------------

class _CPUMixedPrecision(MixedPrecision):
    "Test double: fastai's MixedPrecision with the GradScaler on CPU (fastai hard-codes 'cuda'), no autocast."
    def before_fit(self):
        self.autocast = torch.autocast("cpu", enabled=False)
        self.learn.scaler, self.scales = GradScaler("cpu", init_scale=2.0 ** 10), L()


class _InfGrad(Callback):
    "Puts an inf into one gradient on the given training iterations (an fp16 overflow)."
    def __init__(self, iters): self.iters = set(iters)
    def after_backward(self):
        if self.iter in self.iters:
            p = next(p for p in self.learn.model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")


def test_skipped_steps_counts_gradscaler_overflows_and_says_so():
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    out = io.StringIO()
    sk = SkippedSteps(stream=out)
    params = list(learn.model.parameters())
    learn.fit(1, 1e-3, cbs=[_CPUMixedPrecision(), sk, _InfGrad({1, 3})])   # 72 images / bs 16, drop_last: 4 steps
    assert sk.skipped == 2 and sk.in_fit == 2 and sk.steps == 4
    assert learn.scaler is None                               # fastai clears it after fit
    msg = out.getvalue()
    assert "skipped 2 of 4 optimizer steps" in msg and "loss scale now 256" in msg  # 1024 halved twice
    assert msg.count("\n") == 1                               # once per fit, not per step
    assert all(torch.isfinite(p).all() for p in params)       # overflowed steps did not touch weights
    out.truncate(0); out.seek(0)
    learn.fit(1, 1e-3, cbs=[_CPUMixedPrecision(), sk])
    assert sk.in_fit == 0 and sk.skipped == 2 and out.getvalue() == ""


def test_loss_scale_carries_over_to_the_next_fit_and_through_a_checkpoint():
    "fastai starts every fit at a fresh scale; the scale a run found survives stages and resumes."
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    ls = LossScaleState()
    learn.fit(1, 1e-3, cbs=[_CPUMixedPrecision(), ls, _InfGrad({1, 3})])   # 1024 halved twice
    assert ls.state["scale"] == 256.0
    seen = []

    class Peek(Callback):
        order = LossScaleState.order + 1
        def before_fit(self): seen.append(self.learn.scaler.get_scale())
        def after_batch(self): seen.append(ls.state_dict()["scaler"]["scale"]) if self.training and self.iter == 0 else None

    saved = ls.state_dict()
    learn.fit(1, 1e-3, cbs=[_CPUMixedPrecision(), ls, Peek(), _InfGrad({0})])
    assert seen == [256.0, 128.0]                             # started where the last fit ended; live mid-fit
    resumed = LossScaleState()
    resumed.load_state_dict(saved)                            # what a checkpoint written after fit 1 restores
    seen.clear()
    learn.fit(1, 1e-3, cbs=[_CPUMixedPrecision(), resumed, Peek()])
    assert seen[0] == 256.0


def test_skipped_steps_ignores_cancels_from_other_callbacks():
    class _Cancel(Callback):
        def before_step(self):
            from fastai.callback.core import CancelStepException
            raise CancelStepException()
    learn = transfer_learner(synthetic_dls(n=40), "test_resnet", pretrained=False, progress=False)
    sk = SkippedSteps(stream=io.StringIO())
    learn.fit(1, 1e-3, cbs=[sk, _Cancel()])                    # no MixedPrecision: nothing is an overflow
    assert sk.skipped == 0 and sk.steps == 1                 # 30 train images, bs 16, drop_last


# -- channels_last -------------------------------------------------------------------------------

def test_channels_last_policy():
    conv = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False).model
    vit = torch.nn.TransformerEncoderLayer(8, 2)
    assert use_channels_last(None, conv, "cuda") is True
    assert use_channels_last(None, conv, "cpu") is False
    assert use_channels_last(None, vit, "cuda") is False
    assert use_channels_last(True, vit, "cpu") is True and use_channels_last(False, conv, "cuda") is False
    # on the CPU only the depthwise + BatchNorm family (faster there in NHWC); ConvNeXt (LayerNorm) and ResNets stay NCHW
    effnet, convnext = (timm.create_model(a) for a in ("test_efficientnet", "test_convnext"))
    assert use_channels_last(None, effnet, "cpu") is True and use_channels_last(None, convnext, "cpu") is False
    assert use_channels_last(None, convnext, "cuda") is True and use_channels_last(False, effnet, "cpu") is False


def test_channels_last_callback_converts_model_and_batch():
    learn = transfer_learner(synthetic_dls(n=40), "test_resnet", pretrained=False, progress=False)
    seen = []

    class _Look(Callback):
        order = 5
        def before_batch(self): seen.append(self.xb[0].is_contiguous(memory_format=torch.channels_last))
    learn.fit(1, 1e-3, cbs=[ChannelsLastBatch(), _Look()])
    w = next(m.weight for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert seen and all(seen)
    from fastlearn.fit.resize import ProgressiveResize     # a resized batch is converted, not the original
    assert ChannelsLastBatch.order > ProgressiveResize.order


# -- torch.compile across unfreezing -------------------------------------------------------------

def _frozen_and_trainable(learn):
    return ({n: p.detach().clone() for n, p in learn.model.named_parameters() if not p.requires_grad},
            {n: p.detach().clone() for n, p in learn.model.named_parameters() if p.requires_grad})


class _NoValidate(Callback):
    "Skips validation: an eval-mode graph would be one more compilation, and this test is about training."
    def before_validate(self):
        from fastai.callback.core import CancelValidException
        raise CancelValidException()


def _compile_then_unfreeze(backend: str, device: str = "cpu", extra=()):
    torch.manual_seed(0)
    learn = transfer_learner(synthetic_dls(n=40, device=device), "test_resnet", pretrained=False, progress=False,
                             cbs=[_NoValidate(), *extra])
    model, keys = learn.model, list(learn.model.state_dict())
    cb = CompileAfterUnfreeze(final_trainable=2, backend=backend)
    learn.fit_stage(1, 1e-3, cbs=[cb])                        # head only: not the last stage
    assert not cb.compiled and model._compiled_call_impl is None
    learn.freeze_top(2)
    assert trainable_layer_groups(learn) == 2
    frozen, train = _frozen_and_trainable(learn)
    learn.fit_stage(1, 1e-3, cbs=[cb])
    assert cb.compiled and model._compiled_call_impl is not None
    assert learn.model is model and list(model.state_dict()) == keys   # still the plain module
    now = dict(model.named_parameters())
    assert frozen and all(torch.equal(now[n], v) for n, v in frozen.items())
    assert sum(not torch.equal(now[n], v) for n, v in train.items()) > len(train) // 2
    learn.freeze_top(1)                                       # re-freeze a compiled model: guards recompile
    frozen, _ = _frozen_and_trainable(learn)
    learn.fit_stage(1, 1e-3, cbs=[cb])
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    return learn


@pytest.mark.slow
def test_compile_after_unfreeze_keeps_frozen_weights():
    "dynamo + AOTAutograd (what decides which weights get gradients) without the C++ code generation."
    _compile_then_unfreeze("aot_eager")


@pytest.mark.slow
def test_compile_after_unfreeze_inductor():
    try:
        _compile_then_unfreeze("inductor")
    except Exception as e:  # noqa: BLE001 - only a missing toolchain is a reason to skip
        if "compiler" in str(e).lower() and ("not found" in str(e).lower() or "no such file" in str(e).lower()):
            pytest.skip(f"torch.compile's inductor backend cannot build here: {e}")
        raise


def test_speed_callbacks_from_recipe_on_cpu(tmp_path):
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    from fastlearn.fit.precision import Determinism
    assert [type(c) for c in speed_callbacks(learn, load_recipe("transfer", {"precision": "auto"}))] == [Determinism]
    cbs = speed_callbacks(learn, load_recipe("transfer", {"channels_last": True, "compile": True,
                                                          "strategy": "linear_probe"}), final_trainable=1)
    assert [type(c) for c in cbs] == [Determinism, ChannelsLastBatch, CompileAfterUnfreeze]
    assert cbs[2].final_trainable == 1
    # the recipe's callbacks pass the last stage of the plan: the head for a linear probe, everything for `full`
    from fastlearn.train.recipe_callbacks import recipe_callbacks
    for strategy, final in (("linear_probe", 1), ("full", learn.n_layer_groups)):
        cbs = recipe_callbacks(learn, load_recipe("transfer", {"compile": True, "strategy": strategy}), tmp_path)
        assert [c for c in cbs if isinstance(c, CompileAfterUnfreeze)][0].final_trainable == final


@pytest.mark.parametrize("precision", [pytest.param(p, marks=needs_cuda) for p in ("bf16", "fp16")])
def test_compile_after_unfreeze_inductor_on_cuda(precision):
    "Inductor's Triton kernels under autocast with channels_last; frozen weights stay bitwise unchanged."
    learn = _compile_then_unfreeze("inductor", "cuda", extra=[*amp_callbacks(precision), ChannelsLastBatch()])
    assert next(learn.model.parameters()).is_cuda


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_mixed_precision_training_on_cuda(precision):
    "On a GPU: autocast bf16/fp16 with channels_last trains a few steps to finite weights, on the device."
    from fastai.data.core import DataLoaders
    dls = synthetic_dls()
    dls = DataLoaders(dls.train, dls.valid, device="cuda")
    dls.c = 3
    learn = transfer_learner(dls, "test_resnet", pretrained=False, progress=False)
    learn.model.cuda()
    r = load_recipe("transfer", {"precision": precision, "arch": "test_resnet", "pretrained": False})
    cbs = speed_callbacks(learn, r)
    assert any(isinstance(c, MixedPrecision) for c in cbs) and any(isinstance(c, ChannelsLastBatch) for c in cbs)
    learn.freeze_top(-1)
    learn.fit_stage(1, 1e-3, cbs=cbs)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert next(learn.model.parameters()).is_cuda


# -- deterministic or fast ---------------------------------------------------------------------------------------

def test_deterministic_auto_is_on_for_cpu_off_for_cuda():
    from fastlearn.fit.precision import resolve_deterministic
    assert resolve_deterministic(None, "cpu") is True
    assert resolve_deterministic(None, "cuda") is False
    assert resolve_deterministic(True, "cuda") is True and resolve_deterministic(False, "cpu") is False


def test_set_deterministic_switches_cudnn_and_torch_algorithms():
    from fastlearn.fit.precision import set_deterministic
    try:
        set_deterministic(False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
        set_deterministic(True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        set_deterministic(True)


def test_deterministic_recipe_key_reaches_the_fit():
    from fastlearn.fit.precision import Determinism, speed_callbacks
    from fastlearn.core.recipes import Recipe
    with pytest.raises(ValueError, match="deterministic"):
        Recipe(deterministic="yes")
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    cbs = speed_callbacks(learn, Recipe(arch="test_resnet", deterministic=False))
    assert [c.deterministic for c in cbs if isinstance(c, Determinism)] == [False]
    try:
        learn.fit(1, cbs=cbs)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        learn.fit(1, cbs=speed_callbacks(learn, Recipe(arch="test_resnet")))  # auto on a CPU learner: on
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        from fastlearn.fit.precision import set_deterministic
        set_deterministic(True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_deterministic_auto_on_cuda_turns_the_autotuner_on():
    from fastlearn.fit.precision import Determinism, set_deterministic
    learn = transfer_learner(synthetic_dls(device="cuda"), "test_resnet", pretrained=False, progress=False)
    try:
        learn.fit(1, cbs=[Determinism(None)])
        assert torch.backends.cudnn.benchmark
    finally:
        set_deterministic(True)
