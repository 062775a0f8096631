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
