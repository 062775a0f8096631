"""Recipes: named presets as TOML files in `recipes/`, validated into a frozen `Recipe` before any compute.

A recipe file may `extends = "other"` to inherit every key it does not set; code and the command line
override keys last (`key=value`). Unknown keys, wrong types and out-of-range values raise `RecipeError`
naming the key, the value and the valid choices. The resolved recipe is written into each run folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from ..base.errors import RecipeError


__all__ = ["Recipe", "load_recipe", "list_recipes", "recipe_dirs", "parse_overrides"]

Strategy = Literal["linear_probe", "fine_tune_top", "full", "auto", "scratch"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Opt = Literal["adamw", "adam", "sgd", "sgd_nesterov", "rmsprop"]


@dataclass(frozen=True)
class Recipe:
    "Everything a run needs, in one validated, immutable place (units beside each key)."
    name: str = "custom"
    description: str = ""
    source: str = ""                    # where the numbers come from (paper, config, our bench)
    expected: str = ""                  # the result this recipe is expected to reach, and on what
    # -- model and data
    arch: str = "tf_efficientnet_lite0"  # any timm name
    pretrained: bool = True
    size: int = 224                     # final training resolution, px
    valid_size: int | None = None       # evaluation resolution, px (None = size)
    bs: int | None = None               # per-device batch size; None = from the training images (budget.batch_size_for)
    min_steps: int = 100                # steps the automatic batch size gives the fine-tuning one-cycle, at least
    valid_pct: float = 0.2              # used when the folder has no valid/ split
    seed: int = 42
    augment: bool = True                # fastai aug_transforms on the batch
    flip: bool = True                   # horizontal flips (off for digits/text-like data)
    random_erasing: float = 0.0         # probability
    rand_augment: str | None = None     # timm RandAugment config, e.g. "rand-m9-mstd0.5" (None = off)
    bad_images: Literal["error", "skip"] = "error"
    # -- labels (fastlearn/labels.py): a CSV of file name, label (--data labels.csv), multi-label
    multi_label: bool = False           # space-separated labels per image (CSV only): sigmoid/BCE, F1
    threshold: float = 0.5              # multi-label: a class is predicted when its sigmoid exceeds this
    fn_col: str | None = None           # CSV column of file names (None = the first column)
    label_col: str | None = None        # CSV column of labels (None = the second column)
    valid_col: str | None = None        # CSV column marking validation rows (None = "is_valid" if present)
    folder: str | None = None           # CSV: folder the file names are relative to (None = the CSV's folder)
    # -- schedule: lr_find -> head one-cycle -> gradual unfreezing with discriminative LRs
    strategy: Strategy = "full"
    lr: float | None = None             # peak LR of the head stage; None = from lr_find
    lr_find: bool = True
    lr_suggester: Literal["peak", "valley", "slide", "steep", "minimum"] = "valley"  # picks the LR off the sweep
    head_features: bool = True          # pretrained body: train the head on features computed once (LP-FT)
    head_steps: int = 300               # optimizer steps of the head on cached features
    adapt_bn_shift: float | None = 0.45  # BN shift above which BN statistics are re-estimated before the head (AdaBN)
    ft_lr: float | None = None          # peak LR of the first fine-tuning stage (top group); None = from the head's
    ft_lr_factor: float = 1.0           # first FT stage's peak LR / the head's, after the head on cached features; 1.0
                                        # measured best of 0.1-3 on real photos (bench/lr_calibration.py)
    ft_lr_max: float = 3e-3             # ... capped here: the largest fine-tuning LR measured good (higher ones broke
                                        # the body on real photos: 8.8e-3 sent clothing's valid loss from 0.41 to 7.6)
    ft_lr_max_small: float | None = None  # ... or capped here when the training images average fewer than
                                        # small_per_class per class (None = ft_lr_max at every size)
    small_per_class: float = 40.0       # training images per class below which ft_lr_max_small caps the LR
    train_bn: bool = True               # BatchNorm in frozen groups keeps training (fastai); false: frozen groups are
                                        # frozen whole, so backward stops at the lowest trainable group (cheaper steps)
    keep_best: bool = True              # end with the best stage end's weights (by validation metric, then loss)
    ft_bn: Literal["train", "eval"] = "train"  # BatchNorm while fine-tuning: "train" normalises by batch statistics
                                        # and updates the running ones (PyTorch, fastai); "eval" keeps every BN layer
                                        # in inference mode, on the running statistics the head was fitted on (Keras;
                                        # pair it with ft_lr_max = 3e-4). Default: bench/real_data.py, 02_fine_tuning
    stage_guard: bool = True            # a fine-tuning epoch clearly worse on validation than the best so far (loss
                                        # higher, metric lower beyond the validation set's noise) stops the run
                                        # there and keeps the best weights (with keep_best; fit.keep.clearly_worse)
    soup: float = 0.0                   # after fine-tuning, the weights (1 - soup) x the head stage's end + soup x
                                        # the fine-tuned ones (WiSE-FT) are one more candidate for keep-best; 0 = off
    ensemble: bool = False              # after fine-tuning a pretrained body, the probe (the head stage's end) and the
                                        # fine-tuned network predicting together (probabilities averaged:
                                        # core.models.Ensemble), kept unless clearly worse on validation than the best
                                        # stage end; kept, they double the inference cost and the weights
    lr_ratio: float = 100.0             # head LR / first-group LR, geometric in between
    head_epochs: int = 1
    unfreeze_epochs: int = 1            # per intermediate unfreezing stage
    epochs: int = 2                     # last stage (everything up to unfreeze_to trainable)
    unfreeze_step: int = 2              # groups added per stage, from the top
    unfreeze_to: int = -1               # top groups trainable at the end; -1 = all
    stage_lr_mult: float = 0.5          # peak LR multiplier per deeper stage
    div: float = 25.0                   # one-cycle start LR = lr / div
    final_div: float = 1e5              # one-cycle end LR = lr / final_div
    pct_start: float = 0.25             # fraction of steps rising to the peak
    moms: tuple[float, float] = (0.95, 0.85)  # momentum / Adam beta1: high at the ends, low at the peak
    # -- optimizer and regularisation
    opt: Opt = "adamw"
    lookahead: bool = False
    wd: float = 0.01
    wd_norm_bias: bool = False          # decay norm and bias parameters too
    label_smoothing: float = 0.0
    loss: Literal["ce", "weighted_ce", "focal"] = "ce"  # weighted_ce / focal for imbalanced classes
    focal_gamma: float = 2.0
    mixup: float = 0.0                  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0                 # Beta(alpha, alpha); 0 = off
    drop_rate: float | None = None      # classifier dropout (None = model default)
    drop_path: float | None = None      # stochastic depth (None = model default)
    grad_clip: float | None = None      # max global grad norm, on unscaled gradients
    grad_accum: int = 1                 # micro-batches per optimizer step
    ema: bool = False                   # timm ModelEmaV3 of the weights, evaluated at the end
    ema_decay: float = 0.9998
    early_stop: int | None = None       # patience in epochs on valid loss; restores the best weights
    swa_epochs: int = 0                 # extra epochs of stochastic weight averaging after the last stage
    swa_lr: float | None = None         # constant LR of the SWA epochs (None = last stage's peak / 10)
    health_every: int = 0               # log update/weight ratios and grad norms every N steps (0 = off)
    lr_ref_bs: int | None = None        # scale lr by global_bs / lr_ref_bs (None = no scaling)
    lr_scale_rule: Literal["linear", "sqrt"] = "linear"
    # -- progressive resizing
    resize_start: int | None = None     # first training resolution, px (None = off)
    resize_ramp: tuple[float, float] = (0.0, 0.75)  # ramp from start to final size over these fractions
    resize_multiple: int = 32
    # -- speed and scale
    precision: Precision = "auto"       # auto: bf16 where supported, fp16 elsewhere on CUDA, fp32 on CPU
    channels_last: bool | None = None   # None = on for conv nets on CUDA, depthwise + BN ones on the CPU
    compile: bool = False               # torch.compile after the last unfreeze
    sync_bn: bool = False               # SyncBatchNorm when distributed
    num_workers: int | None = None      # DataLoader worker processes (None = data.default_num_workers())
    cache_images: bool | Literal["auto"] = "auto"  # decoded images in RAM ("auto": when they fit in min(2 GB, 25% RAM))
    decode: Literal["cpu", "cuda"] = "cpu"  # JPEG decoding: Pillow in the workers, or nvJPEG on the GPU (needs CUDA)
    deterministic: bool | None = None   # None = auto: on for CPU (bitwise-exact resume), off on CUDA (cuDNN autotuner)
    # -- run bookkeeping
    checkpoint_every: int = 1           # epochs between checkpoints (0 = only at the end)
    keep_last: int = 2                  # checkpoints kept besides the best while the run trains
    keep_checkpoints: bool = False      # keep every checkpoint once the run has finished; false: only the last one
                                        # stays (resume, inspection), the kept weights being model.safetensors
    loggers: tuple[str, ...] = ()       # experiment loggers besides metrics.csv: "tensorboard", "mlflow", "wandb"

    def __post_init__(self):
        _validate(self)

    @property
    def resizes_on_device(self) -> bool:
        """Whether batches are resized on the device (ProgressiveResize): the DataLoaders load at
        max(size, valid_size), training grows from `resize_start`, validation runs at `valid_size`."""
        return bool(self.resize_start or (self.valid_size or self.size) != self.size)

    def replace(self, **overrides) -> "Recipe":
        "A new recipe with `overrides` applied and validated."
        return from_dict({**self.to_dict(), **overrides}, origin="overrides")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        "The resolved recipe as TOML (written into each run folder)."
        lines = [f"# {k} = (unset)" if v is None else f"{k} = {toml_value(v)}" for k, v in self.to_dict().items()]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_toml())
        return path


# -- validation -------------------------------------------------------------------------------

_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    # key: (low, high, kind in _KINDS)
    "size": (16, None, "ge"), "valid_size": (16, None, "ge"), "bs": (1, None, "ge"), "min_steps": (1, None, "ge"),
    "head_steps": (1, None, "ge"), "adapt_bn_shift": (0, None, "ge"), "ft_lr": (0, None, "low"),
    "ft_lr_factor": (0, None, "low"), "ft_lr_max": (0, None, "low"),
    "ft_lr_max_small": (0, None, "low"), "small_per_class": (0, None, "low"),
    "valid_pct": (0, 1, "open"), "random_erasing": (0, 1, "closed"),
    "lr": (0, None, "low"), "lr_ratio": (1, None, "ge"), "head_epochs": (0, None, "ge"),
    "unfreeze_epochs": (0, None, "ge"), "epochs": (0, None, "ge"), "unfreeze_step": (1, None, "ge"),
    "stage_lr_mult": (0, 1, "left_open"), "div": (1, None, "ge"), "final_div": (1, None, "ge"),
    "pct_start": (0, 1, "open"), "wd": (0, None, "ge"), "label_smoothing": (0, 1, "right_open"),
    "mixup": (0, None, "ge"), "cutmix": (0, None, "ge"), "drop_rate": (0, 1, "right_open"),
    "drop_path": (0, 1, "right_open"), "grad_clip": (0, None, "low"), "grad_accum": (1, None, "ge"),
    "ema_decay": (0, 1, "open"), "early_stop": (1, None, "ge"), "lr_ref_bs": (1, None, "ge"),
    "resize_start": (16, None, "ge"), "resize_multiple": (1, None, "ge"),
    "checkpoint_every": (0, None, "ge"), "keep_last": (1, None, "ge"), "focal_gamma": (0, None, "ge"),
    "swa_epochs": (0, None, "ge"), "soup": (0, 1, "right_open"), "swa_lr": (0, None, "low"),
    "health_every": (0, None, "ge"), "num_workers": (0, None, "ge"), "threshold": (0, 1, "open"),
}


_KINDS = {  # kind: (whether v is in range, the range as the error message says it)
    "open": (lambda v, lo, hi: lo < v < hi, "in ({lo}, {hi})"),
    "closed": (lambda v, lo, hi: lo <= v <= hi, "in [{lo}, {hi}]"),
    "low": (lambda v, lo, hi: v > lo, "> {lo}"),
    "ge": (lambda v, lo, hi: v >= lo, ">= {lo}"),
    "left_open": (lambda v, lo, hi: lo < v <= hi, "in ({lo}, {hi}]"),
    "right_open": (lambda v, lo, hi: lo <= v < hi, "in [{lo}, {hi})"),
}


def _type_ok(v: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return v in args
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, a) for a in args)
    if tp is type(None):
        return v is None
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: any length
        return isinstance(v, tuple) and all(_type_ok(x, args[0]) for x in v)
    if origin is tuple:
        return isinstance(v, tuple) and len(v) == len(args) and all(_type_ok(x, a) for x, a in zip(v, args))
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, tp)


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_type_text(args[0])}s, e.g. [\"tensorboard\", \"mlflow\"]"
    if args:
        return f"a list of {len(args)} numbers" if origin is tuple else " or ".join(_type_text(a) for a in args)
    return {type(None): "unset", float: "a number", int: "an integer", bool: "true/false",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


_HINTS = typing.get_type_hints(Recipe)


def _literal_choices(tp: Any) -> tuple:
    "The allowed values when `tp` is a Literal (or a union holding one), else ()."
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return args
    if origin in (typing.Union, types.UnionType):
        return tuple(c for a in args for c in _literal_choices(a))
    return ()


def _did_you_mean(word: str, choices, n: int = 3) -> str:
    "'did you mean 'x'?' for the closest of `choices` (up to n, as 'a', 'b' or 'c'), or '' when none is close."
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=n)
    if not close:
        return ""
    quoted = [repr(c) for c in close]
    return "did you mean " + (quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}") + "?"


def _validate(r: Recipe) -> None:
    for f in fields(r):
        v, tp = getattr(r, f.name), _HINTS[f.name]
        if not _type_ok(v, tp):
            choices = _literal_choices(tp)
            if isinstance(v, str) and choices and all(isinstance(c, str) for c in choices):  # a wrong value
                raise RecipeError(f"recipe {r.name!r}: key {f.name!r} = {v!r} is not one of "
                                  f"{', '.join(map(repr, choices))}"
                                  + (f"; {hint}" if (hint := _did_you_mean(v, choices, n=1)) else ""))
            raise RecipeError(f"recipe {r.name!r}: key {f.name!r} = {v!r} has the wrong type; "
                              f"expected {_type_text(tp)}")
        if f.name in _RANGES and v is not None:
            lo, hi, kind = _RANGES[f.name]
            in_range, text = _KINDS[kind]
            if not in_range(v, lo, hi):
                raise RecipeError(f"recipe {r.name!r}: key {f.name!r} = {v!r} is out of range; "
                                  f"it must be {text.format(lo=lo, hi=hi)}")
    lo, hi = r.moms
    if not (0 <= lo <= 1 and 0 <= hi <= 1):
        raise RecipeError(f"recipe {r.name!r}: key 'moms' = {r.moms!r} must be two values in [0, 1]")
    a, b = r.resize_ramp
    if not 0 <= a < b <= 1:
        raise RecipeError(f"recipe {r.name!r}: key 'resize_ramp' = {r.resize_ramp!r} must be two "
                          f"fractions 0 <= start < end <= 1")
    if r.resize_start is not None and r.resize_start > r.size:
        raise RecipeError(f"recipe {r.name!r}: final size 'size' = {r.size} is smaller than "
                          f"'resize_start' = {r.resize_start}; progressive resizing grows the images")
    if r.unfreeze_to == 0 or r.unfreeze_to < -1:
        raise RecipeError(f"recipe {r.name!r}: key 'unfreeze_to' = {r.unfreeze_to} must be -1 (all groups) "
                          f"or the number of top groups (>= 1) trainable at the end")
    if r.loss == "focal" and r.label_smoothing:
        raise RecipeError(f"recipe {r.name!r}: 'loss' = 'focal' cannot be combined with 'label_smoothing' = "
                          f"{r.label_smoothing} (focal loss takes hard targets); set label_smoothing = 0")
    if r.mixup and r.cutmix:
        raise RecipeError(f"recipe {r.name!r}: 'mixup' and 'cutmix' are both on; choose one")
    if r.soup and r.ensemble:
        raise RecipeError(f"recipe {r.name!r}: 'soup' = {r.soup} and 'ensemble' = true both combine the probe with the "
                          f"fine-tuned network (one in its weights, one in its predictions); set ensemble = false to "
                          f"use the soup, or soup = 0")
    check_logger_names(r.loggers, origin=f"recipe {r.name!r}")
    if r.multi_label and (r.loss != "ce" or r.label_smoothing):
        what = f"'loss' = {r.loss!r}" if r.loss != "ce" else f"'label_smoothing' = {r.label_smoothing}"
        raise RecipeError(f"recipe {r.name!r}: 'multi_label' = true trains with a per-class sigmoid and binary "
                          f"cross-entropy, which {what} does not apply to; set loss = \"ce\" and label_smoothing = 0")


LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")  # the names the `loggers` key takes (fastlearn/loggers.py)


def check_logger_names(names, origin: str = "loggers") -> None:
    "RecipeError unless every name is one of LOGGERS, once each (with a did-you-mean for a typo)."
    for n in names:
        if n not in LOGGERS:
            close = difflib.get_close_matches(str(n), LOGGERS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"{origin}: unknown logger {n!r} in 'loggers' = {list(names)!r}; {hint}"
                              f"use any of {', '.join(map(repr, LOGGERS))}")
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise RecipeError(f"{origin}: 'loggers' = {list(names)!r} names {twice} more than once; list each once")


# -- loading ------------------------------------------------------------------------------------

_KEYS = [f.name for f in fields(Recipe)]


def from_dict(d: dict, origin: str = "dict", listing: str | None = None) -> Recipe:
    """Validate a plain dict (TOML types) into a `Recipe`. An unknown key names the closest valid ones and
    the command that lists them all: `fastlearn recipes digits` (`listing`; default: this recipe if named)."""
    unknown = [k for k in d if k not in _KEYS]
    if unknown:
        k = unknown[0]
        more = (f" (and {len(unknown) - 1} more unknown: {', '.join(map(repr, unknown[1:]))})"
                if len(unknown) > 1 else "")
        if listing is None:
            listing = d.get("name") if d.get("name") in list_recipes() else "transfer"
        raise RecipeError(f"{origin}: unknown recipe key {k!r} ({_did_you_mean(k, _KEYS) or 'no key is close'}){more}; "
                          f"every key, with its value: `fastlearn recipes {listing}`")
    return Recipe(**{k: _coerce(k, v) for k, v in d.items()})


def _coerce(key: str, v: Any) -> Any:
    "TOML to Python: lists to tuples, 'none' to None for optional keys, ints to floats for float keys."
    args = typing.get_args(_HINTS[key]) or (_HINTS[key],)
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, str) and _HINTS[key] == tuple[str, ...]:  # loggers=tensorboard,mlflow on a command line
        return tuple(x.strip() for x in v.split(",") if x.strip())
    if isinstance(v, str) and v.lower() == "none" and type(None) in args:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and float in args and int not in args:
        return float(v)
    return v


def _packaged_recipes() -> Path | None:
    """The recipes installed with the package: package data `fastlearn/presets/*.toml`, which setup.cfg maps from the
    top-level `recipes/`; found with importlib.resources wherever the package is installed, never via sys.prefix."""
    d = files("fastlearn") / "presets"  # the top package's data, whichever subpackage reads it
    return d if isinstance(d, Path) and d.is_dir() else None  # a zipped install (not a Path) is not supported


def recipe_dirs() -> list[Path]:
    """Where named recipes are looked up, first match wins: $FASTLEARN_RECIPES (os.pathsep-separated folders), the
    installed package data, and the `recipes/` of a source checkout (an editable install or PYTHONPATH)."""
    dirs = [Path(p) for p in os.environ.get("FASTLEARN_RECIPES", "").split(os.pathsep) if p]
    dirs += [_packaged_recipes(), Path(__file__).resolve().parents[2] / "recipes"]
    return list(dict.fromkeys(d for d in dirs if d is not None and d.is_dir()))


def list_recipes() -> dict[str, Path]:
    "Named recipes found on `recipe_dirs()` (first one wins)."
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def _read(name_or_path: str | Path, seen: tuple = ()) -> dict:
    p = Path(name_or_path)
    if not (p.suffix == ".toml" and p.exists()):
        known = list_recipes()
        if str(name_or_path) not in known:
            close = difflib.get_close_matches(str(name_or_path), list(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise RecipeError(f"unknown recipe {str(name_or_path)!r}.{hint} Known recipes: "
                              f"{', '.join(sorted(known)) or '(none found)'}; or pass a path to a .toml file")
        p = known[str(name_or_path)]
    if p.stem in seen:
        raise RecipeError(f"recipe {p.stem!r} extends itself through {' -> '.join(seen)}")
    try:
        d = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe file {p} is not valid TOML: {e}") from None
    parent = d.pop("extends", None)
    d.setdefault("name", p.stem)
    if parent is None:
        return d
    base = _read(parent if not str(parent).endswith(".toml") else p.parent / parent, seen + (p.stem,))
    for k in ("description", "source", "expected"):  # prose belongs to the file that writes it
        if k not in d:
            base.pop(k, None)
    return {**base, **d}


def load_recipe(name_or_path: str | Path | Recipe = "transfer", overrides: dict | list[str] | None = None) -> Recipe:
    "Load a named recipe (or a .toml path), apply `overrides` (dict or 'key=value' strings), validate."
    d = name_or_path.to_dict() if isinstance(name_or_path, Recipe) else _read(name_or_path)
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    origin = f"recipe {d.get('name', name_or_path)!r}"
    if overrides:
        if any(k not in _KEYS for k in overrides):  # from_dict raises, with the hint
            name = d.get("name")
            from_dict(overrides, origin="override", listing=name if name in list_recipes() else "transfer")
        d = {**d, **overrides}
    return from_dict(d, origin=origin)


def parse_overrides(items: list[str]) -> dict:
    "'key=value' strings to a dict; values are parsed as TOML (numbers, true/false, lists) else strings."
    out = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        try:
            out[k] = tomllib.loads(f"v = {v.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[k] = v.strip()
    return out


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)
