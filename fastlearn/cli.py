"""The `fastlearn` command line: `recipes`, `train`, `lr-find`, `doctor`, `search`, `predict`, `export`.

Bad input exits with status 2 and one line `fastlearn: error: ...` before any training starts.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlearn", description="Best-practice training presets for fastai + timm.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sub.add_parser("recipes", help="list the named recipes (presets)",
                   description="List the named recipes: what each is for, epochs, sizes, expected result.")

    t = sub.add_parser("train", help="train a recipe on a folder of class subfolders (or a bundled sample)",
                       description="Train RECIPE on --data. Extra key=value arguments override recipe keys, "
                                   "e.g. `fastlearn train transfer --data ./pets epochs=3 lr=1e-3`.")
    t.add_argument("recipe", help="recipe name (see `fastlearn recipes`) or path to a .toml file")
    t.add_argument("--data", required=True, help="image folder (train/ + valid/, or class folders) or 'digits'")
    t.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    t.add_argument("--run-dir", default=None, help="exact run folder (must not hold a previous run unless --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    t.add_argument("--distributed", action="store_true",
                   help="train with DDP under torchrun/accelerate (launch with `torchrun --nproc_per_node=N`)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="recipe keys to override")

    f = sub.add_parser("lr-find", help="LR range test: print the peak and start LR, save the plot",
                       description="Run the LR range test on the head of ARCH over --data and save lr_find.png.")
    f.add_argument("--data", required=True, help="image folder or 'digits'")
    f.add_argument("--arch", default="tf_efficientnet_lite0", help="timm architecture name")
    f.add_argument("--size", type=int, default=None, help="image size in px (default: the arch's)")
    f.add_argument("--bs", type=int, default=32, help="batch size")
    f.add_argument("--num-it", type=int, default=100, help="sweep steps")
    f.add_argument("--plot", default="lr_find.png", help="where to save the plot")
    f.add_argument("--no-pretrained", action="store_true", help="random init instead of pretrained weights")

    d = sub.add_parser("doctor", help="sanity checks: initial loss, overfit a few batches, data checks",
                       description="Run the sanity checks on --data with --arch and print pass/fail with numbers.")
    d.add_argument("--data", required=True, help="image folder or 'digits'")
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


def _recipes() -> int:
    from .progress import summary_table
    from .recipes import list_recipes, load_recipe
    rows = []
    for name in sorted(list_recipes()):
        r = load_recipe(name)
        epochs = r.epochs if r.strategy == "scratch" else f"{r.head_epochs}+{r.unfreeze_epochs}/stage+{r.epochs}"
        sizes = f"{r.resize_start}->{r.size}" if r.resize_start else str(r.size)
        if r.valid_size:
            sizes += f" (val {r.valid_size})"
        rows.append({"name": name, "for": r.description, "arch": r.arch, "epochs": str(epochs), "size px": sizes,
                     "expected": r.expected})
    summary_table(rows, title="fastlearn recipes")
    return 0


def _data_arg(data: str) -> Path:
    from .samples import is_sample_name, sample
    return sample(data) if is_sample_name(data) and not Path(data).exists() else Path(data)


def _train(a) -> int:
    from .training import learner_from_recipe, run_recipe
    if a.resume and a.run_dir is None:
        raise ValueError("--resume needs --run-dir, the run folder to continue")
    if a.run_dir and not a.resume and Path(a.run_dir).exists() and any(Path(a.run_dir).iterdir()):
        raise FileExistsError(f"run folder {a.run_dir} already holds a run; pass --resume to continue it, "
                              f"or choose another --run-dir (nothing was overwritten)")
    if not a.distributed:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("launched with several processes (WORLD_SIZE > 1) but without --distributed: "
                             "add --distributed, or each process would train alone")
        learn, r = learner_from_recipe(a.data, a.recipe, a.overrides)
        res = run_recipe(learn, r, run_dir=a.run_dir, runs_root=a.out, resume=a.resume)
        _report(res)
        return 0
    from fastai.distributed import teardown_distrib
    from .distributed import distributed_ctx, init_distributed, is_main_process, main_process_first
    if "WORLD_SIZE" not in os.environ:
        raise ValueError("--distributed needs a launcher: torchrun --nproc_per_node=N -m fastlearn.cli train ...")
    init_distributed()  # before building anything, so each rank picks its device
    try:
        with main_process_first():  # rank 0 builds the sample cache first
            learn, r = learner_from_recipe(a.data, a.recipe, a.overrides, progress=is_main_process())
        with distributed_ctx(learn, sync_bn=r.sync_bn):
            res = run_recipe(learn, r, run_dir=a.run_dir, runs_root=a.out, resume=a.resume)
        if is_main_process():
            _report(res)
    finally:
        teardown_distrib()
    return 0


def _report(res) -> None:
    print(f"run folder: {res.run_dir}")
    print(f"accuracy={res.accuracy:.4f} time={res.seconds:.1f}s strategy={res.strategy}")


def _lr_find(a) -> int:
    from .data import image_dls
    from .learner import transfer_learner
    dls = image_dls(_data_arg(a.data), size=a.size, bs=a.bs, arch=a.arch)
    learn = transfer_learner(dls, a.arch, pretrained=not a.no_pretrained, progress=False)
    res = learn.find_lr(num_it=a.num_it, plot=a.plot)
    print(f"peak lr (one-cycle lr_max): {res.peak:.3e}")
    print(f"start lr (loss first improves): {res.start:.3e}")
    print(f"plot: {res.plot}")
    return 0


def _doctor(a) -> int:
    from .diagnostics import doctor_main
    return doctor_main(a.data, a.arch, size=a.size, bs=a.bs, pretrained=not a.no_pretrained, recipe=a.recipe,
                       run=a.run)


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


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`--data x epochs=3 --out runs`) land here
        if args.cmd not in ("train", "search") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    from .errors import FastlearnError
    try:
        return {"recipes": lambda: _recipes(), "train": lambda: _train(args), "lr-find": lambda: _lr_find(args),
                "doctor": lambda: _doctor(args), "search": lambda: _search(args),
                "predict": lambda: _predict(args), "export": lambda: _export(args)}[args.cmd]()
    except (FastlearnError, ValueError, FileNotFoundError, FileExistsError) as e:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"fastlearn: error: {msg}", file=sys.stderr)
        if os.environ.get("FASTLEARN_DEBUG"):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
