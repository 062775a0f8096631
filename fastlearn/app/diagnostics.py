"""Before training: sanity checks that catch a broken setup in seconds; after training: a learning-curve doctor.

`sanity_check(learn)` runs Karpathy's "recipe for training neural networks" checks on a fastai Learner (trainable
parameters, input normalisation, class balance, train/valid duplicates, the loss at initialisation, overfitting a
few batches, whether what was learnt transfers to the validation set). `diagnose(epoch_rows)` reads per-epoch
train/valid losses (metrics.csv rows) and names the problem and the next change to try. Each check is a pure
verdict function over numbers (`*_verdict`); the functions that measure a Learner only gather the numbers.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base.progress import summary_table
from ..core.hotpath import plain_tensor
from ..core.lr_finder import learner_snapshot
from ..core.models import unwrap_model
from ..core.recipes import parse_overrides
from ..core.targets import class_counts, is_multi_label, label_info
from ..fit.precision import learner_device
from ..train.learner import learner_from_recipe

__all__ = ["CheckResult", "sanity_check", "Diagnosis", "diagnose", "NEXT_STEPS", "doctor_main", "read_epoch_rows",
           "initial_loss_verdict", "overfit_verdict", "generalise_verdict", "balance_verdict",
           "duplicates_verdict", "normalisation_verdict", "trainable_verdict"]


@dataclass
class CheckResult:
    "One sanity check: did it pass, the numbers it measured, and what to do when it did not."
    name: str
    passed: bool
    numbers: dict = field(default_factory=dict)
    hint: str = ""                      # empty when passed

    def row(self) -> dict:
        "A flat row for a table: check, passed, numbers (k=v), hint."
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in self.numbers.items())
        return {"check": self.name, "passed": "yes" if self.passed else "NO", "numbers": nums, "hint": self.hint}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


# -- verdicts: pure functions of measured numbers -------------------------------------------------

def trainable_verdict(n_trainable: int, n_total: int) -> CheckResult:
    "Some parameters must require gradients, or training changes nothing."
    nums = {"trainable_params": n_trainable, "total_params": n_total}
    if n_trainable == 0:
        return CheckResult("trainable", False, nums,
                           "no parameter requires gradients (everything is frozen): call learn.freeze_top(1) "
                           "to train the head, or learn.freeze_top(-1) to train all layer groups")
    return CheckResult("trainable", True, nums)


def normalisation_verdict(mean: Sequence[float], std: Sequence[float], max_abs: float,
                          mean_tol: float = 1.0, std_range: tuple[float, float] = (0.2, 5.0)) -> CheckResult:
    "Per-channel mean and std of the batches the model sees should be about 0 and 1."
    nums = {"mean": [round(float(m), 3) for m in mean], "std": [round(float(s), 3) for s in std],
            "max_abs": round(float(max_abs), 2)}
    bad_mean = any(abs(m) > mean_tol for m in mean)
    bad_std = any(not std_range[0] <= s <= std_range[1] for s in std)
    if not (bad_mean or bad_std):
        return CheckResult("normalisation", True, nums)
    hint = (f"inputs not normalised: per-channel mean should be within +-{mean_tol} of 0 and std in "
            f"[{std_range[0]}, {std_range[1]}]; ")
    if max_abs > 20:
        hint += ("values reach %.0f, like raw 0-255 pixels: convert to floats in [0, 1] (fastai "
                 "IntToFloatTensor) before Normalize" % max_abs)
    else:
        hint += ("add Normalize.from_stats(mean, std) with the statistics the weights were trained on "
                 "(fastlearn.models.model_stats(arch)) to the batch transforms")
    return CheckResult("normalisation", False, nums, hint)


def balance_verdict(counts: Sequence[int], max_ratio: float = 3.0) -> CheckResult:
    "Training images per class: the largest class over the smallest should stay below `max_ratio`."
    counts = [int(c) for c in counts]
    lo, hi = min(counts), max(counts)
    ratio = math.inf if lo == 0 else hi / lo
    nums = {"classes": len(counts), "min_per_class": lo, "max_per_class": hi, "imbalance_ratio": ratio}
    if ratio <= max_ratio:
        return CheckResult("class_balance", True, nums)
    what = "a class has no training image" if lo == 0 else f"the largest class has {ratio:.1f}x the smallest"
    return CheckResult("class_balance", False, nums,
                       f"{what} (limit {max_ratio}x): weight the loss by inverse class frequency "
                       "(CrossEntropyLossFlat(weight=...)), use a focal loss (fastai FocalLossFlat), or "
                       "oversample the small classes; judge by per-class recall, not accuracy")


def duplicates_verdict(n_dup: int, n_valid: int, examples: Sequence[tuple[str, str]] = ()) -> CheckResult:
    "No validation item should also be in the training set (identical bytes)."
    nums = {"valid_items_also_in_train": n_dup, "valid_items": n_valid,
            "fraction": round(n_dup / n_valid, 4) if n_valid else 0.0}
    if n_dup == 0:
        return CheckResult("train_valid_duplicates", True, nums)
    ex = f" e.g. valid {examples[0][0]} == train {examples[0][1]}" if examples else ""
    return CheckResult("train_valid_duplicates", False, nums,
                       f"{n_dup} validation item(s) are byte-identical to training items{ex}: remove them from "
                       "the validation split, or the validation accuracy overstates what the model learnt")


def initial_loss_verdict(loss: float, n_classes: int, tol: float = 0.25, multi_label: bool = False) -> CheckResult:
    """With a fresh head the cross-entropy should be about log(C): the model starts unsure of every class.
    Multi-label (binary cross-entropy per class, averaged): about ln 2, each sigmoid starting near 0.5."""
    expected, name = (math.log(2), "ln_2") if multi_label else (math.log(n_classes), "log_C")
    what = "ln 2 (per label)" if multi_label else "log(C)"
    rel = abs(loss - expected) / expected if math.isfinite(loss) else math.inf
    nums = {"loss": loss, name: expected, "rel_error": rel, "tolerance": tol}
    if rel <= tol:
        return CheckResult("initial_loss", True, nums)
    if not math.isfinite(loss):
        hint = "the loss at initialisation is not finite: look for NaN/inf inputs or labels outside [0, C)"
    elif loss > expected:
        hint = (f"loss at init {loss:.3f} is far above {what} = {expected:.3f}: the head starts confident, "
                "usually because inputs are not normalised (huge activations) or the head is not freshly "
                "initialised; check the normalisation check and the labels")
    else:
        hint = (f"loss at init {loss:.3f} is far below {what} = {expected:.3f}: the task may be trivial or "
                "leaky (label information in the input), or the number of classes is wrong")
    return CheckResult("initial_loss", False, nums, hint)


def overfit_verdict(first_loss: float, last_loss: float, accuracy: float, min_accuracy: float = 0.95) -> CheckResult:
    "A model that cannot memorise a handful of batches has a bug (loss, labels, frozen layers, LR)."
    nums = {"loss_start": first_loss, "loss_end": last_loss, "train_accuracy": accuracy}
    if accuracy >= min_accuracy and last_loss < first_loss:
        return CheckResult("overfit_batches", True, nums)
    return CheckResult("overfit_batches", False, nums,
                       f"could not memorise a few batches (accuracy {accuracy:.2f} < {min_accuracy}): check that "
                       "the loss matches the targets, that the layers are trainable and the inputs normalised; "
                       "if the loss did not fall at all, the model or the loss is disconnected from the labels")


def generalise_verdict(valid_accuracy: float, chance: float, n_valid: int, train_accuracy: float) -> CheckResult:
    """After memorising a few batches, validation accuracy should beat chance by more than noise; at
    chance while the training batches were learnt, the labels carry no learnable signal (shuffled,
    misaligned with the images) or train and valid come from different distributions."""
    noise = 2 * math.sqrt(chance * (1 - chance) / max(1, n_valid))   # 2 binomial standard errors
    nums = {"valid_accuracy": valid_accuracy, "chance": chance, "margin": noise, "valid_items": n_valid,
            "train_accuracy": train_accuracy}
    if valid_accuracy > chance + noise:
        return CheckResult("learnable_labels", True, nums)
    return CheckResult("learnable_labels", False, nums,
                       f"validation accuracy {valid_accuracy:.2f} is at chance ({chance:.2f} +- {noise:.2f}) after "
                       f"fitting training batches to {train_accuracy:.2f}: labels may be shuffled or misaligned "
                       "with the images, or train and valid differ (different label order, preprocessing)")


# -- measuring a Learner ---------------------------------------------------------------------------

def _take(dl, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for b in dl:
        out.append((plain_tensor(b[0]), plain_tensor(b[1])))
        if len(out) >= n:
            break
    return out


def _item_keys(ds) -> tuple[list[str], list[str]]:
    "(hash, name) per item: file bytes for path items (fastai Datasets.items), tensor bytes otherwise."
    items = getattr(ds, "items", None)
    if items is not None and len(items) == len(ds) and all(isinstance(p, (str, Path)) for p in items[:5]):
        hashes = [hashlib.blake2b(Path(p).read_bytes(), digest_size=16).hexdigest() for p in items]
        return hashes, [str(p) for p in items]
    hashes, names = [], []
    for i in range(len(ds)):
        x = plain_tensor(ds[i][0])
        x = x.detach().cpu().contiguous().numpy() if isinstance(x, torch.Tensor) else x
        hashes.append(hashlib.blake2b(bytes(memoryview(x).cast("B")) if hasattr(x, "dtype") else repr(x).encode(),
                                      digest_size=16).hexdigest())
        names.append(f"item {i}")
    return hashes, names


def check_duplicates(dls) -> CheckResult:
    train, valid = _item_keys(dls.train_ds), _item_keys(dls.valid_ds)
    seen = dict(zip(*train))
    dups = [(n, seen[h]) for h, n in zip(*valid) if h in seen]
    return duplicates_verdict(len(dups), len(valid[0]), dups[:3])


def check_normalisation(batches) -> CheckResult:
    x = torch.cat([xb.float() for xb, _ in batches])
    dims = [d for d in range(x.ndim) if d != 1] if x.ndim == 4 else list(range(x.ndim))
    mean, std = x.mean(dim=dims), x.std(dim=dims)
    mean = mean.tolist() if mean.ndim else [float(mean)]
    std = std.tolist() if std.ndim else [float(std)]
    return normalisation_verdict(mean, std, float(x.abs().max()))


def _reset_head(model: nn.Module) -> None:
    "Re-initialise the classifier (timm's get_classifier), if any, the way torch initialises a new layer."
    get = getattr(unwrap_model(model), "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module):
        for m in head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def _loss(out: torch.Tensor, y: torch.Tensor, multi: bool, reduction: str = "mean") -> torch.Tensor:
    "Plain cross-entropy, or for multi-label binary cross-entropy averaged over labels (as BCEWithLogitsLossFlat)."
    if not multi:
        return F.cross_entropy(out, y, reduction=reduction)
    per_item = F.binary_cross_entropy_with_logits(out, y.float(), reduction="none").mean(1)
    return per_item.sum() if reduction == "sum" else per_item.mean()


@torch.no_grad()
def _mean_loss_acc(model, batches, multi: bool = False, thresh: float = 0.5) -> tuple[float, float]:
    "Mean loss and accuracy (multi-label: per-label accuracy at `thresh`, fastai's accuracy_multi) over batches."
    losses, correct, n = [], 0.0, 0
    for xb, yb in batches:
        out = plain_tensor(model(xb))
        losses.append(float(_loss(out, yb, multi, reduction="sum")))
        if multi:
            correct += float(((out.sigmoid() > thresh) == yb.bool()).float().mean(1).sum())
        else:
            correct += int((out.argmax(1) == yb).sum())
        n += len(yb)
    return sum(losses) / max(1, n), correct / max(1, n)


@contextlib.contextmanager
def _restore_grads(model: nn.Module):
    "Put every parameter's requires_grad back on exit (learner_snapshot restores values, not freezing)."
    flags = [p.requires_grad for p in model.parameters()]
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
            p.grad = None


def sanity_check(learn, n_batches: int = 8, overfit_batches: int = 5, overfit_steps: int = 40,
                 overfit_lr: float = 1e-3, loss_tol: float = 0.25, max_imbalance: float = 3.0,
                 duplicates: bool = True) -> list[CheckResult]:
    """Run every sanity check on `learn`, then restore it exactly (weights, freezing, optimizer, RNGs, data order).

    The initial-loss check re-initialises the head and measures plain cross-entropy (no label smoothing; binary
    cross-entropy for multi-label data) in eval mode (no dropout; BatchNorm does not hide unnormalised inputs).
    The overfit check then trains every parameter (frozen ones too) on `overfit_batches` fixed training batches
    with its own Adam for `overfit_steps` steps; the learnable-labels check evaluates that model on validation
    batches."""
    model, dls = learn.model, learn.dls
    multi = is_multi_label(dls)
    thresh = label_info(dls)["threshold"] or 0.5
    model.to(learner_device(learn))  # where fit would put it; the batches below come on dls.device
    n_classes = int(getattr(dls, "c", 0) or 0)
    results = [trainable_verdict(sum(p.numel() for p in model.parameters() if p.requires_grad),
                                 sum(p.numel() for p in model.parameters()))]
    with learner_snapshot(learn), _restore_grads(model):
        train = _take(dls.train, max(n_batches, overfit_batches))
        valid = _take(dls.valid, n_batches)
        if not train:
            raise ValueError("the training DataLoader yields no batch: lower bs below the number of training items")
        results.append(check_normalisation(train[:n_batches]))
        results.append(balance_verdict(class_counts(dls), max_imbalance))  # multi-label: images holding each label
        if duplicates:
            results.append(check_duplicates(dls))
        if n_classes < 2:
            n_classes = train[0][1].shape[1] if multi else int(max(int(y.max()) for _, y in train)) + 1
        _reset_head(model)
        model.eval()
        loss0, _ = _mean_loss_acc(model, train[:n_batches], multi, thresh)
        results.append(initial_loss_verdict(loss0, n_classes, loss_tol, multi_label=multi))
        # overfit: every parameter trainable, a fixed subset, plain Adam (independent of the learner's optimizer)
        sub = train[:overfit_batches]
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(model.parameters(), lr=overfit_lr)
        model.train()
        first = last = math.nan
        for step in range(overfit_steps):
            xb, yb = sub[step % len(sub)]
            loss = _loss(plain_tensor(model(xb)), yb, multi)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 0:
                first = loss.item()
            last = loss.item()
        _, acc = _mean_loss_acc(model, sub, multi, thresh)  # train mode: what the batches were fitted in
        results.append(overfit_verdict(first, last, acc))
        model.eval()
        if valid:
            _, vacc = _mean_loss_acc(model, valid, multi, thresh)
            labels = torch.cat([y for _, y in train])
            if multi:  # the best constant guess per label: its majority value
                p = labels.float().mean(0)
                chance = float(torch.maximum(p, 1 - p).mean())
            else:
                chance = float(torch.bincount(labels, minlength=n_classes).max()) / len(labels)  # majority class
            results.append(generalise_verdict(vacc, chance, sum(len(y) for _, y in valid), acc))
    return results


# -- learning-curve doctor -------------------------------------------------------------------------

NEXT_STEPS = ("weight decay", "learning rate", "schedule", "augmentation", "epochs")  # what to change, one at a time


@dataclass
class Diagnosis:
    "What the curves show, the numbers that show it, and the one change to try next."
    kind: str            # overfitting, underfitting, plateau, diverged, still improving, healthy
    evidence: str
    next_step: str
    numbers: dict = field(default_factory=dict)


def _series(rows: Sequence[dict], key: str) -> list[float]:
    out = []
    for i, r in enumerate(rows):
        if key not in r:
            raise ValueError(f"epoch row {i} has no {key!r} (keys: {', '.join(r)}); "
                             "pass rows like training.MetricsLog rows (train_loss, valid_loss per epoch)")
        out.append(float(r[key]))
    return out


def diagnose(epoch_rows: Sequence[dict], n_classes: int | None = None, improving: float = 0.02,
             overfit_rise: float = 0.05, gap: float = 1.1) -> Diagnosis:
    """Name what per-epoch train/valid losses show and the next change, in the order of `NEXT_STEPS`.

    Checked in order: diverged (a non-finite loss, or the training loss ends 1.5x above its minimum),
    overfitting (valid loss rose `overfit_rise` above its minimum while the training loss kept falling),
    still improving (valid loss fell more than `improving` in the last epoch), underfitting (training
    loss no lower than valid loss / `gap` and still high: above 0.3 log(C) with `n_classes`, else above
    half the first epoch's), plateau (valid loss improved less than `improving` over the last half of
    the epochs), else healthy.
    """
    if not epoch_rows:
        raise ValueError("no epoch rows to diagnose; train at least 2 epochs")
    tr, va = _series(epoch_rows, "train_loss"), _series(epoch_rows, "valid_loss")
    n = len(tr)
    nums = {"epochs": n, "train_loss": tr[-1], "valid_loss": va[-1]}
    if not all(math.isfinite(v) for v in tr + va):
        bad = next(i for i, (a, b) in enumerate(zip(tr, va)) if not (math.isfinite(a) and math.isfinite(b)))
        return Diagnosis("diverged", f"the loss is not finite from epoch {bad + 1}",
                         "learning rate: lower it 10x (or rerun lr_find) and set grad_clip = 1.0", nums)
    if tr[-1] > 1.5 * min(tr) or (n >= 2 and tr[-1] > 1.1 * tr[0]):
        return Diagnosis("diverged", f"training loss went from {min(tr):.4f} (its minimum) up to {tr[-1]:.4f}",
                         "learning rate: lower it 3-10x (or rerun lr_find) and set grad_clip = 1.0", nums)
    if n < 2:
        return Diagnosis("still improving", "only one epoch: no trend yet",
                         "epochs: train for more epochs before judging", nums)
    best = min(range(n), key=va.__getitem__)
    nums.update(best_epoch=best + 1, best_valid_loss=va[best])
    if va[-1] > va[best] * (1 + overfit_rise) and tr[-1] < tr[best]:
        return Diagnosis("overfitting",
                         f"valid loss fell to {va[best]:.4f} at epoch {best + 1} then rose to {va[-1]:.4f} "
                         f"(+{va[-1] / va[best] - 1:.0%}) while train loss kept falling to {tr[-1]:.4f}",
                         "weight decay: raise wd 3-10x; then stronger augmentation, then fewer epochs "
                         f"(or early_stop; the best epoch was {best + 1})", nums)
    last_drop = 1 - va[-1] / va[-2] if va[-2] > 0 else 0.0
    nums["valid_drop_last_epoch"] = last_drop
    if last_drop > improving and tr[-1] < tr[-2]:
        return Diagnosis("still improving",
                         f"valid loss still fell {last_drop:.1%} in the last epoch ({va[-2]:.4f} -> {va[-1]:.4f})",
                         "epochs: train longer (e.g. 1.5-2x the epochs); the curve has not flattened", nums)
    high = 0.3 * math.log(n_classes) if n_classes and n_classes > 1 else 0.5 * tr[0]
    nums["high_loss_above"] = high
    if tr[-1] * gap >= va[-1] and tr[-1] > high:
        return Diagnosis("underfitting",
                         f"train loss {tr[-1]:.4f} is still high (> {high:.4f}) and not below valid loss "
                         f"{va[-1]:.4f}: the model does not even fit the training data",
                         "weight decay: lower it (or drop other regularisation: label smoothing, dropout, mixup); "
                         "then a higher learning rate (rerun lr_find), then a longer schedule or a larger model",
                         nums)
    k = max(2, (n + 1) // 2)
    window = va[-k:]
    gain = 1 - min(window) / window[0] if window[0] > 0 else 0.0
    nums["valid_gain_last_half"] = gain
    if n >= 4 and gain < improving:
        return Diagnosis("plateau",
                         f"valid loss improved only {gain:.1%} over the last {k} epochs ({window[0]:.4f} -> "
                         f"{min(window):.4f})",
                         "learning rate: the plateau came early; rerun lr_find and use a higher peak, then a "
                         "schedule that anneals (one-cycle with a lower final LR)", nums)
    return Diagnosis("healthy",
                     f"valid loss at its minimum {va[best]:.4f} near the end (epoch {best + 1} of {n}), "
                     f"train/valid gap {va[-1] / max(tr[-1], 1e-12):.2f}x",
                     "augmentation: for more accuracy try stronger augmentation, then more epochs", nums)


def read_epoch_rows(path) -> list[dict]:
    "Per-epoch rows from a run folder's metrics.csv (or the CSV itself), numbers as floats."
    p = Path(path)
    p = p / "metrics.csv" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no metrics file at {p}; pass a run folder (with metrics.csv) or the CSV path")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v
    return [{k: num(v) for k, v in r.items()} for r in rows]


def doctor_main(data, arch: str = "tf_efficientnet_lite0", size: int | None = None, bs: int | None = None,
                pretrained: bool | None = None, recipe="transfer", overrides: dict | list[str] | None = None,
                n_batches: int = 8, run=None) -> int:
    """CLI entry: sanity-check a learner built from `recipe` with `arch` (and `size`, `bs`, `pretrained`
    when given) on `data` (folder or sample name), print the checks as a table and, with `run` (a run
    folder or its metrics.csv), the learning-curve diagnosis. Exit code 0 when every check passed, else 1."""
    ov = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else dict(overrides or {})
    given = {k: v for k, v in (("size", size), ("bs", bs), ("pretrained", pretrained)) if v is not None}
    learn, r = learner_from_recipe(data, recipe, {"arch": arch, **given, **ov}, progress=False)
    results = sanity_check(learn, n_batches=n_batches)
    failed = [c for c in results if not c.passed]
    summary_table([c.row() for c in results],
                  title=f"sanity checks: {r.arch} on {data}: {len(results) - len(failed)} of {len(results)} passed")
    if run is not None:
        rows = read_epoch_rows(run)
        d = diagnose(rows)
        print(f"learning curves ({len(rows)} epochs): {d.kind}: {d.evidence}\nnext: {d.next_step}", flush=True)
    return 1 if failed else 0
