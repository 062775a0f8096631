"""Running a recipe: lr_find -> head one-cycle -> gradual unfreezing with discriminative LRs, into a run folder.

The run folder holds the resolved recipe (`recipe.toml`), per-epoch metrics (`metrics.csv`), the
per-step hyper-parameter trace (`trace.csv`), plots (`lr_find.png`, `loss.png`, `schedule.png`),
the final weights (`model.safetensors`) and a summary (`summary.json`).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..base.console import say
from ..base.progress import summary_table
from ..base.ranks import broadcast_object, global_batch_size, is_main_process
from ..core.budget import ft_lr_cap
from ..core.recipes import Recipe, load_recipe
from ..core.schedules import UnfreezeStage, scale_lr
from ..core.targets import learner_multi_label
from ..core.weights import save_weights
from ..fit.bn import BNInference
from ..fit.resize import ProgressiveResize
from ..fit.swa import run_swa
from ..run.card import write_model_card
from ..run.checkpoint import Checkpointer, link_in_place, prune_finished, resume_or_restart
from ..run.fingerprint import record_data
from ..run.interpret import interpret_run
from ..run.records import HyperTrace, MetricsLog, environment, new_run_dir, plot_run, score_key, write_trace
from ..run.runlock import run_lock
from .compat import reconcile
from .head import head_on_features
from .interrupt import StopOnSignal, interrupt_guard
from .plan import first_ft_mult, plan_text, stage_plan, with_lrs
from .recipe_callbacks import recipe_callbacks
from .state import RunState
from .strategy import choose_strategy

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
    kept: dict | None = None            # which weights the run ended with, why (keep_best), and when first reached
    stopped: str = ""                   # why fine-tuning stopped before its planned end (stage_guard), or ""
    ft_peak_lr: float | None = None     # peak LR of the first fine-tuning stage


def run_recipe(learn, recipe="transfer", run_dir: str | Path | None = None, overrides: dict | None = None,
               runs_root: str | Path = "runs", resume: bool = False, checkpoint_steps: int = 0,
               cbs=None, accept_data_change: bool = False) -> RunResult:
    """Run `recipe` on `learn`: find the LR, train the head (on cached features when the body is pretrained),
    choose the strategy (`auto`), fine-tune each unfreezing stage as a one-cycle with discriminative LRs (BatchNorm
    as `ft_bn` says; an epoch clearly worse on validation than the best so far ends fine-tuning: `stage_guard`),
    optionally mix the head stage's and the fine-tuned weights (`soup`), keep the best candidate's weights, and write
    everything into a run folder.

    Checkpoints go to `run_dir/checkpoints` every `recipe.checkpoint_every` epochs, at each stage's end and, with
    `checkpoint_steps`, every that many batches; `resume=True` goes on from the latest one. `cbs`: the caller's
    fastai callbacks, added to every stage that trains the network (not to lr_find nor to the head on features).
    One process at a time trains in a run folder (`run.lock`); a resume on other data than `data.json` records
    raises `DataChangedError` unless `accept_data_change`; Ctrl-C or SIGTERM stop at the next batch boundary with a
    checkpoint there and raise `TrainingInterrupted`."""
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
    run = RunState.start(learn, r, run_dir, resume)
    stop = StopOnSignal()  # Ctrl-C/SIGTERM: checkpoint at the next batch boundary and stop
    ckpt = Checkpointer(run_dir, r.checkpoint_every, r.keep_last, checkpoint_steps, recipe=r,
                        extra_state=run.to_checkpoint)
    if run.resumed is None:
        _head_stage(learn, r, run)  # on cached features (sweep, one-cycle, auto's probe), or auto's probe alone
    groups = stage_plan(r, learn.n_layer_groups, run.strategy)
    if run.on_features and groups[0].n_trainable == 1:  # the head stage ran on features: its epochs are not images'
        groups[0] = UnfreezeStage(1, 0, groups[0].lr_mult)
    stop.n_stages = len(groups)
    if is_main_process():
        r.save(run_dir / "recipe.toml")
        (run_dir / "environment.json").write_text(json.dumps(environment(r.seed), indent=2))
    # the callbacks see the chosen strategy (resizing needs the run's length, compile its last stage)
    total_steps = sum(st.epochs for st in groups) * len(learn.dls.train)
    extra = recipe_callbacks(learn, r.replace(strategy=run.strategy), run_dir, total_steps=total_steps)
    learn.freeze_top(next((st.n_trainable for st in groups if st.epochs), 1), train_bn=r.train_bn)
    if run.resumed is not None:
        _restore(learn, r, run, groups, extra, ckpt)
    elif run.on_features:
        _checkpoint_head(learn, run, ckpt)  # a resume skips the head stage (and its feature pass)
    else:
        run.peak = _body_peak(learn, r, run, total_steps)
    plan = with_lrs(groups, learn.n_layer_groups, run.peak, _ft_peak(r, run, groups, learn))
    say(plan_text(plan, learn.n_layer_groups, len(learn.dls.train), r.lr_ratio))
    for i, st in enumerate(plan):
        at = run.resume_point(learn, i, st)  # None: skipped; []: from its start; [ResumeAt]: where it stopped
        if at is None:
            continue
        run.begin_stage(learn, r, i, st, at, ckpt)
        bn = [BNInference()] if _bn_inference(r, run, st) else []
        learn.fit_stage(st.epochs - (at[0].epoch_offset if at else 0), st.lrs(r.lr_ratio), r.div, r.final_div,
                        r.pct_start, r.moms, cbs=[run.trace, run.log, ckpt, run.guard, run.worse, stop] + bn + extra
                        + at + list(cbs or []))
        run.end_stage(learn, st)
        if run.worse.stopped:  # an epoch worse than the best so far: no further epochs nor stages
            say(f"stopped: {run.worse.stopped}")
            break
    return _finish(learn, r, run, plan, extra, cbs)


def _bn_inference(r: Recipe, run: RunState, st) -> bool:
    """`ft_bn = "eval"` applies where a pretrained body is fine-tuned after its head: never to the head stage (its
    frozen body's statistics adapt to the data there, as fastai's do), nor to a network trained from scratch, whose
    BatchNorm statistics have not been estimated yet."""
    return r.ft_bn == "eval" and st.trainable > 1 and r.pretrained and run.strategy != "scratch"


def _head_stage(learn, r: Recipe, run: RunState) -> None:
    "The head on cached features (its LR sweep, one-cycle and auto's probe), or for `auto` the probe alone."
    if run.on_features:
        head_on_features(learn, r, run)
        run.label(learn, "head")
        row = run.stages[-1]
        run.offer(learn, "head", row["valid_loss"], row.get(score_key(row), float("nan")))
    elif r.strategy == "auto":
        ts = time.perf_counter()
        run.strategy, run.why = broadcast_object(choose_strategy(learn, r))
        run.timings["probe"] = time.perf_counter() - ts
        say(f"auto strategy: {run.strategy} ({run.why})")


def _restore(learn, r: Recipe, run: RunState, groups: list, extra: list, ckpt) -> None:
    "A resumed run: the checkpoint's stage frozen as it was, the weights, optimizer and callbacks' state put back."
    ck = run.resumed
    learn.freeze_top(groups[min(ck.stage, len(groups) - 1)].n_trainable, train_bn=r.train_bn)
    ck.restore(learn, extra)
    ckpt.load_history(ck)
    run.say_resumed(len(groups))


def _checkpoint_head(learn, run: RunState, ckpt) -> None:
    learn.add_cb(ckpt)
    ckpt.stage_index = 0
    try:
        ckpt.save(epoch=0, iter=0, valid_loss=run.stages[-1]["valid_loss"], stage_epochs=0)
    finally:
        learn.remove_cb(ckpt)


def _at_global_batch(r: Recipe, lr: float) -> float:
    "A recipe's fixed LR (given for `lr_ref_bs` images per step) scaled to this run's global batch."
    return scale_lr(lr, global_batch_size(r.bs, r.grad_accum), r.lr_ref_bs, r.lr_scale_rule)


def _body_peak(learn, r: Recipe, run: RunState, total_steps: int) -> float:
    """The head's peak LR without cached features: the recipe's `lr`, for `lr_ref_bs` images per step, scaled to
    this run's global batch; without one, a sweep of the whole model (every rank together, rank 0's suggestion),
    at most a tenth of the run's steps (at least 20, at most 100)."""
    if run.peak is not None:
        return _at_global_batch(r, run.peak)
    if not r.lr_find:
        raise ValueError("recipe sets lr_find = false but gives no lr; set lr = <peak LR>")
    num_it = int(min(100, max(20, 0.1 * total_steps)))
    ts = time.perf_counter()
    found = learn.find_lr(num_it=num_it, plot=run.run_dir / "lr_find.png" if is_main_process() else None)
    run.timings["lr_find"] = time.perf_counter() - ts
    peak = broadcast_object(found.peak)
    say(f"lr_find: peak {found.peak:.2e}, start {found.start:.2e}")
    if found.note:  # start == peak: why (lr_finder.start_note)
        say(f"lr_find: {found.note}")
    return peak


def _ft_peak(r: Recipe, run: RunState, groups: list, learn) -> float:
    """The first fine-tuning stage's peak LR, resolved once (a checkpoint written later holds it): the recipe's
    `ft_lr`, scaled to the global batch as `lr` is; else after the head on features ft_lr_factor x the head's LR
    (calibrated for the valley rule on the head's sweep), capped at ft_lr_max (ft_lr_max_small for a few images per
    class: `ft_lr_cap`); else (one sweep of the whole model) the head's LR x the first fine-tuning stage's lr_mult,
    as the stage plan says."""
    if run.ft_peak is None:  # a new run, or a resume from the head's checkpoint (written before this was resolved)
        if r.ft_lr is not None:
            run.ft_peak = _at_global_batch(r, r.ft_lr)
        elif run.on_features:
            n_train, n_classes = len(learn.dls.train_ds), getattr(learn.dls, "c", None) or 1
            cap = ft_lr_cap(r.ft_lr_max, r.ft_lr_max_small, r.small_per_class, n_train, n_classes)
            run.ft_peak = min(run.peak * r.ft_lr_factor, cap)
            if cap != r.ft_lr_max and run.ft_peak == cap:
                say(f"fine-tuning LR capped at {cap:.1e} (ft_lr_max_small): {n_train / max(1, n_classes):.0f} "
                    f"training images per class, fewer than small_per_class = {r.small_per_class:g}")
        else:
            run.ft_peak = run.peak * first_ft_mult(groups)
    return run.ft_peak


def _finish(learn, r: Recipe, run: RunState, plan: list, extra: list, cbs) -> RunResult:
    "SWA when the recipe asks, the final evaluation at valid_size, keep-best's choice, the outputs and the result."
    swa = {}
    if r.swa_epochs:  # after the last stage, at a constant LR, keeping the last stage's groups and LR ratio
        last = plan[-1]
        swa_hi = r.swa_lr if r.swa_lr is not None else last.peak / 10
        swa_lrs = learn.layer_lrs(replace(last, peak=swa_hi).lrs(r.lr_ratio))
        run.label(learn, "swa")
        swa = run_swa(learn, r.swa_epochs, swa_lrs, cbs=[run.trace, run.log, run.guard] + list(cbs or []),
                      mom=r.moms[0])
    at_valid_size = [cb for cb in extra if isinstance(cb, ProgressiveResize)]  # evaluate at valid_size
    with learn.added_cbs(at_valid_size):
        for cb in extra:
            if callable(getattr(type(cb), "finish", None)):
                cb.finish(learn)
        valid_loss, *mets = learn.validate()
        # the fine-tuned weights become a candidate; the soup (their mix with the probe's) or the ensemble is judged
        combined = run.try_soup(learn, valid_loss, mets) or \
            run.try_ensemble(learn, valid_loss, mets, learner_multi_label(learn, r))
        if combined:
            valid_loss, *mets = learn.validate()
        kept = run.kept(learn, valid_loss, mets, combined)
        if kept["stage"] != "final":  # keep-best put a stage end's weights back: the result is theirs
            valid_loss, *mets = learn.validate()
    run.timings["total"] = run.elapsed()
    if run.before:
        run.timings["before_resume"] = run.before
    acc = float(mets[0]) if mets else float("nan")
    result = RunResult(run.run_dir, r, run.strategy, acc, float(valid_loss), run.timings["total"], run.peak,
                       run.stages, run.why, swa, timings=run.timings, probe_accuracy=run.probe, kept=kept,
                       ft_peak_lr=run.ft_peak, stopped=run.worse.stopped)
    if is_main_process():
        _write_outputs(learn, result, run.trace, run.log)
        if not r.keep_checkpoints:  # finished and written: an interrupted or failed run never gets here
            _prune_checkpoints(run.run_dir, run.keep, kept)
        summary_table(run.stages, title=f"{r.name}: {run.strategy}",
                      caption=f"kept: {kept['stage']}, first reached at {kept['seconds_to_accuracy']:.1f}s of "
                              f"{result.seconds:.1f}s" + (" (stopped early)" if run.worse.stopped else ""))
    resumed = f" ({run.before:.1f}s of it before the resume)" if run.before else ""
    # the run's one result line, `key=value` so that scripts and CI read it (the command line adds the run folder);
    # reached: when an epoch (or the head on features) first reached the kept accuracy, on the same clock
    say(f"accuracy={acc:.4f} time={result.seconds:.1f}s reached={kept['seconds_to_accuracy']:.1f}s{resumed}")
    if kept["stage"] != "final":
        say(f"kept: {kept['why']}")
    return result


def _write_outputs(learn, res: RunResult, trace: HyperTrace, log: MetricsLog) -> None:
    d = res.run_dir
    save_weights(learn.model, d / "model.safetensors")
    write_trace(trace.rows, d / "trace.csv")
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
