"""EMA of the weights (closed form, across fits, only real optimizer steps, raw-vs-EMA choice) and the
recipe's early stopping with best-weights restore (built in the same block of `recipe_callbacks`)."""
import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD

from fastlearn.train.recipe_callbacks import recipe_callbacks
from fastlearn.fit.ema import EMA
from fastlearn.train.learner import transfer_learner
from fastlearn.core.recipes import load_recipe

from conftest import make_blobs, synthetic_dls


class _Weights(Callback):
    "Snapshot of the state dict after every optimizer step (or every epoch)."
    order = 90

    def __init__(self, when="after_step"):
        self.snaps, self.when = [], when

    def _snap(self):
        self.snaps.append({k: v.detach().clone() for k, v in self.learn.model.state_dict().items()})

    def after_step(self):
        if self.when == "after_step":
            self._snap()

    def after_epoch(self):
        if self.when == "after_epoch":
            self._snap()


def _linear_learner(n=64, bs=8):
    torch.manual_seed(0)
    x = torch.randn(n, 2)
    y = x @ torch.tensor([[2.0], [-1.0]]) + 0.5
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[:48], ds[48:], bs=bs, shuffle=False, device="cpu", num_workers=0)
    return Learner(dls, torch.nn.Linear(2, 1), loss_func=torch.nn.MSELoss(), opt_func=SGD, lr=0.05)


def _tiny_learner(dls=None):
    torch.manual_seed(0)
    return transfer_learner(dls or synthetic_dls(), "test_resnet", pretrained=False, progress=False)


def test_ema_matches_closed_form_across_fits():
    learn = _linear_learner()
    d = 0.8
    ema, snaps = EMA(d, warmup=False), _Weights()
    learn.fit(2, cbs=[ema, snaps])
    first = ema.ema
    learn.fit(1, cbs=[ema, snaps])
    assert ema.ema is first  # created once, kept across fits
    assert ema.steps == len(snaps.snaps) == 3 * len(learn.dls.train)
    expected = {k: v.clone() for k, v in snaps.snaps[0].items()}  # timm's first update copies the weights
    for w in snaps.snaps[1:]:
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * w[k]
    got = ema.module.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[k], learn.model.state_dict()[k])  # really an average, not the weights


def test_ema_state_round_trips_through_a_checkpoint():
    learn = _linear_learner()
    a = EMA(0.8, warmup=False)
    learn.fit(1, cbs=[a])
    b = EMA(0.8, warmup=False)
    b.load_state_dict(a.state_dict())
    learn.fit(0, cbs=[b])  # the averaged weights arrive when the model is known, at the first fit
    assert b.steps == a.steps == len(learn.dls.train)
    assert all(torch.equal(v, a.module.state_dict()[k]) for k, v in b.module.state_dict().items())
    assert not all(torch.equal(v, learn.model.state_dict()[k]) for k, v in b.module.state_dict().items())


def test_ema_counts_only_real_optimizer_steps():
    learn = _linear_learner()
    ema = EMA(0.9, warmup=False)
    learn.fit(1, cbs=[ema, GradientAccumulation(n_acc=2 * learn.dls.train.bs)])
    assert ema.steps == len(learn.dls.train) // 2


def test_ema_differs_from_raw_on_a_conv_net_and_frozen_params_stay_equal():
    learn = _tiny_learner()  # body frozen: only the head (and BatchNorm) trains
    ema = EMA(0.9)
    learn.fit(2, 1e-2, cbs=[ema])
    raw, avg = learn.model.state_dict(), ema.module.state_dict()
    trainable = {n for n, p in learn.model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in learn.model.named_parameters() if not p.requires_grad}
    assert frozen and trainable
    assert all(torch.equal(raw[n], avg[n]) for n in frozen)
    assert any(not torch.allclose(raw[n], avg[n]) for n in trainable)


def test_finish_keeps_the_weights_with_the_lower_valid_loss(capsys):
    learn = _tiny_learner()
    learn.freeze_top(-1)
    ema = EMA(0.9)
    learn.fit(3, 1e-2, cbs=[ema])
    good = {k: v.clone() for k, v in learn.model.state_dict().items()}
    # make the EMA clearly worse than the raw weights: finish must keep raw
    ema.ema.set(_tiny_learner().model)  # untrained weights
    assert ema.finish(learn) == "raw"
    assert ema.valid_losses["raw"] < ema.valid_losses["ema"]
    assert all(torch.equal(v, good[k]) for k, v in learn.model.state_dict().items())
    # and the other way round: trained weights in the EMA, raw weights spoiled
    ema.ema.module.load_state_dict(good)
    with torch.no_grad():
        for p in learn.model.parameters():
            p.add_(torch.randn_like(p))
    assert ema.finish(learn) == "ema"
    assert ema.valid_losses["ema"] < ema.valid_losses["raw"]
    assert all(torch.equal(v, good[k]) for k, v in learn.model.state_dict().items())
    assert "keeping ema" in capsys.readouterr().out


def test_recipe_early_stop_restores_the_best_weights(tmp_path, monkeypatch):
    "Valid labels are shifted by one class: the better the model fits train, the worse its valid loss."
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "run"
    x, y = make_blobs(96, 3, 32, seed=0)
    train, valid = list(zip(x[24:], y[24:])), list(zip(x[:24], (y[:24] + 1) % 3))
    dls = DataLoaders.from_dsets(train, valid, bs=16, shuffle=True, device="cpu", num_workers=0)
    dls.c = 3
    learn = _tiny_learner(dls)
    learn.freeze_top(-1)
    r = load_recipe("transfer", {"size": 32, "early_stop": 2})
    cbs = recipe_callbacks(learn, r, run_dir)
    snaps = _Weights("after_epoch")
    learn.fit(8, 1e-2, cbs=cbs + [snaps])
    losses = [row[1] for row in learn.recorder.values]
    best = int(np.argmin(losses))
    assert len(losses) == best + 1 + 2 < 8  # stopped `early_stop` epochs after the best one
    final = learn.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in snaps.snaps[best].items())
    assert not all(torch.equal(final[k], v) for k, v in snaps.snaps[-1].items())
    assert (run_dir / "best.pth").exists() and not any(cwd.iterdir())  # nothing in fastai's ./models
    # a second fit (stage) that never beats the run's best gives the best weights back again
    learn.fit(2, 1e-2, cbs=cbs)
    assert all(torch.equal(learn.model.state_dict()[k], v) for k, v in snaps.snaps[best].items())
