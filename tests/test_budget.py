"""Schedules sized in steps: the batch-size and head-length rules against their definitions."""
import pytest

from fastlearn.core.budget import batch_size_for, feature_batch_size, feature_epochs, ft_lr_cap


@pytest.mark.parametrize("n_train,epochs,expected", [
    (245, 3, 16),      # 3 x 15 = 45 steps at 16: none reaches 100, so the floor
    (500, 3, 16),      # 3 x 31 = 93 < 100 at 16 -> floor 16 (32 gives 45)
    (1437, 2, 16),     # digits: 2 x 89 = 178 at 16; 2 x 44 = 88 at 32
    (1437, 4, 32),     # 4 x 44 = 176 at 32; 4 x 22 = 88 at 64
    (20000, 2, 64),    # plenty: the cap
])
def test_batch_size_gives_the_cycle_its_steps(n_train, epochs, expected):
    bs = batch_size_for(n_train, epochs, min_steps=100)
    assert bs == expected
    # the definition: the largest power of two in [16, 64] reaching 100 steps, else 16
    ok = [b for b in (64, 32, 16) if epochs * (n_train // b) >= 100]
    assert bs == (ok[0] if ok else 16)


def test_batch_size_never_exceeds_the_data():
    assert batch_size_for(10, 3) == 8           # one full batch must exist
    assert batch_size_for(1, 1) == 1
    with pytest.raises(ValueError):
        batch_size_for(0, 1)
    with pytest.raises(ValueError):
        batch_size_for(100, 1, bs_min=64, bs_max=16)


def test_feature_head_length():
    assert feature_batch_size(245) == 16         # 245 // 8 = 30 -> 16 (power of two)
    assert feature_batch_size(100_000) == 64
    assert feature_batch_size(5) == 1
    bs = feature_batch_size(245)
    ep = feature_epochs(245, bs, 300)
    assert ep * (245 // bs) >= 300 > (ep - 1) * (245 // bs)
    assert feature_epochs(10, 64, 300, max_epochs=50) == 50


@pytest.mark.parametrize("n_train,n_classes,expected", [
    (200, 10, 1e-4),     # 20 per class: the small-data cap
    (399, 10, 1e-4),     # 39.9 per class: still below 40
    (400, 10, 3e-4),     # 40 per class: the threshold itself is not small
    (800, 10, 3e-4),     # 80 per class
    (245, 2, 3e-4),      # 122 per class
    (30, 0, 1e-4),       # no classes known: the images count as one class
])
def test_ft_lr_cap_is_the_small_cap_below_the_images_per_class_threshold(n_train, n_classes, expected):
    assert ft_lr_cap(3e-4, 1e-4, 40, n_train, n_classes) == expected
    assert ft_lr_cap(3e-4, None, 40, n_train, n_classes) == 3e-4      # no small cap: one cap at every size
