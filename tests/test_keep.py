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


def test_the_stage_guard_goes_back_to_the_last_epoch_that_was_not_worse(dls, seeded):
    """A fit whose second epoch wrecks the network: the guard stops there, and the network holds epoch 1's weights
    again (what keep-best and the ensemble then judge), not the wrecked ones."""
    from fastai.callback.core import Callback
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fastlearn.fit.keep import StopWhenWorse

    class Wreck(Callback):  # epoch `at` ends with every prediction turned around, just before validation
        def __init__(self, at: int): self.at = at
        def before_validate(self):
            if self.epoch == self.at:
                with torch.no_grad():
                    for p in self.model.parameters():
                        p.neg_()

    class Snapshot(Callback):  # the weights at the end of each epoch, before the guard (order 85) looks
        order = 80
        def before_fit(self): self.ends = []
        def after_epoch(self): self.ends.append({k: v.clone() for k, v in self.model.state_dict().items()})

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, lr=1e-3)
    keep = KeepBest(n_valid=len(dls.valid_ds))
    loss, acc = learn.validate()
    keep.offer(learn.model, Candidate("head", float(acc), float(loss)))  # the start: an untrained linear layer
    guard, snap = StopWhenWorse(keep, clock=lambda: 0.0), Snapshot()
    guard.stage = "all"
    with learn.no_bar(), learn.no_logging():
        learn.fit(3, cbs=[guard, snap, Wreck(1)])
    assert len(snap.ends) == 2                                          # epoch 3 never ran
    assert "all epoch 2 ended" in guard.stopped and "back at epoch 1's weights" in guard.stopped
    now = learn.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.ends[0].items())  # epoch 1's weights, exactly
    assert not all(torch.equal(now[k], v) for k, v in snap.ends[1].items())
    # the first epoch worse: nothing earlier in the fit to go back to, the network stays where it stopped
    learn2 = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), loss_func=nn.CrossEntropyLoss(),
                     metrics=accuracy, lr=1e-3)
    keep2 = KeepBest(n_valid=len(dls.valid_ds))
    loss2, acc2 = learn2.validate()
    keep2.offer(learn2.model, Candidate("head", float(acc2), float(loss2)))
    guard2 = StopWhenWorse(keep2, clock=lambda: 0.0)
    with learn2.no_bar(), learn2.no_logging():
        learn2.fit(3, cbs=[guard2, Wreck(0)])
    assert "epoch 1 ended" in guard2.stopped and "back at" not in guard2.stopped
