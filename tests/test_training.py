"""Run orchestration: strategies as stage plans, run folders that never overwrite, outputs written."""
import csv
import json

import pytest
import torch

from fastlearn.data import default_num_workers
from fastlearn.recipes import load_recipe
from fastlearn.training import new_run_dir, stage_plan


def test_stage_plans_follow_the_2x2_table():
    r = load_recipe("transfer", {"unfreeze_step": 2, "head_epochs": 1, "unfreeze_epochs": 1, "epochs": 2})
    assert [s.n_trainable for s in stage_plan(r, 7, "linear_probe")] == [1]
    top = stage_plan(r, 7, "fine_tune_top")
    assert top[-1].n_trainable == 4 < 7                       # later groups only
    full = stage_plan(r, 7, "full")
    assert [s.n_trainable for s in full] == [1, 3, 5, 7] and full[-1].epochs == 2
    assert [s.n_trainable for s in stage_plan(r, 7, "scratch")] == [7]
    with pytest.raises(ValueError, match="unknown strategy"):
        stage_plan(r, 7, "nope")


def test_new_run_dir_never_reuses(tmp_path):
    a = new_run_dir(tmp_path, "x")
    (a / "model.safetensors").write_bytes(b"keep")
    b = new_run_dir(tmp_path, "x")
    assert a != b and (a / "model.safetensors").read_bytes() == b"keep"


def test_run_outputs(image_folder, tmp_path):
    from fastlearn.training import learner_from_recipe, run_recipe
    learn, r = learner_from_recipe(image_folder, "transfer", {"arch": "test_resnet", "pretrained": False, "size": 32,
                                                                "bs": 8, "lr": 3e-3, "epochs": 2, "health_every": 2},
                                   progress=False)
    res = run_recipe(learn, r, run_dir=tmp_path / "run")
    d = tmp_path / "run"
    rows = list(csv.DictReader(open(d / "metrics.csv")))
    assert len(rows) == sum(s["epochs"] for s in res.stages)
    assert {"stage", "train_loss", "valid_loss", "accuracy"} <= set(rows[0])
    trace = list(csv.DictReader(open(d / "trace.csv")))
    assert len(trace) == len(rows) * len(learn.dls.train)     # one row per optimizer step
    summary = json.loads((d / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(res.accuracy) and summary["strategy"] == "full"
    health = list(csv.DictReader(open(d / "health.csv")))
    assert health and {"group", "update_ratio", "grad_norm"} <= set(health[0])
    for png in ("loss.png", "schedule.png"):
        assert (d / png).stat().st_size > 10_000
    assert not (d / "lr_find.png").exists()                   # lr given: no range test
    env = json.loads((d / "environment.json").read_text())
    assert env["seed"] == r.seed and env["versions"]["torch"] and env["versions"]["fastai"]
    assert len(env["git_commit"]["fastlearn"] or "x" * 40) == 40


def test_recipe_sets_the_dataloader_workers(image_folder):
    from fastlearn.training import learner_from_recipe
    base = {"arch": "test_resnet", "pretrained": False, "size": 32, "bs": 8}
    learn, _ = learner_from_recipe(image_folder, "transfer", {**base, "num_workers": 1}, progress=False)
    # fastai keeps the worker count in the torch-side loader (its own `num_workers` is a sharding count)
    assert learn.dls.train.fake_l.num_workers == 1 and learn.dls.valid.fake_l.num_workers == 1
    learn, _ = learner_from_recipe(image_folder, "transfer", base, progress=False)
    assert learn.dls.train.fake_l.num_workers == default_num_workers()


def test_swa_switch_adds_averaged_epochs(image_folder, tmp_path):
    from fastlearn.training import learner_from_recipe, run_recipe
    learn, r = learner_from_recipe(image_folder, "transfer", {"arch": "test_resnet", "pretrained": False, "size": 32,
                                                                "bs": 8, "lr": 3e-3, "epochs": 1, "swa_epochs": 2},
                                   progress=False)
    res = run_recipe(learn, r, run_dir=tmp_path / "run")
    assert res.swa["kept"] in ("swa", "raw")
    assert res.valid_loss == pytest.approx(min(res.swa["swa_valid_loss"], res.swa["raw_valid_loss"]), rel=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [row["stage"] for row in rows].count("swa") == 2


# -- the head on cached features (pretrained body), keep-best, and a resume after the head ----------------------

LITE0 = {"size": 32, "epochs": 1, "head_steps": 40, "seed": 0}


def _feature_run(folder, run_dir, stop_after=None, resume=False, **over):
    from fastlearn.training import learner_from_recipe, run_recipe
    learn, r = learner_from_recipe(folder, "transfer", {**LITE0, **over}, progress=False)
    if stop_after:
        from test_checkpoint import StopAt
        learn.add_cb(StopAt(stop_after))
    return run_recipe(learn, r, run_dir=run_dir, resume=resume)


@pytest.fixture(scope="module")
def feature_run(image_folder, tmp_path_factory):
    return _feature_run(image_folder, tmp_path_factory.mktemp("feat") / "run")


def test_head_trains_on_cached_features_then_fine_tunes(feature_run):
    res, d = feature_run, feature_run.run_dir
    assert [s["stage"] for s in res.stages][0] == "head" and res.stages[0]["epochs"] >= 1
    assert [s["stage"] for s in res.stages][1:] and res.stages[-1]["stage"] == "all"
    assert {"features", "lr_find", "head"} <= set(res.timings) and res.timings["lr_find"] < res.seconds
    assert res.probe_accuracy == pytest.approx(res.stages[0]["accuracy"])
    assert (d / "lr_find.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(d / "metrics.csv")))
    assert rows[0]["stage"] == "head" and sum(r["stage"] == "head" for r in rows) == res.stages[0]["epochs"]
    # the recipe the run used is what it records: the batch size derived from the data
    assert "bs = " in (d / "recipe.toml").read_text() and res.recipe.bs >= 1
    # keep-best: never below a stage end it passed, and it says which weights it kept
    assert res.accuracy >= max(s["accuracy"] for s in res.stages) - 1e-9
    summary = json.loads((d / "summary.json").read_text())
    assert summary["kept"]["stage"] in {"final"} | {s["stage"] for s in res.stages} and summary["kept"]["why"]


def test_keep_best_restores_the_head_when_fine_tuning_wrecks_it(image_folder, tmp_path):
    res = _feature_run(image_folder, tmp_path / "run", ft_lr=3.0)  # an absurd fine-tuning LR
    head = res.stages[0]
    assert res.stages[-1]["accuracy"] < head["accuracy"]
    assert res.kept["stage"] == "head" and "kept" in res.kept["why"]
    assert res.accuracy == pytest.approx(head["accuracy"]) and res.valid_loss == pytest.approx(head["valid_loss"])
    from safetensors.torch import load_file
    final, kept = load_file(str(tmp_path / "run/model.safetensors")), load_file(str(tmp_path / "run/checkpoints/kept.safetensors"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)


def test_resume_after_the_head_skips_the_feature_pass_and_is_exact(image_folder, tmp_path, feature_run, monkeypatch):
    from safetensors.torch import load_file
    import fastlearn.features
    with pytest.raises(KeyboardInterrupt):
        _feature_run(image_folder, tmp_path / "run", stop_after=1)  # crashes in the first fine-tuning batch
    monkeypatch.setattr(fastlearn.features, "extract_features", lambda *a, **k: pytest.fail("feature pass re-run"))
    res = _feature_run(image_folder, tmp_path / "run", resume=True)
    a, b = load_file(str(res.run_dir / "model.safetensors")), load_file(str(feature_run.run_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (res.run_dir / "trace.csv").read_text() == (feature_run.run_dir / "trace.csv").read_text()
