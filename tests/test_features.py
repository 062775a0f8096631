"""Cached frozen-body features: the head trained on them is the model's own classifier, nothing else moves."""
import copy
import random

import numpy as np
import pytest
import torch

from fastlearn.train.features import extract_features, feature_head, head_learner, supports_feature_head
from fastlearn.core.models import create_model


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"])
def test_timm_heads_are_linear_on_pooled_features(arch):
    m = create_model(arch, 3, pretrained=False, drop_rate=0.2)
    assert supports_feature_head(m)
    assert feature_head(m)[1] is m.get_classifier()      # the head shares the model's own parameters


def test_a_model_without_timm_head_api_is_not_supported():
    assert not supports_feature_head(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3)))


@pytest.fixture
def learner(image_folder):
    from fastlearn.train.learner import learner_from_recipe
    learn, _ = learner_from_recipe(image_folder, "transfer", {"arch": "test_resnet", "pretrained": False, "size": 32,
                                                                 "bs": 8}, progress=False)
    return learn


def test_features_leave_model_and_rngs_alone(learner):
    before = copy.deepcopy(learner.model.state_dict())
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    f = extract_features(learner, bs=8)
    assert f.train_x.shape == (len(learner.dls.train_ds), learner.model.num_features)
    assert f.valid_x.shape[0] == len(learner.dls.valid_ds) and f.train_y.dtype == torch.long
    assert all(torch.equal(v, learner.model.state_dict()[k]) for k, v in before.items())
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_channels_last_features_are_the_same_features(image_folder):
    from fastlearn.train.learner import learner_from_recipe
    learn, _ = learner_from_recipe(image_folder, "transfer", {"arch": "test_efficientnet", "pretrained": False,
                                                              "size": 32, "bs": 8}, progress=False)
    nchw = extract_features(learn, bs=8)
    nhwc = extract_features(learn, bs=8, channels_last=True)
    conv = next(m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)   # left as fine-tuning will run it
    assert torch.allclose(nchw.train_x, nhwc.train_x, atol=1e-5) and torch.allclose(nchw.valid_x, nhwc.valid_x, atol=1e-5)
    assert torch.equal(nchw.train_y, nhwc.train_y)


def test_head_on_features_is_the_models_head(learner):
    f = extract_features(learner, bs=8)
    hl = head_learner(learner, f, bs=8, wd=0.01)
    hl.fit(3, lr=1e-2)
    loss_h, acc_h = hl.validate()
    loss_m, acc_m = learner.validate()          # the full model, images through the body, same head weights
    assert loss_m == pytest.approx(loss_h, rel=1e-4, abs=1e-5) and acc_m == pytest.approx(acc_h)


def test_bn_statistics_re_estimated_only_above_the_shift_threshold(learner):
    from fastlearn.train.features import pooled_features, subset_loader
    before = copy.deepcopy(learner.model.state_dict())
    f = extract_features(learner, bs=8, adapt_bn_above=f_shift_plus_one(learner))
    assert not f.bn_adapted and all(torch.equal(v, learner.model.state_dict()[k]) for k, v in before.items())
    f = extract_features(learner, bs=8, adapt_bn_above=0.0)       # a random-init body: any shift is above 0
    assert f.bn_adapted and f.bn_shift > 0
    bns = [m for m in learner.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    first = bns[0]                                               # its running mean: the average input over the images
    seen = []
    h = first.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().mean((0, 2, 3)) * a[0].shape[0]))
    learner.model.eval()
    with torch.no_grad():
        xs, _ = pooled_features(learner.model, subset_loader(learner.dls, learner.dls.train_ds,
                                                 list(range(len(learner.dls.train_ds))), 8))
    h.remove()
    mean = torch.stack(seen).sum(0) / len(learner.dls.train_ds)
    assert torch.allclose(first.running_mean, mean, atol=1e-5)
    assert torch.allclose(xs, f.train_x, atol=1e-5)              # the features are the adapted model's own
    assert first.momentum == 0.1                                  # the BN momentum is restored


def f_shift_plus_one(learner) -> float:
    return extract_features(learner, bs=8).bn_shift + 1.0
