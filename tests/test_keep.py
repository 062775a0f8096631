"""Keep the best: the pure rule, and the weights kept and restored."""
import math

import pytest
import torch
from torch import nn

from fastlearn.fit.keep import Candidate, KeepBest, better


def test_rule():
    a = Candidate("head", 0.90, 0.40)
    assert better(a, None)
    assert better(Candidate("all", 0.91, 0.9), a)          # higher score wins whatever the loss
    assert not better(Candidate("all", 0.89, 0.1), a)
    assert better(Candidate("all", 0.90, 0.39), a)         # same score: lower loss wins
    assert better(Candidate("all", 0.90, 0.40), a)         # exact tie: the later one (trained longer)
    assert not better(Candidate("all", 0.90, 0.41), a)
    nan = Candidate("x", math.nan, 0.5)                    # no metric: the loss decides
    assert better(Candidate("y", math.nan, 0.4), nan) and not better(Candidate("y", math.nan, 0.6), nan)
    assert not better(Candidate("z", 0.5, math.nan), Candidate("w", 0.5, 1.0))


def test_keep_and_restore(tmp_path):
    m = nn.Linear(3, 2)
    k = KeepBest(tmp_path / "kept.safetensors")
    assert k.offer(m, Candidate("head", 0.8, 0.5))
    kept = {n: v.clone() for n, v in m.state_dict().items()}
    with torch.no_grad():
        m.weight.add_(1.0)
    assert not k.offer(m, Candidate("all", 0.7, 0.4))     # worse: not kept
    k.restore(m)
    assert all(torch.equal(m.state_dict()[n], v) for n, v in kept.items())
    # a resumed run knows the record and reads the weights from disk
    k2 = KeepBest(tmp_path / "kept.safetensors")
    k2.load_state_dict(k.state_dict())
    assert k2.best == Candidate("head", 0.8, 0.5)
    with torch.no_grad():
        m.weight.zero_()
    k2.restore(m)
    assert all(torch.equal(m.state_dict()[n], v) for n, v in kept.items())
    with pytest.raises(RuntimeError, match="no weights"):
        KeepBest(tmp_path / "none.safetensors").restore(m)


def test_clearly_worse_is_beyond_the_validation_noise():
    from fastlearn.fit.keep import clearly_worse
    best = Candidate("head", 0.97, 0.10)
    se = math.sqrt(0.97 * 0.03 / 200)                                     # 0.0121 on 200 items
    assert clearly_worse(0.97 - se - 1e-4, 0.2, best, 200)                # beyond one standard error, loss higher
    assert not clearly_worse(0.97 - se + 1e-4, 0.2, best, 200)            # within it
    assert not clearly_worse(0.80, 0.09, best, 200)                       # the loss fell: not worse
    assert not clearly_worse(0.99, 0.2, best, 200)                        # a better metric
    perfect = Candidate("head", 1.0, 0.01)                                # p(1-p) = 0: one item is the noise floor
    assert not clearly_worse(0.99, 0.02, perfect, 100) and clearly_worse(0.98, 0.02, perfect, 100)
    assert clearly_worse(float("nan"), 0.2, Candidate("head", float("nan"), 0.1), 50)  # no metric: the loss
    # the digits quickstart's last stage, mid-way through its one-cycle: one image of 360 down, loss up: go on
    assert not clearly_worse(0.9333, 0.383, Candidate("top7", 0.9361, 0.317), 360)


def test_mix_weights_is_the_linear_interpolation():
    from fastlearn.core.weights import mix_weights
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(7)}
    m = mix_weights(a, b, 0.25)
    assert torch.equal(m["w"], 0.75 * a["w"] + 0.25 * b["w"]) and m["n"].item() == 7  # counters: the fine-tuned one's
    with pytest.raises(ValueError, match="different keys"):
        mix_weights({"x": torch.zeros(1)}, b, 0.5)


def test_a_later_candidate_replaces_the_best_only_when_clearly_better(tmp_path):
    from fastlearn.fit.keep import clearly_better
    probe = Candidate("head", 0.80, 0.5)
    se = math.sqrt(0.8 * 0.2 / 100)                                          # 0.04 on 100 items
    assert not clearly_better(Candidate("all", 0.80 + se - 1e-4, 0.4), probe, 100)
    assert clearly_better(Candidate("all", 0.80 + se + 1e-4, 0.9), probe, 100)   # the score decides, not the loss
    assert clearly_better(Candidate("all", 0.81, 0.4), probe, None)             # no n: the plain order
    assert clearly_better(Candidate("all", float("nan"), 0.4), Candidate("head", float("nan"), 0.5), 100)
    keep = KeepBest(tmp_path / "kept.safetensors", n_valid=100)
    model = nn.Linear(2, 2)
    assert keep.offer(model, probe)
    assert not keep.offer(model, Candidate("all", 0.82, 0.3)) and keep.best.stage == "head"  # two images: noise
    assert keep.offer(model, Candidate("all", 0.86, 0.3)) and keep.best.stage == "all"
