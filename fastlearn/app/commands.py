"""The commands that train, predict or export: each a function of the parsed command line (`fastlearn.cli`
parses it and imports this module only for these commands, since it loads torch and fastai)."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from ..base import fastai_quiet  # noqa: F401  (first: fastai with its one import-time warning silenced)
from fastai.distributed import teardown_distrib  # noqa: E402  (after fastai_quiet, for the same reason)
from ..base.ranks import init_distributed, is_main_process, main_process_first
from ..data.dls import image_dls
from ..fit.distributed import distributed_ctx
from ..run.export import export_main
from ..run.predict import predict_main
from ..train.learner import learner_from_recipe, transfer_learner
from ..train.runner import run_recipe
from .diagnostics import doctor_main
from .search import search_main
from ..base.errors import TrainingInterrupted
from ..data.samples import is_sample_name, sample
from ..run.runlock import LOCK_NAME, check_unlocked

__all__ = ["run_command", "train", "check_run_dir", "resume_command", "interrupted"]


def data_arg(data: str) -> Path:
    return sample(data) if is_sample_name(data) and not Path(data).exists() else Path(data)


def train(a) -> int:
    if a.resume and a.run_dir is None:
        raise ValueError("--resume needs --run-dir, the run folder to continue")
    if a.run_dir:
        check_run_dir(Path(a.run_dir), a.resume)
    run_args = dict(run_dir=a.run_dir, runs_root=a.out, resume=a.resume, checkpoint_steps=a.checkpoint_steps,
                    accept_data_change=a.accept_data_change)
    if not a.distributed:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("launched with several processes (WORLD_SIZE > 1) but without --distributed: "
                             "add --distributed, or each process would train alone")
        learn, r = learner_from_recipe(a.data, a.recipe, a.overrides)
        report(run_recipe(learn, r, **run_args))
        return 0
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
            report(res)
    finally:
        teardown_distrib()
    return 0


RUN_FILES = ("recipe.toml", "checkpoints", "metrics.csv", "model.safetensors", "model.json", "summary.json")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    "Before the data is read: who holds the folder first, then whether it holds a run to continue (or none)."
    if os.environ.get("RANK", "0") == "0":  # rank 0 takes the lock under torchrun
        check_unlocked(run_dir)  # another process trains there: name it, whatever the folder holds
    found = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME) if run_dir.is_dir() else []
    if resume or not found:  # a lone lock: a run that died at its start
        return
    if any((run_dir / f).exists() for f in RUN_FILES):
        raise FileExistsError(f"run folder {run_dir} already holds a run; pass --resume to continue it, "
                              f"or choose another --run-dir (nothing was overwritten)")
    listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    raise FileExistsError(f"--run-dir {run_dir} is not empty and holds no fastlearn run (it has {listed}); "
                          f"choose a new or empty folder for the run (nothing was touched)")


def report(res) -> None:
    "Where the run is; its result (accuracy, seconds, strategy) is the title of the table run_recipe just printed."
    print(f"run folder: {res.run_dir}", flush=True)


def resume_command(a, run_dir) -> str:
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


def interrupted(args, e) -> int:
    "One line: where training stopped, what was saved, how to resume; exit 128 + the signal (130 Ctrl-C, 143 SIGTERM)."
    if is_main_process():
        if args.cmd == "train":
            msg = e.describe(resume_command(args, e.run_dir))
        else:
            msg = f"interrupted ({e.signal_name}) in the training of {e.run_dir}; stopped"
        print(f"fastlearn: {msg}", file=sys.stderr, flush=True)
    return e.exit_code


def lr_find_command(a) -> int:
    dls = image_dls(data_arg(a.data), size=a.size, bs=a.bs, arch=a.arch, multi_label=a.multi_label)
    learn = transfer_learner(dls, a.arch, pretrained=not a.no_pretrained, progress=False)
    res = learn.find_lr(num_it=a.num_it, plot=a.plot)
    print(f"peak lr (one-cycle lr_max): {res.peak:.3e}")
    print(f"start lr (loss first improves): {res.start:.3e}")
    if res.note:  # start == peak: why
        print(res.note)
    print(f"plot: {res.plot}")
    return 0


def doctor(a) -> int:
    return doctor_main(a.data, a.arch, size=a.size, bs=a.bs, pretrained=not a.no_pretrained, recipe=a.recipe,
                       run=a.run, overrides={"multi_label": True} if a.multi_label else None)


def search_command(a) -> int:
    return search_main(a.data, a.recipe, n_trials=a.trials, rounds=a.rounds, epochs=a.epochs, prune=not a.no_prune,
                       out_dir=a.out, seed=a.seed, overrides=a.overrides)


def predict(a) -> int:
    return predict_main(a.run_dir, a.images, topk=a.topk, bs=a.bs, tta=a.tta, csv_path=a.csv, device=a.device)


def export(a) -> int:
    return export_main(a.run_dir, a.format, a.out)


def run_command(args) -> int:
    "Run a parsed command other than `recipes`; an interrupted training is one line and exit 128 + the signal."
    command = {"train": train, "lr-find": lr_find_command, "doctor": doctor, "search": search_command,
               "predict": predict, "export": export}[args.cmd]
    try:
        return command(args)
    except TrainingInterrupted as e:
        return interrupted(args, e)
