"""Exports of a run's model (ONNX, TorchScript, timm folder) compute what the PyTorch model computes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastlearn.cli import main

from fastlearn.run.export import export_run
from fastlearn.run.predict import load_run


def _batch(n, size=32, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_onnx_export_matches_pytorch(trained_run, tmp_path):
    for m in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(m)
    import onnx
    import onnxruntime as ort
    _, _, run_dir = trained_run
    res = export_run(run_dir, "onnx", tmp_path / "m.onnx")
    assert res.max_abs_diff <= 1e-4 and res.exporter in ("dynamo", "torchscript")
    proto = onnx.load(str(res.path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    card = json.loads({p.key: p.value for p in proto.metadata_props}["fastlearn_model_card"])
    assert card["classes"] == ["a", "b", "c"] and card["input_size"] == 32
    model = load_run(run_dir, device="cpu").model
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # a dynamic batch axis
        x = _batch(n)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == (n, 3) and np.abs(got - ref).max() <= 1e-4


def test_missing_onnx_is_a_clear_error(trained_run, monkeypatch):
    import sys
    from fastlearn.base.errors import MissingExtraError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    with pytest.raises(MissingExtraError, match=r"^export --format onnx needs onnxruntime: pip install 'fastlearn\[onnx\]'$"):
        export_run(trained_run[2], "onnx")


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.* is deprecated")
def test_torchscript_export_matches_pytorch(trained_run, tmp_path):
    _, _, run_dir = trained_run
    res = export_run(run_dir, "torchscript", tmp_path / "m.pt")
    assert res.max_abs_diff <= 1e-4
    extra = {"model.json": ""}
    scripted = torch.jit.load(str(res.path), _extra_files=extra)
    assert json.loads(extra["model.json"])["classes"] == ["a", "b", "c"]
    x = _batch(4)
    with torch.no_grad():
        assert float((scripted(x) - load_run(run_dir, device="cpu").model(x)).abs().max()) <= 1e-4


def test_timm_folder_loads_offline_and_predicts_identically(trained_run, tmp_path, monkeypatch):
    import timm
    from timm.data import create_transform, resolve_data_config
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, run_dir = trained_run
    res = export_run(run_dir, "timm", tmp_path / "timm")
    assert res.max_abs_diff == 0.0
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 3 and cfg["label_names"] == ["a", "b", "c"]
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["crop_pct"] == 1.0 and pc["interpolation"] == "bilinear"
    run = load_run(run_dir, device="cpu")
    assert pc["mean"] == pytest.approx(run.card["mean"]) and pc["std"] == pytest.approx(run.card["std"])
    assert cfg["fastlearn"]["multi_label"] is False
    weights = str(res.path / "model.safetensors")
    by_file = timm.create_model("test_resnet", pretrained=True, num_classes=3,
                                pretrained_cfg_overlay=dict(file=weights, num_classes=3)).eval()
    by_folder = timm.create_model(f"local-dir:{res.path}", pretrained=True).eval()
    x = _batch(4)
    with torch.no_grad():
        ref = run.model(x)
        assert torch.equal(by_file(x), ref) and torch.equal(by_folder(x), ref)
    # timm's own preprocessing from the exported config: the same probabilities as fastlearn's on square images
    # at the input size (where fastai's crop-then-resize and timm's resize-then-crop coincide)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    tfm = create_transform(**resolve_data_config({}, model=by_folder))
    with torch.no_grad():
        timm_probs = torch.softmax(by_folder(torch.stack([tfm(im) for im in images])), 1)
    assert float((timm_probs - run.probs(images)).abs().max()) <= 1e-5


def test_cli_export_prints_the_difference(trained_run, tmp_path, capsys):
    _, _, run_dir = trained_run
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert f"exported torchscript: {tmp_path / 'm.pt'}" in out and "max abs diff vs PyTorch" in out
    assert main(["export", str(tmp_path), "--format", "timm"]) == 2
    assert "not a fastlearn run folder" in capsys.readouterr().err


@pytest.mark.parametrize("format", ["onnx", "torchscript", "timm"])
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.* is deprecated")
def test_exports_honour_the_umask(trained_run, tmp_path, format):
    "Issue 22: exports were written 0600 (mkstemp, and safetensors >= 0.8's own temp file for the timm folder)."
    import os
    if format == "onnx":
        for m in ("onnx", "onnxruntime", "onnxscript"):
            pytest.importorskip(m)
    old = os.umask(0o027)
    try:
        res = export_run(trained_run[2], format, tmp_path / "out")
    finally:
        os.umask(old)
    files = [res.path] if res.path.is_file() else sorted(p for p in res.path.rglob("*") if p.is_file())
    assert files and {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o640" for p in files}


def test_cli_export_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "{onnx,torchscript,timm}" in out
