"""The command line: recipes table, bad input exits 2 with one line before training, nothing overwritten."""
import subprocess
import sys

import pytest

from fastlearn.cli import main


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastlearn.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_recipes_table(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("transfer", "digits", "imagenet_rn50_88", "imagenette_5ep_128"):
        assert name in out
    assert "78%" in out or "78" in out          # expected results are shown


@pytest.mark.parametrize("setup, args, words", [
    ("missing", ["train", "transfer", "--data", "{tmp}/nope"], ["does not exist"]),
    ("empty_class", ["train", "transfer", "--data", "{tmp}/d"], ["no usable image", "train/b"]),
    ("one_class", ["train", "transfer", "--data", "{tmp}/d"], ["one class", "a"]),
    ("corrupt", ["train", "transfer", "--data", "{tmp}/d"], ["bad.png"]),
    ("ok", ["train", "transfer", "--data", "{tmp}/d", "arch=resnet5O"], ["no architecture named", "resnet5O", "resnet50"]),
    ("ok", ["train", "transferr", "--data", "{tmp}/d"], ["unknown recipe 'transferr'"]),
    ("ok", ["train", "transfer", "--data", "{tmp}/d", "lr=-1"], ["'lr'", "-1"]),
    ("ok", ["train", "transfer", "--data", "{tmp}/d", "n_out=3"], ["unknown recipe key 'n_out'"]),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, setup, args, words):
    from conftest import write_image_folder
    d = tmp_path / "d"
    if setup != "missing":
        write_image_folder(d, n_per_class=8, valid=2, classes=("a", "b") if setup != "one_class" else ("a",))
    if setup == "empty_class":
        for f in (d / "train" / "b").iterdir():
            f.unlink()
    if setup == "corrupt":
        (d / "train" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code = main([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fastlearn: error:") and len(err.splitlines()) == 1
    for w in words:
        assert w in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing trained


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys, image_folder):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"precious")
    code = main(["train", "transfer", "--data", str(image_folder), "--run-dir", str(run), "arch=test_resnet"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == b"precious"


@pytest.mark.slow
def test_train_and_lr_find_end_to_end(tmp_path, image_folder):
    out = run_cli("train", "transfer", "--data", str(image_folder), "--out", str(tmp_path / "runs"),
                  "arch=test_resnet", "pretrained=false", "size=32", "bs=8", "head_epochs=1", "unfreeze_epochs=1",
                  "epochs=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accuracy=" in out.stdout and out.stdout.count("\r") == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    for f in ("recipe.toml", "metrics.csv", "loss.png", "schedule.png", "lr_find.png", "model.safetensors"):
        assert (runs[0] / f).stat().st_size > 0, f
    out = run_cli("lr-find", "--data", str(image_folder), "--arch", "test_resnet", "--no-pretrained", "--size", "32",
                  "--bs", "8", "--num-it", "30", "--plot", str(tmp_path / "lr.png"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "peak lr" in out.stdout and "start lr" in out.stdout and (tmp_path / "lr.png").exists()


def test_resume_command_is_the_typed_command_plus_resume(monkeypatch):
    from fastlearn.cli import _parser, _resume_command
    a = _parser().parse_args(["train", "digits", "epochs=3", "lr=1e-3", "--data", "my data", "--out", "o",
                              "--checkpoint-steps", "50"])
    assert _resume_command(a, "runs/x") == ("fastlearn train digits --data 'my data' --run-dir runs/x --resume "
                                            "--checkpoint-steps 50 epochs=3 lr=1e-3")
    monkeypatch.setenv("WORLD_SIZE", "4"); monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    a = _parser().parse_args(["train", "digits", "--data", "d", "--distributed"])
    assert _resume_command(a, "r") == ("torchrun --standalone --nproc_per_node=4 -m fastlearn.cli train digits "
                                       "--data d --run-dir r --resume --distributed")


def test_interrupted_training_is_one_line_and_exit_128_plus_signal(monkeypatch, capsys):
    import signal
    from fastlearn import cli
    from fastlearn.errors import TrainingInterrupted

    def stopped(a):
        raise TrainingInterrupted(signal.SIGTERM, "runs/x", "runs/x/checkpoints/ckpt-41.pt",
                                  "stage 2/3 epoch 1/2 batch 17/40", saved=True)
    monkeypatch.setattr(cli, "_train", stopped)
    assert cli.main(["train", "digits", "--data", "digits", "epochs=3"]) == 143
    err = capsys.readouterr().err.strip()
    assert err == ("fastlearn: interrupted (SIGTERM) at stage 2/3 epoch 1/2 batch 17/40: checkpoint "
                   "runs/x/checkpoints/ckpt-41 saved; resume with: fastlearn train digits --data digits --run-dir "
                   "runs/x --resume epochs=3")


def test_a_lone_stale_lock_does_not_count_as_a_run(tmp_path, capsys, monkeypatch):
    "A run killed while starting leaves only run.lock: starting afresh there is allowed (and takes the lock over)."
    from fastlearn import training
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text('{"pid": 999999999, "host": "h"}')

    def reached(*a, **k):
        raise ValueError("reached the data")
    monkeypatch.setattr(training, "learner_from_recipe", reached)
    assert main(["train", "digits", "--data", "digits", "--run-dir", str(run)]) == 2
    assert "reached the data" in capsys.readouterr().err
