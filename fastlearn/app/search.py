"""Random search over a recipe's LR, weight decay, batch size and dropout, with early pruning, in two rounds.

Bergstra & Bengio 2012: random search beats a grid when few hyper-parameters matter. Each trial runs the recipe
(`run_recipe`, LR given, so no lr_find) and reports validation accuracy after every epoch to optuna, whose
successive-halving pruner stops trials that trail at the same epoch. Round 1 samples the wide `SearchSpace`,
round 2 a space narrowed around round 1's best trials. The trials go to a table and `search.csv`; the best
configuration is saved as a fully resolved recipe (`best_recipe.toml`) that `load_recipe(path)` reads back unchanged.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastai.callback.core import Callback

from ..base.extras import require
from ..base.progress import epoch_metrics, summary_table
from ..core.models import check_arch
from ..core.recipes import load_recipe, parse_overrides, Recipe
from ..data.folders import check_image_folder
from ..data.samples import is_sample_name
from ..train.learner import learner_from_recipe
from ..train.runner import run_recipe


__all__ = ["SearchSpace", "SearchResult", "search", "search_main", "narrow_space", "split_trials"]


@dataclass(frozen=True)
class SearchSpace:
    "Ranges sampled per trial: LR and weight decay log-uniform, dropout uniform, batch size from a list."
    lr: tuple[float, float] = (1e-4, 3e-2)          # peak LR of the one-cycle
    wd: tuple[float, float] = (1e-5, 1e-1)          # decoupled weight decay
    bs: tuple[int, ...] = (16, 32, 64)              # per-device batch size
    drop_rate: tuple[float, float] = (0.0, 0.5)     # classifier dropout probability

    def __post_init__(self):
        for name in ("lr", "wd"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"search space {name}={getattr(self, name)!r}: need 0 < low <= high (log scale)")
        lo, hi = self.drop_rate
        if not 0 <= lo <= hi < 1:
            raise ValueError(f"search space drop_rate={self.drop_rate!r}: need 0 <= low <= high < 1")
        if not self.bs or any(b < 1 for b in self.bs):
            raise ValueError(f"search space bs={self.bs!r}: need a non-empty list of batch sizes >= 1")

    def sample(self, trial, rnd: int = 1) -> dict:
        "One configuration from an optuna trial (keys are recipe keys), in search round `rnd`."
        # optuna allows a float range to change between trials but not a categorical's choices
        bs_name = "bs" if rnd == 1 else f"bs_round{rnd}"
        return {"lr": trial.suggest_float("lr", *self.lr, log=True),
                "wd": trial.suggest_float("wd", *self.wd, log=True),
                "bs": int(trial.suggest_categorical(bs_name, list(self.bs))),
                "drop_rate": trial.suggest_float("drop_rate", *self.drop_rate)}


def narrow_space(space: SearchSpace, top: list[dict], factor: float = 2.0) -> SearchSpace:
    """The space around the best configurations: LR and wd from the top trials' min / `factor` to
    max * `factor` (inside the original range), their batch sizes, dropout +-0.1 around theirs."""
    if not top:
        return space

    def log_range(key: str) -> tuple[float, float]:
        lo, hi = min(t[key] for t in top) / factor, max(t[key] for t in top) * factor
        return max(lo, getattr(space, key)[0]), min(hi, getattr(space, key)[1])
    d_lo = max(space.drop_rate[0], min(t["drop_rate"] for t in top) - 0.1)
    d_hi = min(space.drop_rate[1], max(t["drop_rate"] for t in top) + 0.1)
    return SearchSpace(lr=log_range("lr"), wd=log_range("wd"), bs=tuple(sorted({int(t["bs"]) for t in top})),
                       drop_rate=(d_lo, d_hi))


def split_trials(n_trials: int, rounds: int) -> list[int]:
    "Trials per round: as even as possible, earlier rounds get the remainder (round 1 explores)."
    if n_trials < 1 or rounds < 1:
        raise ValueError(f"n_trials={n_trials} and rounds={rounds} must both be >= 1")
    rounds = min(rounds, n_trials)
    return [n_trials // rounds + (1 if i < n_trials % rounds else 0) for i in range(rounds)]


class ReportToOptuna(Callback):
    "After each epoch: report the validation metric to the optuna trial and stop the run if it is pruned."
    order = 67   # after Recorder (50) has logged the epoch

    def __init__(self, trial, metric: str = "accuracy"):
        self.trial, self.metric, self.values, self._trained = trial, metric, [], False

    def after_train(self):
        self._trained = True

    def after_epoch(self):
        import optuna  # lazy: optional extra (fastlearn[search])
        if not self._trained:   # Learner.validate() fires after_epoch too, with no training phase
            return
        self._trained = False
        vals = epoch_metrics(self.learn.recorder)
        if self.metric not in vals:
            raise ValueError(f"metric {self.metric!r} is not logged; logged: {', '.join(vals)}")
        self.values.append(float(vals[self.metric]))
        self.trial.report(self.values[-1], len(self.values))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {self.values[-1]:.4f} at epoch {len(self.values)}")


@dataclass
class SearchResult:
    "The search's trials, its best configuration as a recipe, and where they were written."
    best: Recipe = field(repr=False)
    best_value: float
    best_trial: int
    rows: list[dict] = field(repr=False)
    csv_path: Path | None
    recipe_path: Path | None
    seconds: float
    n_pruned: int
    epochs_run: int           # epochs trained over all trials (the cost pruning saves)


def _row(number: int, rnd: int, state: str, params: dict, values: list[float], seconds: float) -> dict:
    return {"trial": number, "round": rnd, "state": state, "lr": params["lr"], "wd": params["wd"],
            "bs": params["bs"], "drop_rate": params["drop_rate"], "epochs": len(values),
            "accuracy": values[-1] if values else math.nan, "seconds": round(seconds, 1)}


def _run_rounds(study, data, base: Recipe, space: SearchSpace, n_trials: int, rounds: int, top_k: int,
                metric: str, quiet: bool, trials_dir: Path, rows: list[dict]) -> None:
    "Run the trials round by round, appending one row per trial to `rows`."
    import optuna  # lazy: optional extra (fastlearn[search])
    cur = space
    for rnd, n in enumerate(split_trials(n_trials, rounds), start=1):
        if rnd > 1:
            done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: -r["accuracy"])
            cur = narrow_space(space, done[:top_k])
        for _ in range(n):
            trial = study.ask()
            params = cur.sample(trial, rnd)
            ts = time.perf_counter()
            report = ReportToOptuna(trial, metric)
            with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                learn, r = learner_from_recipe(data, base, {**params, "lr_find": False}, progress=not quiet)
                learn.add_cb(report)
                try:
                    res = run_recipe(learn, r, run_dir=trials_dir / f"trial-{trial.number:03d}")
                    value = res.accuracy if metric == "accuracy" else report.values[-1]
                    study.tell(trial, value)
                    state, values = "complete", report.values[:-1] + [value]
                except optuna.TrialPruned:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    state, values = "pruned", report.values
            rows.append(_row(trial.number, rnd, state, params, values, time.perf_counter() - ts))


def search(data, recipe="digits", n_trials: int = 8, rounds: int = 2, top_k: int = 3,
           space: SearchSpace | None = None, overrides: dict | list[str] | None = None, prune: bool = True,
           out_dir: str | Path | None = "runs/search", seed: int = 0, metric: str = "accuracy",
           quiet: bool = True) -> SearchResult:
    """Random search over `space` for recipe `recipe` on `data` (a folder or a sample name), maximising the
    validation `metric`; `n_trials` split over `rounds`, each later round narrowed around the `top_k`
    finished trials so far. `overrides` (e.g. a shorter `epochs`) apply to every trial. With `out_dir`,
    trials run in `out_dir/trials/` and `search.csv` and `best_recipe.toml` are written there (None: a
    temporary folder, nothing kept)."""
    base = load_recipe(recipe, overrides)  # everything checked as each trial would, before any compute or folder
    check_arch(base.arch)
    if not is_sample_name(str(data)) or Path(data).exists():  # a sample name means the bundled sample
        check_image_folder(data, bad_images=base.bad_images)
    optuna = require("optuna", "search")
    space = space or SearchSpace()
    out = Path(out_dir) if out_dir is not None else None
    tmp = tempfile.TemporaryDirectory(prefix="fastlearn-search-") if out is None else None
    trials_dir = Path(tmp.name) if tmp is not None else out / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3) if prune \
        else optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed), pruner=pruner)
    rows, t0 = [], time.perf_counter()
    try:
        _run_rounds(study, data, base, space, n_trials, rounds, top_k, metric, quiet, trials_dir, rows)
    finally:
        if tmp is not None:
            tmp.cleanup()
    done = [r for r in rows if r["state"] == "complete"]
    if not done:
        raise RuntimeError("every trial was pruned; run more trials or pass prune=False")
    best_row = max(done, key=lambda r: r["accuracy"])
    best = load_recipe(base, {k: best_row[k] for k in ("lr", "wd", "bs", "drop_rate")} | {
        "lr_find": False, "name": f"{base.name}-searched",
        "description": f"{base.name} with LR, wd, bs and dropout from a random search ({len(rows)} trials)",
        "source": f"fastlearn search: trial {best_row['trial']} of {len(rows)}, seed {seed}",
        "expected": f"validation {metric} {best_row['accuracy']:.4f} in the search"})
    csv_path = recipe_path = None
    if out is not None:
        csv_path = out / "search.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        recipe_path = best.save(out / "best_recipe.toml")
    return SearchResult(best, best_row["accuracy"], best_row["trial"], rows, csv_path, recipe_path,
                        time.perf_counter() - t0, sum(r["state"] == "pruned" for r in rows),
                        sum(r["epochs"] for r in rows))


def search_main(data, recipe="digits", n_trials: int = 8, rounds: int = 2, epochs: int | None = None,
                prune: bool = True, out_dir: str | Path = "runs/search", seed: int = 0,
                overrides: dict | list[str] | None = None) -> int:
    "CLI entry: run `search`, print the trials as a table and where the best recipe went; exit code 0."
    ov = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else dict(overrides or {})
    if epochs is not None:
        ov["epochs"] = epochs
    res = search(data, recipe, n_trials, rounds, overrides=ov, prune=prune, out_dir=out_dir, seed=seed)
    summary_table(res.rows, title=f"search: {len(res.rows)} trials, {res.n_pruned} pruned, "
                                  f"{res.epochs_run} epochs in {res.seconds:.0f}s")
    print(f"best: trial {res.best_trial}, accuracy {res.best_value:.4f}, lr {res.best.lr:.3g}, wd {res.best.wd:.3g}, "
          f"bs {res.best.bs}, drop_rate {res.best.drop_rate}", flush=True)
    print(f"trials: {res.csv_path}\nbest recipe: {res.recipe_path}\ntrain with it: fastlearn train "
          f"{shlex.quote(str(res.recipe_path))} --data {shlex.quote(str(data))}", flush=True)
    return 0
