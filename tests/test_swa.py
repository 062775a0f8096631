"""SWA (fastlearn.swa): the average is the mean of the per-epoch weights, BN statistics are recomputed,
LR and momentum stay constant, the better of raw and SWA weights is kept, 0 epochs is a no-op."""
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback

from fastlearn.train.learner import transfer_learner
from fastlearn.fit.swa import fit_swa, keep_better, run_swa

from conftest import synthetic_dls


def _bn_buffer(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


class _EpochWeights(Callback):
    "Parameters (no BN buffers) at the end of every epoch."
    def __init__(self): self.snaps = []
    def after_epoch(self):
        self.snaps.append({k: v.detach().clone() for k, v in self.learn.model.state_dict().items() if not _bn_buffer(k)})


class _Hypers(Callback):
    "lr and mom of every optimizer group at every step."
    def __init__(self): self.lrs, self.moms = [], []
    def before_step(self):
        self.lrs.append([h["lr"] for h in self.learn.opt.hypers])
        self.moms.append([h["mom"] for h in self.learn.opt.hypers])


def _learner():
    torch.manual_seed(0)
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    learn.unfreeze()
    return learn


def test_average_is_mean_of_epoch_weights_and_bn_recomputed():
    learn = _learner()
    rec = _EpochWeights()
    avg = fit_swa(learn, 3, 1e-3, cbs=[rec])
    assert len(rec.snaps) == 3
    avg_sd = avg.state_dict()
    for k in rec.snaps[0]:
        mean = torch.stack([s[k].float() for s in rec.snaps]).mean(0)
        torch.testing.assert_close(avg_sd[k].float(), mean, rtol=1e-5, atol=1e-6, msg=k)
    # the average is a copy: learn.model still holds the last epoch's weights
    for k, v in learn.model.state_dict().items():
        if not _bn_buffer(k):
            assert torch.equal(v, rec.snaps[-1][k]), k
    raw_sd = learn.model.state_dict()
    bn_means = [k for k in avg_sd if k.endswith("running_mean")]
    assert bn_means, "test_resnet has BatchNorm layers"
    n_batches = len(learn.dls.train)
    for k in bn_means:
        assert not torch.allclose(avg_sd[k], raw_sd[k]), f"{k} not recomputed"
        # update_bn resets the stats and runs one pass: exactly one count per training batch
        assert int(avg_sd[k.replace("running_mean", "num_batches_tracked")]) == n_batches


def test_lr_and_momentum_constant_per_group():
    learn = _learner()
    lrs = learn.layer_lrs(slice(1e-4, 1e-2))
    hp = _Hypers()
    fit_swa(learn, 2, lrs, cbs=[hp], mom=0.9)
    assert len(hp.lrs) == 2 * len(learn.dls.train)
    assert len(set(lrs.round(12))) > 1, "discriminative LRs differ across groups"
    np.testing.assert_allclose(np.array(hp.lrs), np.broadcast_to(lrs, (len(hp.lrs), len(lrs))), rtol=1e-12)
    assert np.all(np.array(hp.moms) == 0.9)


def test_run_swa_keeps_lower_valid_loss(capsys):
    learn = _learner()
    learn.fit_one_cycle(1, 1e-2)
    rec = _EpochWeights()
    res = run_swa(learn, 2, 1e-3, cbs=[rec])
    assert res["kept"] == ("swa" if res["swa_valid_loss"] < res["raw_valid_loss"] else "raw")
    assert float(learn.validate()[0]) == pytest.approx(min(res["swa_valid_loss"], res["raw_valid_loss"]), rel=1e-5)
    sd = learn.model.state_dict()
    expect = ({k: (a + b) / 2 for (k, a), b in zip(rec.snaps[0].items(), rec.snaps[1].values())}
              if res["kept"] == "swa" else rec.snaps[-1])
    for k, v in expect.items():
        torch.testing.assert_close(sd[k].float(), v.float(), rtol=1e-5, atol=1e-6, msg=k)
    out = capsys.readouterr().out
    assert "swa: valid loss raw" in out and f"kept {res['kept']}" in out


def test_keep_better_picks_each_side():
    learn = _learner()
    learn.fit_one_cycle(1, 1e-2)
    raw = {k: v.clone() for k, v in learn.model.state_dict().items()}
    worse = _learner().model  # untrained weights: a higher valid loss than the trained ones
    res = keep_better(learn, worse)
    assert res["kept"] == "raw" and res["swa_valid_loss"] > res["raw_valid_loss"]
    assert all(torch.equal(v, raw[k]) for k, v in learn.model.state_dict().items())
    untrained = _learner()
    res = keep_better(untrained, learn.model)
    assert res["kept"] == "swa"
    assert all(torch.equal(v, raw[k]) for k, v in untrained.model.state_dict().items())


def test_zero_epochs_is_a_no_op():
    learn = _learner()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    hp = _Hypers()
    assert run_swa(learn, 0, 1e-3, cbs=[hp]) == {}
    assert hp.lrs == []  # nothing was fit
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())


def test_bad_arguments_name_the_value():
    learn = _learner()
    with pytest.raises(ValueError, match="-1"):
        run_swa(learn, -1, 1e-3)
    with pytest.raises(ValueError, match="learning rate"):
        run_swa(learn, 1, 0.0)
