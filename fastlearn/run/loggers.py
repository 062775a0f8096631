"""Experiment loggers as a recipe key: `loggers = ["tensorboard", "mlflow", "wandb"]`.

Each logger sends exactly the rows `MetricsLog` writes to metrics.csv, one per epoch at step = the run's epoch
(which keeps increasing over the stages), plus the resolved recipe as parameters. Logs stay inside the run folder:
`tensorboard/`, `mlruns/` (MLflow file store), `wandb/` (offline unless WANDB_MODE says otherwise). "csv" names
metrics.csv itself, which is always written. Only the main process logs.

Not fastai's callbacks: they log per batch at `learn.train_iter`, which restarts on every `fit` (each stage would
overwrite the last), `WandbCallback` logs `gather_args` rather than the recipe, and there is no MLflow one. So each
tool gets a thin callback over its own writer: `SummaryWriter`, `MlflowClient`, `wandb.Run`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fastai.callback.core import Callback

from ..base.errors import MissingExtraError
from ..base.extras import require
from ..base.ranks import is_main_process
from ..core.recipes import check_logger_names, LOGGERS
from .records import MetricsLog


__all__ = ["LOGGERS", "logger_callbacks", "check_loggers", "check_logger_names", "EpochLogger", "TensorBoardLogger",
           "MLflowLogger", "WandbLogger", "MissingDependencyError"]

# logger -> (module that must import, pip extra of fastlearn that installs it)
_NEEDS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
          "wandb": ("wandb", "wandb")}
_PROSE = ("description", "source", "expected")  # recipe text, not parameters


MissingDependencyError = MissingExtraError  # an alias: one error class for every extra


def check_loggers(names) -> None:
    "Before training: each logger's package imports (else MissingDependencyError naming the extra)."
    check_logger_names(names)
    for n in names:
        if n in _NEEDS:
            require(*_NEEDS[n], f"the {n} logger (recipe key loggers = {list(names)!r})")


def logger_callbacks(recipe, run_dir: str | Path) -> list[Callback]:
    "The callbacks for `recipe.loggers`, writing into `run_dir`; none off the main process."
    check_loggers(recipe.loggers)
    if not is_main_process():
        return []
    make = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger, "wandb": WandbLogger}
    return [make[n](recipe, run_dir) for n in recipe.loggers if n in make]


def _numbers(row: dict) -> dict[str, float]:
    "The numeric columns of a metrics row (everything but stage and the epoch, which is the step)."
    return {k: float(v) for k, v in row.items() if k not in ("stage", "epoch")}


def _params(recipe) -> dict:
    "Recipe keys as flat scalars for a tool's parameter table: None as 'none', lists as JSON text."
    return {k: "none" if v is None else json.dumps(list(v)) if isinstance(v, (list, tuple)) else v
            for k, v in recipe.to_dict().items() if k not in _PROSE}


class EpochLogger(Callback):
    """Base of the loggers: hands each new row of the fit's `MetricsLog` to `log_row` (the rows a resumed run brings
    back were logged by the process that wrote them); subclasses implement `open`, `log_row` and `close` with their
    tool's own writer. `finish` (run_recipe calls it at the end) sends the epochs trained outside the logger's fits
    (SWA). Without a MetricsLog (a plain `learn.fit(..., cbs=[logger])`) it builds the rows itself."""
    order = 67  # after MetricsLog (66) has appended this epoch's row
    quiet_in_lr_find = True

    def __init__(self, recipe, run_dir: str | Path):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self._source, self._sent, self._own, self._opened, self._t0 = None, 0, [], False, 0.0

    # -- what a tool implements
    def open(self) -> None: ...
    def log_row(self, row: dict) -> None: ...
    def close(self, rows: list[dict]) -> None: ...
    def flush(self) -> None: ...

    # -- fastai events
    def before_fit(self):
        log = next((c for c in self.learn.cbs if isinstance(c, MetricsLog)), None)
        if log is not None and log is not self._source:
            self._source, self._sent = log, len(log.rows)
        if not self._opened:
            self.open()
            self._opened = True

    def before_epoch(self):
        self._t0 = time.perf_counter()

    def after_epoch(self):
        if self._source is None:  # no MetricsLog in this fit: the same row it would write
            self._own.append(MetricsLog.epoch_row(self.learn, "", len(self._own) + 1, self._t0))
        self._send_new()

    def after_fit(self):
        if self._opened:
            self.flush()

    def finish(self, learn=None) -> None:
        "Send the rows not yet logged and close the tool's run (run_recipe calls this once, at the end)."
        if not self._opened:
            return
        self._send_new()
        self.close(self._rows())
        self._opened = False

    def _rows(self) -> list[dict]:
        return self._source.rows if self._source is not None else self._own

    def _send_new(self) -> None:
        rows = self._rows()
        for row in rows[self._sent:]:
            self.log_row(row)
        self._sent = len(rows)


class TensorBoardLogger(EpochLogger):
    "Scalars per epoch (step = epoch), the stage as text, the recipe as text and as HParams, in run_dir/tensorboard."

    def open(self):
        from torch.utils.tensorboard import SummaryWriter  # lazy: optional extra (fastlearn[tensorboard])
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        toml = "\n".join("    " + line for line in self.recipe.to_toml().splitlines())  # markdown code block
        self.writer.add_text("recipe", toml, 0)

    def log_row(self, row):
        step = int(row["epoch"])
        for k, v in _numbers(row).items():
            self.writer.add_scalar(k, v, step)
        self.writer.add_text("stage", str(row["stage"]), step)

    def flush(self):
        self.writer.flush()

    def close(self, rows):
        if rows:  # the HParams table: recipe keys vs the final epoch's numbers ("hparam/" keeps them off the curves)
            final = {f"hparam/{k}": v for k, v in _numbers(rows[-1]).items()}
            self.writer.add_hparams(_params(self.recipe), final, run_name=".", global_step=int(rows[-1]["epoch"]))
        self.writer.close()


class MLflowLogger(EpochLogger):
    """Metrics per epoch (step = epoch), the recipe as params, metrics.csv and recipe.toml as artifacts, through
    `MlflowClient` into the file store run_dir/mlruns (or $MLFLOW_TRACKING_URI when set). A resumed run
    continues the MLflow run of its folder."""

    def open(self):
        # lazy: optional extra (fastlearn[mlflow])
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.run_dir / "mlruns").absolute().as_uri()
        if uri.startswith("file:"):  # mlflow 3 keeps its file store behind this switch ("maintenance mode")
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fastlearn")
        exp = self.client.get_experiment_by_name(name)
        eid = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        key, where = "fastlearn.run_dir", str(self.run_dir.absolute())
        prior = [r for r in self.client.search_runs([eid], max_results=1000) if r.data.tags.get(key) == where]
        self._stage_epochs: dict[str, list[int]] = {}
        if prior:
            self.run_id = prior[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self._stage_epochs = json.loads(prior[0].data.tags.get("fastlearn.stage_epochs", "{}"))
            return
        self.run_id = self.client.create_run(eid, run_name=self.run_dir.name, tags={key: where}).info.run_id
        params = [Param(k, str(v)) for k, v in _params(self.recipe).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_row(self, row):
        from mlflow.entities import Metric, RunTag  # lazy: optional extra (fastlearn[mlflow])
        step, ts = int(row["epoch"]), int(time.time() * 1000)
        self._stage_epochs.setdefault(str(row["stage"]), []).append(step)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in _numbers(row).items()],
                              tags=[RunTag("stage", str(row["stage"])),
                                    RunTag("fastlearn.stage_epochs", json.dumps(self._stage_epochs))])

    def close(self, rows):
        for f in ("metrics.csv", "recipe.toml"):
            if (self.run_dir / f).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / f))
        self.client.set_terminated(self.run_id, "FINISHED")


class WandbLogger(EpochLogger):
    """Each row (stage included) as one `run.log` at step = epoch, the whole recipe as the run config, in
    run_dir/wandb. Offline unless $WANDB_MODE is set (`wandb sync run_dir/wandb/offline-run-*` uploads it),
    so a run never waits on a login prompt or the network."""

    def open(self):
        import wandb  # lazy: optional extra (fastlearn[wandb])
        self.wb = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastlearn"), name=self.run_dir.name,
                             dir=str(self.run_dir), config=self.recipe.to_dict(),
                             mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new",
                             settings=wandb.Settings(console="off"))  # never wraps fastlearn's stdout

    def log_row(self, row):
        self.wb.log(dict(row), step=int(row["epoch"]))

    def close(self, rows):
        self.wb.finish()
