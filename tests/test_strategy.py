"""The 2x2 chooser: the pure rule on synthetic numbers, the measurement on a tiny model and synthetic data."""
import re

import numpy as np
import pytest
import torch
from fastai.data.core import DataLoaders
from torch import nn

from conftest import make_blobs, synthetic_dls
from fastlearn.train.learner import transfer_learner
from fastlearn.core.recipes import load_recipe
from fastlearn.train.strategy import STRATEGIES, DatasetStats, Thresholds, choose_strategy, decide, measure_dataset


def stats(per_class: float, probe: float, shift: float) -> DatasetStats:
    return DatasetStats(n_train=int(per_class * 10), n_classes=10, images_per_class=per_class,
                        min_per_class=int(per_class), probe_acc=probe, bn_shift=shift)


@pytest.mark.parametrize("per_class,probe,shift,expected", [
    (50, 0.95, 0.2, "fine_tune_top"),   # small, similar: the probe is kept unless the top groups beat it
    (500, 0.95, 0.2, "fine_tune_top"),  # large, similar
    (500, 0.60, 0.9, "full"),           # large, different
    (50, 0.60, 0.9, "full"),            # small, different: gradual unfreezing with low body LRs
    (500, 0.95, 0.9, "full"),           # separable but the BN statistics say the images are unlike ImageNet
    (500, 0.60, 0.2, "full"),           # ImageNet-like statistics but the features do not separate the classes
    (10, 0.60, 0.9, "linear_probe"),    # tiny: too few images to tune the body, whatever the similarity
])
def test_decide_cells(per_class, probe, shift, expected):
    strategy, why = decide(stats(per_class, probe, shift))
    assert strategy == expected
    assert why.endswith(expected) or f"-> {expected}" in why
    assert f"{per_class:g} images/class" in why and f"{probe:.3f}" in why and f"{shift:.2f}" in why


def test_decide_without_batchnorm_uses_the_probe_alone():
    assert decide(stats(50, 0.95, float("nan")))[0] == "fine_tune_top"
    strategy, why = decide(stats(500, 0.60, float("nan")))
    assert strategy == "full" and "no BatchNorm" in why and "0.600" in why


def test_decide_thresholds_are_the_cuts():
    t = Thresholds(small_per_class=100, probe_similar=0.9, bn_similar=0.45)
    assert decide(stats(19.5, 0.9, 0.45), t)[0] == "linear_probe"   # below the tiny cut
    assert decide(stats(20, 0.9, 0.45), t)[0] == "fine_tune_top"    # at the similarity cuts: similar
    assert decide(stats(100, 0.9, 0.45), t)[0] == "fine_tune_top"   # at the size cut: large
    assert decide(stats(100, 0.899, 0.45), t)[0] == "full"
    assert decide(stats(100, 0.9, 0.451), t)[0] == "full"
    assert "(large, cut at 100)" in decide(stats(100, 0.9, 0.45), t)[1]


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _learner(dls, model=None):
    return transfer_learner(dls, "test_resnet", pretrained=False, progress=False, model=model)


def test_measure_dataset_on_blobs_leaves_the_model_alone():
    learn = _learner(synthetic_dls(n=96, c=3))
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.model.train()
    s = measure_dataset(learn)
    assert (s.n_train, s.n_classes, s.images_per_class, s.min_per_class) == (72, 3, 24.0, 24)
    assert (s.probe_train, s.probe_valid) == (72, 24)
    assert s.n_bn_layers == len(_bn_layers(learn.model)) > 0
    assert s.probe_acc >= 0.9  # mean-colour blobs are linearly separable even through a random body
    assert 0 < s.bn_shift < float("inf")
    assert learn.model.training  # mode restored
    after = learn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running stats untouched


def test_measure_dataset_leaves_the_random_states_alone():
    import random
    learn = _learner(synthetic_dls(n=96, c=3))
    draws = []
    for measure in (False, True):
        random.seed(1); np.random.seed(1); torch.manual_seed(1)
        if measure:
            measure_dataset(learn)
        draws.append((random.random(), float(np.random.rand()), torch.rand(3).tolist()))
    assert draws[0] == draws[1]  # the training after `auto` measures is the same as without it


def test_measure_dataset_probe_is_chance_on_random_labels():
    x, _ = make_blobs(200, 4, 32, seed=1)
    y = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(0))
    dls = DataLoaders.from_dsets(list(zip(x[50:], y[50:])), list(zip(x[:50], y[:50])), bs=16, device="cpu")
    dls.c = 4
    s = measure_dataset(_learner(dls))
    assert s.probe_acc < 0.5  # labels carry no signal: near 1/4, far from the blobs' >= 0.9


def test_max_images_caps_the_probe():
    s = measure_dataset(_learner(synthetic_dls(n=96, c=3)), max_images=20)
    assert (s.probe_train, s.probe_valid, s.n_train) == (20, 10, 72)


def _shifted_dls(x, y, c, shift):
    x = x + shift
    dls = DataLoaders.from_dsets(list(zip(x[24:], y[24:])), list(zip(x[:24], y[:24])), bs=16, device="cpu")
    dls.c = c
    return dls


def test_bn_shift_grows_with_distance_from_the_running_stats():
    x, y = make_blobs(96, 3, 32, seed=0)
    matched = _learner(_shifted_dls(x, y, 3, 0.0))
    model = matched.model
    # make the running stats exactly those of this data: cumulative averages over one pass in train mode
    for m in _bn_layers(model):
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for dl in (matched.dls.train.new(shuffle=False, drop_last=False), matched.dls.valid):
            for xb, _ in dl:
                model(xb.as_subclass(torch.Tensor))
    s_matched = measure_dataset(matched)
    s_shifted = measure_dataset(_learner(_shifted_dls(x, y, 3, 3.0), model=model))
    assert s_matched.bn_shift < 0.1  # measured 0.015: eval-mode inputs differ slightly from train-mode ones
    assert s_shifted.bn_shift > 1.0  # measured 5.4


def test_measure_dataset_on_a_model_without_batchnorm():
    learn = transfer_learner(synthetic_dls(n=96, c=3), "test_convnext", pretrained=False, progress=False)
    s = measure_dataset(learn)
    assert s.n_bn_layers == 0 and np.isnan(s.bn_shift)  # LayerNorm only: no running stats to compare
    assert 0.0 <= s.probe_acc <= 1.0


def test_measure_dataset_on_an_image_folder(tmp_path):
    from PIL import Image
    from fastlearn.data.dls import image_dls
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("valid", 4)):
        for c, colour in enumerate(((220, 30, 30), (30, 30, 220))):
            d = tmp_path / split / f"class{c}"
            d.mkdir(parents=True)
            for k in range(n):
                a = np.clip(np.array(colour) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{k}.png")
    dls = image_dls(tmp_path, size=32, bs=4, arch="test_resnet", num_workers=0, device="cpu")
    s = measure_dataset(_learner(dls))
    assert (s.n_train, s.n_classes, s.images_per_class, s.probe_valid) == (24, 2, 12.0, 8)
    assert s.probe_acc == 1.0  # red vs blue squares
    assert s.bn_shift > 0


def test_choose_strategy_states_the_numbers():
    learn = _learner(synthetic_dls(n=96, c=3))
    r = load_recipe("auto")
    strategy, why = choose_strategy(learn, r)
    s = measure_dataset(learn, seed=r.seed)
    assert strategy in STRATEGIES
    assert strategy == decide(s)[0]
    for number in (f"{s.images_per_class:g} images/class", f"{s.probe_acc:.3f}", f"{s.bn_shift:.2f}"):
        assert number in why
    assert re.search(r"measured on 72\+24 images", why)


def test_choose_strategy_without_pretrained_weights_is_scratch():
    learn = _learner(synthetic_dls(n=96, c=3))
    strategy, why = choose_strategy(learn, load_recipe("auto", {"pretrained": False}))
    assert strategy == "scratch" and "pretrained = false" in why


def test_measure_dataset_without_validation_images_says_so():
    x, y = make_blobs(16, 2, 32)
    dls = DataLoaders.from_dsets(list(zip(x, y)), [], bs=4, device="cpu")
    dls.c = 2
    with pytest.raises(ValueError, match="got 16 and 0"):
        measure_dataset(_learner(dls))
