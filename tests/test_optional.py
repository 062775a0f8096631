"""Optional dependencies: one-line errors naming the pip extra, and the extras declared in setup.cfg."""
import configparser
import re
import sys
from pathlib import Path

import pytest

from fastlearn.base.extras import EXTRAS, require
from fastlearn.base.errors import FastlearnError, MissingExtraError

ROOT = Path(__file__).resolve().parent.parent


def test_require_returns_the_module():
    import json
    assert require("json", "search") is json


def test_missing_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)            # as if optuna were not installed
    with pytest.raises(MissingExtraError) as e:
        require("optuna", "search")
    assert str(e.value) == "search needs optuna: pip install 'fastlearn[search]'"
    assert isinstance(e.value, FastlearnError) and isinstance(e.value, ImportError)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingExtraError, match=r"^wandb is not installed: pip install 'fastlearn\[wandb\]'$"):
        require("wandb", "wandb")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"^export\(format='onnx'\) needs onnxruntime: pip install "):
        require("onnxruntime", "onnx", "export(format='onnx')")


def test_unknown_extra_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown extra 'serch'"):
        require("json", "serch")


def _setup_extras() -> dict[str, set[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    return {k: {re.split(r"[<>=!~\[ ]", line.strip())[0] for line in v.strip().splitlines() if line.strip()}
            for k, v in extras.items()}


def test_extras_in_setup_cfg_match_the_messages():
    declared = _setup_extras()
    for extra, dists in EXTRAS.items():
        assert declared[extra] == set(dists), extra
    assert declared["all"] == set().union(*(set(d) for d in EXTRAS.values()))
    assert "optuna" in declared["dev"]                            # the test command installs the search extra's optuna
