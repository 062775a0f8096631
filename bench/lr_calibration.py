"""Which LR suggestion fits fine-tuning a pretrained model? Measured: the accuracy each rule's LR gives.

For each image folder (same layout rules as bench/real_data.py; pass its `views/<name>-s0` folders to reuse
exactly the bench's splits), with tf_efficientnet_lite0 and the `transfer` recipe's data settings:

1. the frozen body's features are computed once (fastlearn.features);
2. an LR range test of the head on those features gives a curve; each suggester (fastlearn's `peak`, fastai's
   `valley`, `slide`, `steep`, `minimum`) picks an LR from it, and the head is trained with each (a few
   hundred steps on the features, seconds): head accuracy per suggester, and per LR of a fixed grid;
3. from the head trained at the `valley` LR, the whole network is fine-tuned as one one-cycle with
   discriminative LRs (`lr_ratio` 100), once per peak LR of `--ft-lrs`: validation accuracy per LR;
4. optionally (`--full-sweep N`) an N-step range test of the whole network after the head, for comparison.

Writes one JSON per folder (curves, suggestions, accuracies) into `--out`; `--analyse` prints, for every rule
"LR = c x suggester(head curve)", the accuracy it would reach on each folder (log-LR interpolation of the grid)
and its regret to the best grid LR. The saved curves become test fixtures (`--fixtures DIR`).

    python bench/lr_calibration.py runs/real_data/views/clothing-s0 ... --opt adamw --out runs/lr_calib
    python bench/lr_calibration.py --analyse runs/lr_calib/*.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np

HEAD_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _head_fit(hl, lr: float, epochs: int, r) -> tuple[float, float]:
    from fastlearn.core.schedules import one_cycle_scheds
    from fastai.callback.schedule import ParamScheduler
    hl.fit(epochs, cbs=[ParamScheduler(one_cycle_scheds(lr, r.div, r.final_div, r.pct_start, r.moms))])
    loss, acc = hl.validate()
    return float(acc), float(loss)


def calibrate(view: Path, a) -> dict:
    import torch
    from fastlearn.core.budget import batch_size_for, feature_batch_size, feature_epochs
    from fastlearn.train.features import extract_features, head_learner
    from fastlearn.core.lr_finder import SUGGESTERS, lr_find, suggest
    from fastlearn.train.learner import learner_from_recipe
    from fastai.data.transforms import CategoryMap  # noqa: F401  (fastai import order)
    from fastlearn.data.folders import check_image_folder
    rep = check_image_folder(view)
    n_train = sum(rep.counts["train"].values())
    bs = batch_size_for(n_train, a.epochs, a.min_steps)
    learn, r = learner_from_recipe(view, "transfer", {"size": a.size, "seed": a.seed, "opt": a.opt, "bs": bs},
                                   progress=False)
    out = {"dataset": view.name, "n_train": n_train, "n_valid": sum(rep.counts["valid"].values()),
           "n_classes": len(rep.classes), "opt": a.opt, "size": a.size, "bs": bs, "epochs": a.epochs}
    t = time.perf_counter()
    feats = extract_features(learn, bs=64)
    out["features_s"] = time.perf_counter() - t
    hbs = feature_batch_size(n_train)
    hepochs = feature_epochs(n_train, hbs, a.head_steps)
    hl = head_learner(learn, feats, hbs, r.wd, seed=r.seed)
    head0 = copy.deepcopy(hl.model.state_dict())
    t = time.perf_counter()
    sweep = lr_find(hl, num_it=a.num_it)
    out["sweep_s"] = time.perf_counter() - t
    out["head_curve"] = {"lrs": sweep.lrs, "losses": sweep.losses}
    out["suggest"] = {m: suggest(sweep.lrs, sweep.losses, m) for m in SUGGESTERS}
    out["head_acc"] = {}
    for name, lr in [*out["suggest"].items(), *((f"{x:g}", x) for x in HEAD_LRS)]:
        hl.model.load_state_dict(head0)
        out["head_acc"][name] = _head_fit(hl, lr, hepochs, r)
    hl.model.load_state_dict(head0)
    out["head_lr"] = out["suggest"]["valley"]
    out["head_final"] = _head_fit(hl, out["head_lr"], hepochs, r)
    base = copy.deepcopy(learn.model.state_dict())
    if a.full_sweep:
        learn.freeze_top(-1)
        ratios = learn.layer_lrs(slice(1 / r.lr_ratio, 1.0))
        t = time.perf_counter()
        fs = lr_find(learn, start_lr=1e-7, end_lr=1.0, num_it=a.full_sweep, ratios=ratios)
        out["full_sweep_s"] = time.perf_counter() - t
        out["full_curve"] = {"lrs": fs.lrs, "losses": fs.losses}
        out["full_suggest"] = {}
        for m in SUGGESTERS:
            try:
                out["full_suggest"][m] = suggest(fs.lrs, fs.losses, m)
            except ValueError as e:
                print(f"  full sweep: no {m} suggestion ({e})")
    out["ft"] = {}
    for lr in a.ft_lrs:
        learn.model.load_state_dict(base)
        learn.freeze_top(-1)
        learn.opt = None
        t = time.perf_counter()
        learn.fit_stage(a.epochs, slice(lr / r.lr_ratio, lr), r.div, r.final_div, r.pct_start, r.moms)
        names = [n for n in list(learn.recorder.metric_names)[1:] if n != "time"]  # train_loss, valid_loss, accuracy
        accs = [float(v[names.index("accuracy")]) for v in learn.recorder.values]
        losses = [float(v[names.index("valid_loss")]) for v in learn.recorder.values]
        out["ft"][f"{lr:g}"] = {"lr": lr, "acc": accs[-1], "accs": accs, "valid_losses": losses,
                                "seconds": time.perf_counter() - t}
        print(f"  {view.name} {a.opt} ft lr {lr:g}: acc {accs}", flush=True)
    torch.set_num_threads(torch.get_num_threads())
    return out


def _interp_acc(grid: dict, lr: float) -> float:
    "Accuracy at `lr` by linear interpolation in log-LR over the grid (clamped at its ends)."
    pts = sorted((v["lr"], v["acc"]) for v in grid.values())
    xs, ys = np.log10([p[0] for p in pts]), [p[1] for p in pts]
    return float(np.interp(math.log10(lr), xs, ys))


def analyse(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    print(f"{'dataset':<16}{'opt':<7}{'best ft lr':>11}{'best acc':>9}   head acc by suggester (LR)")
    for r in runs:
        best = max(r["ft"].values(), key=lambda v: v["acc"])
        heads = "  ".join(f"{m} {r['head_acc'][m][0]:.3f} ({r['suggest'][m]:.1e})" for m in r["suggest"])
        print(f"{r['dataset']:<16}{r['opt']:<7}{best['lr']:>11.0e}{best['acc']:>9.4f}   {heads}")
    rules = []
    for m in ("peak", "valley", "slide", "steep", "minimum"):
        for c in (1, 1 / 3, 1 / 10, 1 / 30, 1 / 100, 1 / 300):
            rules.append((f"{c:.3g} x {m}", lambda r, m=m, c=c: c * r["suggest"][m]))
    for lr in sorted({v["lr"] for r in runs for v in r["ft"].values()}):
        rules.append((f"const {lr:g}", lambda r, lr=lr: lr))
    print(f"\n{'rule':<22}{'mean acc':>9}{'mean regret':>12}{'worst':>8}   per dataset: acc (LR)")
    scored = []
    for name, rule in rules:
        accs, regrets, cells = [], [], []
        for r in runs:
            lr = rule(r)
            acc = _interp_acc(r["ft"], lr)
            best = max(v["acc"] for v in r["ft"].values())
            accs.append(acc), regrets.append(best - acc), cells.append(f"{acc:.3f} ({lr:.1e})")
        scored.append((float(np.mean(regrets)), name, float(np.mean(accs)), max(regrets), cells))
    for reg, name, acc, worst, cells in sorted(scored)[:25]:
        print(f"{name:<22}{acc:>9.4f}{reg:>12.4f}{worst:>8.4f}   {'  '.join(cells)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="*")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opt", default="adamw")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per grid point")
    p.add_argument("--min-steps", type=int, default=100)
    p.add_argument("--head-steps", type=int, default=300)
    p.add_argument("--num-it", type=int, default=200, help="head sweep steps")
    p.add_argument("--full-sweep", type=int, default=0, help="steps of a whole-network sweep after the head (0: none)")
    p.add_argument("--ft-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/lr_calib")
    p.add_argument("--analyse", nargs="+", default=None, metavar="JSON")
    a = p.parse_args()
    if a.analyse:
        return analyse(a.analyse)
    import torch
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for d in a.data:
        res = calibrate(Path(d), a)
        path = out / f"{Path(d).name}-{a.opt}.json"
        path.write_text(json.dumps(res))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
