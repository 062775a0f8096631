"""The `fastlearn` command line: `recipes`, `train`, `lr-find`, `doctor`, `search`, `predict`, `export` (and
`--version`).

Bad input exits with status 2 and one line `fastlearn: error: ...` before any training starts, and before
any folder is created. Every command a message suggests is one this parser accepts (tests/test_cli.py).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from . import __version__
from .console import console_width
from .errors import FastlearnError, TrainingInterrupted
from .recipe_view import recipe_list, recipe_text
from .runlock import LOCK_NAME, check_unlocked
from .samples import is_sample_name, sample

# The commands that train, predict or export import their modules inside the command's function: those load
# torch and fastai (seconds), which `--help`, `--version` and `recipes` must not wait for.

__all__ = ["main", "parse_args"]


class _Version(argparse.Action):
    "`--version`: the version and, as pip does, which install answered (argparse's own would wrap the path)."

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"fastlearn {__version__} from {Path(__file__).resolve().parent} (python {sys.version.split()[0]})")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlearn", description="Best-practice training presets for fastai + timm.")
    p.add_argument("--version", action=_Version, help="print the version and where it is installed, and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = sub.add_parser("recipes", help="list the named recipes (presets), or show one with every key",
                       description="List the named recipes: what each is for, arch, sizes, epochs, expected result. "
                                   "With NAME: that recipe resolved, every key with its value and meaning "
                                   "(TOML: save it, edit it, `fastlearn train my.toml --data D`).")
    r.add_argument("name", nargs="?", default=None, metavar="NAME", help="a recipe name or a path to a .toml file")

    t = sub.add_parser("train", help="train a recipe on a folder of class subfolders (or a bundled sample)",
                       description="Train RECIPE on --data. Extra key=value arguments override recipe keys, "
                                   "e.g. `fastlearn train transfer --data ./pets epochs=3 lr=1e-3`.")
    t.add_argument("recipe", help="recipe name (see `fastlearn recipes`) or path to a .toml file")
    t.add_argument("--data", required=True, help="image folder (train/ + valid/, or class folders), a CSV of file "
                   "names and labels (or a folder with labels.csv), or 'digits'")
    t.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    t.add_argument("--run-dir", default=None, help="exact run folder (must not hold a previous run unless --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    t.add_argument("--distributed", action="store_true",
                   help="train with DDP under torchrun/accelerate (launch with `torchrun --nproc_per_node=N`)")
    t.add_argument("--checkpoint-steps", type=int, default=0, metavar="N",
                   help="also checkpoint every N training batches (for long epochs; default: epoch ends only)")
    t.add_argument("--accept-data-change", action="store_true",
                   help="with --resume: go on even if the data differs from the run folder's data.json")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="recipe keys to override")

    f = sub.add_parser("lr-find", help="LR range test: print the peak and start LR, save the plot",
                       description="Run the LR range test on the head of ARCH over --data and save lr_find.png.")
    f.add_argument("--data", required=True, help="image folder, CSV of file names and labels, or 'digits'")
    f.add_argument("--multi-label", action="store_true", help="CSV labels are space-separated (sigmoid/BCE)")
    f.add_argument("--arch", default="tf_efficientnet_lite0", help="timm architecture name")
    f.add_argument("--size", type=int, default=None, help="image size in px (default: the arch's)")
    f.add_argument("--bs", type=int, default=32, help="batch size")
    f.add_argument("--num-it", type=int, default=100, help="sweep steps")
    f.add_argument("--plot", default="lr_find.png", help="where to save the plot")
    f.add_argument("--no-pretrained", action="store_true", help="random init instead of pretrained weights")

    d = sub.add_parser("doctor", help="sanity checks: initial loss, overfit a few batches, data checks",
                       description="Run the sanity checks on --data with --arch and print pass/fail with numbers.")
    d.add_argument("--data", required=True, help="image folder, CSV of file names and labels, or 'digits'")
    d.add_argument("--multi-label", action="store_true", help="CSV labels are space-separated (sigmoid/BCE)")
    d.add_argument("--arch", default="tf_efficientnet_lite0", help="timm architecture name")
    d.add_argument("--size", type=int, default=64, help="image size in px")
    d.add_argument("--bs", type=int, default=32, help="batch size")
    d.add_argument("--recipe", default="transfer", help="recipe whose data/model settings to check")
    d.add_argument("--no-pretrained", action="store_true", help="random init instead of pretrained weights")
    d.add_argument("--run", default=None, help="a finished run folder: also diagnose its learning curves")

    s = sub.add_parser("search", help="random search with early pruning; saves the best config as a recipe",
                       description="Random search (optuna, successive-halving pruning) over lr, wd, batch size and "
                                   "dropout for RECIPE on --data; writes search.csv and best_recipe.toml.")
    s.add_argument("recipe", help="recipe to start from")
    s.add_argument("--data", required=True, help="image folder or 'digits'")
    s.add_argument("--trials", type=int, default=8, help="trials per round")
    s.add_argument("--rounds", type=int, default=2, help="rounds; each narrows the ranges around the best")
    s.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the recipe's)")
    s.add_argument("--no-prune", action="store_true", help="run every trial to the end")
    s.add_argument("--out", default="runs/search", help="output folder")
    s.add_argument("--seed", type=int, default=0, help="sampler seed")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="recipe keys to override")
    _use_parsers(sub)
    return p


def _use_parsers(sub) -> None:
    "`predict` and `export`: use a finished run folder without its training data."
    pr = sub.add_parser("predict", help="top-k classes of images with a finished run's model",
                        description="Predict IMAGES (files, folders searched recursively, glob patterns) with the "
                                    "model in RUN_DIR; preprocessing is the run's validation pipeline.")
    pr.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (holds model.json)")
    pr.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders or glob patterns")
    pr.add_argument("--topk", type=int, default=3, help="classes shown per image (default 3)")
    pr.add_argument("--bs", type=int, default=64, help="batch size (default 64)")
    pr.add_argument("--tta", action="store_true",
                    help="average over the original, a 1.1x centre zoom and (if the run trained with flips) the mirror")
    pr.add_argument("--csv", default=None, metavar="OUT.csv", help="also write every prediction to this CSV file")
    pr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")

    ex = sub.add_parser("export", help="export a finished run's model to ONNX, TorchScript or a timm folder",
                        description="Export the model in RUN_DIR and check the export against PyTorch "
                                    "(prints the largest absolute difference of the logits).")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (holds model.json)")
    ex.add_argument("--format", required=True, choices=("onnx", "torchscript", "timm"),
                    help="onnx (needs fastlearn[onnx]), torchscript, timm")
    ex.add_argument("--out", default=None, help="output file (folder for timm); default RUN_DIR/export/...")


def _recipes(name: str | None) -> int:
    width = console_width() or shutil.get_terminal_size().columns
    print(recipe_text(name, width) if name else recipe_list(width), end="", flush=True)
    return 0


def _data_arg(data: str) -> Path:
    return sample(data) if is_sample_name(data) and not Path(data).exists() else Path(data)


def _train(a) -> int:
    from .training import learner_from_recipe, run_recipe
    if a.resume and a.run_dir is None:
        raise ValueError("--resume needs --run-dir, the run folder to continue")
    if a.run_dir:
        _check_run_dir(Path(a.run_dir), a.resume)
    run_args = dict(run_dir=a.run_dir, runs_root=a.out, resume=a.resume, checkpoint_steps=a.checkpoint_steps,
                    accept_data_change=a.accept_data_change)
    if not a.distributed:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("launched with several processes (WORLD_SIZE > 1) but without --distributed: "
                             "add --distributed, or each process would train alone")
        learn, r = learner_from_recipe(a.data, a.recipe, a.overrides)
        res = run_recipe(learn, r, **run_args)
        _report(res)
        return 0
    from fastai.distributed import teardown_distrib
    from .distributed import distributed_ctx, init_distributed, is_main_process, main_process_first
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--distributed needs a launcher, one process per device: torchrun --standalone "
                         f"--nproc_per_node=2 -m fastlearn.cli {shlex.join(a.argv)}")
    init_distributed()  # before building anything, so each rank picks its device
    try:
        with main_process_first():  # rank 0 builds the sample cache first
            learn, r = learner_from_recipe(a.data, a.recipe, a.overrides, progress=is_main_process())
        with distributed_ctx(learn, sync_bn=r.sync_bn):
            res = run_recipe(learn, r, **run_args)
        if is_main_process():
            _report(res)
    finally:
        teardown_distrib()
    return 0


_RUN_FILES = ("recipe.toml", "checkpoints", "metrics.csv", "model.safetensors", "model.json", "summary.json")


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    "Before the data is read: who holds the folder first, then whether it holds a run to continue (or none)."
    if os.environ.get("RANK", "0") == "0":  # rank 0 takes the lock under torchrun
        check_unlocked(run_dir)  # another process trains there: name it, whatever the folder holds
    found = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME) if run_dir.is_dir() else []
    if resume or not found:  # a lone lock: a run that died at its start
        return
    if any((run_dir / f).exists() for f in _RUN_FILES):
        raise FileExistsError(f"run folder {run_dir} already holds a run; pass --resume to continue it, "
                              f"or choose another --run-dir (nothing was overwritten)")
    listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    raise FileExistsError(f"--run-dir {run_dir} is not empty and holds no fastlearn run (it has {listed}); "
                          f"choose a new or empty folder for the run (nothing was touched)")


def _report(res) -> None:
    "Where the run is; its result (accuracy, seconds, strategy) is the title of the table run_recipe just printed."
    print(f"run folder: {res.run_dir}", flush=True)


def _resume_command(a, run_dir) -> str:
    "The command line that resumes this `fastlearn train` run in `run_dir` (what the user typed, plus --resume)."
    argv = ["train", a.recipe, "--data", a.data, "--run-dir", str(run_dir), "--resume"]
    if a.checkpoint_steps:
        argv += ["--checkpoint-steps", str(a.checkpoint_steps)]
    if a.distributed:
        argv.append("--distributed")
    argv += list(a.overrides)
    if not a.distributed:
        return shlex.join(["fastlearn", *argv])
    n = os.environ.get("LOCAL_WORLD_SIZE")
    launcher = (f"torchrun --standalone --nproc_per_node={n}" if n and os.environ.get("WORLD_SIZE") == n
                else "torchrun <your torchrun options>")
    return f"{launcher} -m fastlearn.cli {shlex.join(argv)}"


def _interrupted(args, e) -> int:
    "One line: where training stopped, what was saved, how to resume; exit 128 + the signal (130 Ctrl-C, 143 SIGTERM)."
    from .distributed import is_main_process
    if is_main_process():
        if args.cmd == "train":
            msg = e.describe(_resume_command(args, e.run_dir))
        else:
            msg = f"interrupted ({e.signal_name}) in the training of {e.run_dir}; stopped"
        print(f"fastlearn: {msg}", file=sys.stderr, flush=True)
    return e.exit_code


def _lr_find(a) -> int:
    from .data import image_dls
    from .learner import transfer_learner
    dls = image_dls(_data_arg(a.data), size=a.size, bs=a.bs, arch=a.arch, multi_label=a.multi_label)
    learn = transfer_learner(dls, a.arch, pretrained=not a.no_pretrained, progress=False)
    res = learn.find_lr(num_it=a.num_it, plot=a.plot)
    print(f"peak lr (one-cycle lr_max): {res.peak:.3e}")
    print(f"start lr (loss first improves): {res.start:.3e}")
    if res.note:  # start == peak: why
        print(res.note)
    print(f"plot: {res.plot}")
    return 0


def _doctor(a) -> int:
    from .diagnostics import doctor_main
    return doctor_main(a.data, a.arch, size=a.size, bs=a.bs, pretrained=not a.no_pretrained, recipe=a.recipe,
                       run=a.run, overrides={"multi_label": True} if a.multi_label else None)


def _search(a) -> int:
    from .search import search_main
    return search_main(a.data, a.recipe, n_trials=a.trials, rounds=a.rounds, epochs=a.epochs, prune=not a.no_prune,
                       out_dir=a.out, seed=a.seed, overrides=a.overrides)


def _predict(a) -> int:
    from .predict import predict_main
    return predict_main(a.run_dir, a.images, topk=a.topk, bs=a.bs, tta=a.tta, csv_path=a.csv, device=a.device)


def _export(a) -> int:
    from .export import export_main
    return export_main(a.run_dir, a.format, a.out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    "The command line as `main` reads it (argparse exits with status 2 and its usage on a bad command)."
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`--data x epochs=3 --out runs`) land here
        if args.cmd not in ("train", "search") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cmd != "recipes":  # every other command loads fastai: once, through its quiet import
        from . import _fastai  # noqa: F401
    try:
        return {"recipes": lambda: _recipes(args.name), "train": lambda: _train(args), "lr-find": lambda: _lr_find(args),
                "doctor": lambda: _doctor(args), "search": lambda: _search(args),
                "predict": lambda: _predict(args), "export": lambda: _export(args)}[args.cmd]()
    except TrainingInterrupted as e:
        return _interrupted(args, e)
    except (FastlearnError, ValueError, FileNotFoundError, FileExistsError) as e:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"fastlearn: error: {msg}", file=sys.stderr)
        if os.environ.get("FASTLEARN_DEBUG"):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
