"""Sanity checks catch deliberately broken setups (and pass a healthy one); the curve doctor names each curve."""
import math

import pytest
import torch
from fastai.data.core import DataLoaders

from conftest import make_blobs, synthetic_dls
from fastlearn.app.diagnostics import Diagnosis, balance_verdict, diagnose, doctor_main, duplicates_verdict, generalise_verdict, initial_loss_verdict, normalisation_verdict, read_epoch_rows, sanity_check, check_duplicates
from fastlearn.train.learner import transfer_learner


def _dls(x, y, bs=16):
    nv = len(x) // 4
    dls = DataLoaders.from_dsets(list(zip(x[nv:], y[nv:])), list(zip(x[:nv], y[:nv])), bs=bs, shuffle=True,
                                 device="cpu", num_workers=0)
    dls.c = int(y.max()) + 1
    dls.train.rng.seed(0)
    return dls


def _learner(dls):
    torch.manual_seed(0)
    return transfer_learner(dls, "test_resnet", pretrained=False, progress=False)


def _by_name(results):
    return {r.name: r for r in results}


# -- pure verdicts ---------------------------------------------------------------------------------

def test_initial_loss_verdict():
    assert initial_loss_verdict(math.log(10) * 1.1, 10).passed
    bad = initial_loss_verdict(7.0, 3)
    assert not bad.passed and "far above" in bad.hint and bad.numbers["log_C"] == pytest.approx(math.log(3))
    assert not initial_loss_verdict(0.2, 3).passed
    assert not initial_loss_verdict(float("nan"), 3).passed


def test_balance_verdict():
    ok = balance_verdict([30, 25, 20])
    assert ok.passed and ok.numbers["imbalance_ratio"] == pytest.approx(1.5)
    bad = balance_verdict([100, 10, 50])
    assert not bad.passed and bad.numbers["imbalance_ratio"] == pytest.approx(10)
    assert "focal" in bad.hint.lower() and "weight" in bad.hint
    assert balance_verdict([5, 0]).numbers["imbalance_ratio"] == math.inf


def test_normalisation_verdict():
    assert normalisation_verdict([0.1, -0.2, 0.0], [1.0, 0.9, 1.1], 4.0).passed
    raw = normalisation_verdict([120, 118, 121], [60, 61, 59], 255)
    assert not raw.passed and "0-255" in raw.hint
    unnorm = normalisation_verdict([0.45, 0.45, 0.4], [0.05, 0.05, 0.05], 0.9)  # [0, 1] pixels, tiny std
    assert not unnorm.passed and "Normalize" in unnorm.hint


def test_duplicates_and_generalise_verdicts():
    assert duplicates_verdict(0, 50).passed
    d = duplicates_verdict(5, 50, [("v/1.png", "t/9.png")])
    assert not d.passed and d.numbers["fraction"] == 0.1 and "v/1.png" in d.hint
    assert generalise_verdict(0.9, 0.1, 100, 1.0).passed
    g = generalise_verdict(0.12, 0.1, 100, 1.0)
    assert not g.passed and "shuffled" in g.hint


# -- the checks on learners: one healthy, each broken one caught by its check ---------------------

def test_healthy_setup_passes_and_learner_is_restored():
    learn = _learner(synthetic_dls())
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    grads = [p.requires_grad for p in learn.model.parameters()]
    results = sanity_check(learn)
    assert [r.name for r in results] == ["trainable", "normalisation", "class_balance", "train_valid_duplicates",
                                         "initial_loss", "overfit_batches", "learnable_labels"]
    failed = [r.row() for r in results if not r.passed]
    assert not failed, failed
    r = _by_name(results)
    assert r["overfit_batches"].numbers["train_accuracy"] >= 0.95
    assert abs(r["initial_loss"].numbers["rel_error"]) <= 0.25
    after = learn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)          # weights and BN stats restored
    assert [p.requires_grad for p in learn.model.parameters()] == grads   # still frozen as before


def test_unnormalised_0_255_inputs_are_caught():
    x, y = make_blobs(96, 3, 32, seed=0)
    raw = (x * 60 + 128).clamp(0, 255)            # raw pixel values, as if IntToFloatTensor were missing
    r = _by_name(sanity_check(_learner(_dls(raw, y))))
    assert not r["normalisation"].passed and "0-255" in r["normalisation"].hint
    assert r["normalisation"].numbers["max_abs"] > 200
    assert not r["initial_loss"].passed           # huge activations: a confident, wrong head at init
    assert r["initial_loss"].numbers["loss"] > 2 * math.log(3)


def test_shuffled_labels_are_caught():
    x, y = make_blobs(96, 3, 32, seed=0)
    y = y[torch.randperm(96, generator=torch.Generator().manual_seed(1))]   # labels no longer match images
    r = _by_name(sanity_check(_learner(_dls(x, y))))
    assert r["overfit_batches"].passed            # a net memorises noise: this check alone cannot tell
    assert not r["learnable_labels"].passed       # but what it learnt does not transfer to valid
    assert r["learnable_labels"].numbers["valid_accuracy"] < 0.6


def test_everything_frozen_is_caught():
    learn = _learner(synthetic_dls())
    for p in learn.model.parameters():
        p.requires_grad_(False)
    r = _by_name(sanity_check(learn))
    assert not r["trainable"].passed and r["trainable"].numbers["trainable_params"] == 0
    assert "freeze_top" in r["trainable"].hint
    assert not any(p.requires_grad for p in learn.model.parameters())   # left as found


def test_imbalance_and_duplicates_are_caught():
    x, y = make_blobs(96, 3, 32, seed=0)
    keep = torch.cat([torch.nonzero(y == 0).flatten(), torch.nonzero(y != 0).flatten()[:12]])  # class 0 dominates
    x, y = x[keep], y[keep]
    x[:3] = x[-3:]                                # 3 valid items are copies of training items
    dls = _dls(x, y)
    r = _by_name(sanity_check(_learner(dls), n_batches=2))
    assert not r["class_balance"].passed and r["class_balance"].numbers["imbalance_ratio"] > 3
    assert not r["train_valid_duplicates"].passed
    assert r["train_valid_duplicates"].numbers["valid_items_also_in_train"] == 3


def _folder(root, dup: bool):
    from conftest import write_image_folder
    write_image_folder(root, n_per_class=6, classes=("a", "b"), size=16, valid=3)
    if dup:
        (root / "valid" / "a" / "0.png").write_bytes((root / "train" / "a" / "3.png").read_bytes())
    return root


def test_duplicate_image_files_found_by_hash(tmp_path):
    from fastlearn.data.dls import image_dls
    dls = image_dls(_folder(tmp_path, dup=True), size=16, bs=4, augment=False, num_workers=0)
    res = check_duplicates(dls)
    assert not res.passed and res.numbers["valid_items_also_in_train"] == 1
    assert "0.png" in res.hint and "3.png" in res.hint


def test_doctor_main_prints_table_and_exit_code(tmp_path, capsys):
    data = _folder(tmp_path / "data", dup=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("stage,epoch,train_loss,valid_loss,accuracy,seconds\n"
                                     "all,1,1.0,0.9,0.6,1\nall,2,0.5,0.6,0.8,1\nall,3,0.2,0.8,0.78,1\n")
    code = doctor_main(data, "test_resnet", size=16, bs=4, pretrained=False, recipe="transfer", n_batches=2, run=run)
    out = capsys.readouterr().out
    assert code == 1                               # the duplicate fails a check
    assert "train_valid_duplicates" in out and "initial_loss" in out
    assert "overfitting" in out and "weight decay" in out
    assert read_epoch_rows(run)[1]["valid_loss"] == 0.6


# -- learning-curve doctor on synthetic curves ---------------------------------------------------

def _rows(train, valid):
    return [{"epoch": i + 1, "train_loss": t, "valid_loss": v} for i, (t, v) in enumerate(zip(train, valid))]


@pytest.mark.parametrize("train,valid,kind,step", [
    ([1.2, 0.7, 0.4, 0.2, 0.1, 0.05], [1.1, 0.8, 0.7, 0.75, 0.85, 0.95], "overfitting", "weight decay"),
    ([2.2, 2.1, 2.05, 2.0, 2.0, 1.99], [2.15, 2.1, 2.05, 2.02, 2.01, 2.0], "underfitting", "weight decay"),
    ([1.0, 0.5, 0.45, 0.45, 0.45, 0.45], [1.0, 0.6, 0.59, 0.59, 0.59, 0.59], "plateau", "learning rate"),
    ([1.0, 0.6, float("nan")], [0.9, 0.7, float("nan")], "diverged", "learning rate"),
    ([1.0, 0.5, 2.5, 9.0], [0.9, 0.6, 3.0, 12.0], "diverged", "learning rate"),
    ([1.5, 0.9, 0.6, 0.4], [1.3, 0.9, 0.7, 0.55], "still improving", "epochs"),
    ([1.5, 0.8, 0.5, 0.35, 0.3, 0.29], [1.3, 0.8, 0.6, 0.45, 0.44, 0.438], "healthy", "augmentation"),
])
def test_diagnose_each_kind(train, valid, kind, step):
    d = diagnose(_rows(train, valid))
    assert isinstance(d, Diagnosis)
    assert d.kind == kind, (d.kind, d.evidence)
    assert d.next_step.startswith(step), d.next_step
    assert d.evidence


def test_diagnose_uses_number_of_classes_for_underfitting():
    rows = _rows([1.0, 0.8, 0.78, 0.77], [0.95, 0.8, 0.79, 0.785])
    assert diagnose(rows, n_classes=2).kind == "underfitting"      # 0.77 > 0.3 * log 2: barely better than chance
    assert diagnose(rows, n_classes=1000).kind == "plateau"        # 0.77 is low for 1000 classes


def test_diagnose_bad_rows():
    with pytest.raises(ValueError, match="no epoch rows"):
        diagnose([])
    with pytest.raises(ValueError, match="valid_loss"):
        diagnose([{"train_loss": 1.0}])
