"""A run's state from stage to stage: the strategy, the LRs, the stage rows, the trace and metrics logs, keep-best
and the run's clock. A checkpoint saves it and a resume reads it back through `to_checkpoint` and `resume`, the one
place that names the checkpoint's keys."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from ..base.console import say
from ..base.progress import epoch_metrics, first_metric
from ..base.ranks import is_main_process
from ..core.recipes import Recipe
from ..fit.guard import NonFiniteGuard
from ..core.models import Ensemble, unwrap_model
from ..core.weights import cpu_state_dict, mix_weights, save_weights
from ..fit.keep import Candidate, KeepBest, StopWhenWorse, clearly_better, clearly_worse
from ..run.checkpoint import CheckpointState, ResumeAt, resume_state
from ..run.records import HyperTrace, MetricsLog, stage_row
from .head import use_feature_head
from .plan import Stage

__all__ = ["RunState"]


@dataclass
class RunState:
    "What a run carries between its stages; `resumed` is the checkpoint a resumed process goes on from."
    run_dir: Path
    strategy: str
    why: str = ""                      # why `auto` chose the strategy
    on_features: bool = False          # the head stage trains on cached frozen-body features
    peak: float | None = None          # the head's peak LR: the sweep's, or the recipe's `lr` scaled to the batch
    ft_peak: float | None = None       # the first fine-tuning stage's peak LR
    probe: float | None = None         # the head on features' validation accuracy (auto's linear probe)
    stages: list[dict] = field(default_factory=list)  # a row per finished stage: the summary table
    timings: dict = field(default_factory=dict)       # seconds: features, lr_find, head, probe, total
    before: float = 0.0                # seconds the run's earlier processes trained (the clock counts them all)
    stage_t0: float = 0.0              # when the current stage started, on the run's clock
    trace: HyperTrace = field(default_factory=HyperTrace)
    log: MetricsLog | None = None
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    keep: KeepBest | None = None       # keep-best: offered every stage end, asked once at the end (`kept`)
    worse: StopWhenWorse | None = None  # the stage guard: stops fine-tuning at an epoch worse than keep-best's best
    resumed: CheckpointState | None = None
    soup: float = 0.0                  # the recipe's soup: the fine-tuned weights' share in the WiSE-FT mix (0 = off)
    ensemble: bool = False             # the recipe's ensemble: the probe and the fine-tuned network predict together
    probe_weights: dict | None = None  # the head stage's end (a CPU copy): what the soup mixes, the ensemble's probe
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, learn, r: Recipe, run_dir: Path, resume: bool) -> RunState:
        "A new run's state, or the state the latest checkpoint of `run_dir` saved."
        main = is_main_process()  # under DDP only rank 0 writes files; all ranks train
        ck = resume_state(run_dir, r) if resume else None
        # ft_peak: resolved by the runner, once; the ensemble's probe is a pretrained body's (a network trained from
        # random weights has none worth keeping)
        run = cls(run_dir, r.strategy, peak=r.lr, resumed=ck, soup=r.soup, ensemble=r.ensemble and r.pretrained)
        if ck is None:
            run.on_features = use_feature_head(learn, r, "full" if r.strategy == "auto" else r.strategy)
        run.log = MetricsLog(run_dir / "metrics.csv", write=main)
        run.keep = KeepBest(run_dir / "checkpoints" / "kept.safetensors", write=main,
                            n_valid=len(learn.dls.valid_ds)) if r.keep_best else None
        run.worse = StopWhenWorse(run.keep, run.elapsed, enabled=r.stage_guard)
        if ck is not None:
            x = ck.extra
            run.strategy, run.why, run.on_features = x["strategy"], x["why"], x.get("on_features", False)
            run.peak, run.ft_peak, run.probe = x["peak"], x.get("ft_peak"), x.get("probe")
            run.stages, run.timings = list(x["stages"]), dict(x.get("timings") or {})
            # older checkpoints have no seconds: the epochs' then
            run.before = float(x["seconds"]) if "seconds" in x else \
                float(sum(row.get("seconds", 0.0) for row in x.get("metrics", [])))
            run.stage_t0 = float(x.get("stage_t0", run.before))
            run.trace.rows, run.log.rows = list(x["trace"]), list(x["metrics"])
            if run.keep is not None and x.get("kept"):
                run.keep.load_state_dict(x["kept"])
            run.worse.reached = [tuple(p) for p in x.get("reached", [])]
            if (run.soup or run.ensemble) and run._probe_path().exists():
                run.probe_weights = load_file(str(run._probe_path()))
        return run

    def to_checkpoint(self) -> dict:
        "What a checkpoint saves of the run (plain data; `start` reads these keys back)."
        return {"strategy": self.strategy, "why": self.why, "peak": self.peak, "ft_peak": self.ft_peak,
                "stages": self.stages, "trace": self.trace.rows, "metrics": self.log.rows,
                "on_features": self.on_features, "probe": self.probe,
                "kept": self.keep.state_dict() if self.keep else None, "timings": self.timings,
                "seconds": self.elapsed(), "stage_t0": self.stage_t0, "reached": self.worse.reached}

    def elapsed(self) -> float:
        "Seconds on the run's clock, every process of the run counted."
        return self.before + time.perf_counter() - self.t0

    def label(self, learn, name: str) -> None:
        "The stage name in traces, metrics, guard messages and progress lines."
        for cb in [self.trace, self.log, self.guard, self.worse] + [c for c in learn.cbs if hasattr(c, "stage")]:
            cb.stage = name

    def offer(self, learn, name: str, valid_loss: float, score: float) -> None:
        "A stage end's weights to keep-best."
        if name == "head" and not self.worse.reached:  # the head on features: no epoch of images recorded it
            self.worse.reached.append((round(self.elapsed(), 3), score))
        if name == "head" and (self.soup or self.ensemble):  # where fine-tuning starts (on disk for a resume)
            self.probe_weights = cpu_state_dict(learn.model)
            if is_main_process():
                save_weights(learn.model, self._probe_path())
        if self.keep is not None:
            self.keep.offer(learn.model, Candidate(name, score, valid_loss, len(self.trace.rows)))

    def _probe_path(self) -> Path:
        return self.run_dir / "checkpoints" / "probe.safetensors"

    def try_soup(self, learn, valid_loss: float, mets: list) -> bool:
        """WiSE-FT: offer the fine-tuned weights to keep-best, then load the mix (1 - soup) x the head stage's end +
        soup x them, which `kept` judges as the final weights. False (nothing done) without soup or fine-tuning."""
        if not self.soup or not self._fine_tuned() or self.keep is None:
            return False
        self.offer(learn, "fine-tuned", valid_loss, float(mets[0]) if mets else float("nan"))
        model = unwrap_model(learn.model)
        model.load_state_dict(mix_weights(self.probe_weights, model.state_dict(), self.soup))
        return True

    def try_ensemble(self, learn, valid_loss: float, mets: list, multi_label: bool) -> bool:
        """Probe+FT ensembling: offer the fine-tuned network to keep-best, then make `learn.model` the ensemble of the
        head stage's end (the probe) and it, which `kept` judges as the run's final model (putting the fine-tuned
        network back when it loses). False (nothing done) without `ensemble` or fine-tuning."""
        if not self.ensemble or not self._fine_tuned():
            return False
        if self.keep is not None:
            self.offer(learn, "fine-tuned", valid_loss, float(mets[0]) if mets else float("nan"))
        tuned = unwrap_model(learn.model)
        probe = copy.deepcopy(tuned)
        probe.load_state_dict(self.probe_weights)
        learn.model = Ensemble([probe, tuned], multi_label=multi_label)
        return True

    def _fine_tuned(self) -> bool:
        "The head stage's end is known and at least one fine-tuning epoch trained after it."
        return self.probe_weights is not None and any(s["stage"] != "head" and s["epochs"] for s in self.stages)

    def say_resumed(self, n_stages: int) -> None:
        ck = self.resumed
        at = "done" if ck.stage_done else f"epoch {ck.epoch + 1}/{ck.stage_epochs}" + (
            f" from batch {ck.iter + 1}" if ck.iter else "")  # counted as the progress lines count
        say(f"resuming {self.run_dir} from {ck.path.name}: stage {ck.stage + 1}/{n_stages} {at}")

    def resume_point(self, learn, i: int, st: Stage) -> list | None:
        """How stage `i` runs in this process: None when it is skipped (no epochs, or finished before the resume),
        [] from its start, [ResumeAt] where the checkpoint left it."""
        ck = self.resumed
        if st.epochs == 0 or (ck is not None and i < ck.stage):
            return None
        if ck is None:
            return []
        if i == ck.stage and ck.stage_done:
            self._record_finished(learn, st)
            return None
        self.resumed = None
        return [ResumeAt(ck) if i == ck.stage else ResumeAt(ck, epoch=0, stage_epochs=st.epochs)]

    def begin_stage(self, learn, r: Recipe, i: int, st: Stage, at: list, ckpt) -> None:
        "Name the stage, train its groups, and start its clock (a stage resumed mid-way counts from its real start)."
        self.label(learn, st.name)
        ckpt.stage_index = i
        learn.freeze_top(st.trainable, train_bn=r.train_bn)  # fastai's freeze_to clears the optimizer state
        if at and at[0].mid_stage:  # mid-stage: the state the interrupted stage had built up
            at[0].st.restore_optimizer(learn)
        else:
            self.stage_t0 = self.elapsed()

    def end_stage(self, learn, st: Stage) -> None:
        "The stage's row (the epochs it ran: fewer than planned after early stopping) and its keep-best offer."
        ran = sum(1 for row in self.log.rows if row["stage"] == st.name)
        vals = {k: float(v) for k, v in epoch_metrics(learn.recorder).items()}
        self.stages.append(stage_row(st.name, st.trainable, ran, st.peak, vals, round(self.elapsed() - self.stage_t0, 1)))
        self.offer(learn, st.name, *first_metric(learn))

    def _record_finished(self, learn, st: Stage) -> None:
        """A resume from a stage-end checkpoint (stopped after the checkpoint, before the stage was recorded): its row,
        from the metrics log, and its keep-best offer (the restored model is that stage's end), as the uninterrupted
        run made them."""
        mine = [row for row in self.log.rows if row["stage"] == st.name]
        if not mine or any(s["stage"] == st.name for s in self.stages):
            return
        vals = {k: float(v) for k, v in mine[-1].items() if k not in ("stage", "epoch", "seconds")}
        self.stages.append(stage_row(st.name, st.trainable, len(mine), st.peak, vals,
                                     round(sum(row.get("seconds", 0.0) for row in mine), 1)))
        metrics = [k for k in vals if k not in ("train_loss", "valid_loss")]
        self.offer(learn, st.name, vals.get("valid_loss", float("nan")), vals[metrics[0]] if metrics else float("nan"))

    def kept(self, learn, valid_loss: float, mets: list, combined: bool = False) -> dict:
        """keep-best's one decision, at the end: the model the run ended with (`combined`: the WiSE-FT mix or the
        probe+FT ensemble), or the best stage end's put back; with the seconds (on the run's clock) at which the kept
        score was first reached."""
        final = Candidate("final", float(mets[0]) if mets else float("nan"), float(valid_loss), len(self.trace.rows))
        best = self.keep.best if self.keep is not None else None
        ensemble = isinstance(learn.model, Ensemble)  # try_ensemble made it the model under judgement
        if best is not None and not _same(final, best) and not _replaces(final, best, self.keep.n_valid, ensemble):
            if ensemble:  # it lost: the fine-tuned network, its last member, is the model again
                learn.model = learn.model.members[-1]
            self.keep.restore(learn.model)  # the end of the run did not clearly beat a stage end: keep that stage's
            return {"stage": best.stage, "accuracy": best.score, "valid_loss": best.valid_loss,
                    "final_accuracy": final.score, "final_valid_loss": final.valid_loss,
                    "seconds_to_accuracy": self.time_to(best.score),
                    "why": f"the end of the run ({_metric_text(final)}) was "
                           f"{'clearly worse' if ensemble else 'not clearly better'} on validation than stage "
                           f"{best.stage!r} ({_metric_text(best)}; by more than one standard error of "
                           f"{self.keep.n_valid} images): its weights were kept"}
        why = "the end of the run was the best on validation" if self.keep is not None else \
            "keep_best = false: the weights the run ended with"
        if ensemble:
            why = (f"the probe and the fine-tuned network predicting together (their probabilities averaged; "
                   f"{_metric_text(final)}) were not clearly worse on validation than any stage end")
        elif combined:
            why = (f"the soup of the head stage's and the fine-tuned weights ({1 - self.soup:g} : {self.soup:g}, "
                   f"WiSE-FT) was the best on validation ({_metric_text(final)})")
        return {"stage": "final", "accuracy": final.score, "valid_loss": final.valid_loss,
                "seconds_to_accuracy": self.time_to(final.score), "soup": self.soup if combined else 0.0,
                "ensemble": ensemble, "why": why}

    def time_to(self, score: float) -> float:
        "Seconds on the run's clock at the first epoch end that reached `score` (the run's total when none did)."
        return next((t for t, s in self.worse.reached if math.isfinite(score) and s >= score), round(self.elapsed(), 3))


def _replaces(final: Candidate, best: Candidate, n_valid: int, ensemble: bool) -> bool:
    """Whether the run's end replaces keep-best's best. A fine-tuned network must be clearly better; the probe+FT
    ensemble, half of whose prediction is the probe's, must only not be clearly worse: on validation sets of ~100
    images a real gain on test shows as a difference within the noise (bench/real_data.py, nbs/02_fine_tuning)."""
    if ensemble:
        return not clearly_worse(final.score, final.valid_loss, best, n_valid)
    return clearly_better(final, best, n_valid)


def _same(a: Candidate, b: Candidate) -> bool:
    "The same weights: no optimizer step between the two, and the same validation (so no EMA or soup swapped them)."
    return a.step == b.step and a.valid_loss == b.valid_loss and (a.score == b.score or not math.isfinite(a.score))


def _metric_text(c: Candidate) -> str:
    return (f"accuracy {c.score:.4f}, loss {c.valid_loss:.4f}" if math.isfinite(c.score)
            else f"loss {c.valid_loss:.4f}")
