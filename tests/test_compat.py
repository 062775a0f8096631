"""A recipe on the caller's own learner: each difference named, recipe.toml records what ran, raise only where it cannot."""
import warnings

import pytest
from torch import nn

from fastlearn.train.compat import Difference, LearnerRecipeWarning, differences, dls_image_size, learner_settings, reconcile
from fastlearn.base.errors import FastlearnError, RecipeMismatchError
from fastlearn.train.learner import transfer_learner
from fastlearn.core.recipes import load_recipe

SAME = {"arch": "tf_efficientnet_lite0", "opt": "adamw", "lookahead": False, "wd": 0.01, "wd_norm_bias": False,
        "loss": "ce", "label_smoothing": 0.1, "size": 64, "bs": 32}   # what the digits recipe builds


def test_a_derived_batch_size_is_not_a_difference():
    assert load_recipe("transfer").bs is None                    # derived from the number of training images
    assert "bs" not in [d.key for d in differences({**SAME, "bs": 8}, load_recipe("transfer"))]


def test_no_difference_when_the_learner_is_the_recipe():
    assert differences(SAME, load_recipe("digits", {"bs": 32})) == []
    assert differences({}, load_recipe("digits", {"bs": 32})) == []          # a learner that says nothing: nothing to compare


def test_each_difference_is_named_with_both_values():
    got = differences({**SAME, "arch": "resnet18", "opt": "sgd", "wd": 0.05, "loss": "focal",
                       "focal_gamma": 1.0, "size": 48, "bs": 8}, load_recipe("digits", {"bs": 32}))
    assert [d.key for d in got] == ["arch", "opt", "wd", "loss", "bs", "focal_gamma", "size"]
    assert str(got[0]) == "arch: learner 'resnet18', recipe 'tf_efficientnet_lite0'"
    assert str(got[-1]) == "size: learner 48, recipe 64"
    assert all(d.recordable for d in got)


def test_a_custom_loss_or_optimizer_is_named_but_not_recordable():
    got = differences({**SAME, "loss": "<MyLoss>", "opt": "<Adam>"}, load_recipe("digits", {"bs": 32}))
    assert {d.key: d.recordable for d in got} == {"opt": False, "loss": False}
    assert "(no recipe value for it)" in str(got[0])


def test_non_square_images_are_named_not_recorded():
    (d,) = differences({**SAME, "size": (48, 64)}, load_recipe("digits", {"bs": 32}))
    assert d.key == "size" and not d.recordable and "48x64 px" in str(d)


def test_raises_only_where_the_recipe_would_upsample_on_the_device():
    r = load_recipe("imagenet_rn50_16")                          # 160->192 px training, 256 px validation
    big = {"size": 256, "bs": r.bs}
    assert [d.key for d in differences(big, r)] == []            # loads at max(size, valid_size): as the recipe does
    assert differences({"size": 320}, r) == []                   # larger: the device resize shrinks, as written
    with pytest.raises(RecipeMismatchError, match=r"up to 256 px.*yield 224.*image_dls\(\.\.\., size=256\)"):
        differences({"size": 224}, r)
    assert issubclass(RecipeMismatchError, FastlearnError) and issubclass(RecipeMismatchError, ValueError)


def test_learner_settings_read_what_the_learner_was_built_with(dls):
    learn = transfer_learner(dls, "test_resnet", pretrained=False, progress=False, opt="sgd", lookahead=True,
                             wd=0.05, label_smoothing=0.1)
    s = learner_settings(learn)
    assert s == {"arch": "test_resnet", "opt": "sgd", "lookahead": True, "wd": 0.05, "wd_norm_bias": False,
                 "loss": "ce", "label_smoothing": 0.1, "size": 32, "bs": 16}     # size from one batch: no transforms
    s = learner_settings(transfer_learner(dls, "test_resnet", pretrained=False, progress=False, loss="focal",
                                          focal_gamma=1.5, wd_norm_bias=True))
    assert (s["loss"], s["focal_gamma"], s["wd_norm_bias"]) == ("focal", 1.5, True)
    learn.loss_func = nn.MSELoss()
    assert learner_settings(learn)["loss"] == "<MSELoss>"


def test_dls_size_from_the_transforms(image_folder):
    from fastlearn.data.dls import image_dls
    assert dls_image_size(image_dls(image_folder, size=24, bs=4)) == 24          # aug_transforms' batch size
    assert dls_image_size(image_dls(image_folder, size=24, bs=4, augment=False)) == 24   # the item Resize


def test_reconcile_returns_the_recipe_of_what_runs(dls):
    learn = transfer_learner(dls, "test_resnet", pretrained=False, progress=False, wd=0.05, label_smoothing=0.1)
    r = load_recipe("digits", {"bs": 32})
    with pytest.warns(LearnerRecipeWarning) as w:
        ran = reconcile(learn, r)
    msg = str(w[0].message)
    assert msg.splitlines()[1:] == ["  arch: learner 'test_resnet', recipe 'tf_efficientnet_lite0'",
                                    "  wd: learner 0.05, recipe 0.01", "  bs: learner 16, recipe 32",
                                    "  size: learner 32, recipe 64"]
    assert w[0].filename == __file__                              # points at the caller's line
    assert (ran.arch, ran.wd, ran.bs, ran.size, ran.name) == ("test_resnet", 0.05, 16, 32, "digits")
    assert "run on the caller's learner" in ran.source and "size: learner 32, recipe 64" in ran.source
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reconcile(learn, ran) is ran                       # nothing differs any more: same recipe, no warning


def test_reconcile_refuses_a_plain_fastai_learner(dls):
    from fastai.learner import Learner
    with pytest.raises(RecipeMismatchError, match="transfer_learner"):
        reconcile(Learner(dls, nn.Linear(3, 3), loss_func=nn.CrossEntropyLoss()), load_recipe("digits", {"bs": 32}))


def test_fit_preset_on_own_learner_records_what_ran_and_takes_cbs(image_folder, tmp_path):
    from fastai.callback.core import Callback
    from fastlearn.data.dls import image_dls

    class Seen(Callback):
        def __init__(self): self.fits, self.batches = 0, 0
        def before_fit(self): self.fits += 1
        def after_batch(self): self.batches += self.training

    dls = image_dls(image_folder, size=32, bs=8, flip=False)
    learn = transfer_learner(dls, "test_resnet", pretrained=False, progress=False, opt="sgd")
    seen = Seen()
    with pytest.warns(LearnerRecipeWarning, match="opt: learner 'sgd', recipe 'adamw'"):
        res = learn.fit_preset("digits", run_dir=tmp_path / "run", cbs=[seen], strategy="linear_probe",
                               head_epochs=1, epochs=1, lr=1e-3, lr_find=False,
                               head_features=False)  # the head on images: cbs see every stage (not a cached-feature head)
    ran = load_recipe(tmp_path / "run" / "recipe.toml")
    assert (ran.arch, ran.opt, ran.size, ran.bs) == ("test_resnet", "sgd", 32, 8)
    assert ran == res.recipe
    assert seen.fits == len(res.stages) and seen.batches == 2 * len(dls.train)   # every training batch
    assert seen not in learn.cbs                                  # only for this run's stages, as fit(cbs=...)


def test_difference_is_a_value():
    assert Difference("bs", 32, 8) == Difference("bs", 32, 8)
