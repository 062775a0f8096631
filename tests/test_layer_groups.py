"""Tests of fastlearn.layer_groups on timm's tiny test models: coverage, order, and freezing in a fastai Learner."""
import pytest
import timm
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.torch_core import norm_types
from torch import nn

from fastlearn.core.layer_groups import group_index_of, layer_group_names, layer_groups, n_groups, splitter
from fastlearn.core.models import create_model

ARCHS = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"]


def _model(arch: str, n_out: int = 3) -> nn.Module:
    return create_model(arch, n_out=n_out, pretrained=False)


def _input(arch: str, bs: int = 2) -> torch.Tensor:
    size = timm.get_pretrained_cfg(arch).input_size[-1]
    return torch.randn(bs, 3, size, size)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_in_exactly_one_group(arch):
    model = _model(arch)
    names = [n for g in layer_group_names(model) for n in g]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in model.named_parameters()}
    params = [p for g in layer_groups(model) for p in g]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()} and len(params) == len(names)


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_are_stem_stages_head(arch):
    model = _model(arch)
    groups = layer_group_names(model)
    assert n_groups(model) == len(groups) > 3
    assert f"{model.pretrained_cfg['first_conv']}.weight" in groups[0]
    head = {n for n, _ in model.get_classifier().named_parameters(prefix=model.pretrained_cfg["classifier"])}
    assert set(groups[-1]) == head


@pytest.mark.parametrize("arch", ARCHS)
def test_group_order_follows_forward_order(arch):
    model = _model(arch).eval()
    called = []  # modules owning parameters, in the order forward first reaches them
    owners = [(name, m) for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: None if name in called else called.append(name))
             for name, m in owners]
    with torch.no_grad():
        model(_input(arch))
    for h in hooks:
        h.remove()
    index = group_index_of(model)
    seq = [index[f"{mod}.{p}"] for mod in called for p, _ in model.get_submodule(mod).named_parameters(recurse=False)]
    assert seq == sorted(seq)
    assert seq[0] == 0 and seq[-1] == n_groups(model) - 1


@pytest.mark.parametrize("arch,final_norm,last_stage_param", [
    ("test_efficientnet", "bn2.weight", "blocks.4.0.conv_pw.weight"),
    ("test_convnext", "head.norm.weight", "stages.3.downsample.0.weight"),  # timm leaves it with head.fc
    ("test_vit", "norm.weight", "blocks.5.norm1.weight"),
])
def test_final_norm_goes_with_last_stage_not_head(arch, final_norm, last_stage_param):
    index = group_index_of(_model(arch))
    assert index[final_norm] == index[last_stage_param] == max(index.values()) - 1


def _learner(arch: str, train_bn: bool) -> Learner:
    x, y = _input(arch, bs=4), torch.tensor([0, 1, 2, 0])
    items = list(zip(x, y))
    dls = DataLoaders(DataLoader(items, bs=4), DataLoader(items, bs=4))
    return Learner(dls, _model(arch), loss_func=nn.CrossEntropyLoss(), splitter=splitter, train_bn=train_bn)


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_trains_only_the_head(arch):
    learn = _learner(arch, train_bn=False)
    learn.freeze()
    groups = layer_groups(learn.model)
    assert len(learn.opt.param_lists) == len(groups)
    head = {id(p) for p in groups[-1]}
    assert {id(p) for p in learn.model.parameters() if p.requires_grad} == head

    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    changed = {n for n, p in learn.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(layer_group_names(learn.model)[-1])


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_freeze_with_train_bn_also_trains_norms(arch):
    learn = _learner(arch, train_bn=True)
    learn.freeze()
    norms = {id(p) for m in learn.model.modules() if isinstance(m, norm_types) for p in m.parameters()}
    head = {id(p) for p in layer_groups(learn.model)[-1]}
    assert norms
    assert {id(p) for p in learn.model.parameters() if p.requires_grad} == head | norms


class _DDPLike(nn.Module):
    "Stands in for DistributedDataParallel, which needs a process group: the model lives in `.module`."

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_wrapped_models_give_the_same_groups():
    model = _model("test_convnext")
    expected = layer_group_names(model)
    assert layer_group_names(torch.compile(model)) == expected
    assert layer_group_names(_DDPLike(model)) == expected
    assert [[id(p) for p in g] for g in splitter(_DDPLike(model))] == [[id(p) for p in g] for g in layer_groups(model)]


def test_model_without_group_matcher_splits_body_and_head():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    assert layer_group_names(model) == [["0.weight", "0.bias", "1.weight", "1.bias"], ["5.weight", "5.bias"]]


def test_headless_timm_model_has_no_head_group():
    model = timm.create_model("test_resnet", num_classes=0)
    groups = layer_group_names(model)
    assert not any(n.startswith("fc.") for g in groups for n in g)
    assert groups[-1][0].startswith("layer4.")
