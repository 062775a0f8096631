"""Predicting from a run folder gives fastai's validation probabilities; files, folders, globs; clear errors."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastlearn.core.weights import save_weights
from fastlearn.cli import main
from fastlearn.base.errors import CorruptImageError, DataError
from fastlearn.core.models import create_model
from fastlearn.run.predict import find_images, preprocess, tta_views, load_image, _view
from fastlearn.run.card import MODEL_CARD, write_model_card
from fastlearn.run.predict import load_run
from conftest import needs_cuda


def test_probabilities_equal_fastai_get_preds_on_the_validation_set(trained_run):
    learn, _, run_dir = trained_run
    preds, _ = learn.get_preds()  # fastai's validation pipeline: Resize (centre crop of 40x52), /255, Normalize
    items = list(learn.dls.valid.items)
    run = load_run(run_dir, device="cpu")
    probs = run.probs(items, bs=5)  # several batches, the last one partial
    assert probs.shape == preds.shape == (12, 3)
    assert float((probs - preds).abs().max()) <= 1e-5
    out = run.predict(items, topk=2)
    assert [p.label for p in out] == [run.classes[i] for i in preds.argmax(1)]
    assert all(len(p.top) == 2 and p.top[0][1] >= p.top[1][1] and p.labels == (p.label,) for p in out)
    assert out[0].source == str(items[0])
    pil = [Image.open(f) for f in items[:2]]  # in-memory images take the same path
    assert float((run.probs(pil) - preds[:2]).abs().max()) <= 1e-5


def test_device_side_valid_resize_is_reproduced(trained_run, tmp_path):
    "A recipe that loads at 40 px and evaluates at valid_size 32 (progressive resizing): the same on predict."
    from fastlearn.data.dls import image_dls
    from fastlearn.train.learner import transfer_learner
    from fastlearn.core.recipes import load_recipe
    from fastlearn.fit.resize import ProgressiveResize
    learn, _, run_dir = trained_run
    folder = learn.dls.path
    dls = image_dls(folder, size=40, bs=8, arch="test_resnet", num_workers=0)
    big = transfer_learner(dls, "test_resnet", pretrained=False, model=learn.model, progress=False)
    r = load_recipe("transfer", {"arch": "test_resnet", "size": 40, "valid_size": 32})
    preds, _ = big.get_preds(cbs=[ProgressiveResize(40, 40, valid_size=32)])
    d = tmp_path / "run"
    save_weights(big.model, d / "model.safetensors")
    card = json.loads(write_model_card(big, d, r).read_text())
    assert card["resize"]["size"] == 40 and card["input_size"] == 32
    probs = load_run(d, device="cpu").probs(list(dls.valid.items))
    assert float((probs - preds).abs().max()) <= 1e-5


def test_find_images_takes_files_folders_and_globs(tmp_path):
    from conftest import write_image_folder
    root = write_image_folder(tmp_path / "imgs", n_per_class=2, valid=1, size=16)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / ".hidden" / "x.png")
    assert len(find_images([root])) == 9                          # recursive, images only, hidden folders skipped
    assert find_images([root / "valid" / "b" / "0.png"]) == [root / "valid" / "b" / "0.png"]
    assert len(find_images([str(root / "*" / "a" / "*.png")])) == 3  # a quoted glob, expanded here
    assert len(find_images([str(root / "**" / "0.png")])) == 6
    with pytest.raises(DataError, match="does not exist"):
        find_images([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        find_images([tmp_path / "empty"])
    with pytest.raises(DataError, match="matches no image file"):
        find_images([str(tmp_path / "*.jpg")])


def test_unreadable_image_is_a_clear_error(trained_run, tmp_path):
    _, _, run_dir = trained_run
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CorruptImageError, match="cannot read .*broken.png as an image") as e:
        load_run(run_dir, device="cpu").predict([bad])
    assert e.value.paths == [bad]


def test_tta_views_follow_the_training_augmentations():
    assert tta_views({"augment": True, "flip": True}) == ["original", "hflip", "zoom"]
    assert tta_views({"augment": True, "flip": False}) == ["original", "zoom"]  # digits: a mirrored 7 is no 7
    assert tta_views({"augment": False, "flip": True}) == ["original"]
    assert tta_views({}) == ["original"]  # no recipe.toml: nothing known, nothing assumed


@pytest.mark.parametrize("flip", [True, False])
def test_tta_averages_the_views(trained_run, tmp_path, flip):
    learn, _, run_dir = trained_run
    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("checkpoints"))
    text = (d / "recipe.toml").read_text()
    assert "flip = true" in text
    (d / "recipe.toml").write_text(text.replace("flip = true", f"flip = {str(flip).lower()}"))
    run = load_run(d, device="cpu")
    items = list(learn.dls.valid.items)[:4]
    x = run.preprocess(items)
    views = ["original", "hflip", "zoom"] if flip else ["original", "zoom"]
    with torch.no_grad():
        expect = torch.stack([torch.softmax(run.model(_view(x, v)), 1) for v in views]).mean(0)
    assert float((run.probs(items, tta=True) - expect).abs().max()) <= 1e-6
    assert float((run.probs(items, tta=True) - run.probs(items)).abs().max()) > 0  # the views do change it


def test_cli_predict_table_and_csv(trained_run, tmp_path, capsys):
    learn, _, run_dir = trained_run
    valid = learn.dls.path / "valid"
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run_dir), str(valid), "--topk", "2", "--csv", str(out), "--bs", "4"]) == 0
    text = capsys.readouterr().out
    assert "top 2" in text and "wrote 12 predictions" in text and "valid/a/0.png" in text
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 12 and list(rows[0]) == ["path", "prediction", "class_1", "prob_1", "class_2", "prob_2"]
    probs = load_run(run_dir, device="cpu").probs([r["path"] for r in rows])
    assert [float(r["prob_1"]) for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-6)


@pytest.mark.parametrize("args,msg", [
    (["{run}", "{tmp}/nope.png"], "nope.png does not exist"),
    (["{tmp}", "{tmp}"], "not a fastlearn run folder"),
    (["{run}", "{tmp}/empty"], "holds no image files"),
    (["{run}", "{tmp}/bad.jpg"], "cannot read .*bad.jpg as an image"),
])
def test_cli_predict_bad_input_is_one_line_and_exit_2(trained_run, tmp_path, capsys, args, msg):
    import re
    _, _, run_dir = trained_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jpg").write_bytes(b"")
    argv = ["predict"] + [a.format(run=run_dir, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlearn: error: ") and re.search(msg, err[0])


def test_multi_label_run_uses_sigmoid_and_per_class_thresholds(tmp_path):
    "A hand-built multi-label run folder (the training side writes the same model.json through write_model_card)."
    d = tmp_path / "run"
    model = create_model("test_resnet", 3, pretrained=False).eval()
    save_weights(model, d / "model.safetensors")
    card = {"format": 1, "arch": "test_resnet", "n_classes": 3, "classes": ["cat", "dog", "sofa"], "input_size": 32,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "multi_label": True, "threshold": [0.5, 0.3, 0.9],
            "weights": "model.safetensors", "fastlearn_version": "0.1.0"}  # the shared design's fields only
    (d / MODEL_CARD).write_text(json.dumps(card))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)) for _ in range(6)]
    run = load_run(d, device="cpu")
    x = preprocess([load_image(im) for im in images], card)
    with torch.no_grad():
        expect = torch.sigmoid(model(x))
    probs = run.probs(images)
    assert float((probs - expect).abs().max()) <= 1e-6
    assert float(probs.sum(1).sub(1).abs().max()) > 1e-3  # not a softmax
    thr = torch.tensor(card["threshold"])
    for p, row in zip(run.predict(images, topk=3), probs):
        assert set(p.labels) == {c for c, v, t in zip(card["classes"], row, thr) if v >= t}
        assert [v for _, v in p.top] == sorted(row.tolist(), reverse=True)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_predict_on_cuda_matches_cpu(trained_run, device):
    learn, _, run_dir = trained_run
    items = list(learn.dls.valid.items)
    gpu, cpu = load_run(run_dir), load_run(run_dir, device="cpu")  # the default device is CUDA when present
    assert gpu.device.type == "cuda"
    assert float((gpu.probs(items, tta=True) - cpu.probs(items, tta=True)).abs().max()) <= 1e-4


def test_cli_predict_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: fastlearn predict" in out and "--tta" in out and "--csv" in out
