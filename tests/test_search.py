"""Random search: space narrowing, trial split, pruning callback, and an end-to-end search on a tiny folder."""
import csv
from types import SimpleNamespace

import optuna
import pytest

from fastlearn.core.recipes import load_recipe
from fastlearn.app.search import ReportToOptuna, SearchSpace, narrow_space, search, search_main, split_trials


def test_split_trials():
    assert split_trials(8, 2) == [4, 4]
    assert split_trials(5, 2) == [3, 2]
    assert split_trials(1, 3) == [1]
    with pytest.raises(ValueError):
        split_trials(0, 2)


def test_space_validation():
    with pytest.raises(ValueError, match="lr"):
        SearchSpace(lr=(0.0, 1e-2))
    with pytest.raises(ValueError, match="drop_rate"):
        SearchSpace(drop_rate=(0.2, 1.0))
    with pytest.raises(ValueError, match="bs"):
        SearchSpace(bs=())


def test_narrow_space_around_top_trials():
    space = SearchSpace(lr=(1e-5, 1e-1), wd=(1e-6, 1e-1), bs=(16, 32, 64), drop_rate=(0.0, 0.5))
    top = [{"lr": 1e-3, "wd": 1e-4, "bs": 32, "drop_rate": 0.2}, {"lr": 4e-3, "wd": 1e-2, "bs": 64, "drop_rate": 0.05}]
    n = narrow_space(space, top)
    assert n.lr == pytest.approx((5e-4, 8e-3)) and n.wd == pytest.approx((5e-5, 2e-2))
    assert n.bs == (32, 64)
    assert n.drop_rate == pytest.approx((0.0, 0.3))          # clipped at the original low end
    edge = narrow_space(space, [{"lr": 9e-2, "wd": 1e-6, "bs": 16, "drop_rate": 0.5}])
    assert edge.lr[1] == 1e-1 and edge.wd[0] == 1e-6 and edge.drop_rate[1] == 0.5   # never outside the space
    assert narrow_space(space, []) == space


def test_report_to_optuna_prunes_a_trailing_trial():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    for v in (0.8, 0.85, 0.9):             # three trials, each the best so far at epoch 1: promoted
        t = study.ask()
        t.report(v, 1)
        assert not t.should_prune()
        study.tell(t, v)
    cb = ReportToOptuna(study.ask())
    cb.learn = SimpleNamespace(recorder=SimpleNamespace(metric_names=["epoch", "train_loss", "valid_loss",
                                                                      "accuracy", "time"],
                                                        log=[0, 1.0, 1.1, 0.3, "00:01"]))
    cb.after_epoch()                      # no training phase (Learner.validate): nothing reported
    assert cb.values == []
    cb.after_train()
    with pytest.raises(optuna.TrialPruned):
        cb.after_epoch()
    assert cb.values == [0.3]


def _folder(root):
    from conftest import write_image_folder
    return write_image_folder(root, n_per_class=12, classes=("a", "b"), size=16, valid=6)


TINY = {"arch": "test_resnet", "pretrained": False, "strategy": "scratch", "size": 16, "augment": False,
        "epochs": 2}


def test_search_end_to_end_saves_resolved_recipe(tmp_path):
    data = _folder(tmp_path / "data")
    space = SearchSpace(lr=(1e-4, 1e-2), wd=(1e-4, 1e-2), bs=(4, 8), drop_rate=(0.0, 0.3))
    res = search(data, "digits", n_trials=2, rounds=2, top_k=1, space=space, overrides=TINY,
                 out_dir=tmp_path / "out", seed=0)
    assert [r["round"] for r in res.rows] == [1, 2]
    assert all(r["state"] in ("complete", "pruned") for r in res.rows)
    done = [r for r in res.rows if r["state"] == "complete"]
    assert all(r["epochs"] == 2 for r in done) and all(0 <= r["accuracy"] <= 1 for r in done)
    assert res.best_value == max(r["accuracy"] for r in done)
    # round 2 sampled around round 1's best finished trial
    best1 = max((r for r in res.rows if r["round"] == 1 and r["state"] == "complete"), key=lambda r: r["accuracy"])
    r2 = res.rows[1]
    assert best1["lr"] / 2 * (1 - 1e-9) <= r2["lr"] <= best1["lr"] * 2 * (1 + 1e-9)
    assert r2["bs"] == best1["bs"]
    # the table as CSV, and the best configuration as a recipe file that loads back equal
    with open(res.csv_path) as f:
        assert len(list(csv.DictReader(f))) == 2
    text = res.recipe_path.read_text()
    assert "extends" not in text
    back = load_recipe(res.recipe_path)
    assert back == res.best
    best_row = next(r for r in res.rows if r["trial"] == res.best_trial)
    assert back.lr == best_row["lr"] and back.bs == best_row["bs"] and back.arch == "test_resnet"
    assert back.lr_find is False and back.flip is False      # inherited from digits (extends transfer), resolved
    assert res.epochs_run == sum(r["epochs"] for r in res.rows)


def test_search_main_prints_table_and_a_train_command_that_runs(tmp_path, capsys, monkeypatch):
    import shlex
    from fastlearn.cli import main
    data = _folder(tmp_path / "data")
    code = search_main(data, "digits", n_trials=2, rounds=1, epochs=1, prune=False, out_dir=tmp_path / "out",
                       overrides=[f"{k}={str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in TINY.items()
                                  if k != "epochs"])
    out = capsys.readouterr().out
    assert code == 0
    assert "search: 2 trials, 0 pruned, 2 epochs" in out and "best recipe:" in out
    assert load_recipe(tmp_path / "out" / "best_recipe.toml").epochs == 1
    hint = next(line for line in out.splitlines() if line.startswith("train with it: "))
    cmd = shlex.split(hint.removeprefix("train with it: "))
    assert cmd[:2] == ["fastlearn", "train"]
    monkeypatch.chdir(tmp_path)                                   # it writes ./runs
    assert main(cmd[1:]) == 0                                     # runs as printed
    (run,) = (tmp_path / "runs").iterdir()
    assert load_recipe(run / "recipe.toml") == load_recipe(tmp_path / "out" / "best_recipe.toml")


def test_search_without_optuna_or_data_creates_nothing(tmp_path, monkeypatch):
    import sys
    from fastlearn.base.errors import DataError, MissingExtraError
    with pytest.raises(DataError, match="does not exist"):
        search(tmp_path / "nope", "digits", out_dir=tmp_path / "out")
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(MissingExtraError, match=r"search needs optuna: pip install 'fastlearn\[search\]'"):
        search(_folder(tmp_path / "data"), "digits", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
