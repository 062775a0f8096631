"""Progress: one plain line per epoch where output is not a terminal, never a bar redraw; final table."""
import io

from fastlearn.learner import transfer_learner
from fastlearn.progress import EpochProgress, summary_table
from conftest import synthetic_dls


def test_plain_lines_when_not_a_terminal(capsys):
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    buf = io.StringIO()
    learn.add_cb(EpochProgress(stream=buf))
    assert not learn.cbs.filter(lambda c: type(c).__name__ == "ProgressCallback")  # fastprogress removed
    learn.fit_stage(3, 1e-3)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert all(l.startswith(f"epoch {i + 1}/3 ") and "valid_loss" in l and "accuracy" in l for i, l in enumerate(lines))
    assert "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()
    assert capsys.readouterr().out == ""        # fastai's Recorder printed nothing either
    learn.validate()                            # epoch events outside a fit: no extra line
    assert len(buf.getvalue().splitlines()) == 3


def test_summary_table_text(capsys):
    text = summary_table([{"stage": "head", "accuracy": 0.9}, {"stage": "all", "accuracy": 0.975}], title="t")
    assert "head" in text and "0.9750" in text and "\x1b" not in text


def test_piped_width_is_columns_or_80(monkeypatch):
    from fastlearn.progress import console, console_width
    monkeypatch.delenv("COLUMNS", raising=False)
    assert console_width() == 80 and console().width == 80       # not a terminal (pytest captures)
    monkeypatch.setenv("COLUMNS", "132")
    assert console_width() == 132 and console().width == 132
    monkeypatch.setenv("COLUMNS", "wide")
    assert console_width() == 80


def test_summary_table_never_cuts_a_value(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "40")
    row = {"trial": 0, "state": "complete", "lr": 3.16e-3, "wd": 1.2e-4, "drop_rate": 0.2345, "accuracy": 0.9123,
           "seconds": 12.3}
    text = summary_table([row], title="search")
    for v in ("complete", "0.0032", "1.20e-04", "0.2345", "0.9123", "12.3000"):
        assert v in text, v                                      # headers may fold, values stay whole
    assert "…" not in text
