"""End-of-run interpretation: confusion matrix and top-loss PNGs, per-class metrics in summary.json."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import classification_report

from fastlearn.run.interpret import Interpretation, interpret, interpret_run, per_class_metrics, plot_top_losses
from conftest import synthetic_dls


def test_run_folder_holds_the_interpretation(trained_run):
    learn, r, run_dir = trained_run
    summary = json.loads((run_dir / "summary.json").read_text())
    per_class = summary["per_class"]
    preds, targs = learn.get_preds()
    report = classification_report(targs.numpy(), preds.argmax(1).numpy(), output_dict=True, zero_division=0)
    assert list(per_class) == ["a", "b", "c"]
    for i, c in enumerate(per_class):
        for k, rk in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"), ("support", "support")):
            assert per_class[c][k] == pytest.approx(report[str(i)][rk])
    assert sum(m["support"] for m in per_class.values()) == 12
    assert summary["accuracy"] == pytest.approx(report["accuracy"])  # the same validation pass as run_recipe's
    for png, min_kb in (("confusion_matrix.png", 10), ("top_losses.png", 20)):
        with Image.open(run_dir / png) as im:
            assert im.size[0] > 300 and im.size[1] > 300
        assert (run_dir / png).stat().st_size > min_kb * 1000


def test_one_validation_pass_feeds_everything(trained_run, monkeypatch):
    learn, r, _ = trained_run
    calls = []
    real = type(learn).get_preds
    monkeypatch.setattr(type(learn), "get_preds", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    it = interpret(learn, r)
    cm = it.confusion_matrix()
    it.per_class()
    losses, idx = it.top_losses(4)
    assert len(calls) == 1 and calls[0]["with_loss"]
    assert cm.sum() == 12 and np.trace(cm) == int((it.preds.argmax(1) == it.targs).sum())
    assert losses.tolist() == sorted(it.losses.tolist(), reverse=True)[:4]
    loss = torch.nn.functional.cross_entropy(torch.log(it.preds[idx]), it.targs[idx], reduction="none")
    assert loss.tolist() == pytest.approx(losses.tolist(), abs=1e-5)  # per-item losses of those images


def test_per_class_metrics_single_and_multi_label():
    targs, decided = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 1])
    m = per_class_metrics(targs, decided, ["x", "y", "z"])
    assert m["x"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["y"]["precision"] == pytest.approx(0.5) and m["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                                    "support": 1}
    multi = per_class_metrics(torch.tensor([[1., 0.], [1., 1.], [0., 1.]]),  # fastai's one-hot float targets
                              torch.tensor([[1, 1], [0, 1], [0, 1]]), ["cat", "dog"], multi_label=True)
    assert multi["cat"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert multi["dog"]["precision"] == pytest.approx(2 / 3) and multi["dog"]["support"] == 2


def test_multi_label_decisions_use_the_threshold():
    preds = torch.tensor([[0.9, 0.4], [0.2, 0.6]])
    it = Interpretation(None, preds, torch.tensor([[1, 1], [0, 1]]), torch.zeros(2), ["cat", "dog"],
                        multi_label=True, threshold=[0.5, 0.3])
    assert it.decided.tolist() == [[1, 1], [0, 1]]
    assert plot_top_losses(it, "unused.png") is None  # no validation images to show


def test_tensor_data_gets_metrics_and_matrix_without_images(tmp_path):
    "A learner over tensors (no files, no vocab): class names are the indices, no top-loss grid."
    from matplotlib import pyplot as plt
    from fastlearn.train.learner import transfer_learner
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    figures = plt.get_fignums()
    per_class = interpret_run(learn, tmp_path, show=False)
    assert list(per_class) == ["0", "1", "2"] and sum(m["support"] for m in per_class.values()) == 24
    assert (tmp_path / "confusion_matrix.png").exists() and not (tmp_path / "top_losses.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["per_class"] == per_class
    assert plt.get_fignums() == figures  # drawn on matplotlib Figures: no pyplot figure was opened


def test_multi_label_learner_gets_card_and_interpretation(trained_run, tmp_path):
    "A fastai multi-label learner (BCE-with-logits, one-hot targets): sigmoid card, thresholded metrics, no matrix."
    from fastai.data.block import DataBlock, MultiCategoryBlock
    from fastai.losses import BCEWithLogitsLossFlat
    from fastai.vision.augment import Resize
    from fastai.vision.data import ImageBlock
    from fastai.data.transforms import GrandparentSplitter, get_image_files
    from fastlearn.train.learner import transfer_learner
    from fastlearn.run.card import model_card
    learn, _, _ = trained_run
    extra = {"a": ["a", "warm"], "b": ["b"], "c": ["c", "cold"]}  # two labels on some images
    block = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_items=get_image_files,
                      get_y=lambda p: extra[p.parent.name], splitter=GrandparentSplitter(valid_name="valid"),
                      item_tfms=Resize(32))
    dls = block.dataloaders(learn.dls.path, bs=8, num_workers=0)
    multi = transfer_learner(dls, "test_resnet", pretrained=False, loss_func=BCEWithLogitsLossFlat(thresh=0.4),
                             metrics=[], progress=False)
    card = model_card(multi)
    assert card["multi_label"] is True and card["threshold"] == 0.4 and card["classes"] == list(dls.vocab)
    per_class = interpret_run(multi, tmp_path, show=False)
    assert set(per_class) == {"a", "b", "c", "cold", "warm"}
    assert per_class["warm"]["support"] == 4 and per_class["a"]["support"] == 4
    assert (tmp_path / "top_losses.png").exists() and not (tmp_path / "confusion_matrix.png").exists()
