"""fastlearn's optimizers (torch foreach kernels in fastai's OptimWrapper) get exactly the schedule fastai's
own optimizers get, per param group; weight decay skips norm/bias; lookahead does what the paper says."""
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.optimizer import Adam, SGD

from fastlearn.train.learner import transfer_learner
from fastlearn.core.optim import opt_func, split_decay
from fastlearn.core.schedules import one_cycle_lr, one_cycle_mom
from conftest import synthetic_dls


class _FastaiHypers(Callback):
    "What a fastai optimizer uses at each step: its hypers right before `opt.step` (after ParamScheduler)."
    order = 99
    def before_fit(self): self.rows = []
    def before_step(self):
        self.rows.append([(h["lr"], h["mom"]) for h in self.opt.hypers])


def _torch_trace(torch_opt, mom_key):
    "Step pre-hook on the torch optimizer itself: the values its kernels read."
    rows = []
    def hook(opt, args, kwargs):
        rows.append([(g["lr"], g["betas"][0] if mom_key == "betas" else g[mom_key]) for g in opt.param_groups])
    torch_opt.register_step_pre_hook(hook)
    return rows


def _learner(opt_name_or_func, seed=0, n=80):
    torch.manual_seed(seed)
    learn = transfer_learner(synthetic_dls(n=n, bs=10), "test_resnet", pretrained=False, progress=False)
    if not isinstance(opt_name_or_func, str):              # a fastai optimizer over the same param groups
        learn.opt_func, learn.opt = opt_name_or_func, None
    else:
        learn.opt_func, learn.opt = opt_func(opt_name_or_func), None
    learn.freeze_top(-1)
    return learn


@pytest.mark.parametrize("fastai_opt, ours, mom_key", [(Adam, "adamw", "betas"), (SGD, "sgd", "momentum")])
def test_same_one_cycle_trace_as_fastai_optimizer(fastai_opt, ours, mom_key):
    lr = slice(1e-4, 1e-2)
    ref = _learner(fastai_opt)
    rec = _FastaiHypers()
    ref.fit_stage(1, lr, cbs=[rec])
    mine = _learner(ours)
    rows = _torch_trace(mine.opt.opt, mom_key)
    mine.fit_stage(1, lr)
    assert len(rows) == len(rec.rows) == len(mine.dls.train) == 6             # 60 train images, bs 10
    assert len(rows[0]) == len(rec.rows[0]) == len(mine.group_map) > 2
    np.testing.assert_allclose(np.array(rows, dtype=float), np.array(rec.rows, dtype=float), rtol=1e-12, atol=0)
    # and both are the closed-form one-cycle: per-group peak * one_cycle_lr(pos), pos = step / total
    n = len(rows)
    peaks = mine.layer_lrs(lr)
    for t, row in enumerate(rows):
        pos = t / n
        np.testing.assert_allclose([r[0] for r in row], peaks * one_cycle_lr(pos, 1.0), rtol=1e-12)
        np.testing.assert_allclose([r[1] for r in row], one_cycle_mom(pos), rtol=1e-12)


def test_discriminative_lrs_mid_training_are_geometric():
    learn = _learner("adamw")
    rows = _torch_trace(learn.opt.opt, "betas")
    learn.fit_stage(1, slice(1e-4, 1e-2))
    per_layer = np.geomspace(1e-4, 1e-2, learn.n_layer_groups)
    expected_ratio = per_layer[learn.group_map.layer_index()] / 1e-2       # group LR / head LR
    assert learn.n_layer_groups >= 3 and len(rows) == len(learn.dls.train)
    for row in rows:                                                         # every step, incl. mid-training
        lrs = np.array([r[0] for r in row])
        np.testing.assert_allclose(lrs / lrs[-1], expected_ratio, rtol=1e-12)
    mid = np.array([r[0] for r in rows[len(rows) // 2]])
    spacing = mid[np.r_[[learn.group_map.first_group_of(i) for i in range(learn.n_layer_groups)]]]
    np.testing.assert_allclose(spacing[1:] / spacing[:-1], (1e-2 / 1e-4) ** (1 / (learn.n_layer_groups - 1)),
                               rtol=1e-12)


def test_split_decay_gives_norm_and_bias_zero_weight_decay():
    learn = _learner("adamw")
    seen = []
    learn.opt.opt.register_step_pre_hook(lambda o, a, k: seen.append([g["weight_decay"] for g in o.param_groups]))
    learn.fit(1, 1e-3)
    norm_ids = {id(p) for m in learn.model.modules()
                if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm))
                for p in m.parameters(recurse=False)}
    names = {id(p): n for n, p in learn.model.named_parameters()}
    assert seen and all(s == seen[0] for s in seen)
    n_zero = 0
    for g, wd in zip(learn.opt.opt.param_groups, seen[-1]):
        no_decay = [id(p) in norm_ids or names[id(p)].endswith(".bias") or p.ndim <= 1 for p in g["params"]]
        if wd == 0:
            n_zero += 1
            assert all(no_decay), "a weight matrix ended up without weight decay"
        else:
            assert wd == pytest.approx(0.01) and not any(no_decay), "a norm/bias param is decayed"
    assert n_zero == sum(not d for _, d in learn.group_map) > 0
    # decay_norm_bias=True keeps one group per layer group, all decayed
    groups, gmap = split_decay(learn.model, [list(learn.model.parameters())], decay_norm_bias=True)
    assert len(groups) == 1 and gmap.wd(0.01) == [0.01]


def test_lookahead_pulls_fast_weights_back_halfway_every_k_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = opt_func("adamw", lookahead=True)(list(model.parameters()), lr=1e-2)
    base = opt.opt._base_optimizer
    fast = []  # the weights right after each inner AdamW step, before any lookahead sync
    base.register_step_post_hook(lambda o, a, k: fast.append(model[0].weight.detach().clone()))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    after = []
    for _ in range(12):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step(); opt.zero_grad()
        after.append(model[0].weight.detach().clone())
    assert len(fast) == 12 and all(torch.equal(f, a) for f, a in zip(fast[:5], after[:5]))  # no sync before k
    # step 6: timm initialises the slow weights to the fast ones there, so the first sync pulls nothing
    # back (the paper starts the slow weights at step 0); step 12: slow = w6 + 0.5 * (fast12 - w6),
    # and the fast weights are reset to it (k=6, alpha=0.5)
    assert torch.equal(after[5], fast[5])
    np.testing.assert_allclose(after[11], after[5] + 0.5 * (fast[11] - after[5]), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(after[11], fast[11])
    assert torch.equal(after[11], base.state[model[0].weight]["lookahead_slow_buff"])


def test_lookahead_learner_gets_the_schedule():
    learn = transfer_learner(synthetic_dls(n=80, bs=10), "test_resnet", pretrained=False, progress=False,
                             lookahead=True)
    learn.freeze_top(-1)
    rows = _torch_trace(learn.opt.opt._base_optimizer, "betas")
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit_stage(1, 1e-3)
    n = len(rows)
    assert n == len(learn.dls.train)
    np.testing.assert_allclose([r[-1][0] for r in rows], [one_cycle_lr(t / n, 1e-3) for t in range(n)], rtol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
