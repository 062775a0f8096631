"""Same seed, same weights bitwise; a different seed, different weights (CPU, num_workers=0)."""
import pytest
import torch
from fastai.torch_core import set_seed

from fastlearn.train.learner import transfer_learner
from conftest import synthetic_dls


def _train(seed: int, shuffle_seed: int = 0) -> dict:
    "Seed as learner_from_recipe does (fastai set_seed, reproducible=True), build, train one one-cycle epoch."
    set_seed(seed, reproducible=True)
    dls = synthetic_dls(seed=0)
    dls.train.rng.seed(shuffle_seed)
    learn = transfer_learner(dls, "test_resnet", pretrained=False, progress=False)
    learn.freeze_top(-1)
    learn.fit_stage(1, 1e-3)
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


@pytest.fixture(scope="module")
def seed0():
    return _train(0)


def test_same_seed_gives_identical_weights(seed0):
    again = _train(0)
    assert all(torch.equal(seed0[k], again[k]) for k in seed0)


def test_different_seed_gives_different_weights(seed0):
    other = _train(1)
    differ = [k for k in seed0 if seed0[k].is_floating_point() and not torch.equal(seed0[k], other[k])]
    assert len(differ) > len(seed0) // 2


def test_shuffle_seed_alone_changes_the_result(seed0):
    "Same model seed, same data, another shuffle: the DataLoader's own rng is part of what must be seeded."
    other = _train(0, shuffle_seed=1)
    assert any(not torch.equal(seed0[k], other[k]) for k in seed0 if seed0[k].is_floating_point())
