"""Running a recipe: lr_find -> head one-cycle -> gradual unfreezing with discriminative LRs, into a run folder.

The run folder holds the resolved recipe (`recipe.toml`), per-epoch metrics (`metrics.csv`), the
per-step hyper-parameter trace (`trace.csv`), plots (`lr_find.png`, `loss.png`, `schedule.png`),
the final weights (`model.safetensors`) and a summary (`summary.json`).
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from fastai.callback.core import Callback

from .progress import epoch_metrics
from .recipes import Recipe, load_recipe
from .schedules import UnfreezeStage, unfreeze_plan

__all__ = ["run_recipe", "learner_from_recipe", "environment", "RunResult", "HyperTrace", "MetricsLog", "new_run_dir", "stage_plan"]


@dataclass
class RunResult:
    "What a run did and reached."
    run_dir: Path
    recipe: Recipe = field(repr=False)
    strategy: str
    accuracy: float
    valid_loss: float
    seconds: float
    peak_lr: float
    stages: list[dict] = field(default_factory=list)
    why: str = ""                       # why `auto` chose this strategy
    swa: dict = field(default_factory=dict)  # run_swa's valid losses and which weights were kept ({} without SWA)


class HyperTrace(Callback):
    "Records every optimizer group's LR and momentum/beta1 at each training step (what the optimizer used)."
    order = 70

    def __init__(self):
        self.rows: list[dict] = []
        self.stage = ""

    def after_batch(self):
        if not self.training or len(self.yb) == 0:
            return
        hs = self.opt.hypers
        self.rows.append({"step": len(self.rows), "stage": self.stage,
                          "lr": [float(h["lr"]) for h in hs], "mom": [float(h["mom"]) for h in hs if "mom" in h],
                          "loss": float(self.learn.loss.detach())})


class MetricsLog(Callback):
    "Appends one row per epoch (stage, epoch, train/valid loss, metrics, seconds) to a CSV file."
    order = 66

    def __init__(self, path: Path, write: bool = True):
        self.path, self.rows, self.stage, self.write = Path(path), [], "", write

    def before_epoch(self):
        self._t = time.perf_counter()

    def after_epoch(self):
        row = {"stage": self.stage, "epoch": len(self.rows) + 1}
        row.update({n: float(v) for n, v in epoch_metrics(self.learn.recorder).items()})
        row["seconds"] = round(time.perf_counter() - self._t, 3)
        self.rows.append(row)
        if not self.write:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)


def new_run_dir(root: str | Path = "runs", name: str = "run") -> Path:
    "A fresh run folder `root/name-YYYYmmdd-HHMMSS[-k]`; never reuses (so never overwrites) an existing one."
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1000):
        p = root / (base if k == 0 else f"{base}-{k}")
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder under {root}")


def stage_plan(recipe: Recipe, n_groups: int, strategy: str) -> list[UnfreezeStage]:
    "The unfreezing stages a strategy runs (the 2x2 table made concrete)."
    r = recipe
    if strategy == "linear_probe":    # small data, similar to ImageNet: a classifier on frozen features
        return unfreeze_plan(n_groups, r.head_epochs, 0, r.epochs, unfreeze_to=1)
    if strategy == "fine_tune_top":   # large data, similar: the later groups only
        top = r.unfreeze_to if r.unfreeze_to != -1 else max(2, (n_groups + 1) // 2)
        return unfreeze_plan(n_groups, r.head_epochs, r.unfreeze_epochs, r.epochs, r.unfreeze_step, top,
                             r.stage_lr_mult)
    if strategy == "full":            # different data: gradually everything, discriminative LRs
        return unfreeze_plan(n_groups, r.head_epochs, r.unfreeze_epochs, r.epochs, r.unfreeze_step,
                             r.unfreeze_to, r.stage_lr_mult)
    if strategy == "scratch":         # no pretrained weights: one one-cycle over everything
        return [UnfreezeStage(n_groups, r.epochs, 1.0)]
    raise ValueError(f"unknown strategy {strategy!r}")


def run_recipe(learn, recipe="transfer", run_dir: str | Path | None = None, overrides: dict | None = None,
               runs_root: str | Path = "runs", resume: bool = False, checkpoint_steps: int = 0) -> RunResult:
    """Run `recipe` on `learn`: choose the strategy, find the LR, train each unfreezing stage as a
    one-cycle with discriminative LRs, and write everything into a run folder.

    Checkpoints go to `run_dir/checkpoints` every `recipe.checkpoint_every` epochs, at each stage's end and,
    with `checkpoint_steps`, every that many batches. `resume=True` continues `run_dir` from its latest
    checkpoint: finished stages are skipped and the current one goes on from the saved epoch and batch."""
    from .callbacks import recipe_callbacks
    from .checkpoint import Checkpointer, ResumeAt, resume_state
    from .distributed import broadcast_object, global_batch_size, is_main_process
    from .guard import NonFiniteGuard
    from .schedules import scale_lr
    r = load_recipe(recipe, overrides)
    main = is_main_process()  # under DDP only rank 0 writes files and prints; all ranks train
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir, the run folder to continue")
    if run_dir is None:
        run_dir = broadcast_object(new_run_dir(runs_root, r.name) if main else None)
    run_dir = Path(run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    state = resume_state(run_dir, r) if resume else None
    t0 = time.perf_counter()
    strategy, why = r.strategy, ""
    if state is not None:
        strategy, why = state.extra["strategy"], state.extra["why"]
    elif strategy == "auto":
        from .strategy import choose_strategy
        strategy, why = broadcast_object(choose_strategy(learn, r))
        if main:
            print(f"auto strategy: {strategy} ({why})", flush=True)
    plan = stage_plan(r, learn.n_layer_groups, strategy)
    if main:
        r.save(run_dir / "recipe.toml")
        (run_dir / "environment.json").write_text(json.dumps(environment(r.seed), indent=2))
    trace, log = HyperTrace(), MetricsLog(run_dir / "metrics.csv", write=main)
    # the callbacks see the chosen strategy (resizing needs the run's length, compile its last stage)
    total_steps = sum(st.epochs for st in plan) * len(learn.dls.train)
    extra = recipe_callbacks(learn, r.replace(strategy=strategy), run_dir, total_steps=total_steps)
    stages = []
    ckpt = Checkpointer(run_dir, r.checkpoint_every, r.keep_last, checkpoint_steps, recipe=r,
                        extra_state=lambda: {"strategy": strategy, "why": why, "peak": peak, "stages": stages,
                                             "trace": trace.rows, "metrics": log.rows})
    guard = NonFiniteGuard()

    def label_stage(name: str) -> None:  # the stage name in traces, metrics, guard messages and progress lines
        for cb in [trace, log, guard] + [c for c in learn.cbs if hasattr(c, "stage")]:
            cb.stage = name
    learn.freeze_top(plan[0].n_trainable)
    peak = r.lr
    if state is not None:
        learn.freeze_top(plan[min(state.stage, len(plan) - 1)].n_trainable)
        state.restore(learn, extra)
        ckpt.load_history(state)
        peak, stages = state.extra["peak"], list(state.extra["stages"])
        trace.rows, log.rows = list(state.extra["trace"]), list(state.extra["metrics"])
        if main:
            print(f"resuming {run_dir} from {state.path.name}: stage {state.stage + 1}/{len(plan)}, "
                  f"epoch {state.epoch}/{state.stage_epochs}, batch {state.iter}", flush=True)
    elif peak is None:
        if not r.lr_find:
            raise ValueError("recipe sets lr_find = false but gives no lr; set lr = <peak LR>")
        # every rank sweeps together (at the global batch); rank 0's suggestion is used everywhere
        found = learn.find_lr(plot=run_dir / "lr_find.png" if main else None)
        peak = broadcast_object(found.peak)
        if main:
            print(f"lr_find: peak {found.peak:.2e}, start {found.start:.2e}", flush=True)
    else:  # a recipe's fixed LR is for `lr_ref_bs` images per step: scale to this run's global batch
        peak = scale_lr(peak, global_batch_size(r.bs, r.grad_accum), r.lr_ref_bs, r.lr_scale_rule)
    for i, st in enumerate(plan):
        epochs, resume_cb = st.epochs, []
        if state is not None:  # the first stage run after a resume: skip finished stages, go on mid-stage
            if i < state.stage or (i == state.stage and state.stage_done):
                continue
            if st.epochs > 0:  # a 0-epoch stage draws nothing: the RNGs wait for the next real one
                resume_cb = [ResumeAt(state) if i == state.stage else ResumeAt(state, epoch=0, stage_epochs=st.epochs)]
                epochs, state = st.epochs - resume_cb[0].epoch_offset, None
        name = "head" if st.n_trainable == 1 else f"top{st.n_trainable}" if st.n_trainable < learn.n_layer_groups else "all"
        label_stage(name)
        ckpt.stage_index = i
        learn.freeze_top(st.n_trainable)  # fastai's freeze_to clears the optimizer state
        if resume_cb and resume_cb[0].mid_stage:  # mid-stage: the state the interrupted stage had built up
            resume_cb[0].st.restore_optimizer(learn)
        hi = peak * st.lr_mult
        lr = slice(hi / r.lr_ratio, hi) if st.n_trainable > 1 else hi
        ts = time.perf_counter()
        learn.fit_stage(epochs, lr, r.div, r.final_div, r.pct_start, r.moms,
                        cbs=[trace, log, ckpt, guard] + extra + resume_cb)
        vals = epoch_metrics(learn.recorder)
        ran = sum(1 for row in log.rows if row["stage"] == name)  # fewer than planned after early stopping
        stages.append({"stage": name, "trainable_groups": st.n_trainable, "epochs": ran,
                       "peak_lr": hi, **{k: float(v) for k, v in vals.items()},
                       "seconds": round(time.perf_counter() - ts, 1)})
    swa = {}
    if r.swa_epochs:  # SWA after the last stage, at a constant LR, keeping the last stage's groups and LR ratio
        from .swa import run_swa
        last = plan[-1]
        swa_hi = r.swa_lr if r.swa_lr is not None else peak * last.lr_mult / 10
        swa_lrs = learn.layer_lrs(slice(swa_hi / r.lr_ratio, swa_hi) if last.n_trainable > 1 else swa_hi)
        label_stage("swa")
        swa = run_swa(learn, r.swa_epochs, swa_lrs, cbs=[trace, log, guard], mom=r.moms[0])
    from .resize import ProgressiveResize
    at_valid_size = [cb for cb in extra if isinstance(cb, ProgressiveResize)]  # evaluate at valid_size
    with learn.added_cbs(at_valid_size):
        for cb in extra:
            if callable(getattr(type(cb), "finish", None)):
                cb.finish(learn)
        valid_loss, *mets = learn.validate()
    acc = float(mets[0]) if mets else float("nan")
    result = RunResult(run_dir, r, strategy, acc, float(valid_loss), time.perf_counter() - t0, peak, stages, why, swa)
    if main:
        _write_outputs(learn, result, trace, log)
        from .progress import summary_table
        summary_table(stages, title=f"{r.name}: {strategy}, accuracy {acc:.4f} in {result.seconds:.0f}s")
    return result


def _git_commit(where: Path) -> str | None:
    import subprocess
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(seed: int) -> dict:
    "What reproduces a run besides the recipe: seed, library and dependency versions, devices, git commits."
    import platform
    from importlib.metadata import PackageNotFoundError, version
    import torch
    from . import __version__
    vers = {}
    for pkg in ("torch", "torchvision", "fastai", "timm", "numpy", "rich", "scikit-learn"):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            vers[pkg] = None
    return {"seed": seed, "fastlearn": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "versions": vers,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(),
            "git_commit": {"cwd": _git_commit(Path.cwd()), "fastlearn": _git_commit(Path(__file__).parent)}}


def _write_outputs(learn, res: RunResult, trace: HyperTrace, log: MetricsLog) -> None:
    from .checkpoint import save_weights
    d = res.run_dir
    save_weights(learn.model, d / "model.safetensors")
    with open(d / "trace.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "stage", "lr_head", "lr_first", "mom", "loss"])
        for row in trace.rows:
            w.writerow([row["step"], row["stage"], row["lr"][-1], row["lr"][0],
                        row["mom"][-1] if row["mom"] else "", row["loss"]])
    summary = {k: v for k, v in asdict(res).items() if k not in ("recipe", "run_dir")}
    (d / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    plot_run(trace.rows, log.rows, d)
    from .run_folder import write_model_card  # issue 13: model.json, so the run folder is usable without the data
    write_model_card(learn, d, res.recipe)
    from .interpret import interpret_run  # issue 13: confusion_matrix.png, top_losses.png, per_class in summary.json
    interpret_run(learn, d, res.recipe)


def plot_run(trace_rows: list[dict], epoch_rows: list[dict], out: Path) -> None:
    "loss.png (training loss per step, validation loss per epoch) and schedule.png (LR and momentum)."
    from matplotlib.figure import Figure  # no pyplot: never switches the user's (notebook's) backend
    if not trace_rows:
        return
    steps = [r["step"] for r in trace_rows]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, [r["loss"] for r in trace_rows], lw=0.8, label="train loss (per step)")
    if epoch_rows and "valid_loss" in epoch_rows[0]:
        per_epoch = len(steps) / max(1, len(epoch_rows))
        ax.plot([per_epoch * (i + 1) for i in range(len(epoch_rows))], [r["valid_loss"] for r in epoch_rows],
                "o-", label="valid loss (per epoch)")
    ax.set_xlabel("optimizer step"); ax.set_ylabel("loss"); ax.legend(); ax.set_title("loss")
    fig.tight_layout(); fig.savefig(out / "loss.png", dpi=100)
    fig = Figure(figsize=(7, 5))
    a1, a2 = fig.subplots(2, 1, sharex=True)
    a1.plot(steps, [r["lr"][-1] for r in trace_rows], label="head LR")
    a1.plot(steps, [r["lr"][0] for r in trace_rows], label="first-group LR")
    a1.set_yscale("log"); a1.set_ylabel("learning rate"); a1.legend()
    if trace_rows[0]["mom"]:
        a2.plot(steps, [r["mom"][-1] for r in trace_rows], color="C3")
    a2.set_ylabel("momentum / beta1"); a2.set_xlabel("optimizer step")
    fig.suptitle("one-cycle schedule per stage"); fig.tight_layout()
    fig.savefig(out / "schedule.png", dpi=100)


def learner_from_recipe(data: str | Path, recipe="transfer", overrides: dict | list[str] | None = None,
                        progress: bool = True):
    """DataLoaders and a `TransferLearner` exactly as recipe `recipe` says, for a folder or a sample name.

    Everything is validated before any compute: the recipe, the data folder, the architecture name
    and the number of classes against the head.
    """
    from fastai.torch_core import set_seed
    from .data import image_dls
    from .learner import transfer_learner
    from .models import check_arch
    from .precision import choose_precision
    from .samples import is_sample_name, sample
    r = load_recipe(recipe, overrides)
    check_arch(r.arch)
    choose_precision(r.precision, None)  # a bf16/fp16 recipe on a CPU fails here, before the data is read
    path = sample(str(data)) if is_sample_name(str(data)) and not Path(data).exists() else Path(data)
    set_seed(r.seed, reproducible=True)
    # images load at the largest size the run needs; ProgressiveResize shrinks training batches on the device
    dls = image_dls(path, size=max(r.size, r.valid_size or r.size), bs=r.bs, valid_pct=r.valid_pct, seed=r.seed,
                    arch=r.arch, augment=r.augment, flip=r.flip, bad_images=r.bad_images, random_erasing=r.random_erasing,
                    rand_augment=r.rand_augment, num_workers=r.num_workers)
    learn = transfer_learner(dls, r.arch, pretrained=r.pretrained, opt=r.opt, lookahead=r.lookahead, wd=r.wd,
                             wd_norm_bias=r.wd_norm_bias, label_smoothing=r.label_smoothing,
                             drop_rate=r.drop_rate, drop_path=r.drop_path, progress=progress,
                             loss=r.loss, focal_gamma=r.focal_gamma)
    return learn, r
