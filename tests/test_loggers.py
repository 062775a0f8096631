"""Loggers: what each tool's own reader finds in the run folder is metrics.csv, epoch by epoch."""
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastlearn.base.errors import RecipeError
from fastlearn.run.loggers import EpochLogger, MissingDependencyError, MLflowLogger, check_loggers, logger_callbacks
from fastlearn.core.recipes import load_recipe

TOOLS = [n for n, mod in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb"))
         if importlib.util.find_spec(mod) is not None]
# head stage (1 epoch) -> all groups (2 epochs) -> 1 SWA epoch: the step must run on over fits and the SWA fit
RUN = {"arch": "test_resnet", "pretrained": False, "size": 32, "bs": 8, "lr": 3e-3, "head_epochs": 1, "epochs": 2,
       "unfreeze_step": 10, "swa_epochs": 1, "num_workers": 0, "checkpoint_every": 0}


def _offline(mp, tmp: Path) -> None:
    "W&B offline, silent, all its files in tmp (no network, no login prompt); MLflow into the run folder."
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp, "WANDB_CONFIG_DIR": tmp / "cfg",
                 "WANDB_CACHE_DIR": tmp / "cache", "WANDB_DATA_DIR": tmp / "data"}.items():
        mp.setenv(k, str(v))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, image_folder):
    "One tiny run with every installed logger; its run folder and metrics.csv rows."
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
    if not TOOLS:
        pytest.skip("no logger package installed (pip install 'fastlearn[tensorboard,mlflow,wandb]')")
    tmp = tmp_path_factory.mktemp("logged")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, tmp)
        learn, r = learner_from_recipe(image_folder, "transfer", {**RUN, "loggers": ["csv", *TOOLS]}, progress=False)
        run_recipe(learn, r, run_dir=tmp / "run")
    rows = list(csv.DictReader(open(tmp / "run" / "metrics.csv")))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    assert [row["stage"] for row in rows] == ["head", "all", "all", "swa"]
    return tmp / "run", rows, r


def _numeric(rows) -> dict[str, list[tuple[int, float]]]:
    "metric -> [(epoch, value)] from metrics.csv rows."
    keys = [k for k in rows[0] if k not in ("stage", "epoch")]
    return {k: [(int(row["epoch"]), float(row[k])) for row in rows] for k in keys}


def test_tensorboard_event_files_match_metrics_csv(logged_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    run_dir, rows, r = logged_run
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    expected = _numeric(rows)
    assert set(expected) == {"train_loss", "valid_loss", "accuracy", "seconds"}
    for k, series in expected.items():
        got = [(e.step, e.value) for e in ea.Scalars(k)]
        assert [s for s, _ in got] == [s for s, _ in series], k  # one point per epoch at the run's epoch
        assert [v for _, v in got] == pytest.approx([v for _, v in series], rel=1e-6), k  # float32 in the file
    stages = [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors("stage/text_summary")]
    assert stages == [(int(row["epoch"]), row["stage"]) for row in rows]
    hp = plugin_data_pb2.HParamsPluginData.FromString(ea.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    params = hp.session_start_info.hparams
    assert params["lr"].number_value == pytest.approx(r.lr) and params["arch"].string_value == "test_resnet"
    assert json.loads(params["loggers"].string_value) == ["csv", *TOOLS]


def test_mlflow_file_store_matches_metrics_csv(logged_run, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    run_dir, rows, r = logged_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    exp = client.get_experiment_by_name("fastlearn")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    for k, series in _numeric(rows).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
        assert got == series, k  # MLflow stores the float exactly
    assert run.data.params["lr"] == str(r.lr) and run.data.params["arch"] == "test_resnet"
    assert json.loads(run.data.tags["fastlearn.stage_epochs"]) == {"head": [1], "all": [2, 3], "swa": [4]}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.csv", "recipe.toml"}


def test_wandb_offline_run_matches_metrics_csv(logged_run):
    pytest.importorskip("wandb")
    run_dir, rows, r = logged_run
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's own reader of the offline transaction log (`wandb leet inspect`), one JSON record per line
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    history = [rec["history"]["item"] for rec in records if rec["type"] == "history"]
    assert [h["_step"] for h in history] == [int(row["epoch"]) for row in rows]
    for h, row in zip(history, rows):
        assert h["stage"] == row["stage"] and h["epoch"] == int(row["epoch"])
        assert {k: h[k] for k in _numeric(rows)} == {k: float(row[k]) for k in _numeric(rows)}
    config = next(rec["run"]["config"]["update"] for rec in records if rec["type"] == "run")
    assert config["lr"] == r.lr and config["arch"] == "test_resnet" and config["loggers"] == ["csv", *TOOLS]
    assert any(rec["type"] == "exit" and rec["exit"].get("exit_code", 0) == 0 for rec in records)  # finished


@pytest.mark.parametrize("loggers, words", [
    (["tensorbord"], ["unknown logger 'tensorbord'", "did you mean 'tensorboard'?", "'wandb'"]),
    (["mlflow", "mlflow"], ["['mlflow']", "more than once"]),
    ("comet", ["unknown logger 'comet'"]),
])
def test_logger_names_are_validated(loggers, words):
    with pytest.raises(RecipeError) as e:
        load_recipe("transfer", {"loggers": loggers})
    for w in words:
        assert w in str(e.value)


def test_loggers_from_the_command_line():
    from fastlearn.core.recipes import parse_overrides
    assert load_recipe("transfer", parse_overrides(["loggers=tensorboard,mlflow"])).loggers == ("tensorboard", "mlflow")
    assert load_recipe("transfer", parse_overrides(['loggers=["wandb"]'])).loggers == ("wandb",)
    assert load_recipe("transfer").loggers == ()
    r = load_recipe("transfer", {"loggers": ["csv"]})  # metrics.csv is always written: no extra callback
    assert logger_callbacks(r, "unused") == [] and 'loggers = ["csv"]' in r.to_toml()


def test_missing_package_names_the_extra_before_the_data_is_read(monkeypatch, tmp_path, capsys):
    from fastlearn.cli import main
    from fastlearn.train.learner import learner_from_recipe
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'fastlearn\[wandb\]'"):
        check_loggers(["csv", "wandb"])
    with pytest.raises(MissingDependencyError, match="wandb logger"):  # the data folder does not even exist
        learner_from_recipe(tmp_path / "nope", "transfer", {"arch": "test_resnet", "loggers": ["wandb"]})
    assert main(["train", "transfer", "--data", str(tmp_path / "nope"), "arch=test_resnet", "loggers=wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastlearn: error: the wandb logger") and "fastlearn[wandb]" in err and "\n" not in err


def test_only_the_main_process_logs(monkeypatch):
    import fastlearn.run.loggers as dist
    monkeypatch.setattr(dist, "is_main_process", lambda: False)
    assert logger_callbacks(load_recipe("transfer", {"loggers": TOOLS or ["csv"]}), "unused") == []


class _Rows(EpochLogger):
    "A logger that keeps what it is sent."

    def open(self): self.sent = []
    def log_row(self, row): self.sent.append(dict(row))
    def close(self, rows): self.closed = len(rows)


def test_without_metrics_log_the_logger_builds_the_rows(dls):
    from fastai.learner import Learner
    from torch import nn
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), loss_func=nn.CrossEntropyLoss())
    logger = _Rows(load_recipe("transfer"), "unused")
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-3, cbs=[logger])
        learn.fit(1, 1e-3, cbs=[logger])  # a second fit goes on counting epochs
    logger.finish()
    assert [row["epoch"] for row in logger.sent] == [1, 2, 3] and logger.closed == 3
    assert set(logger.sent[0]) == {"stage", "epoch", "train_loss", "valid_loss", "seconds"}
    assert logger.sent[-1]["valid_loss"] == pytest.approx(float(learn.recorder.values[-1][1]))


def test_mlflow_continues_the_run_of_a_resumed_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = load_recipe("transfer", {"loggers": ["mlflow"]})
    first, second = MLflowLogger(r, tmp_path), MLflowLogger(r, tmp_path)
    first.open()
    first.log_row({"stage": "head", "epoch": 1, "valid_loss": 0.5})  # ...the process dies here; a resume:
    second.open()
    second.log_row({"stage": "all", "epoch": 2, "valid_loss": 0.25})
    second.close([])
    assert second.run_id == first.run_id
    hist = second.client.get_metric_history(second.run_id, "valid_loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.5), (2, 0.25)]
    tags = second.client.get_run(second.run_id).data.tags
    assert json.loads(tags["fastlearn.stage_epochs"]) == {"head": [1], "all": [2]}
