"""Multi-label data end to end: BCE, accuracy_multi and macro F1, the presets, lr_find, auto, sanity checks."""
import csv
import math

import numpy as np
import pytest
import torch

from conftest import write_csv_dataset
from fastlearn.base.errors import RecipeError
from fastlearn.core.targets import class_counts, is_multi_label, label_info, multi_label_probe
from fastlearn.core.recipes import load_recipe

TINY = {"arch": "test_resnet", "pretrained": False, "size": 32, "bs": 8, "num_workers": 0}


@pytest.fixture(scope="module")
def multi_csv(tmp_path_factory):
    "96 images holding 1 or 2 of 3 colours, labels space-separated in columns image,tags (fastai's planet names)."
    return write_csv_dataset(tmp_path_factory.mktemp("multi"), n=96, multi_label=True, is_valid=True,
                             columns=("image", "tags"))


def _learner(csv_path, **over):
    from fastlearn.train.learner import learner_from_recipe
    return learner_from_recipe(csv_path, "transfer", {**TINY, "multi_label": True, "fn_col": "image",
                                                      "label_col": "tags", **over}, progress=False)


def test_multi_label_run_learns_with_bce(multi_csv, tmp_path):
    from fastai.losses import BCEWithLogitsLossFlat
    from fastlearn.train.runner import run_recipe
    learn, r = _learner(multi_csv, lr=1e-2, head_epochs=1, epochs=3, unfreeze_step=10)
    assert isinstance(learn.loss_func, BCEWithLogitsLossFlat) and learn.loss_func.thresh == 0.5
    assert [m.name for m in learn.metrics] == ["accuracy_multi", "f1_macro"]
    res = run_recipe(learn, r, run_dir=tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert list(rows[0]) == ["stage", "epoch", "train_loss", "valid_loss", "accuracy_multi", "f1_macro", "seconds"]
    # chance: answering each label's majority value (absent: each label is in ~4/9 of the images)
    valid_y = torch.stack([y for _, y in learn.dls.valid_ds])
    chance = float(torch.maximum(valid_y.mean(0), 1 - valid_y.mean(0)).mean())
    assert res.accuracy == pytest.approx(float(rows[-1]["accuracy_multi"]))
    assert res.accuracy > chance + 0.2, (res.accuracy, chance)
    assert float(rows[-1]["f1_macro"]) > 0.6
    assert float(rows[0]["train_loss"]) < 1.0  # BCE per label starts near ln 2, not near log(C) of a softmax
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_lr_find_and_auto_work_on_multi_label(multi_csv):
    from fastlearn.train.strategy import choose_strategy
    learn, r = _learner(multi_csv)
    found = learn.find_lr(num_it=30)
    assert 1e-7 < found.start <= found.peak < 10 and all(math.isfinite(v) for v in found.losses[:10])
    # the measurement needs no pretrained weights, only a recipe that says there are some
    strategy, why = choose_strategy(learn, load_recipe("auto", TINY).replace(pretrained=True), max_images=64)
    assert strategy in ("linear_probe", "fine_tune_top", "full") and "one-vs-rest" in why
    assert "linear-probe accuracy" in why and "images/class" in why


def test_sanity_checks_use_bce_on_multi_label(multi_csv):
    from fastlearn.app.diagnostics import sanity_check
    learn, _ = _learner(multi_csv)
    checks = {c.name: c for c in sanity_check(learn, n_batches=4, overfit_batches=2, overfit_steps=30)}
    init = checks["initial_loss"]
    assert init.passed and init.numbers["ln_2"] == pytest.approx(math.log(2)), init.numbers
    assert checks["class_balance"].numbers["classes"] == 3 and checks["overfit_batches"].passed
    assert 0.4 < checks["learnable_labels"].numbers["chance"] < 0.8  # per-label majority, not 1/C


def test_label_info_and_counts(multi_csv):
    from fastlearn.data.dls import image_dls
    dls = image_dls(multi_csv, size=16, bs=8, multi_label=True, threshold=0.4, fn_col="image", label_col="tags",
                    device="cpu", num_workers=0)
    assert is_multi_label(dls) and label_info(dls)["threshold"] == 0.4
    counts = class_counts(dls)
    assert counts == [dls.folder_report.counts["train"][c] for c in dls.vocab] and sum(counts) > len(dls.train_ds)
    del dls.multi_label, dls.label_info  # DataLoaders not built by image_dls: read from fastai's label pipeline
    assert label_info(dls) == {"multi_label": True, "threshold": 0.5, "classes": ["blue", "green", "red"]}


def test_single_label_options_are_refused_for_multi_label(multi_csv):
    from fastlearn.core.losses import make_loss
    from fastlearn.data.dls import image_dls
    for over, word in (({"loss": "focal"}, "'focal'"), ({"label_smoothing": 0.1}, "label_smoothing")):
        with pytest.raises(RecipeError, match=f"multi_label.*{word}"):
            load_recipe("transfer", {"multi_label": True, **over})
    dls = image_dls(multi_csv, size=16, bs=8, multi_label=True, fn_col="image", label_col="tags", device="cpu",
                    num_workers=0)
    with pytest.raises(ValueError, match="loss='weighted_ce' is a single-label"):
        make_loss("weighted_ce", dls)
    with pytest.raises(RecipeError, match="'threshold' = 1.5"):
        load_recipe("transfer", {"threshold": 1.5})


def test_multi_label_probe_scores_separable_labels_high():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 3))
    x = np.concatenate([y * 3.0 + rng.normal(0, 0.5, (200, 3)), rng.normal(0, 1, (200, 5))], 1)
    assert multi_label_probe(x[:150], y[:150], x[150:], y[150:]) > 0.95
    noise = rng.normal(0, 1, (200, 8))
    assert multi_label_probe(noise[:150], y[:150], noise[150:], y[150:]) < 0.7
