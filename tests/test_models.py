"""Tests of fastlearn.models: offline ImageNet weights, timm-name checks, local weights files, head checks."""
import time

import numpy as np
import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from skimage import data as skdata
from skimage.transform import resize

from fastlearn.core import models
from fastlearn.base.errors import LabelRangeError, UnknownArchError, WeightsError
from fastlearn.core.models import OFFLINE_WEIGHTS, check_head, create_model, has_depthwise_bn, is_convolutional, load_offline_weights, model_input_size, model_n_out, model_stats, offline_weights_path

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0_imagenet():
    "tf_efficientnet_lite0 with the offline ImageNet weights and its original 1000-class head, in eval mode."
    return create_model(LITE0, n_out=None, pretrained=True).eval()


def _batch(img: np.ndarray, arch: str) -> torch.Tensor:
    "One image, resized to the arch's input size and normalised with the stats its weights were trained with."
    size = model_input_size(arch)
    x = resize(img, (size, size), anti_aliasing=True)  # float64 in [0, 1]
    mean, std = model_stats(arch)
    x = (x - np.array(mean)) / np.array(std)
    return torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name,imagenet_class", [("chelsea", 285), ("coffee", 967)])  # Egyptian cat, espresso
def test_offline_lite0_weights_classify_imagenet_images(lite0_imagenet, name, imagenet_class):
    with torch.no_grad():
        logits = lite0_imagenet(_batch(getattr(skdata, name)(), LITE0))
    assert logits.shape == (1, 1000)
    assert logits.argmax(-1).item() == imagenet_class


def test_offline_weights_file_is_found_and_only_for_lite0():
    path = offline_weights_path(LITE0)
    assert path is not None and path.is_file() and path.suffix == ".pth"
    assert offline_weights_path("resnet18") is None
    assert set(OFFLINE_WEIGHTS) == {LITE0}


def test_new_head_keeps_pretrained_body():
    model = create_model(LITE0, n_out=5, pretrained=True)
    src = torch.load(offline_weights_path(LITE0), map_location="cpu", weights_only=True)
    assert torch.equal(model.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, src["_bn1.running_var"])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_load_offline_weights_rejects_a_different_model():
    with pytest.raises(WeightsError, match="tensors but the model has"):
        load_offline_weights(timm.create_model("test_efficientnet"), LITE0)
    with pytest.raises(WeightsError, match="no offline weights for 'test_resnet'"):
        load_offline_weights(timm.create_model("test_resnet"), "test_resnet")


def test_unknown_arch_suggests_close_names_before_building(monkeypatch):
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("built a model for an unknown arch"))
    with pytest.raises(UnknownArchError, match=r"'resnt18'.*did you mean.*'resnet18'"):
        create_model("resnt18", n_out=3)
    with pytest.raises(UnknownArchError):
        model_stats("not_a_model_at_all")


def test_pretrained_without_offline_weights_fails_fast_offline(monkeypatch):
    real = timm.create_model

    def offline_create(arch, pretrained=False, **kwargs):
        if pretrained:  # what timm raises when huggingface.co cannot be reached
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        return real(arch, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"'test_resnet' could not be downloaded.*pretrained=False.*weights=.*"
                                           r"tf_efficientnet_lite0") as err:
        create_model("test_resnet", n_out=3, pretrained=True)
    assert isinstance(err.value.__cause__, LocalEntryNotFoundError)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("arch,n_out", [("test_resnet", 7), ("test_vit", 2), ("test_efficientnet", 1)])
def test_head_has_n_out_outputs(arch, n_out):
    model = create_model(arch, n_out=n_out, pretrained=False, drop_rate=0.1, drop_path_rate=0.05)
    size = model_input_size(arch)
    assert model(torch.randn(2, 3, size, size)).shape == (2, n_out)
    assert model_n_out(model) == n_out


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_n_out_must_be_positive(bad):
    with pytest.raises(ValueError, match=f"n_out={bad!r}"):
        create_model("test_resnet", n_out=bad, pretrained=False)


def test_drop_rate_must_be_a_probability():
    with pytest.raises(ValueError, match="drop_path_rate=1.5"):
        create_model("test_resnet", n_out=2, pretrained=False, drop_path_rate=1.5)


def test_model_stats_and_input_size():
    assert model_stats(LITE0) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert model_stats("resnet18") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert model_input_size(LITE0) == 224
    assert model_input_size("test_resnet") == 160


def test_has_depthwise_bn_is_the_inverted_residual_family():
    assert has_depthwise_bn(timm.create_model("test_efficientnet"))        # depthwise convs + BatchNorm
    assert not has_depthwise_bn(timm.create_model("test_resnet"))          # BatchNorm, no depthwise conv
    assert not has_depthwise_bn(timm.create_model("test_convnext"))        # depthwise convs, LayerNorm


def test_is_convolutional():
    assert is_convolutional(timm.create_model("test_resnet"))
    assert is_convolutional(timm.create_model("test_convnext"))
    assert not is_convolutional(timm.create_model("test_vit"))  # has a Conv2d patch embed, but attention blocks


def test_check_head_rejects_more_classes_than_outputs():
    model = create_model("test_resnet", n_out=3, pretrained=False)
    check_head(model, 3)
    check_head(model, 2)
    with pytest.raises(LabelRangeError, match=r"5 classes.*only 3 outputs.*n_out=5"):
        check_head(model, 5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip(tmp_path, suffix):
    src = create_model("test_resnet", n_out=4, pretrained=False).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    x = torch.randn(2, 3, 64, 64)

    same = create_model("test_resnet", n_out=None, pretrained=True, weights=path).eval()  # keeps the file's head
    with torch.no_grad():
        assert torch.equal(same(x), src(x))

    rehead = create_model("test_resnet", n_out=2, weights=path)
    assert torch.equal(rehead.conv1[0].weight, src.conv1[0].weight)
    assert rehead.fc.out_features == 2


def test_weights_file_for_another_arch_is_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit this architecture"):
        create_model("test_efficientnet", n_out=2, weights=path)
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("test_resnet", n_out=2, weights=tmp_path / "missing.pth")


class _Evil:
    "A pickle payload that writes a file when unpickled without weights_only."

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({self.marker!r}).write_text('pwned')",)


def test_malicious_pickle_weights_do_not_run(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.0.weight": _Evil(marker)}, path)
    with pytest.raises(WeightsError, match="plain tensor state_dict"):
        create_model("test_resnet", n_out=2, weights=path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proves the file really is a payload: unsafe loading runs it
    assert marker.read_text() == "pwned"


def test_models_module_exports_only_what_it_defines():
    assert all(hasattr(models, name) for name in models.__all__)


def test_an_ensemble_outputs_the_logits_of_its_members_mean_probabilities():
    from fastlearn.core.models import Ensemble, model_n_out
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    ens = Ensemble([a, b])
    mean = (a(x).softmax(-1) + b(x).softmax(-1)) / 2
    assert torch.allclose(ens(x).softmax(-1), mean, atol=1e-6) and torch.allclose(ens(x).exp().sum(-1), torch.ones(5))
    multi = Ensemble([a, b], multi_label=True)
    assert torch.allclose(multi(x).sigmoid(), (a(x).sigmoid() + b(x).sigmoid()) / 2, atol=1e-5)
    assert model_n_out(Ensemble([create_model("test_resnet", 7, pretrained=False)] * 2)) == 7
