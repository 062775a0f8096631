"""Health monitor: update/weight ratio and gradient norms per layer group, warnings for a bad LR."""
import csv
import math
import warnings

import pytest
import torch

from conftest import synthetic_dls
from fastlearn.fit.health import HealthMonitor, HealthWarning, health_problems, update_ratio
from fastlearn.train.learner import transfer_learner


def _row(ratio=1e-3, grad=1.0, group="2", lr=1e-3):
    return {"group": group, "lr": lr, "grad_norm": grad, "update_ratio": ratio}


def test_update_ratio():
    before = [torch.ones(4), torch.zeros(3)]
    after = [torch.ones(4) * 1.5, torch.zeros(3)]
    r, w = update_ratio(before, after)
    assert w == pytest.approx(2.0) and r == pytest.approx(0.5)        # ||0.5 * 1_4|| = 1, ||1_4|| = 2
    assert update_ratio([torch.zeros(2)], [torch.zeros(2)]) == (0.0, 0.0)
    assert update_ratio([torch.zeros(2)], [torch.ones(2)])[0] == math.inf


@pytest.mark.parametrize("row,kinds", [
    (_row(), []),
    (_row(ratio=0.5), ["ratio_high"]),
    (_row(ratio=1e-7), ["ratio_low"]),
    (_row(grad=1e-10), ["grad_vanish"]),
    (_row(grad=1e5), ["grad_explode"]),
    (_row(ratio=0.5, grad=1e5), ["ratio_high", "grad_explode"]),
    (_row(grad=float("nan")), ["non_finite"]),
])
def test_health_problems(row, kinds):
    assert [k for k, _ in health_problems(row)] == kinds


def _fit(lr, tmp_path=None, epochs=2, **kw):
    torch.manual_seed(0)
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    learn.freeze_top(-1)
    mon = HealthMonitor(every=1, csv_path=None if tmp_path is None else tmp_path / "health.csv", **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit(epochs, lr, cbs=[mon])
    return learn, mon, [w for w in caught if issubclass(w.category, HealthWarning)]


def test_healthy_lr_no_warning_and_csv(tmp_path):
    learn, mon, warned = _fit(1e-3, tmp_path)
    assert not warned and not mon.problems
    groups = {r["group"] for r in mon.rows}
    assert groups == {str(i) for i in range(learn.n_layer_groups)}   # decay/no-decay merged per layer group
    steps = len(learn.dls.train) * 2
    assert len(mon.rows) == steps * len(groups)
    ratios = [r["update_ratio"] for r in mon.rows]
    assert all(1e-5 < v < 1e-1 for v in ratios), (min(ratios), max(ratios))
    assert all(r["images_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 for r in mon.rows)
    with open(tmp_path / "health.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(mon.rows) and float(rows[0]["update_ratio"]) == pytest.approx(mon.rows[0]["update_ratio"])


def test_lr_100x_too_high_warns():
    _, mon, warned = _fit(1e-1)
    assert any(k == "ratio_high" for k, _ in mon.problems)
    assert warned and "lower the LR" in str(warned[0].message)
    assert len(warned) == len(mon.problems)                # each problem and group once, not every step


def test_lr_zero_warns_updates_vanish():
    _, mon, warned = _fit(0.0)
    assert {k for k, _ in mon.problems} == {"ratio_low"}
    assert all(r["update_ratio"] == 0.0 for r in mon.rows)
    assert warned


def test_patience_and_every():
    _, mon, _ = _fit(1e-1, epochs=1, patience=100, warn=False)
    assert not mon.problems                                # never lasted 100 measurements
    torch.manual_seed(0)
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    mon = HealthMonitor(every=2, warn=False)
    learn.fit(1, 1e-3, cbs=[mon])
    assert sorted({r["step"] for r in mon.rows}) == list(range(0, len(learn.dls.train), 2))
    with pytest.raises(ValueError, match="every"):
        HealthMonitor(every=0)
