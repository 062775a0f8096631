"""TransferLearner: layer groups, freezing, discriminative LRs, gradual unfreezing, bad input."""
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from torch import nn

from fastlearn.base.errors import LabelRangeError, UnknownArchError
from fastlearn.train.learner import transfer_learner
from conftest import synthetic_dls


def learner(arch="test_resnet", **kw):
    torch.manual_seed(0)
    return transfer_learner(synthetic_dls(), arch, pretrained=False, progress=False, **kw)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def is_norm_param(model, name):
    if "." not in name:          # e.g. a ViT's cls_token: a parameter of the model itself
        return False
    mod = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"])
def test_frozen_groups_stay_bitwise_unchanged(arch):
    learn = learner(arch)
    assert learn.n_layer_groups > 3            # stem, stages..., head: more than fastai's 2-3
    learn.freeze_top(2)
    before = snapshot(learn.model)
    groups = learn.group_map.layer_index()
    top = {id(p) for g, ps in zip(groups, learn.opt.param_lists) if g >= learn.n_layer_groups - 2 for p in ps}
    learn.fit_stage(1, slice(1e-4, 1e-2))
    after = snapshot(learn.model)
    changed_frozen = [n for n, p in learn.model.named_parameters()
                      if id(p) not in top and not is_norm_param(learn.model, n) and not torch.equal(before[n], after[n])]
    assert changed_frozen == []
    changed_top = [n for n, p in learn.model.named_parameters() if id(p) in top and not torch.equal(before[n], after[n])]
    assert changed_top                          # the trainable groups did learn


def test_batchnorm_in_frozen_groups_keeps_training():
    learn = learner("test_resnet")              # head only
    bn_names = [n for n, _ in learn.model.named_parameters() if is_norm_param(learn.model, n) and "fc" not in n]
    before = snapshot(learn.model)
    stats0 = learn.model.bn1.running_mean.clone()
    learn.fit_stage(1, 1e-2)
    after = snapshot(learn.model)
    assert any(not torch.equal(before[n], after[n]) for n in bn_names)
    assert not torch.equal(stats0, learn.model.bn1.running_mean)


def test_train_bn_false_freezes_frozen_groups_whole_and_backward_stops_there():
    learn = learner("test_resnet")
    learn.freeze_top(2, train_bn=False)         # the head and the last stage trainable, everything below frozen whole
    groups = learn.group_map.layer_index()
    top = {id(p) for g, ps in zip(groups, learn.opt.param_lists) if g >= learn.n_layer_groups - 2 for p in ps}
    assert all(p.requires_grad == (id(p) in top) for p in learn.model.parameters())
    before = snapshot(learn.model)
    stats0 = learn.model.bn1.running_mean.clone()
    learn.fit_stage(1, 1e-2)
    after = snapshot(learn.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in learn.model.named_parameters() if id(p) in top}
    assert changed and changed <= trainable     # BN affine weights in frozen groups did not move
    assert not torch.equal(stats0, learn.model.bn1.running_mean)  # their statistics still follow the data
    # no gradient reaches the frozen stem: the backward pass stopped at the lowest trainable group
    assert all(p.grad is None for n, p in learn.model.named_parameters() if id(p) not in top)
    learn.freeze_top(2, train_bn=True)           # back to fastai's behaviour: frozen BN trains again
    assert all(p.requires_grad for n, p in learn.model.named_parameters() if is_norm_param(learn.model, n))


class LRProbe(Callback):
    "Reads every optimizer group's LR at training step `at` (mid-training)."
    order = 99

    def __init__(self, at):
        self.at, self.lrs = at, None

    def after_batch(self):
        if self.training and self.train_iter == self.at:
            self.lrs = np.array([g["lr"] for g in self.opt.opt.param_groups])


def test_discriminative_lrs_read_from_optimizer_mid_training():
    learn = learner("test_resnet")
    learn.freeze_top(-1)
    probe = LRProbe(at=3)
    learn.fit_stage(1, slice(1e-5, 1e-2), cbs=[probe])
    per_layer = {}
    for g, lr in zip(learn.group_map.layer_index(), probe.lrs):
        per_layer.setdefault(g, set()).add(round(lr, 15))
    assert all(len(v) == 1 for v in per_layer.values())       # decay/no-decay halves share the LR
    lrs = np.array([per_layer[g].pop() for g in sorted(per_layer)])
    ratios = lrs[1:] / lrs[:-1]
    assert np.allclose(ratios, (1e-2 / 1e-5) ** (1 / (len(lrs) - 1)), rtol=1e-9)  # geometric


def test_no_weight_decay_on_norm_and_bias():
    learn = learner("test_resnet", wd=0.05)
    learn.freeze_top(-1)
    learn.fit_stage(1, 1e-3)
    names = {id(p): n for n, p in learn.model.named_parameters()}
    for g in learn.opt.opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            nodecay = p.ndim <= 1 or n.endswith(".bias")
            assert g["weight_decay"] == (0.0 if nodecay else 0.05), n


def test_more_classes_than_outputs_and_unknown_arch():
    with pytest.raises(LabelRangeError, match="3 classes|3"):
        transfer_learner(synthetic_dls(c=3), "test_resnet", pretrained=False, n_out=2, progress=False)
    with pytest.raises(UnknownArchError, match="resnet5O"):
        transfer_learner(synthetic_dls(), "resnet5O", pretrained=False, progress=False)


def test_freeze_top_bounds():
    learn = learner()
    with pytest.raises(ValueError, match="layer groups"):
        learn.freeze_top(learn.n_layer_groups + 1)


def test_three_line_script_learns(image_folder, tmp_path):
    from fastlearn import image_dls, transfer_learner as tl
    dls = image_dls(image_folder, size=32, bs=8, flip=False)
    learn = tl(dls, "test_resnet", pretrained=False, progress=False)
    res = learn.fit_preset("transfer", run_dir=tmp_path / "run", arch="test_resnet", pretrained=False,
                           head_epochs=2, unfreeze_epochs=1, epochs=3, size=32, bs=8, unfreeze_step=2,
                           stage_lr_mult=0.5)
    assert res.accuracy >= 0.9                  # three colour classes: learnable
    assert [s["stage"] for s in res.stages][0] == "head"
    peaks = [s["peak_lr"] for s in res.stages]
    assert all(b < a for a, b in zip(peaks, peaks[1:]))  # lower peak LR for deeper stages
    assert (tmp_path / "run" / "lr_find.png").exists() and (tmp_path / "run" / "schedule.png").exists()
