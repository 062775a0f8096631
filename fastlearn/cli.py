"""The `fastlearn` command line: `recipes`, `train`, `lr-find`, `doctor`, `search`, `predict`, `export`, `--version`.

Bad input exits with status 2 and one line `fastlearn: error: ...` before any training starts or folder is created.
Every command a message suggests is one this parser accepts (tests/test_cli.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .app.recipe_view import recipe_list, recipe_text
from .base.console import console_width
from .base.errors import FastlearnError
from .base.version import __version__

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
    d = sub.add_parser("doctor", help="sanity checks: initial loss, overfit a few batches, data checks",
                       description="Run the sanity checks on --data with --arch and print pass/fail with numbers.")
    for q, size, size_help in ((f, None, "image size in px (default: the arch's)"), (d, 64, "image size in px")):
        q.add_argument("--data", required=True, help="image folder, CSV of file names and labels, or 'digits'")
        q.add_argument("--multi-label", action="store_true", help="CSV labels are space-separated (sigmoid/BCE)")
        q.add_argument("--arch", default="tf_efficientnet_lite0", help="timm architecture name")
        q.add_argument("--size", type=int, default=size, help=size_help)
        q.add_argument("--bs", type=int, default=32, help="batch size")
    f.add_argument("--num-it", type=int, default=100, help="sweep steps")
    f.add_argument("--plot", default="lr_find.png", help="where to save the plot")
    f.add_argument("--no-pretrained", action="store_true", help="random init instead of pretrained weights")
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

    # `predict` and `export` use a finished run folder without its training data
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
    return p


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
    try:
        if args.cmd == "recipes":
            width = console_width() or shutil.get_terminal_size().columns
            print(recipe_text(args.name, width) if args.name else recipe_list(width), end="", flush=True)
            return 0
        # deferred: the other commands load torch and fastai (seconds), which `--help` and `recipes` must not wait for
        from .app import commands
        return commands.run_command(args)
    except (FastlearnError, ValueError, FileNotFoundError, FileExistsError) as e:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"fastlearn: error: {msg}", file=sys.stderr)
        if os.environ.get("FASTLEARN_DEBUG"):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
