"""Export a finished run's model: ONNX, TorchScript, or a timm/Hugging Face folder; each checked against PyTorch.

Every export takes the normalised `(N, 3, input_size, input_size)` batch `model.json` describes and returns logits
(softmax or sigmoid is left to the caller, as in timm). The exported model is then run on a random batch of another
size than the one it was traced with; the largest absolute logit difference to PyTorch is returned and printed.

- `onnx` (`pip install 'fastlearn[onnx]'`): a dynamic batch axis, `model.json` in the ONNX metadata
  (`fastlearn_model_card`), checked with onnxruntime on the CPU. The TorchScript-based exporter (opset 17), much
  faster than dynamo, runs first; where it fails or is gone (deprecated since torch 2.9) the dynamo exporter
  (opset 18, needs onnxscript) runs instead; `Exported.exporter` says which wrote the file.
- `torchscript`: `torch.jit.trace`, `model.json` stored as the archive's extra file `model.json`.
- `timm`: timm's own `save_for_hf` layout, `model.safetensors` + `config.json` (`architecture`, `num_classes`,
  `label_names`, and a `pretrained_cfg` holding the run's input size, mean, std, crop_pct 1.0, bilinear). Load it
  offline with `timm.create_model("local-dir:FOLDER", pretrained=True)`, or with `timm.create_model(arch,
  pretrained=True, num_classes=N, pretrained_cfg_overlay={**cfg["pretrained_cfg"], "file":
  "FOLDER/model.safetensors"})`: without `num_classes` timm drops the classifier weights (the architecture's
  default cfg says 1000 classes).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

from ..base.errors import ExportError
from ..base.extras import require
from ..base.files import atomic_write, file_mode
from .predict import load_run


__all__ = ["FORMATS", "Exported", "export_run", "export_onnx", "export_torchscript", "export_timm"]

FORMATS = ("onnx", "torchscript", "timm")
_DEFAULT_OUT = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "timm": "timm"}
_TOLERANCE = 1e-3  # largest |logit difference| accepted, times max(1, largest |logit|); the test holds 1e-4


@dataclass(frozen=True)
class Exported:
    "Where an export went and how close it is to the PyTorch model."
    format: str
    path: Path
    max_abs_diff: float    # largest |logit difference| to PyTorch on a random batch
    checked_with: str      # what ran the exported model for the check
    exporter: str = ""     # which exporter wrote it (onnx: dynamo or torchscript)


def _check_batch(card: dict, n: int = 3, seed: int = 0) -> torch.Tensor:
    "A normalised-looking random batch at the model's input size (N(0, 1) pixels, like normalised images)."
    s = card["input_size"]
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _compare(what: str, ref: torch.Tensor, got: torch.Tensor, path: Path) -> float:
    diff = float((ref - got).abs().max())
    limit = _TOLERANCE * max(1.0, float(ref.abs().max()))
    if not diff <= limit:  # also catches NaN
        raise ExportError(f"{path}: {what} disagrees with PyTorch by up to {diff:.3g} (limit {limit:.3g}) on the "
                          f"check batch; this architecture does not export faithfully to this format")
    return diff


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _require_onnx() -> None:
    "MissingExtraError (one line naming the extra) unless onnx, onnxruntime and onnxscript import."
    for m in ("onnx", "onnxruntime", "onnxscript"):
        require(m, "onnx", "export --format onnx")


def export_onnx(model: torch.nn.Module, card: dict, path: str | Path) -> Exported:
    "Write `model` as ONNX (dynamic batch axis), store `card` in its metadata, check it with onnxruntime."
    _require_onnx()
    import onnx  # lazy: optional extra (fastlearn[onnx])
    import onnxruntime as ort  # lazy: optional extra (fastlearn[onnx])
    path = Path(path)
    model = model.cpu().eval()
    used = []

    def write(tmp: Path) -> None:
        example = _check_batch(card, n=2, seed=1)
        names = dict(input_names=["input"], output_names=["logits"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice (torch >= 2.9) and tracer notes
            try:
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=17,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names)
                used.append("torchscript")
            except Exception as first:  # an op it cannot trace, or a torch without it: the dynamo exporter
                try:
                    torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=18, verbose=False,
                                      external_data=False, dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
                    used.append("dynamo")
                except Exception as e:
                    raise ExportError(f"torch.onnx.export failed for {card['arch']!r} with both exporters "
                                      f"(torchscript: {type(first).__name__}: {_first_line(first)}; dynamo: "
                                      f"{type(e).__name__}: {_first_line(e)})") from e
        m = onnx.load(str(tmp))
        onnx.helper.set_model_props(m, {"fastlearn_model_card": json.dumps(card)})
        onnx.save(m, str(tmp))
    atomic_write(path, write)
    x = _check_batch(card)
    with torch.inference_mode():
        ref = model(x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    return Exported("onnx", path, _compare("onnxruntime", ref, got, path), f"onnxruntime {ort.__version__}", used[0])


def export_torchscript(model: torch.nn.Module, card: dict, path: str | Path) -> Exported:
    "Trace `model` with torch.jit.trace, save it with `card` as the extra file `model.json`, check the reloaded copy."
    path = Path(path)
    model = model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notes
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(model, _check_batch(card, n=2, seed=1))
        atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files={"model.json": json.dumps(card)}))
        loaded = torch.jit.load(str(path), map_location="cpu")
    x = _check_batch(card)
    with torch.no_grad():
        ref, got = model(x), loaded(x)
    return Exported("torchscript", path, _compare("the traced model", ref, got, path), "torch.jit.load", "jit.trace")


def export_timm(model: torch.nn.Module, card: dict, folder: str | Path) -> Exported:
    "timm's `save_for_hf` folder (model.safetensors + config.json), reloaded offline by timm and compared."
    if card.get("ensemble"):
        raise ValueError(f"this run kept an ensemble of {card['ensemble']} networks (recipe key ensemble = true), which "
                         f"one timm model cannot hold; export it with --format onnx or --format torchscript")
    folder = Path(folder)
    model = model.cpu().eval()
    s = card["input_size"]
    # the source pretrained tag names weights these are not (they were fine-tuned from them, or trained from scratch)
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "tag"}
    # crop_pct 1 + centre crop + bilinear: the closest timm transform to fastai's Resize (centre crop, bilinear)
    data = {"input_size": (3, s, s), "mean": tuple(card["mean"]), "std": tuple(card["std"]), "crop_pct": 1.0,
            "crop_mode": "center", "interpolation": "bilinear"}
    extra = {k: card.get(k) for k in ("multi_label", "threshold", "resize", "fastlearn_version")}
    save_for_hf(model, str(folder), model_config={"label_names": list(card["classes"]), "fastlearn": extra},
                safe_serialization=True, data_config=data)
    for name in ("model.safetensors", "config.json"):  # safetensors >= 0.8 writes 0600 whatever the umask
        os.chmod(folder / name, file_mode())           # (safetensors #782): the mode open() gives, as for the rest
    cfg = json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    loaded = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                               pretrained_cfg_overlay={**cfg["pretrained_cfg"], "file": str(weights)}).eval()
    x = _check_batch(card)
    with torch.inference_mode():
        ref, got = model(x), loaded(x)
    return Exported("timm", folder, _compare("timm.create_model", ref, got, folder), f"timm {timm.__version__}",
                    "save_for_hf")


def export_run(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None) -> Exported:
    "Export a finished run's model to `out` (default `run_dir/export/...`) and check it against PyTorch."
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; use one of {', '.join(FORMATS)}")
    if format == "onnx":
        _require_onnx()  # before loading anything
    run = load_run(run_dir, device="cpu")
    out = Path(out) if out is not None else Path(run_dir) / "export" / _DEFAULT_OUT[format]
    fn = {"onnx": export_onnx, "torchscript": export_torchscript, "timm": export_timm}[format]
    return fn(run.model, run.card, out)


def export_main(run_dir: str | Path, format: str, out: str | Path | None = None) -> int:
    "`fastlearn export`: write the export, print where and the largest difference to PyTorch."
    res = export_run(run_dir, format, out)
    how = f" ({res.exporter} exporter)" if res.format == "onnx" else ""
    print(f"exported {res.format}{how}: {res.path}")
    print(f"max abs diff vs PyTorch (logits, {res.checked_with}, random batch of 3): {res.max_abs_diff:.3g}")
    return 0
