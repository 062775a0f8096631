"""Run orchestration: strategies as stage plans, run folders that never overwrite, outputs written."""
import csv
import json
import os

import pytest
import torch

from fastlearn.data.dls import default_num_workers
from fastlearn.core.recipes import load_recipe
from fastlearn.run.records import new_run_dir
from fastlearn.train.plan import stage_plan


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
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
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
    from fastlearn.train.learner import learner_from_recipe
    base = {"arch": "test_resnet", "pretrained": False, "size": 32, "bs": 8}
    learn, _ = learner_from_recipe(image_folder, "transfer", {**base, "num_workers": 1}, progress=False)
    # fastai keeps the worker count in the torch-side loader (its own `num_workers` is a sharding count)
    assert learn.dls.train.fake_l.num_workers == 1 and learn.dls.valid.fake_l.num_workers == 1
    learn, _ = learner_from_recipe(image_folder, "transfer", base, progress=False)
    assert learn.dls.train.fake_l.num_workers == default_num_workers()


def test_swa_switch_adds_averaged_epochs(image_folder, tmp_path):
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
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
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
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
    # keep-best: never clearly below a stage end it passed (one standard error of the validation set, at least one
    # image), and it says which weights it kept
    n = sum(json.loads((d / "data.json").read_text())["counts"]["valid"].values())
    top = max(s["accuracy"] for s in res.stages)
    assert res.accuracy >= top - max((top * (1 - top) / n) ** 0.5, 1 / n) - 1e-9
    summary = json.loads((d / "summary.json").read_text())
    assert summary["kept"]["stage"] in {"final"} | {s["stage"] for s in res.stages} and summary["kept"]["why"]


def test_a_few_images_per_class_cap_the_fine_tuning_lr_at_ft_lr_max_small(feature_run, image_folder, tmp_path,
                                                                          capsys):
    r = feature_run.recipe
    assert r.ft_lr_max_small == 1e-4 and r.small_per_class == 40 and r.ft_lr_max == 3e-4  # the transfer preset
    assert feature_run.peak_lr * r.ft_lr_factor > 3e-4, "the head's LR must be above both caps for this test"
    assert feature_run.ft_peak_lr == pytest.approx(1e-4)           # the image folder has < 40 images per class
    res = _feature_run(image_folder, tmp_path / "run", ft_lr_max_small=5e-5)
    assert res.ft_peak_lr == pytest.approx(5e-5)
    out = capsys.readouterr().out
    assert "fine-tuning LR capped at 5.0e-05 (ft_lr_max_small)" in out and "fewer than small_per_class = 40" in out


def test_keep_best_restores_the_head_when_fine_tuning_wrecks_it(image_folder, tmp_path):
    res = _feature_run(image_folder, tmp_path / "run", ft_lr=3.0, epochs=2)  # an absurd fine-tuning LR
    head = res.stages[0]
    assert res.stages[-1]["accuracy"] < head["accuracy"]
    # the stage guard: the first fine-tuning epoch was worse than the head, so nothing trained after it
    rows = list(csv.DictReader(open(tmp_path / "run/metrics.csv")))
    assert [r["stage"] for r in rows if r["stage"] != "head"] == [res.stages[1]["stage"]] and len(res.stages) == 2
    assert res.stages[1]["epochs"] == 1 < res.recipe.epochs
    assert "worse than head's" in res.stopped and json.loads((tmp_path / "run/summary.json").read_text())["stopped"]
    assert res.kept["stage"] == "head" and "kept" in res.kept["why"]
    assert res.accuracy == pytest.approx(head["accuracy"]) and res.valid_loss == pytest.approx(head["valid_loss"])
    from safetensors.torch import load_file
    final, kept = load_file(str(tmp_path / "run/model.safetensors")), load_file(str(tmp_path / "run/checkpoints/kept.safetensors"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    # finished: the last checkpoint stays, and the kept copy is model.safetensors itself (a hard link, stored once)
    from fastlearn.run.checkpoint import latest_checkpoint
    last = latest_checkpoint(tmp_path / "run").stem
    assert _names(tmp_path / "run") == [f"{last}.pt", f"{last}.safetensors", "kept.safetensors", "latest"]
    assert os.path.samefile(tmp_path / "run/model.safetensors", tmp_path / "run/checkpoints/kept.safetensors")


def test_without_the_stage_guard_every_planned_epoch_trains(image_folder, tmp_path):
    from fastlearn.train.plan import stage_plan
    res = _feature_run(image_folder, tmp_path / "run", ft_lr=3.0, epochs=2, stage_guard=False)
    planned = sum(st.epochs for st in stage_plan(res.recipe, 9, "full")[1:])
    rows = list(csv.DictReader(open(tmp_path / "run/metrics.csv")))
    assert planned >= 2 and sum(r["stage"] != "head" for r in rows) == planned and not res.stopped
    assert res.kept["stage"] == "head"  # keep-best still puts the head back at the end


def test_the_soup_mixes_the_head_stage_and_the_fine_tuned_weights(image_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    import fastlearn.train.state
    from fastlearn.core.weights import mix_weights
    from fastlearn.fit.keep import better
    from fastlearn.run.checkpoint import latest_checkpoint
    # every candidate scores 1.0 on these 12 validation images: none is *clearly* better, so the plain order (a tie
    # goes to the later candidate, the soup) lets the soup be kept and its weights checked
    monkeypatch.setattr(fastlearn.train.state, "clearly_better", lambda a, b, n: better(a, b))
    res = _feature_run(image_folder, tmp_path / "run", soup=0.5, ensemble=False, ft_bn="eval", stage_guard=False,
                       keep_checkpoints=True)
    ck = tmp_path / "run/checkpoints"
    probe, tuned = load_file(str(ck / "probe.safetensors")), load_file(str(latest_checkpoint(tmp_path / "run")
                                                                              .with_suffix(".safetensors")))
    final = load_file(str(tmp_path / "run/model.safetensors"))
    assert res.kept["stage"] == "final" and res.kept["soup"] == 0.5 and "WiSE-FT" in res.kept["why"]
    mix = mix_weights(probe, tuned, 0.5)
    assert all(torch.equal(final[k], mix[k]) for k in final)
    assert not all(torch.equal(final[k], tuned[k]) for k in final)  # not the fine-tuned weights themselves


def test_the_probe_and_the_fine_tuned_network_predict_together_from_the_run_folder(image_folder, tmp_path):
    from safetensors.torch import load_file
    from fastlearn.core.models import Ensemble, create_model
    from fastlearn.run.checkpoint import latest_checkpoint
    from fastlearn.run.export import export_run
    from fastlearn.run.predict import load_run
    res = _feature_run(image_folder, tmp_path / "run", ensemble=True, ft_bn="eval", stage_guard=False,
                       keep_checkpoints=True)
    # every candidate scores 1.0 on these 12 validation images: the ensemble, not clearly worse, is kept
    assert res.kept["stage"] == "final" and res.kept["ensemble"] and "not clearly worse" in res.kept["why"]
    ck = tmp_path / "run/checkpoints"
    probe = load_file(str(ck / "probe.safetensors"))
    tuned = load_file(str(latest_checkpoint(tmp_path / "run").with_suffix(".safetensors")))
    final = load_file(str(tmp_path / "run/model.safetensors"))
    assert all(torch.equal(final[f"members.0.{k}"], v) for k, v in probe.items())   # the probe, as the head left it
    assert all(torch.equal(final[f"members.1.{k}"], v) for k, v in tuned.items())   # the fine-tuned network
    run = load_run(tmp_path / "run", device="cpu")
    assert isinstance(run.model, Ensemble) and json.loads((tmp_path / "run/model.json").read_text())["ensemble"] == 2
    x = torch.randn(2, 3, 32, 32)
    nets = []
    for sd in (probe, tuned):
        m = create_model("tf_efficientnet_lite0", run.card["n_classes"], pretrained=False).eval()
        m.load_state_dict(sd)
        nets.append(m)
    with torch.no_grad():
        assert torch.allclose(run.model(x).softmax(-1), (nets[0](x).softmax(-1) + nets[1](x).softmax(-1)) / 2,
                              atol=1e-5)
    assert export_run(tmp_path / "run", "torchscript").max_abs_diff < 1e-4
    with pytest.raises(ValueError, match="ensemble of 2 networks.*--format onnx or --format torchscript"):
        export_run(tmp_path / "run", "timm")


def test_an_ensemble_that_loses_on_validation_leaves_the_kept_stage_as_one_network(image_folder, tmp_path):
    from fastlearn.core.models import Ensemble
    # fine-tuning at LR 3 wrecks the network: neither it nor its ensemble with the probe beats the probe
    res = _feature_run(image_folder, tmp_path / "run", ft_lr=3.0, ensemble=True, stage_guard=False)
    assert res.kept["stage"] == "head" and not json.loads((tmp_path / "run/model.json").read_text())["ensemble"]
    from fastlearn.run.predict import load_run
    assert not isinstance(load_run(tmp_path / "run", device="cpu").model, Ensemble)


def _first_steps(run_dir, n_head: int = 5) -> tuple[float, float]:
    "(the head's mean loss over its last `n_head` steps, the first fine-tuning step's loss), from trace.csv."
    rows = list(csv.DictReader(open(run_dir / "trace.csv")))
    head = [float(r["loss"]) for r in rows if r["stage"] == "head"][-n_head:]
    return sum(head) / len(head), next(float(r["loss"]) for r in rows if r["stage"] != "head")


def test_fine_tuning_starts_where_the_probe_ended_with_bn_in_inference_mode(image_folder, tmp_path):
    # the stage boundary (issue 24): the first fine-tuning step sees the features the head was fitted on when every
    # BatchNorm normalises by its running statistics; with batch statistics (train mode) the loss jumps
    over = {"augment": False, "stage_guard": False}
    _feature_run(image_folder, tmp_path / "eval", ft_bn="eval", **over)
    head, first = _first_steps(tmp_path / "eval")
    assert first < 2 * head + 0.05, (head, first)
    _feature_run(image_folder, tmp_path / "train", ft_bn="train", **over)
    head_t, first_t = _first_steps(tmp_path / "train")
    assert head_t == pytest.approx(head) and first_t > 5 * first, (first, first_t)


def test_resume_after_the_head_skips_the_feature_pass_and_is_exact(image_folder, tmp_path, feature_run, monkeypatch):
    from safetensors.torch import load_file
    import fastlearn.train.head
    with pytest.raises(KeyboardInterrupt):
        _feature_run(image_folder, tmp_path / "run", stop_after=1)  # crashes in the first fine-tuning batch
    monkeypatch.setattr(fastlearn.train.head, "extract_features", lambda *a, **k: pytest.fail("feature pass re-run"))
    res = _feature_run(image_folder, tmp_path / "run", resume=True)
    a, b = load_file(str(res.run_dir / "model.safetensors")), load_file(str(feature_run.run_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (res.run_dir / "trace.csv").read_text() == (feature_run.run_dir / "trace.csv").read_text()


def test_a_resume_after_the_head_scales_an_explicit_ft_lr_as_the_first_process_would(image_folder, tmp_path):
    over = {"ft_lr": 1e-3, "lr_ref_bs": 4}  # the recipe's fine-tuning LR, given for 4 images per step
    full = _feature_run(image_folder, tmp_path / "full", **over)
    with pytest.raises(KeyboardInterrupt):
        _feature_run(image_folder, tmp_path / "run", stop_after=1, **over)  # after the head's checkpoint
    res = _feature_run(image_folder, tmp_path / "run", resume=True, **over)
    assert res.ft_peak_lr == full.ft_peak_lr == pytest.approx(1e-3 * res.recipe.bs / 4)


# -- a finished run keeps only the checkpoint a resume or an inspection reads (issue 22) -------------------------

TINY = {"arch": "test_resnet", "pretrained": False, "lr": 1e-3, "lr_find": False, "size": 32, "bs": 16,
        "augment": False, "strategy": "scratch", "epochs": 3, "keep_last": 2}


def _tiny_run(run_dir, stop_at=None, prepare=None, **over):
    "3 epochs x 4 batches on synthetic data; checkpoints every 3 steps and at epoch ends (steps 3, 4, 6, 8, 9, 12)."
    from conftest import synthetic_dls
    from fastai.torch_core import set_seed

    from fastlearn.train.learner import transfer_learner
    from fastlearn.core.recipes import Recipe
    from fastlearn.train.runner import run_recipe
    set_seed(0, reproducible=True)
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    if stop_at:
        from test_checkpoint import StopAt
        learn.add_cb(StopAt(stop_at))
    if prepare:
        prepare(learn)
    return run_recipe(learn, Recipe(**{**TINY, **over}), run_dir=run_dir, checkpoint_steps=3)


def _names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _retained(run_dir) -> list[str]:
    "What the Checkpointer keeps while a run trains: the last `keep_last` checkpoints and the best, and `latest`."
    from fastlearn.run.checkpoint import latest_checkpoint, read_state
    st = read_state(latest_checkpoint(run_dir))
    steps = set(st["history"][-TINY["keep_last"]:]) | {st["best"][1]}
    return sorted([f"ckpt-{s}.{ext}" for s in steps for ext in ("pt", "safetensors")] + ["latest"])


def test_a_finished_run_keeps_only_its_last_checkpoint(tmp_path):
    from fastlearn.run.checkpoint import resume_state
    res = _tiny_run(tmp_path / "run")
    assert res.kept["stage"] == "final"          # keep-best's copy held a stage end that lost to the end: gone too
    assert _names(res.run_dir) == ["ckpt-12.pt", "ckpt-12.safetensors", "latest"]
    st = resume_state(res.run_dir, res.recipe)   # the last checkpoint still loads, for a resume or a look
    assert st.step == 12 and st.stage_done
    everything = _tiny_run(tmp_path / "all", keep_checkpoints=True)
    assert _names(everything.run_dir) == sorted(_retained(everything.run_dir) + ["kept.safetensors"])
    assert len(_names(everything.run_dir)) >= 6  # at least two checkpoints and keep-best's copy


@pytest.mark.parametrize("how", ["interrupted", "failed"])
def test_an_interrupted_or_failed_run_deletes_no_checkpoint(tmp_path, monkeypatch, how):
    import importlib
    interpret = importlib.import_module("fastlearn.train.runner")  # where the run calls interpret_run
    if how == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            _tiny_run(tmp_path / "run", stop_at=10)  # in epoch 3: checkpoints at 8 and 9, and the best
        assert _names(tmp_path / "run") == _retained(tmp_path / "run")
    else:
        def fail(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(interpret, "interpret_run", fail)  # the run's last output fails
        with pytest.raises(OSError, match="No space"):
            _tiny_run(tmp_path / "run")
        assert _names(tmp_path / "run") == sorted(_retained(tmp_path / "run") + ["kept.safetensors"])
    assert len(_names(tmp_path / "run")) >= 5


def test_the_run_says_why_start_equals_peak(tmp_path, capsys):
    from fastlearn.core.lr_finder import LRFindResult
    found = LRFindResult(peak=1e-3, start=1e-3, lrs=[1e-4, 1e-3], losses=[1.0, 0.9], note="start = peak: why")

    def fake_sweep(learn):
        learn.find_lr = lambda num_it, plot: found
    _tiny_run(tmp_path / "run", prepare=fake_sweep, lr=None, lr_find=True, epochs=1)
    assert "lr_find: peak 1.00e-03, start 1.00e-03\nlr_find: start = peak: why\n" in capsys.readouterr().out
