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
from .schedules import UnfreezeStage, unfreeze_plan  # noqa: F401  (UnfreezeStage: the head stage on features)

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
    timings: dict = field(default_factory=dict)  # seconds: features, lr_find, head, probe, total
    probe_accuracy: float | None = None  # the head on frozen features' validation accuracy (a linear probe)
    kept: dict | None = None            # which weights the run ended with, and why (keep_best)
    ft_peak_lr: float | None = None     # peak LR of the first fine-tuning stage


class HyperTrace(Callback):
    """Records every optimizer group's LR and momentum/beta1 at each training step (what the optimizer used), and
    the step's loss. The losses stay device tensors until `rows` is read (at the end of each epoch, or by a
    checkpoint), then come over in one transfer: no step waits for the device."""
    order = 70

    def __init__(self):
        self._rows: list[dict] = []
        self._pending: list[tuple[dict, object]] = []  # (row, its loss as a detached tensor) not yet read
        self.stage = ""

    @property
    def rows(self) -> list[dict]:
        self._flush()
        return self._rows

    @rows.setter
    def rows(self, value: list[dict]):
        self._rows, self._pending = value, []

    def _flush(self) -> None:
        "Write the pending losses into their rows, read from the device in one transfer."
        if self._pending:
            losses = [t for _, t in self._pending]
            if len({(t.device, t.dtype) for t in losses}) == 1:
                import torch
                vals = torch.stack(losses).tolist()
            else:
                vals = [float(t) for t in losses]
            for (row, _), v in zip(self._pending, vals):
                row["loss"] = v
            self._pending = []

    def after_batch(self):
        if not self.training or len(self.yb) == 0:
            return
        if hasattr(self.opt, "hyper"):  # fastlearn's optimizers read one hyper-parameter without the others
            lr, mom = self.opt.hyper("lr"), self.opt.hyper("mom")
        else:
            hs = self.opt.hypers
            lr, mom = [h["lr"] for h in hs], [h["mom"] for h in hs if "mom" in h]
        row = {"step": len(self._rows), "stage": self.stage, "lr": [float(v) for v in lr],
               "mom": [float(v) for v in mom], "loss": None}
        self._rows.append(row)
        self._pending.append((row, self.learn.loss.detach()))

    def after_epoch(self):
        self._flush()


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


def _record_finished_stage(stages: list, rows: list, st, plan, peak, ft_peak, n_groups: int, offer) -> None:
    """A resume from a stage-end checkpoint (stopped after the checkpoint, before the stage was recorded): its row in
    `stages`, from the metrics log, and its keep-best offer (the restored model is that stage's end), as the
    uninterrupted run made them."""
    name = _stage_name(st.n_trainable, n_groups)
    if any(s["stage"] == name for s in stages):
        return
    mine = [row for row in rows if row["stage"] == name]
    if not mine:
        return
    vals = {k: float(v) for k, v in mine[-1].items() if k not in ("stage", "epoch", "seconds")}
    hi = _stage_peak(st, plan, peak, ft_peak)
    stages.append({"stage": name, "trainable_groups": st.n_trainable, "epochs": len(mine), "peak_lr": hi, **vals,
                   "seconds": round(sum(row.get("seconds", 0.0) for row in mine), 1)})
    metrics = [k for k in vals if k not in ("train_loss", "valid_loss")]
    offer(name, vals.get("valid_loss", float("nan")), vals[metrics[0]] if metrics else float("nan"))


def use_feature_head(learn, r: Recipe, strategy: str) -> bool:
    "Whether the head stage trains on cached frozen-body features: pretrained weights and a plain linear head."
    if not (r.head_features and r.pretrained) or strategy == "scratch" or r.mixup or r.cutmix:
        return False  # mixup/cutmix mix images, which cached features cannot do
    from .features import supports_feature_head
    return supports_feature_head(learn.model, size=min(64, r.size))


def _stage_name(n_trainable: int, n_groups: int) -> str:
    return "head" if n_trainable == 1 else f"top{n_trainable}" if n_trainable < n_groups else "all"


def _first_metric(learn) -> tuple[float, float]:
    "(valid_loss, first metric) of the last epoch fastai recorded; the metric is nan when there is none."
    vals = epoch_metrics(learn.recorder)
    names = [k for k in vals if k not in ("epoch", "train_loss", "valid_loss")]
    score = float(vals[names[0]]) if names else float("nan")
    return float(vals.get("valid_loss", float("nan"))), score


def run_recipe(learn, recipe="transfer", run_dir: str | Path | None = None, overrides: dict | None = None,
               runs_root: str | Path = "runs", resume: bool = False, checkpoint_steps: int = 0,
               cbs=None, accept_data_change: bool = False) -> RunResult:
    """Run `recipe` on `learn`: find the LR, train the head (on cached features when the body is pretrained),
    choose the strategy (`auto`), fine-tune each unfreezing stage as a one-cycle with discriminative LRs, keep
    the best stage end's weights, and write everything into a run folder.

    Checkpoints go to `run_dir/checkpoints` every `recipe.checkpoint_every` epochs, at each stage's end and,
    with `checkpoint_steps`, every that many batches. `resume=True` continues `run_dir` from its latest
    checkpoint: finished stages are skipped and the current one goes on from the saved epoch and batch.
    `cbs`: the caller's fastai callbacks, added to every stage that trains the network (not to lr_find, nor to the
    head trained on cached features, which never sees images).

    One process at a time trains in a run folder (`run.lock`, else `RunLockedError`). `data.json` records the
    data; a resume on other data raises `DataChangedError` unless `accept_data_change`. Ctrl-C or SIGTERM stop
    at the next batch boundary with a checkpoint there and raise `TrainingInterrupted` (how to resume)."""
    from .checkpoint import resume_or_restart
    from .compat import reconcile
    from .distributed import broadcast_object, is_main_process
    from .fingerprint import record_data
    from .interrupt import interrupt_guard
    from .runlock import run_lock
    r = load_recipe(recipe, overrides)
    if r.bs is None:  # derived from the data: the batch size the DataLoaders were built with is what runs
        r = r.replace(bs=int(learn.dls.train.bs))
    r = reconcile(learn, r)  # a learner built outside the recipe: its own values, warned and recorded
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir, the run folder to continue")
    if run_dir is None:
        run_dir = broadcast_object(new_run_dir(runs_root, r.name) if is_main_process() else None)
    run_dir = Path(run_dir)
    if resume and not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: nothing to resume; check the path, or "
                                f"train without resume to start a run there")
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir), interrupt_guard(run_dir):
        resume = resume and resume_or_restart(run_dir)
        record_data(learn.dls, run_dir, resume=resume, accept_change=accept_data_change)
        return _run_recipe(learn, r, run_dir, resume=resume, checkpoint_steps=checkpoint_steps, cbs=cbs)


def _run_recipe(learn, r: Recipe, run_dir: Path, resume: bool = False, checkpoint_steps: int = 0,
                cbs=None) -> RunResult:
    "run_recipe's training, inside the run folder's lock and the signal guard."
    from .callbacks import recipe_callbacks
    from .checkpoint import Checkpointer, ResumeAt, resume_state
    from .distributed import broadcast_object, global_batch_size, is_main_process
    from .guard import NonFiniteGuard
    from .interrupt import StopOnSignal
    from .keep import Candidate, KeepBest
    from .schedules import scale_lr
    main = is_main_process()  # under DDP only rank 0 writes files and prints; all ranks train
    state = resume_state(run_dir, r) if resume else None
    t0 = time.perf_counter()
    # the run's clock counts every process: a resumed run starts from the seconds its checkpoint recorded
    before = _seconds_before(state) if state is not None else 0.0
    stage_t0 = 0.0  # when the current stage started, on the run's clock

    def elapsed() -> float:
        return before + time.perf_counter() - t0
    timings: dict[str, float] = {}
    strategy, why = r.strategy, ""
    if state is not None:
        strategy, why = state.extra["strategy"], state.extra["why"]
    on_features = state.extra.get("on_features", False) if state is not None else \
        use_feature_head(learn, r, "full" if strategy == "auto" else strategy)
    trace, log = HyperTrace(), MetricsLog(run_dir / "metrics.csv", write=main)
    stages: list[dict] = []
    keep = KeepBest(run_dir / "checkpoints" / "kept.safetensors", write=main) if r.keep_best else None
    peak, ft_peak, probe = r.lr, r.ft_lr, None
    guard = NonFiniteGuard()
    stop = StopOnSignal()  # Ctrl-C/SIGTERM: checkpoint at the next batch boundary and stop

    def extra_state() -> dict:
        return {"strategy": strategy, "why": why, "peak": peak, "ft_peak": ft_peak, "stages": stages,
                "trace": trace.rows, "metrics": log.rows, "on_features": on_features, "probe": probe,
                "kept": keep.state_dict() if keep else None, "timings": timings,
                "seconds": elapsed(), "stage_t0": stage_t0}
    ckpt = Checkpointer(run_dir, r.checkpoint_every, r.keep_last, checkpoint_steps, recipe=r, extra_state=extra_state)

    def label_stage(name: str) -> None:  # the stage name in traces, metrics, guard messages and progress lines
        for cb in [trace, log, guard] + [c for c in learn.cbs if hasattr(c, "stage")]:
            cb.stage = name

    def offer(name: str, valid_loss: float, score: float) -> None:
        if keep is not None:
            keep.offer(learn.model, Candidate(name, score, valid_loss, len(trace.rows)))

    if state is None and on_features:
        # -- the head on features the frozen body computes once: LR sweep, head stage and auto's probe --
        strategy, why, peak, probe = _head_on_features(learn, r, run_dir if main else None, trace, log, stages, timings,
                                                       main)
        label_stage("head")
        offer("head", stages[-1]["valid_loss"], stages[-1].get(_score_key(stages[-1]), float("nan")))
    elif state is None and strategy == "auto":
        from .strategy import choose_strategy
        ts = time.perf_counter()
        strategy, why = broadcast_object(choose_strategy(learn, r))
        timings["probe"] = time.perf_counter() - ts
        if main:
            print(f"auto strategy: {strategy} ({why})", flush=True)
    plan = stage_plan(r, learn.n_layer_groups, strategy)
    if on_features and plan[0].n_trainable == 1:  # the head stage ran on features: its epochs are not images'
        plan[0] = UnfreezeStage(1, 0, plan[0].lr_mult)
    stop.n_stages = len(plan)
    if main:
        r.save(run_dir / "recipe.toml")
        (run_dir / "environment.json").write_text(json.dumps(environment(r.seed), indent=2))
    # the callbacks see the chosen strategy (resizing needs the run's length, compile its last stage)
    total_steps = sum(st.epochs for st in plan) * len(learn.dls.train)
    extra = recipe_callbacks(learn, r.replace(strategy=strategy), run_dir, total_steps=total_steps)
    learn.freeze_top(plan[0].n_trainable if plan[0].epochs else next((s.n_trainable for s in plan if s.epochs), 1),
                     train_bn=r.train_bn)
    if state is not None:
        learn.freeze_top(plan[min(state.stage, len(plan) - 1)].n_trainable, train_bn=r.train_bn)
        state.restore(learn, extra)
        ckpt.load_history(state)
        peak, ft_peak, probe = state.extra["peak"], state.extra.get("ft_peak"), state.extra.get("probe")
        stages, timings = list(state.extra["stages"]), dict(state.extra.get("timings") or {})
        stage_t0 = float(state.extra.get("stage_t0", before))
        trace.rows, log.rows = list(state.extra["trace"]), list(state.extra["metrics"])
        if keep is not None and state.extra.get("kept"):
            keep.load_state_dict(state.extra["kept"])
        if main:
            at = "done" if state.stage_done else f"epoch {state.epoch + 1}/{state.stage_epochs}" + (
                f" from batch {state.iter + 1}" if state.iter else "")  # counted as the progress lines count
            print(f"resuming {run_dir} from {state.path.name}: stage {state.stage + 1}/{len(plan)} {at}", flush=True)
    elif on_features:
        learn.add_cb(ckpt)  # a checkpoint after the head stage: a resume skips it (and its feature pass)
        ckpt.stage_index = 0
        try:
            ckpt.save(epoch=0, iter=0, valid_loss=stages[-1]["valid_loss"], stage_epochs=0)
        finally:
            learn.remove_cb(ckpt)
    elif peak is None:
        if not r.lr_find:
            raise ValueError("recipe sets lr_find = false but gives no lr; set lr = <peak LR>")
        # every rank sweeps together (at the global batch); rank 0's suggestion is used everywhere. The sweep is
        # bounded by the run: at most a tenth of its steps (at least 20, at most 100)
        num_it = int(min(100, max(20, 0.1 * total_steps)))
        ts = time.perf_counter()
        found = learn.find_lr(num_it=num_it, plot=run_dir / "lr_find.png" if main else None)
        timings["lr_find"] = time.perf_counter() - ts
        peak = broadcast_object(found.peak)
        if main:
            print(f"lr_find: peak {found.peak:.2e}, start {found.start:.2e}", flush=True)
            if found.note:  # start == peak: why (lr_finder.start_note)
                print(f"lr_find: {found.note}", flush=True)
    else:  # a recipe's fixed LR is for `lr_ref_bs` images per step: scale to this run's global batch
        peak = scale_lr(peak, global_batch_size(r.bs, r.grad_accum), r.lr_ref_bs, r.lr_scale_rule)
    if ft_peak is None:
        # after the head on features: ft_lr_factor x the head's LR (calibrated for the valley rule on the head's
        # sweep); on the classic path (one sweep of the whole model, its divergence-side peak) each stage runs at
        # peak x its lr_mult (stage_lr_mult per deeper stage), as the recipe's stage plan says
        ft_peak = min(peak * r.ft_lr_factor, r.ft_lr_max) if on_features else peak * _first_ft_mult(plan)
    elif state is None:
        ft_peak = scale_lr(ft_peak, global_batch_size(r.bs, r.grad_accum), r.lr_ref_bs, r.lr_scale_rule)
    for i, st in enumerate(plan):
        epochs, resume_cb = st.epochs, []
        if st.epochs == 0:
            continue
        if state is not None:  # the first stage run after a resume: skip finished stages, go on mid-stage
            if i < state.stage:
                continue
            if i == state.stage and state.stage_done:
                _record_finished_stage(stages, log.rows, st, plan, peak, ft_peak, learn.n_layer_groups, offer)
                continue
            resume_cb = [ResumeAt(state) if i == state.stage else ResumeAt(state, epoch=0, stage_epochs=st.epochs)]
            epochs, state = st.epochs - resume_cb[0].epoch_offset, None
        name = _stage_name(st.n_trainable, learn.n_layer_groups)
        label_stage(name)
        ckpt.stage_index = i
        learn.freeze_top(st.n_trainable, train_bn=r.train_bn)  # fastai's freeze_to clears the optimizer state
        if resume_cb and resume_cb[0].mid_stage:  # mid-stage: the state the interrupted stage had built up
            resume_cb[0].st.restore_optimizer(learn)
        # the head stage's peak is the sweep's; fine-tuning stages start at ft_peak, lower for each deeper one
        hi = _stage_peak(st, plan, peak, ft_peak)
        lr = slice(hi / r.lr_ratio, hi) if st.n_trainable > 1 else hi
        if not (resume_cb and resume_cb[0].mid_stage):  # a stage resumed mid-way counts from its real start
            stage_t0 = elapsed()
        learn.fit_stage(epochs, lr, r.div, r.final_div, r.pct_start, r.moms,
                        cbs=[trace, log, ckpt, guard, stop] + extra + resume_cb + list(cbs or []))
        vals = epoch_metrics(learn.recorder)
        ran = sum(1 for row in log.rows if row["stage"] == name)  # fewer than planned after early stopping
        stages.append({"stage": name, "trainable_groups": st.n_trainable, "epochs": ran,
                       "peak_lr": hi, **{k: float(v) for k, v in vals.items()},
                       "seconds": round(elapsed() - stage_t0, 1)})
        offer(name, *_first_metric(learn))
    swa = {}
    if r.swa_epochs:  # SWA after the last stage, at a constant LR, keeping the last stage's groups and LR ratio
        from .swa import run_swa
        last = plan[-1]
        last_hi = _stage_peak(last, plan, peak, ft_peak)
        swa_hi = r.swa_lr if r.swa_lr is not None else last_hi / 10
        swa_lrs = learn.layer_lrs(slice(swa_hi / r.lr_ratio, swa_hi) if last.n_trainable > 1 else swa_hi)
        label_stage("swa")
        swa = run_swa(learn, r.swa_epochs, swa_lrs, cbs=[trace, log, guard] + list(cbs or []), mom=r.moms[0])
    from .resize import ProgressiveResize
    at_valid_size = [cb for cb in extra if isinstance(cb, ProgressiveResize)]  # evaluate at valid_size
    kept = None
    with learn.added_cbs(at_valid_size):
        for cb in extra:
            if callable(getattr(type(cb), "finish", None)):
                cb.finish(learn)
        valid_loss, *mets = learn.validate()
        final = Candidate("final", float(mets[0]) if mets else float("nan"), float(valid_loss), len(trace.rows))
        if keep is not None and keep.best is not None and not _better_or_same(final, keep.best):
            keep.restore(learn.model)  # a stage end beat the weights the run ended with: keep that stage's
            kept = {"stage": keep.best.stage, "accuracy": keep.best.score, "valid_loss": keep.best.valid_loss,
                    "final_accuracy": final.score, "final_valid_loss": final.valid_loss,
                    "why": f"stage {keep.best.stage!r} reached validation {_metric_text(keep.best)}, better than the "
                           f"end of the run ({_metric_text(final)}); its weights were kept"}
            valid_loss, *mets = learn.validate()
        else:
            kept = {"stage": "final", "accuracy": final.score, "valid_loss": final.valid_loss,
                    "why": "the end of the run was the best on validation" if keep is not None else
                           "keep_best = false: the weights the run ended with"}
    timings["total"] = elapsed()
    if before:
        timings["before_resume"] = before
    acc = float(mets[0]) if mets else float("nan")
    result = RunResult(run_dir, r, strategy, acc, float(valid_loss), timings["total"], peak, stages, why, swa,
                       timings=timings, probe_accuracy=probe, kept=kept, ft_peak_lr=ft_peak)
    if main:
        _write_outputs(learn, result, trace, log)
        if not r.keep_checkpoints:  # finished and written: an interrupted or failed run never gets here
            _prune_checkpoints(run_dir, keep, kept)
        from .progress import summary_table
        resumed = f" ({before:.1f}s of it before the resume)" if before else ""
        summary_table(stages, title=f"{r.name}: {strategy}")
        # the run's one result line, `key=value` so that scripts and CI read it (the command line adds the run folder)
        print(f"accuracy={acc:.4f} time={result.seconds:.1f}s{resumed}", flush=True)
        if kept and kept["stage"] != "final":
            print(f"kept: {kept['why']}", flush=True)
    return result


def _seconds_before(state) -> float:
    "Seconds the run's earlier processes trained, as its checkpoint recorded them (older checkpoints: the epochs')."
    if "seconds" in state.extra:
        return float(state.extra["seconds"])
    return float(sum(row.get("seconds", 0.0) for row in state.extra.get("metrics", [])))


def _score_key(stage: dict) -> str:
    "The first metric's name in a stage row (after the losses)."
    return next((k for k in stage if k not in ("stage", "trainable_groups", "epochs", "peak_lr", "train_loss",
                                               "valid_loss", "seconds", "epoch")), "")


def _stage_peak(st, plan, peak: float, ft_peak: float) -> float:
    "A stage's peak LR: the head's is the sweep's; fine-tuning stages start at ft_peak, scaled by their lr_mult."
    return peak * st.lr_mult if st.n_trainable == 1 else ft_peak * st.lr_mult / _first_ft_mult(plan)


def _first_ft_mult(plan) -> float:
    "The LR multiplier of the first fine-tuning stage (the one ft_peak applies to)."
    return next((st.lr_mult for st in plan if st.n_trainable > 1 and st.epochs), 1.0)


def _better_or_same(a, b) -> bool:
    from .keep import better
    return better(a, b)


def _metric_text(c) -> str:
    import math
    return (f"accuracy {c.score:.4f}, loss {c.valid_loss:.4f}" if math.isfinite(c.score)
            else f"loss {c.valid_loss:.4f}")


def _head_on_features(learn, r: Recipe, plot_dir, trace, log, stages: list, timings: dict, main: bool):
    """The head stage on cached features: one frozen-body pass, an LR sweep of the head, the head's one-cycle and,
    for `auto`, the 2x2 decision from the head's validation accuracy (the linear probe) and the BN shift.
    Returns (strategy, why, head peak LR, probe accuracy)."""
    from fastai.callback.schedule import ParamScheduler
    from .budget import feature_batch_size, feature_epochs
    from .distributed import broadcast_object, is_distributed
    from .features import extract_features, head_learner
    from .lr_finder import lr_find, plot_lr_find, suggest
    from .schedules import one_cycle_scheds
    ts = time.perf_counter()
    feats = extract_features(learn, bs=max(32, r.bs or 32), seed=r.seed, adapt_bn_above=r.adapt_bn_shift)
    timings["features"] = time.perf_counter() - ts
    n = len(feats.train_y)
    bs = feature_batch_size(n)
    epochs = feature_epochs(n, bs, r.head_steps)
    hl = head_learner(learn, feats, bs, r.wd, seed=r.seed)
    peak = r.lr
    if peak is None:
        if not r.lr_find:
            raise ValueError("recipe sets lr_find = false but gives no lr; set lr = <peak LR>")
        ts = time.perf_counter()
        found = lr_find(hl, num_it=200)
        peak = suggest(found.lrs, found.losses, r.lr_suggester)
        timings["lr_find"] = time.perf_counter() - ts
        if plot_dir is not None:
            found.peak = peak  # the plot marks the LR the run uses
            plot_lr_find(found, Path(plot_dir) / "lr_find.png")
    peak = broadcast_object(peak)
    log.stage = trace.stage = "head"
    ts = time.perf_counter()
    hl.fit(epochs, cbs=[ParamScheduler(one_cycle_scheds(peak, r.div, r.final_div, r.pct_start, r.moms)), trace, log])
    if is_distributed():  # every rank trained the same head on the same features; make it bitwise rank 0's
        import torch.distributed as dist
        for p in hl.model.parameters():
            dist.broadcast(p.data, src=0)
    valid_loss, score = _first_metric(hl)
    vals = {k: float(v) for k, v in epoch_metrics(hl.recorder).items()}
    timings["head"] = time.perf_counter() - ts
    stages.append({"stage": "head", "trainable_groups": 1, "epochs": epochs, "peak_lr": peak, **vals,
                   "seconds": round(timings["features"] + timings.get("lr_find", 0) + timings["head"], 1)})
    if main:
        metric = f" {_score_key(stages[-1])} {score:.4f}" if score == score else ""
        print(f"[head] on cached features: {n} train / {len(feats.valid_y)} valid images, {epochs} epochs x "
              f"{n // bs} steps at peak LR {peak:.2e}: valid_loss {valid_loss:.4f}{metric} "
              f"(features {timings['features']:.1f}s, sweep {timings.get('lr_find', 0):.1f}s, "
              f"head {timings['head']:.1f}s)" + (f"; BN statistics re-estimated on the training images first (BN "
                                                 f"shift {feats.bn_shift:.2f} > {r.adapt_bn_shift:g})"
                                                 if feats.bn_adapted else ""), flush=True)
    strategy, why = r.strategy, ""
    if strategy == "auto":
        from .strategy import decide, stats_from_features
        strategy, why = broadcast_object(decide(stats_from_features(learn, feats, score)))
        if main:
            print(f"auto strategy: {strategy} ({why})", flush=True)
    return strategy, why, peak, score


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


def _prune_checkpoints(run_dir: Path, keep, kept: dict | None) -> None:
    """A finished run's checkpoints: the last one stays (a resume or an inspection reads it), the others go (issue 22).
    keep-best's copy of a stage end's weights, when the run kept that stage, holds what model.safetensors holds: it
    becomes a hard link to it (stored once; a resume still finds it). When the run kept its own end, that copy lost."""
    from .checkpoint import link_in_place, prune_finished
    stay: tuple[str, ...] = ()
    if keep is not None and keep.path is not None and keep.path.exists() and kept and kept["stage"] != "final":
        link_in_place(run_dir / "model.safetensors", keep.path)  # no hard links there: the copy stays as it is
        stay = (keep.path.name,)
    prune_finished(run_dir, keep=stay)


def _epoch_end_steps(trace_rows: list[dict], epoch_rows: list[dict]) -> list[float]:
    "The optimizer step at which each logged epoch ended: stages differ in steps per epoch (the head on features)."
    steps_of, first_of = {}, {}
    for r in trace_rows:
        steps_of[r["stage"]] = steps_of.get(r["stage"], 0) + 1
        first_of.setdefault(r["stage"], r["step"])
    epochs_of: dict[str, int] = {}
    for r in epoch_rows:
        epochs_of[r["stage"]] = epochs_of.get(r["stage"], 0) + 1
    out, seen = [], {}
    for r in epoch_rows:
        st = r["stage"]
        seen[st] = seen.get(st, 0) + 1
        per = steps_of.get(st, 0) / max(1, epochs_of[st])
        out.append(first_of.get(st, out[-1] if out else 0) + per * seen[st])
    return out


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
        ax.plot(_epoch_end_steps(trace_rows, epoch_rows), [r["valid_loss"] for r in epoch_rows], "o-",
                label="valid loss (per epoch)")
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
    from .data import image_dls
    from .labels import label_args
    from .learner import transfer_learner
    from .models import check_arch
    from .precision import choose_precision
    from .samples import is_sample_name, sample
    r = load_recipe(recipe, overrides)
    check_arch(r.arch)
    from .loggers import check_loggers
    check_loggers(r.loggers)  # a logger's missing package fails here, before the data is read
    choose_precision(r.precision, None)  # a bf16/fp16 recipe on a CPU fails here, before the data is read
    from .loader import check_decode
    check_decode(r.decode)  # decode="cuda" without CUDA fails here too
    path = sample(str(data)) if is_sample_name(str(data)) and not Path(data).exists() else Path(data)
    from .precision import seed_and_mode
    seed_and_mode(r.seed, r.deterministic)  # fastai's set_seed, then the deterministic/fast switch (precision.py)
    report = None
    if r.bs is None:  # schedules sized in steps: the batch size follows the number of training images
        from .budget import batch_size_for
        from .labels import label_report
        report = label_report(path, bad_images=r.bad_images, valid_pct=r.valid_pct, seed=r.seed, **label_args(r))
        r = r.replace(bs=batch_size_for(report.n_train(r.valid_pct), r.epochs, r.min_steps))
    # images load at the largest size the run needs; ProgressiveResize shrinks training batches on the device
    dls = image_dls(path, size=max(r.size, r.valid_size or r.size), bs=r.bs, valid_pct=r.valid_pct, seed=r.seed,
                    report=report,
                    arch=r.arch, augment=r.augment, flip=r.flip, bad_images=r.bad_images, random_erasing=r.random_erasing,
                    rand_augment=r.rand_augment, num_workers=r.num_workers, cache_images=r.cache_images,
                    decode=r.decode, **label_args(r))
    learn = transfer_learner(dls, r.arch, pretrained=r.pretrained, opt=r.opt, lookahead=r.lookahead, wd=r.wd,
                             wd_norm_bias=r.wd_norm_bias, label_smoothing=r.label_smoothing,
                             drop_rate=r.drop_rate, drop_path=r.drop_path, progress=progress,
                             loss=r.loss, focal_gamma=r.focal_gamma)
    return learn, r
