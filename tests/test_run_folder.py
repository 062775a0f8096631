"""The run folder describes its model (model.json), and load_run rebuilds it from safetensors alone."""
import json
import os
import shutil

import pytest
import torch

from fastlearn.base.errors import RunFolderError
from fastlearn.core.recipes import load_recipe
from fastlearn.run.card import MODEL_CARD, read_model_card, uses_valid_resize
from fastlearn.run.predict import load_run


def _copy(run_dir, tmp_path, *names):
    d = tmp_path / "copy"
    d.mkdir()
    for n in names:
        shutil.copy(run_dir / n, d / n)
    return d


def test_model_card_describes_the_run(trained_run):
    learn, r, run_dir = trained_run
    card = json.loads((run_dir / MODEL_CARD).read_text())
    assert card["format"] == 1 and card["arch"] == "test_resnet"
    assert card["classes"] == ["a", "b", "c"] == list(learn.dls.vocab) and card["n_classes"] == 3
    assert card["input_size"] == 32 and card["resize"] == {"size": 32, "method": "crop", "pad_mode": "reflection"}
    norm = learn.dls.valid.after_batch.fs[-1]  # image_dls's Normalize
    assert card["mean"] == pytest.approx(norm.mean.flatten().tolist())
    assert card["std"] == pytest.approx(norm.std.flatten().tolist())
    assert card["multi_label"] is False and card["threshold"] is None
    assert (run_dir / card["weights"]).exists() and card["fastlearn_version"] and card["recipe"] == r.name


def test_load_run_rebuilds_the_model_without_unpickling(trained_run, monkeypatch):
    learn, _, run_dir = trained_run

    def no_pickles(*a, **k):
        raise AssertionError("load_run must not unpickle anything")
    monkeypatch.setattr(torch, "load", no_pickles)
    run = load_run(run_dir, device="cpu")
    assert not run.model.training and run.classes == ["a", "b", "c"] and "test_resnet" in repr(run)
    mine, theirs = run.model.state_dict(), learn.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine)
    assert run.recipe["flip"] is True and run.recipe["name"] == "transfer"  # recipe.toml, read as plain data


def test_valid_size_decides_the_input_size():
    assert not uses_valid_resize(load_recipe("transfer", {"size": 64}))
    assert uses_valid_resize(load_recipe("transfer", {"size": 64, "valid_size": 80}))
    assert uses_valid_resize(load_recipe("transfer", {"size": 64, "resize_start": 32}))
    assert not uses_valid_resize(None)


def test_unfinished_or_foreign_folders_say_what_to_do(trained_run, tmp_path):
    _, _, run_dir = trained_run
    with pytest.raises(RunFolderError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(RunFolderError, match="not a fastlearn run folder"):
        load_run(tmp_path)
    # interrupted: recipe.toml and a checkpoint, no model yet -> resume
    d = _copy(run_dir, tmp_path, "recipe.toml")
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "latest").write_text("ckpt-12\n")
    with pytest.raises(RunFolderError, match=r"did not finish.*ckpt-12.*fastlearn train transfer .*--resume"):
        load_run(d)
    shutil.rmtree(d / "checkpoints")
    with pytest.raises(RunFolderError, match="no checkpoint; train it again"):
        load_run(d)
    shutil.copy(run_dir / "model.safetensors", d / "model.safetensors")
    with pytest.raises(RunFolderError, match="has model.safetensors but no model.json"):
        load_run(d)
    shutil.copy(run_dir / MODEL_CARD, d / MODEL_CARD)
    (d / "model.safetensors").unlink()
    with pytest.raises(RunFolderError, match="no weights file model.safetensors"):
        load_run(d)


def test_inconsistent_cards_are_refused(trained_run, tmp_path):
    _, _, run_dir = trained_run
    d = _copy(run_dir, tmp_path, MODEL_CARD, "model.safetensors")
    card = json.loads((d / MODEL_CARD).read_text())
    (d / MODEL_CARD).write_text("{not json")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        read_model_card(d)
    (d / MODEL_CARD).write_text(json.dumps({**card, "classes": ["a", "b"]}))
    with pytest.raises(RunFolderError, match="2 classes for a 3-output model"):
        read_model_card(d)
    (d / MODEL_CARD).write_text(json.dumps({k: v for k, v in card.items() if k != "arch"}))
    with pytest.raises(RunFolderError, match="lacks \\['arch'\\]"):
        read_model_card(d)
    (d / MODEL_CARD).write_text(json.dumps({**card, "multi_label": True, "threshold": [0.5, 0.5]}))
    with pytest.raises(RunFolderError, match="2 thresholds for 3 classes"):
        read_model_card(d)
    (d / MODEL_CARD).write_text(json.dumps({**card, "n_classes": 4, "classes": list("abcd")}))
    with pytest.raises(RunFolderError, match="does not fit 'test_resnet' with 4 outputs"):
        load_run(d)
    if not torch.cuda.is_available():
        (d / MODEL_CARD).write_text(json.dumps(card))
        with pytest.raises(ValueError, match="no CUDA device; pass device='cpu'"):
            load_run(d, device="cuda")


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o022, 0o644)])
def test_run_folder_files_honour_the_umask(tmp_path, umask, mode):
    "Issue 22: model.safetensors, model.json, summary.json, data.json and the checkpoints were 0600."
    from test_training import _tiny_run
    old = os.umask(umask)
    try:
        res = _tiny_run(tmp_path / "run", lr=None, lr_find=True, keep_checkpoints=True)
    finally:
        os.umask(old)
    files = {p.relative_to(res.run_dir).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in res.run_dir.rglob("*") if p.is_file()}
    assert {"model.safetensors", "model.json", "summary.json", "data.json", "recipe.toml", "lr_find.png",
            "checkpoints/latest", "checkpoints/kept.safetensors"} <= set(files)
    assert files == dict.fromkeys(files, oct(mode))
