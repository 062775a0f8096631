"""Speed switches: mixed precision, TF32, channels_last and torch.compile, as pure policies plus the callbacks that
apply them.

Mixed precision is fastai's `MixedPrecision` (torch.amp autocast + GradScaler), which autocasts on 'cuda' only, so
bf16/fp16 on another device is an error rather than a silent fp32 run. Its `GradScaler.step` (order 10) unscales the
gradients and cancels a step whose gradients hold inf/NaN; `GradientClip` (order 11) then clips unscaled gradients,
and skips cancelled steps. fastai does not report skipped steps; `SkippedSteps` does, once per fit.
"""
from __future__ import annotations

import os
import sys
from typing import Literal

import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.torch_core import set_seed

from ..core.models import has_depthwise_bn, is_convolutional

__all__ = ["choose_precision", "set_tf32", "amp_callbacks", "precision_callbacks", "speed_callbacks",
           "resolve_deterministic", "set_deterministic", "seed_and_mode", "Determinism",
           "SkippedSteps", "LossScaleState", "TF32", "use_channels_last", "ChannelsLastBatch", "CompileAfterUnfreeze",
           "trainable_layer_groups", "learner_device"]

Precision = Literal["fp32", "bf16", "fp16"]
_REQUESTS = ("auto", "fp32", "bf16", "fp16")


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def choose_precision(requested: str = "auto", device: torch.device | str | None = None) -> Precision:
    """The precision a run uses on `device` (None: CUDA when available, else CPU). auto: bf16 on CUDA where the GPU
    supports it, fp16 on other CUDA GPUs, fp32 elsewhere; bf16/fp16 off CUDA raise."""
    if requested not in _REQUESTS:
        raise ValueError(f"precision must be one of {', '.join(_REQUESTS)}, got {requested!r}")
    dev = _as_device(device)
    if requested == "fp32" or (requested == "auto" and dev.type != "cuda"):
        return "fp32"
    if dev.type != "cuda":
        raise ValueError(f"precision={requested!r} needs a CUDA device, but training runs on {dev.type!r} "
                         f"(fastai's MixedPrecision autocasts 'cuda' only); use precision='fp32' or 'auto'")
    bf16_ok = torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if bf16_ok else "fp16"
    if requested == "bf16" and not bf16_ok:
        name = torch.cuda.get_device_name(dev) if torch.cuda.is_available() else "this GPU"
        raise ValueError(f"precision='bf16' is not supported on {name}; use precision='fp16' or 'auto'")
    return requested


def set_tf32(enabled: bool = True) -> tuple[str, bool]:
    """Let fp32 matmuls and cuDNN convolutions use TF32 tensor cores (Ampere and newer GPUs). Process-wide: returns
    the previous (matmul precision, cudnn.allow_tf32) for the caller to put back."""
    prev = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    return prev


class TF32(Callback):
    "TF32 matmuls/convolutions for the duration of a fit; the global torch setting is restored after it."
    order = -5

    def before_fit(self):
        self._prev = set_tf32(True)

    def after_fit(self):
        torch.set_float32_matmul_precision(self._prev[0])
        torch.backends.cudnn.allow_tf32 = self._prev[1]


class SkippedSteps(Callback):
    """Counts optimizer steps fastai's fp16 `MixedPrecision` skipped because GradScaler found inf/NaN
    gradients (fastai raises `CancelStepException` and says nothing); prints the count once per fit."""
    order = MixedPrecision.order + 1

    def __init__(self, stream=None):
        self.total, self.in_fit, self.steps, self.stream = 0, 0, 0, stream
        self.scale = float("nan")  # GradScaler's scale after the last skipped step

    @property
    def skipped(self) -> int:
        "Steps skipped over every fit this callback has seen."
        return self.total

    def before_fit(self):
        self.in_fit, self.steps = 0, 0
        self._mp = next((c for c in self.learn.cbs if isinstance(c, MixedPrecision)), None)

    def after_cancel_step(self):
        # other callbacks may cancel a step too; only MixedPrecision's own overflow flag counts here
        if self._mp is not None and getattr(self._mp, "skipped", False):
            self.in_fit += 1
            self.total += 1
            self._just_skipped = True

    def after_step(self):
        self.steps += 1
        if getattr(self, "_just_skipped", False):  # read the lowered scale only then: get_scale() syncs
            self._just_skipped = False
            self.scale = self.learn.scaler.get_scale()

    def after_fit(self):
        if self.in_fit:
            print(f"fp16: GradScaler skipped {self.in_fit} of {self.steps} optimizer steps (inf/NaN gradients; "
                  f"loss scale now {self.scale:g}). A few at the start are normal; many mean the loss overflows "
                  f"fp16: use precision='bf16' or 'fp32', or a lower LR", file=self.stream or sys.stdout, flush=True)


class LossScaleState(Callback):
    """Carries fp16's GradScaler state from one fit to the next and through checkpoints. fastai's `MixedPrecision`
    makes a new GradScaler at every fit, so each unfreezing stage and each resume would skip steps to re-learn the
    scale; with this callback a resumed run continues bitwise as the uninterrupted one."""
    order = MixedPrecision.order + 1  # before_fit runs after MixedPrecision's has made learn.scaler

    def __init__(self):
        self.state: dict | None = None

    def _scaler(self):
        "The live GradScaler: fastai's MixedPrecision sets `learn.scaler` for a fit and None after it."
        return getattr(self.learn, "scaler", None)

    def before_fit(self):
        scaler = self._scaler()
        if scaler is not None and self.state is not None and scaler.is_enabled():
            scaler.load_state_dict(self.state)

    def after_epoch(self):  # MixedPrecision.after_fit (order 10) drops learn.scaler before ours would run
        scaler = self._scaler()
        if scaler is not None and scaler.is_enabled():
            self.state = scaler.state_dict()

    def state_dict(self) -> dict:
        "The scaler's state now (inside a fit: the live scaler's, for a mid-epoch checkpoint)."
        scaler = self._scaler()
        return {"scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else self.state}

    def load_state_dict(self, state: dict) -> None:
        self.state = state.get("scaler")


def amp_callbacks(precision: Precision) -> list[Callback]:
    "fastai's `MixedPrecision` for bf16/fp16 (plus `SkippedSteps` for fp16's loss scaling); none for fp32."
    if precision == "fp32":
        return []
    if precision == "bf16":
        return [MixedPrecision(amp_mode="bf16")]  # bf16 has fp32's range: fastai disables the GradScaler
    if precision == "fp16":
        return [MixedPrecision(amp_mode="fp16"), SkippedSteps(), LossScaleState()]
    raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16' (see choose_precision), got {precision!r}")


def precision_callbacks(learn, recipe) -> list[Callback]:
    "The recipe's precision on this learner's device: AMP callbacks, or TF32 for fp32 on CUDA."
    dev = learner_device(learn)
    prec = choose_precision(recipe.precision, dev)
    return ([TF32()] if dev.type == "cuda" and prec == "fp32" else []) + amp_callbacks(prec)


# -- deterministic or fast ----------------------------------------------------------------------

def resolve_deterministic(value: bool | None, device=None) -> bool:
    """The recipe's `deterministic` on `device` (None: CUDA when available): its value when set; None (auto) is on
    for CPU, where it costs nothing, and off on CUDA, where cuDNN's autotuned kernels are much faster."""
    return bool(value) if value is not None else _as_device(device).type != "cuda"


def set_deterministic(on: bool) -> None:
    """Process-wide switch, replacing fastai's `set_seed(reproducible=True)`. on: deterministic cuDNN kernels and torch
    algorithms where torch has them (warning where not), so a resumed run is bitwise the uninterrupted one. off:
    cuDNN autotunes the fastest kernels, so reruns agree only up to float rounding."""
    on = bool(on)
    if on and torch.cuda.is_available():  # cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=True)


def seed_and_mode(seed: int, deterministic: bool | None, device=None) -> bool:
    "fastai's `set_seed(seed)` and `set_deterministic(resolve_deterministic(...))`; returns the mode (True: deterministic)."
    set_seed(seed)
    on = resolve_deterministic(deterministic, device)
    set_deterministic(on)
    return on


class Determinism(Callback):
    "Applies the recipe's `deterministic` (resolved on the learner's device) at the start of each fit."
    order = -5

    def __init__(self, deterministic: bool | None = None):
        self.deterministic = deterministic

    def before_fit(self):
        set_deterministic(resolve_deterministic(self.deterministic, learner_device(self.learn)))


# -- channels_last -------------------------------------------------------------------------------

def use_channels_last(recipe_value: bool | None, model: torch.nn.Module, device) -> bool:
    """The recipe's choice when set; None: on for convolutional models on CUDA (where cuDNN's NHWC kernels pay),
    and on the CPU for those with depthwise convolutions and BatchNorm (EfficientNet, MobileNet: 1.3-1.5x per
    training step at 160-224 px there, bench/channels_last_cpu.py)."""
    if recipe_value is not None:
        return bool(recipe_value)
    if not is_convolutional(model):
        return False
    return _as_device(device).type == "cuda" or has_depthwise_bn(model)


class ChannelsLastBatch(ChannelsLast):
    """fastai's `ChannelsLast` (model weights to NHWC before fit) that also converts each 4-d input batch,
    so the first convolution does not get a layout conversion per step (fastai converts the model only)."""
    order = 1  # after callbacks that replace the batch (ProgressiveResize -1, MixUp/CutMix 0)

    def before_batch(self):
        self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last)
                              if isinstance(x, torch.Tensor) and x.ndim == 4 else x for x in self.xb)


# -- torch.compile -------------------------------------------------------------------------------

def trainable_layer_groups(learn) -> int:
    """How many layer groups (from the top) are trainable now, from the optimizer's `frozen_idx`
    (a learner without a `group_map` counts as one group; one without an optimizer yet is unfrozen)."""
    gmap = getattr(learn, "group_map", None)
    opt = getattr(learn, "opt", None)
    if gmap is None or opt is None:
        return 1 if gmap is None else gmap.n_layer_groups
    idx = getattr(opt, "frozen_idx", 0)
    return 0 if idx >= len(gmap) else gmap.n_layer_groups - gmap[idx][0]


class CompileAfterUnfreeze(Callback):
    """torch.compile the model for fits where `final_trainable` layer groups (None: all) are trainable, i.e. the last
    unfreezing stage only, so earlier stages do not pay a compilation each. Compiled in place (`nn.Module.compile`):
    `learn.model`, its state_dict keys and layer groups stay the same. fastai PR #3899 found compiled models could not
    be re-frozen; dynamo now guards on `requires_grad`, so a later freeze recompiles (tests/test_precision.py)."""
    order = ChannelsLastBatch.order + 1  # after the weights are in their final memory format

    def __init__(self, final_trainable: int | None = None, backend: str = "inductor", mode: str | None = None):
        self.final_trainable, self.backend, self.mode = final_trainable, backend, mode
        self.compiled = False

    def before_fit(self):
        if self.compiled:
            return
        target = self.final_trainable
        n_groups = getattr(getattr(self.learn, "group_map", None), "n_layer_groups", 1)
        if trainable_layer_groups(self.learn) >= (n_groups if target in (None, -1) else target):
            self.learn.model.compile(backend=self.backend, mode=self.mode)
            self.compiled = True


def learner_device(learn) -> torch.device:
    "The device a learner trains on: its DataLoaders' device, else its parameters'."
    dev = getattr(learn.dls, "device", None)
    if dev is None:
        p = next(learn.model.parameters(), None)
        dev = p.device if p is not None else "cpu"
    return torch.device(dev)


def speed_callbacks(learn, recipe, final_trainable: int | None = None) -> list[Callback]:
    """The callbacks for a recipe's `precision`, `channels_last` and `compile` on this learner's device;
    `final_trainable`: top layer groups trainable in the run's last stage (None: all), where compile waits for."""
    cbs = precision_callbacks(learn, recipe) + [Determinism(getattr(recipe, "deterministic", None))]
    if use_channels_last(recipe.channels_last, learn.model, learner_device(learn)):
        cbs.append(ChannelsLastBatch())
    if recipe.compile:
        cbs.append(CompileAfterUnfreeze(final_trainable))
    return cbs
