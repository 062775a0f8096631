import pytest
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat, FocalLossFlat, LabelSmoothingCrossEntropyFlat

from fastlearn.data.dls import image_dls
from fastlearn.base.errors import DataError
from fastlearn.core.losses import class_weights, make_loss

from conftest import write_image_folder


def _imbalanced_dls(counts=(6, 2, 1), device="cpu"):
    "Tensor DataLoaders whose training labels have `counts` samples per class (validation balanced)."
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    x = torch.randn(len(y), 4)
    train, valid = list(zip(x, y)), list(zip(torch.randn(3, 4), torch.arange(3)))
    dls = DataLoaders.from_dsets(train, valid, bs=2, device=device, num_workers=0)
    dls.c = len(counts)
    return dls


def test_class_weights_formula_on_tensor_data():
    w = class_weights(_imbalanced_dls((6, 2, 1)))
    # n_samples / (n_classes * count_c) = 9 / (3 * [6, 2, 1])
    assert torch.allclose(w, torch.tensor([0.5, 1.5, 3.0]))
    assert w.dtype == torch.float32


def test_class_weights_from_an_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "a", n_per_class=8, classes=("a", "b"), size=8, valid=2)
    write_image_folder(tmp_path / "b", n_per_class=2, classes=("c",), size=8, valid=2)  # class c: 2 training images
    for split in ("train", "valid"):
        (tmp_path / "b" / split / "c").rename(root / split / "c")
    dls = image_dls(root, size=8, bs=2, device="cpu", num_workers=0)
    assert list(dls.vocab) == ["a", "b", "c"]
    # 18 training images: 8, 8, 2
    assert torch.allclose(class_weights(dls), torch.tensor([18 / 24, 18 / 24, 18 / 6]))


def test_class_without_training_samples_is_named():
    dls = _imbalanced_dls((3, 3))
    dls.c = 3
    with pytest.raises(DataError, match=r"\[2\].*loss='ce'"):
        class_weights(dls)


def test_weighted_ce_equals_the_manual_weighted_mean():
    dls = _imbalanced_dls((6, 2, 1))
    loss = make_loss("weighted_ce", dls)
    g = torch.Generator().manual_seed(0)
    logits, targ = torch.randn(10, 3, generator=g), torch.tensor([0, 1, 2, 2, 0, 1, 0, 2, 1, 0])
    w = torch.tensor([0.5, 1.5, 3.0])
    nll = -logits.log_softmax(-1)[torch.arange(10), targ]
    expected = (w[targ] * nll).sum() / w[targ].sum()  # torch's weighted 'mean' divides by the summed weights
    assert torch.allclose(loss(logits, targ), expected)
    assert not torch.allclose(loss(logits, targ), nll.mean())  # and the weights matter


def test_weighted_ce_keeps_label_smoothing():
    dls = _imbalanced_dls((6, 2, 1))
    logits, targ = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    got = make_loss("weighted_ce", dls, label_smoothing=0.1)(logits, targ)
    want = F.cross_entropy(logits, targ, weight=torch.tensor([0.5, 1.5, 3.0]), label_smoothing=0.1)
    assert torch.allclose(got, want)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, targ = torch.randn(8, 4), torch.randint(0, 4, (8,))
    ce = F.cross_entropy(logits, targ)
    assert isinstance(make_loss("focal", gamma=0.0), FocalLossFlat)
    assert torch.allclose(make_loss("focal", gamma=0.0)(logits, targ), ce)
    assert make_loss("focal", gamma=2.0)(logits, targ) < ce  # down-weights every sample by (1 - p_t)^2 < 1


def test_ce_matches_what_transfer_learner_used():
    assert type(make_loss("ce")) is CrossEntropyLossFlat
    smoothed = make_loss("ce", label_smoothing=0.1)
    assert isinstance(smoothed, LabelSmoothingCrossEntropyFlat) and smoothed.func.eps == 0.1


def test_argument_errors():
    with pytest.raises(ValueError, match=r"loss='nope'.*'ce', 'weighted_ce', 'focal'"):
        make_loss("nope")
    with pytest.raises(ValueError, match="needs dls="):
        make_loss("weighted_ce")
    with pytest.raises(ValueError, match="label_smoothing=0.1 with loss='focal'"):
        make_loss("focal", label_smoothing=0.1)
    with pytest.raises(ValueError, match="gamma=-1"):
        make_loss("focal", gamma=-1)
