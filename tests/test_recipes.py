"""Recipes: every file validates and runs (scaled down); broken recipes fail with the key named."""

import numpy as np

import pytest

from fastlearn.base.errors import RecipeError
from fastlearn.core.recipes import list_recipes, load_recipe, parse_overrides

RECIPES = sorted(list_recipes())


def test_recipes_found():
    assert {"transfer", "digits", "linear_probe", "fine_tune_top", "full_fine_tune", "auto",
            "imagenet_rn50_16", "imagenet_rn50_32", "imagenet_rn50_88", "imagenet_rn18_16", "imagenet_rn18_88",
            "imagenette_5ep_128"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_validates_and_states_its_evidence(name):
    r = load_recipe(name)
    assert r.name == name
    assert r.description and r.expected, f"{name} must say what it is for and what it reaches"
    if name.startswith("imagenet_"):
        assert "ffcv" in r.source.lower() and r.label_smoothing == 0.1 and not r.wd_norm_bias
        assert r.resize_start == 160 and r.size == 192 and r.valid_size == 256 and r.lr_ref_bs


def test_extends_inherits_and_overrides():
    d = load_recipe("digits")
    t = load_recipe("transfer")
    assert d.size == 64 and not d.flip and d.opt == t.opt and d.lr_ratio == t.lr_ratio
    rn18 = load_recipe("imagenet_rn18_16")  # two levels: rn18_16 -> rn18_88 -> rn50_88
    assert (rn18.arch, rn18.epochs, rn18.lr, rn18.label_smoothing) == ("resnet18", 16, 0.5, 0.1)


def test_keep_checkpoints_is_off_by_default_and_set_like_any_key():
    "Issue 22: a finished run prunes its checkpoints unless the recipe keeps them all."
    assert load_recipe("transfer").keep_checkpoints is False
    assert load_recipe("transfer", ["keep_checkpoints=true"]).keep_checkpoints is True
    assert "keep_checkpoints = false" in load_recipe("transfer").to_toml()


def test_overrides_from_code_and_command_line():
    r = load_recipe("digits", ["lr=3e-3", "epochs=5", "moms=[0.9, 0.8]", "flip=true", "drop_rate=none"])
    assert (r.lr, r.epochs, r.moms, r.flip, r.drop_rate) == (3e-3, 5, (0.9, 0.8), True, None)
    assert load_recipe("digits", {"bs": 7}).bs == 7
    assert parse_overrides(["arch=resnet18", "size=128"]) == {"arch": "resnet18", "size": 128}


@pytest.mark.parametrize("override, words", [
    ({"lrr": 1e-3}, ["unknown recipe key 'lrr'", "did you mean 'lr'?", "`fastlearn recipes transfer`"]),
    ({"strategy": "ful"}, ["key 'strategy' = 'ful' is not one of 'linear_probe', 'fine_tune_top', 'full', 'auto', "
                           "'scratch'; did you mean 'full'?"]),
    ({"strategy": 3}, ["'strategy' = 3 has the wrong type"]),
    ({"lr": -1e-3}, ["'lr'", "-0.001", "> 0"]),
    ({"pct_start": 1.5}, ["'pct_start'", "1.5", "(0, 1)"]),
    ({"bs": "big"}, ["'bs'", "'big'", "integer"]),
    ({"opt": "adamax"}, ["'opt'", "adamax", "'adamw'"]),
    ({"resize_start": 256, "size": 128}, ["'size' = 128", "'resize_start' = 256"]),
    ({"strategy": "yolo"}, ["'strategy'", "linear_probe"]),
    ({"loss": "focal", "label_smoothing": 0.1}, ["'focal'", "label_smoothing"]),
    ({"loss": "hinge"}, ["'loss'", "'weighted_ce'"]),
    ({"keep_checkpoints": "yes"}, ["'keep_checkpoints' = 'yes' has the wrong type"]),
])
def test_bad_values_name_the_key_value_and_choices(override, words):
    with pytest.raises(RecipeError) as e:
        load_recipe("transfer", override)
    for w in words:
        assert w in str(e.value)


def test_broken_recipe_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "transfer"\nepochz = 3\n')
    with pytest.raises(RecipeError, match="'epochz' \\(did you mean 'epochs'"):
        load_recipe(bad)
    (tmp_path / "syntax.toml").write_text("lr = = 1")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(tmp_path / "syntax.toml")
    with pytest.raises(RecipeError, match="unknown recipe 'trasnfer'.*Did you mean transfer"):
        load_recipe("trasnfer")


def test_unknown_key_names_close_keys_not_every_key():
    with pytest.raises(RecipeError) as e:
        load_recipe("digits", {"foo": 1})
    msg = str(e.value)
    assert msg == ("override: unknown recipe key 'foo' (no key is close); every key, with its value: "
                   "`fastlearn recipes digits`")
    with pytest.raises(RecipeError, match=r"'epochz' \(did you mean 'epochs' or 'swa_epochs'\?\) \(and 1 more "
                                          r"unknown: 'bar'\)"):
        load_recipe("digits", {"epochz": 3, "bar": 1})


def test_recipes_dirs_env_first_and_package_data(tmp_path, monkeypatch):
    from fastlearn.core import recipes as rmod
    (tmp_path / "digits.toml").write_text('extends = "transfer"\ndescription = "mine"\nexpected = "x"\n')
    monkeypatch.setenv("FASTLEARN_RECIPES", str(tmp_path))
    assert rmod.recipe_dirs()[0] == tmp_path
    assert load_recipe("digits").description == "mine"           # first folder wins
    assert load_recipe("linear_probe").strategy == "linear_probe"  # the rest still found
    monkeypatch.delenv("FASTLEARN_RECIPES")
    # a source checkout has no fastlearn/presets: recipes come from the repository's recipes/ (tests/test_packaging.py
    # installs a wheel, where they come from the package data)
    assert rmod._packaged_recipes() is None and rmod.recipe_dirs()[-1].name == "recipes"


def test_recipe_is_frozen_and_round_trips(tmp_path):
    r = load_recipe("imagenet_rn50_88")
    with pytest.raises(Exception):
        r.lr = 1.0
    p = r.save(tmp_path / "resolved.toml")
    assert load_recipe(p) == r


def scaled_down(name: str) -> dict:
    "Same recipe structure, tiny numbers: a timm test model, 32 px, one epoch per stage."
    r = load_recipe(name)
    o = {"arch": "test_resnet", "pretrained": False, "size": 32, "bs": 8, "head_epochs": 1,
         "unfreeze_epochs": 1, "epochs": 1, "lr_ref_bs": None}
    if r.resize_start:
        o.update(resize_start=16, resize_multiple=8)
    if r.valid_size:
        o["valid_size"] = 32
    if r.lr_find and r.lr is None:
        o["lr"] = 1e-3  # the range test has its own tests; keep this one about the recipe's structure
    return o


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_scaled_down(name, image_folder, tmp_path):
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
    learn, r = learner_from_recipe(image_folder, name, scaled_down(name), progress=False)
    res = run_recipe(learn, r, run_dir=tmp_path / "run")
    assert res.strategy in {"linear_probe", "fine_tune_top", "full", "scratch"}
    assert 0.0 <= res.accuracy <= 1.0
    for f in ("recipe.toml", "metrics.csv", "trace.csv", "model.safetensors", "summary.json"):
        assert (tmp_path / "run" / f).exists(), f
    assert load_recipe(tmp_path / "run" / "recipe.toml") == r


@pytest.mark.parametrize("switches", [
    {"rand_augment": "rand-m9-mstd0.5", "loss": "weighted_ce", "label_smoothing": 0.1, "mixup": 0.4, "ema": True},
    {"loss": "focal", "cutmix": 1.0, "grad_clip": 1.0, "grad_accum": 2, "drop_path": 0.1, "opt": "sgd_nesterov",
     "lookahead": True, "early_stop": 1, "random_erasing": 0.25},
])
def test_regulariser_switches_run(switches, image_folder, tmp_path):
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
    o = {**scaled_down("transfer"), **switches}
    learn, r = learner_from_recipe(image_folder, "transfer", o, progress=False)
    res = run_recipe(learn, r, run_dir=tmp_path / "run")
    assert np.isfinite(res.valid_loss) and 0 <= res.accuracy <= 1


def test_the_soup_and_the_ensemble_are_one_choice():
    assert load_recipe("transfer").ensemble and load_recipe("transfer", {"soup": 0.5, "ensemble": False}).soup == 0.5
    with pytest.raises(RecipeError, match="'soup' = 0.5 and 'ensemble' = true both combine the probe.*set "
                                          "ensemble = false to use the soup"):
        load_recipe("transfer", {"soup": 0.5})
