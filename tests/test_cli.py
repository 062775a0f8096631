"""The command line: recipes table, bad input exits 2 with one line before training, nothing overwritten."""
import subprocess
import sys

import pytest

from fastlearn.cli import main


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastlearn.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_recipes_list_fits_80_columns_when_piped(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)                 # not a terminal (captured): 80 columns
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80
    for name in ("transfer", "digits", "imagenet_rn50_88", "imagenette_5ep_128"):
        assert name in lines                                      # whole, on its own line
    assert any("78%" in line for line in lines)                  # the expected results are shown
    monkeypatch.setenv("COLUMNS", "120")
    assert main(["recipes"]) == 0
    assert 80 < max(map(len, capsys.readouterr().out.splitlines())) <= 120


def test_recipes_name_shows_every_key(capsys, tmp_path):
    from fastlearn.core.recipes import load_recipe
    assert main(["recipes", "imagenet_rn18_16"]) == 0
    out = capsys.readouterr().out
    assert "lr_ref_bs = 1024" in out and 'arch = "resnet18"' in out and "# drop_rate = (unset)" in out
    (tmp_path / "r.toml").write_text(out)
    assert load_recipe(tmp_path / "r.toml") == load_recipe("imagenet_rn18_16")
    assert main(["recipes", "imagenet_rn18"]) == 2
    assert "unknown recipe 'imagenet_rn18'" in capsys.readouterr().err


def test_version(capsys):
    import fastlearn
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out.strip()
    assert e.value.code == 0 and out.startswith(f"fastlearn {fastlearn.__version__} from {fastlearn.__path__[0]}")


def test_import_prints_nothing_on_stderr():
    """fastai's import raises torch's torch.jit.script FutureWarning; fastlearn silences it where it imports fastai
    (pytest shows no warning filter for it; tests/test_readme.py checks `--help` of every command the same way)."""
    import os
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run([sys.executable, "-c", "import fastlearn"], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent, env=env)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]


def _commands_in(text: str) -> list[str]:
    "`fastlearn COMMAND ...` and `-m fastlearn.cli COMMAND ...` in a text, up to a backtick, ), ; or the line end."
    import re
    pat = r"(?:^|(?<=[\s`(:'\"]))(?:fastlearn|-m fastlearn\.cli) ((?:recipes|train|lr-find|doctor|search)(?=[\s`]|$)[^`;()\n]*)"
    return [m.group(1).strip().rstrip(".,") for m in re.finditer(pat, text, re.M)]


def _source_strings() -> list[str]:
    "Every string literal in fastlearn/**/*.py; an f-string's {holes} become the word X."
    import ast
    from pathlib import Path
    out = []
    for path in sorted((Path(__file__).resolve().parent.parent / "fastlearn").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                out.append("".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return out


def _parses(cmd: str) -> None:
    "`cmd` (after `fastlearn`) is accepted by the real parser; a bare command name (a reference) must exist."
    import shlex
    from fastlearn.cli import parse_args
    args = shlex.split(cmd.split(" > ")[0].split(" | ")[0])       # up to a shell redirection or pipe
    try:
        parse_args(args if len(args) > 1 else args + ["--help"])
    except SystemExit as e:                                        # argparse's error (or --version/--help's exit 0)
        assert e.code == 0, f"`fastlearn {cmd}` does not parse"


def test_every_command_the_cli_and_readme_suggest_parses(capsys):
    "Hints in messages, help texts and docstrings, in `fastlearn recipes`' output and in README run as printed."
    from pathlib import Path
    from fastlearn.app.recipe_view import recipe_list
    hints = [c for s in _source_strings() for c in _commands_in(s)]
    hints += _commands_in(recipe_list(80))
    import json
    root = Path(__file__).resolve().parent.parent
    guide = "".join("".join(c["source"]) for c in json.loads((root / "nbs" / "11_guide.ipynb").read_text())["cells"])
    for text in ((root / "README.md").read_text(), guide):
        hints += [c.split("  #")[0] for c in _commands_in(text)]
    assert len(hints) >= 20 and any(h.startswith("train X --data X") for h in hints)   # search's hint is found
    for cmd in hints:
        _parses(cmd)
    # the launcher hint is built from the actual command line
    assert main(["train", "digits", "--data", "digits", "--distributed"]) == 2
    err = capsys.readouterr().err
    (cmd,) = _commands_in(err)
    assert cmd == "train digits --data digits --distributed"
    _parses(cmd)


def test_search_checks_before_creating_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "digits", "--data", "nope"]) == 2
    assert "data folder nope does not exist" in capsys.readouterr().err
    assert main(["search", "digits", "--data", "digits", "arch=resnet5O"]) == 2
    assert "resnet5O" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "optuna", None)              # as without the search extra
    assert main(["search", "digits", "--data", "digits"]) == 2
    assert capsys.readouterr().err == "fastlearn: error: search needs optuna: pip install 'fastlearn[search]'\n"
    assert list(tmp_path.iterdir()) == []                         # no runs/search/trials/


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


def test_a_run_dir_that_is_a_data_folder_is_named_for_what_it_is(tmp_path, capsys, image_folder):
    before = sorted(p.relative_to(image_folder) for p in image_folder.rglob("*"))
    code = main(["train", "transfer", "--data", str(image_folder), "--run-dir", str(image_folder), "arch=test_resnet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "is not empty and holds no fastlearn run (it has train, valid)" in err and "already holds" not in err
    assert sorted(p.relative_to(image_folder) for p in image_folder.rglob("*")) == before


def test_printing_commands_do_not_load_torch_or_fastai():
    "`--help`, `--version` and `recipes` answer without the training stack (seconds of start-up on a CPU)."
    code = ("import sys, contextlib, io\n"
            "from fastlearn.cli import main\n"
            "for argv in (['--help'], ['--version'], ['recipes'], ['recipes', 'transfer'], ['train', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    assert out.getvalue().strip(), argv\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastai', 'timm', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_train_and_lr_find_end_to_end(tmp_path, image_folder):
    out = run_cli("train", "transfer", "--data", str(image_folder), "--out", str(tmp_path / "runs"),
                  "arch=test_resnet", "pretrained=false", "size=32", "bs=8", "head_epochs=1", "unfreeze_epochs=1",
                  "epochs=1")
    assert out.returncode == 0, out.stderr[-2000:]
    import re
    assert out.stdout.count("\r") == 0
    # the result, once, as key=value (issue 22: it was printed twice)
    assert len(re.findall(r"accuracy=\d\.\d{4} time=\d+\.\ds", out.stdout)) == 1, out.stdout[-2000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    for f in ("recipe.toml", "metrics.csv", "loss.png", "schedule.png", "lr_find.png", "model.safetensors"):
        assert (runs[0] / f).stat().st_size > 0, f
    out = run_cli("lr-find", "--data", str(image_folder), "--arch", "test_resnet", "--no-pretrained", "--size", "32",
                  "--bs", "8", "--num-it", "30", "--plot", str(tmp_path / "lr.png"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "peak lr" in out.stdout and "start lr" in out.stdout and (tmp_path / "lr.png").exists()


def test_resume_command_is_the_typed_command_plus_resume(monkeypatch):
    from fastlearn.app.commands import resume_command as _resume_command
    from fastlearn.cli import _parser
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
    from fastlearn.app import commands
    from fastlearn.base.errors import TrainingInterrupted

    def stopped(a):
        raise TrainingInterrupted(signal.SIGTERM, "runs/x", "runs/x/checkpoints/ckpt-41.pt",
                                  "stage 2/3 epoch 1/2 batch 17/40", saved=True)
    monkeypatch.setattr(commands, "train", stopped)
    assert cli.main(["train", "digits", "--data", "digits", "epochs=3"]) == 143
    err = capsys.readouterr().err.strip()
    assert err == ("fastlearn: interrupted (SIGTERM) at stage 2/3 epoch 1/2 batch 17/40: checkpoint "
                   "runs/x/checkpoints/ckpt-41 saved; resume with: fastlearn train digits --data digits --run-dir "
                   "runs/x --resume epochs=3")


def test_a_lone_stale_lock_does_not_count_as_a_run(tmp_path, capsys, monkeypatch):
    "A run killed while starting leaves only run.lock: starting afresh there is allowed (and takes the lock over)."
    from fastlearn.app import commands as training  # where `fastlearn train` builds its learner
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text('{"pid": 999999999, "host": "h"}')

    def reached(*a, **k):
        raise ValueError("reached the data")
    monkeypatch.setattr(training, "learner_from_recipe", reached)
    assert main(["train", "digits", "--data", "digits", "--run-dir", str(run)]) == 2
    assert "reached the data" in capsys.readouterr().err
