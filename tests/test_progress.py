"""Progress: one plain line per epoch where output is not a terminal, never a bar redraw; final table."""
import io

from fastlearn.train.learner import transfer_learner
from fastlearn.base.progress import EpochProgress, summary_table
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
    from fastlearn.base.console import console, console_width
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
    for v in ("complete", "0.0032", "1.20e-04", "0.2345", "0.9123", "12.3"):
        assert v in text, v                                      # headers may fold, values stay whole
    assert "…" not in text


def test_each_line_shows_its_own_epoch_time_and_the_stage_count_goes_on_after_a_resume():
    import re
    import time
    from types import SimpleNamespace
    from fastai.callback.core import Callback

    class SlowFirstEpoch(Callback):
        def before_batch(self):
            if self.epoch == 0 and self.iter == 0 and self.training:
                time.sleep(2.0)

    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    buf = io.StringIO()
    learn.add_cbs([EpochProgress(stream=buf), SlowFirstEpoch()])
    learn.fit_stage(2, 1e-3)
    first, second = buf.getvalue().splitlines()
    t1 = float(re.search(r" time (\d+\.\d)s$", first).group(1))
    t2, stage = map(float, re.search(r" time (\d+\.\d)s \(stage (\d+\.\d)s\)$", second).groups())
    # per epoch, not since the fit started (a cumulative time would make t2 >= t1); the stage's time is labelled
    assert t1 >= 2.0 and t2 < t1 - 1.0 and stage >= t1 + t2 - 0.1
    # a stage resumed at epoch 3 of 5 (fastlearn.checkpoint.ResumeAt sets learn.resume_at) counts on from there
    learn.resume_at = SimpleNamespace(epoch_offset=3, stage_epochs=5)
    buf.truncate(0); buf.seek(0)
    learn.fit_stage(2, 1e-3)
    lines = buf.getvalue().splitlines()
    assert [l.split(" train_loss")[0] for l in lines] == ["epoch 4/5", "epoch 5/5"]
    assert "(stage since resume " in lines[1]


def _header_cells(text: str) -> list[str]:
    "The headers of a rich table as printed: each column's header lines joined by a space (a folded word shows)."
    rows = [line.strip().strip("┃").split("┃") for line in text.splitlines() if line.strip().startswith("┃")]
    return [" ".join(r[j].strip() for r in rows if r[j].strip()) for j in range(len(rows[0]))]


def test_run_summary_fits_80_columns_without_splitting_a_header(monkeypatch, capsys):
    "The table every run ends with, as a pipe, a CI log or `| tee` shows it (80 columns): whole words, 0.1 s."
    monkeypatch.delenv("COLUMNS", raising=False)                 # not a terminal (captured): 80 columns
    stages = [{"stage": "head", "trainable_groups": 1, "epochs": 1, "peak_lr": 0.0215, "train_loss": 1.3719,
               "valid_loss": 1.2516, "accuracy": 0.6694, "seconds": 11.94},
              {"stage": "top4", "trainable_groups": 4, "epochs": 1, "peak_lr": 0.0107, "train_loss": 0.9173,
               "valid_loss": 0.4051, "accuracy": 0.9417, "seconds": 120.7},
              {"stage": "all", "trainable_groups": 7, "epochs": 2, "peak_lr": 5.37e-4, "train_loss": 0.3512,
               "valid_loss": 0.1187, "accuracy": 0.975, "seconds": 26.8}]
    text = summary_table(stages, title="digits: full, accuracy 0.9750 in 159.4s")
    assert max(map(len, text.splitlines())) <= 80
    assert _header_cells(text) == ["stage", "groups", "epochs", "peak LR", "train loss", "valid loss", "accuracy",
                                  "seconds"]
    assert "11.9" in text and "120.7" in text and "26.8 " in text   # seconds to 0.1 s
    assert "26.8000" not in text and "11.9400" not in text
    assert "0.9750" in text and "5.37e-04" in text                   # other numbers as before
