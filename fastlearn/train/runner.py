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

from ..base.progress import epoch_metrics, summary_table
from ..base.ranks import broadcast_object, global_batch_size, is_main_process
from ..core.recipes import load_recipe, Recipe
from ..core.schedules import scale_lr, unfreeze_plan, UnfreezeStage
from ..core.weights import save_weights
from ..fit.guard import NonFiniteGuard
from ..fit.keep import better, Candidate, KeepBest
from ..fit.resize import ProgressiveResize
from ..fit.swa import run_swa
from ..run.card import write_model_card
from ..run.checkpoint import Checkpointer, link_in_place, prune_finished, resume_or_restart, resume_state, ResumeAt
from ..run.fingerprint import record_data
from ..run.interpret import interpret_run
from ..run.runlock import run_lock
from .compat import reconcile
from .interrupt import interrupt_guard, StopOnSignal
from .recipe_callbacks import recipe_callbacks
from .strategy import choose_strategy
from ..base.progress import first_metric
from ..run.records import HyperTrace, MetricsLog, environment, new_run_dir, plot_run, score_key
from .head import head_on_features, use_feature_head
from .plan import first_ft_mult, stage_name, stage_peak, stage_plan


__all__ = ["run_recipe", "RunResult"]


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


def _record_finished_stage(stages: list, rows: list, st, plan, peak, ft_peak, n_groups: int, offer) -> None:
    """A resume from a stage-end checkpoint (stopped after the checkpoint, before the stage was recorded): its row in
    `stages`, from the metrics log, and its keep-best offer (the restored model is that stage's end), as the
    uninterrupted run made them."""
    name = stage_name(st.n_trainable, n_groups)
    if any(s["stage"] == name for s in stages):
        return
    mine = [row for row in rows if row["stage"] == name]
    if not mine:
        return
    vals = {k: float(v) for k, v in mine[-1].items() if k not in ("stage", "epoch", "seconds")}
    hi = stage_peak(st, plan, peak, ft_peak)
    stages.append({"stage": name, "trainable_groups": st.n_trainable, "epochs": len(mine), "peak_lr": hi, **vals,
                   "seconds": round(sum(row.get("seconds", 0.0) for row in mine), 1)})
    metrics = [k for k in vals if k not in ("train_loss", "valid_loss")]
    offer(name, vals.get("valid_loss", float("nan")), vals[metrics[0]] if metrics else float("nan"))


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
        strategy, why, peak, probe = head_on_features(learn, r, run_dir if main else None, trace, log, stages, timings,
                                                       main)
        label_stage("head")
        offer("head", stages[-1]["valid_loss"], stages[-1].get(score_key(stages[-1]), float("nan")))
    elif state is None and strategy == "auto":
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
        ft_peak = min(peak * r.ft_lr_factor, r.ft_lr_max) if on_features else peak * first_ft_mult(plan)
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
        name = stage_name(st.n_trainable, learn.n_layer_groups)
        label_stage(name)
        ckpt.stage_index = i
        learn.freeze_top(st.n_trainable, train_bn=r.train_bn)  # fastai's freeze_to clears the optimizer state
        if resume_cb and resume_cb[0].mid_stage:  # mid-stage: the state the interrupted stage had built up
            resume_cb[0].st.restore_optimizer(learn)
        # the head stage's peak is the sweep's; fine-tuning stages start at ft_peak, lower for each deeper one
        hi = stage_peak(st, plan, peak, ft_peak)
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
        offer(name, *first_metric(learn))
    swa = {}
    if r.swa_epochs:  # SWA after the last stage, at a constant LR, keeping the last stage's groups and LR ratio
        last = plan[-1]
        last_hi = stage_peak(last, plan, peak, ft_peak)
        swa_hi = r.swa_lr if r.swa_lr is not None else last_hi / 10
        swa_lrs = learn.layer_lrs(slice(swa_hi / r.lr_ratio, swa_hi) if last.n_trainable > 1 else swa_hi)
        label_stage("swa")
        swa = run_swa(learn, r.swa_epochs, swa_lrs, cbs=[trace, log, guard] + list(cbs or []), mom=r.moms[0])
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


def _better_or_same(a, b) -> bool:
    return better(a, b)


def _metric_text(c) -> str:
    import math
    return (f"accuracy {c.score:.4f}, loss {c.valid_loss:.4f}" if math.isfinite(c.score)
            else f"loss {c.valid_loss:.4f}")


def _write_outputs(learn, res: RunResult, trace: HyperTrace, log: MetricsLog) -> None:
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
    write_model_card(learn, d, res.recipe)
    interpret_run(learn, d, res.recipe)


def _prune_checkpoints(run_dir: Path, keep, kept: dict | None) -> None:
    """A finished run's checkpoints: the last one stays (a resume or an inspection reads it), the others go (issue 22).
    keep-best's copy of a stage end's weights, when the run kept that stage, holds what model.safetensors holds: it
    becomes a hard link to it (stored once; a resume still finds it). When the run kept its own end, that copy lost."""
    stay: tuple[str, ...] = ()
    if keep is not None and keep.path is not None and keep.path.exists() and kept and kept["stage"] != "final":
        link_in_place(run_dir / "model.safetensors", keep.path)  # no hard links there: the copy stays as it is
        stay = (keep.path.name,)
    prune_finished(run_dir, keep=stay)


