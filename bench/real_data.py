"""fastlearn's presets vs fastai's `fine_tune(3)` vs the PyTorch transfer-learning tutorial, on real image folders,
scored on a test split that nothing selected on.

Every folder is split per class, with a fixed seed, into **test** (`--test-per-class` images, the same ones at every
training size), **valid** (`--valid-per-class`, default a quarter of the training images, at least 10) and **train**
(`--max-per-class`). Keep-best, the stage guard, early stopping and every rule look at valid only; the table reports
test accuracy. Each (folder, method, seed) runs in a fresh process, as a user would run it alone; wall seconds are
measured inside it, from building the data to the final validation (the test pass is not counted).

Methods, all with the same architecture (tf_efficientnet_lite0, offline ImageNet weights) and image size:
- `transfer` (and any `--variant NAME:key=value,...`, the `transfer` recipe with those overrides): the probe (the
  head on cached features, its test accuracy before fine-tuning starts), every stage end, the kept weights, where
  the run stopped, and the time at which the kept validation accuracy was first reached;
- `fastai`: the documented three lines with fastai's defaults (`ImageDataLoaders.from_folder(item_tfms=Resize(size),
  batch_tfms=aug_transforms())`, bs 64, `vision_learner(...).fine_tune(3)`), scored on test at the end;
- `tutorial`: the PyTorch tutorial's whole-network fine-tuning (RandomResizedCrop + flip, batch 4, SGD 1e-3 momentum
  0.9, StepLR(7, 0.1), 25 epochs), its final and its best-on-valid epoch scored on test.

    python bench/real_data.py /work/corpus/* --size 160 --max-per-class 20 --methods transfer,fastai \\
        --variant bn_eval:ft_bn=eval,ft_lr_max=3e-4 --json runs/real_data/small.json

The calibration corpus (12 public sets, out of git) is rebuilt from GitHub mirrors, at pinned commits, by
`bench/build_corpus.py` (its MANIFEST.json lists each set's repository, commit, path, classes and counts).

Prints one table (dataset, method: test accuracy of probe / stage ends / kept, valid kept, wall s, seconds to the
kept accuracy, time x fastai, where the run stopped), the issue-24 targets met or missed, and a leave-one-dataset-out
choice among the fastlearn variants: for each dataset, the variant with the best mean test accuracy on the *other*
datasets, and what it scores on the held-out one. `--report A.json B.json` prints the tables of saved results again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ARCH = "tf_efficientnet_lite0"
BASELINES = ("fastai", "tutorial")
VALID_NAMES = ("valid", "val", "validation", "test")
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


# -- the split every method reads ---------------------------------------------------------------------

def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_files(src: Path) -> dict[str, list[Path]]:
    "Every image per class: `<class>/` subfolders, or `train/` + `valid/`... with `<class>/` in each (pooled)."
    splits = [src / "train"] + [src / n for n in VALID_NAMES] if (src / "train").is_dir() else [src]
    out: dict[str, list[Path]] = {}
    for d in splits:
        if d.is_dir():
            for c in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
                out.setdefault(c.name, []).extend(_images(c))
    return out


def make_view(src: Path, dest: Path, n_train: int | None, n_valid: int | None, n_test: int, seed: int) -> dict:
    """`dest/{train,valid,test}/<class>/` as symlinks into `src`. Per class, one seeded shuffle: the first `n_test`
    images are the test split (the same at every training size), the next `n_valid` valid, the next `n_train` train."""
    n_valid = n_valid if n_valid is not None else max(10, (n_train or 40) // 4)
    if dest.exists():
        shutil.rmtree(dest)
    counts = {"train": 0, "valid": 0, "test": 0}
    classes = 0
    for c, files in _class_files(src).items():
        files = sorted(files)
        random.Random(f"{seed}-{c}").shuffle(files)
        test, valid = files[:n_test], files[n_test:n_test + n_valid]
        train = files[n_test + n_valid:][:n_train] if n_train else files[n_test + n_valid:]
        if len(train) < 2 or not valid or not test:
            continue
        classes += 1
        for split, picked in (("train", train), ("valid", valid), ("test", test)):
            d = dest / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(picked):
                (d / f"{i:05d}{f.suffix.lower()}").symlink_to(f.resolve())
            counts[split] += len(picked)
    return {"n_train": counts["train"], "n_valid": counts["valid"], "n_test": counts["test"], "n_classes": classes}


# -- one method, in its own process ---------------------------------------------------------------------

def _probs_on(learn, dl, flip: bool = False):
    """Softmax probabilities of `learn.model` over a labelled fastai DataLoader, and its labels (plain tensors);
    `flip`: of the horizontally flipped images."""
    import torch
    model, was = learn.model, learn.model.training
    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for xb, yb in dl:
            probs.append(model(xb.flip(-1) if flip else xb).float().softmax(1).cpu().as_subclass(torch.Tensor))
            labels.append(yb.cpu().as_subclass(torch.Tensor))
    model.train(was)
    return torch.cat(probs), torch.cat(labels)


def _test_probs(learn, files, flip: bool = False):
    "`_probs_on` the images `files` (labelled by their parent folder) through the valid transforms."
    return _probs_on(learn, learn.dls.test_dl(files, with_labels=True), flip)


def _acc(probs, labels) -> float:
    return float((probs.argmax(1) == labels).float().mean())


def _test_accuracy(learn, files) -> float:
    "Top-1 accuracy of `learn.model` on `files` (labelled by their parent folder), through the valid transforms."
    return _acc(*_test_probs(learn, files))


def _valid_nums(probs, labels, prefix: str) -> dict:
    "Accuracy and cross-entropy (of the probabilities) on a validation set, as keep-best reads them."
    import torch
    loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels)
    return {prefix + "acc": _acc(probs, labels), prefix + "loss": float(loss)}


def run_fastlearn(view: Path, overrides: dict, size: int, seed: int, out: Path) -> dict:
    from fastai.callback.core import Callback
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
    test_files = _images(view / "test")
    t_test = [0.0]  # seconds spent on test passes inside the run: not the run's time

    class TestAtStages(Callback):
        """Test accuracy before the first fine-tuning fit (the probe's weights) and at every stage end; after every
        fine-tuning epoch, the test and valid numbers of the network and of its average with the probe, so stopping
        and ensembling rules can be scored offline on the same runs. The RNGs are put back after each pass, so the
        passes do not change what the run trains."""
        order = 84  # before the stage guard (85), which may end the fit in its after_epoch
        def __init__(self):
            self.at: list[tuple[str, float]] = []
            self.epochs: list[dict] = []
            self.probs, self.labels, self.valid = {}, None, {}
        def _passes(self, valid: bool = True, flip: bool = False):
            "Test probabilities, and the valid and flipped-test ones when asked; the RNGs put back after the passes."
            from fastlearn.base.rng import rng_state, set_rng_state
            st = rng_state(self.learn.dls)
            test = _test_probs(self.learn, test_files)
            v = _probs_on(self.learn, self.learn.dls.valid) if valid else None
            flipped = _test_probs(self.learn, test_files, flip=True)[0] if flip else None
            set_rng_state(st, self.learn.dls)
            return test, v, flipped
        def _eval(self, name):
            t = time.perf_counter()
            probe = name == "probe"
            (probs, labels), valid, flipped = self._passes(valid=probe, flip=probe)
            self.at.append((name, _acc(probs, labels)))
            self.probs[name], self.labels = probs, labels
            if probe:  # the probe with flip test-time augmentation, and its valid probabilities
                self.probs["probe+flip"] = (probs + flipped) / 2
                self.valid["probe"] = valid
            t_test[0] += time.perf_counter() - t
        def _stage(self):
            return next((c.stage for c in self.learn.cbs if type(c).__name__ == "MetricsLog"), "?")
        def before_fit(self):
            if not self.at and self._stage() != "head":
                self._eval("probe")
        def after_epoch(self):
            if self._stage() == "head" or "probe" not in self.probs:
                return
            t = time.perf_counter()
            (probs, labels), (vp, vy), _ = self._passes()
            pp, (pv, _) = self.probs["probe"], self.valid["probe"]
            self.epochs.append({"stage": self._stage(), "epoch": self.epoch + 1, "test": _acc(probs, labels),
                                "ens_test": _acc((pp + probs) / 2, labels), **_valid_nums(vp, vy, "valid_"),
                                **_valid_nums((pv + vp) / 2, vy, "ens_valid_")})
            t_test[0] += time.perf_counter() - t
        def after_fit(self):
            self._eval(self._stage())

    t0 = time.perf_counter()
    learn, r = learner_from_recipe(view, "transfer", {"size": size, "seed": seed, **overrides})
    cb = TestAtStages()
    res = run_recipe(learn, r, runs_root=out, cbs=[cb])
    wall = time.perf_counter() - t0 - t_test[0]
    kept_probs, labels = _test_probs(learn, test_files)
    kept_test = _acc(kept_probs, labels)
    # not methods of the run: what averaging predictions would give, scored offline on the same test images
    kept_flip = (kept_probs + _test_probs(learn, test_files, flip=True)[0]) / 2
    ends = [n for n, _ in cb.at if n != "probe"]
    extra = {"kept_flip_test": _acc(kept_flip, labels)}
    if "probe" in cb.probs:
        extra["probe_flip_test"] = _acc(cb.probs["probe+flip"], labels)
        if ends:  # the probe's and fine-tuning's predictions averaged (probe+FT logit ensembling, as probabilities)
            extra["ens_test"] = _acc((cb.probs["probe"] + cb.probs[ends[-1]]) / 2, labels)
            extra["ens_kept_test"] = _acc((cb.probs["probe"] + kept_probs) / 2, labels)
    if "probe" in cb.valid:
        extra["probe_valid_nums"] = _valid_nums(*cb.valid["probe"], "valid_")
    extra["epochs"] = cb.epochs
    probe_test = next((a for n, a in cb.at if n == "probe"), None)
    if probe_test is None and res.kept and res.kept.get("stage") == "head":
        probe_test = kept_test
    n_ft = sum(s["epochs"] for s in res.stages if s["stage"] != "head")
    return {"test": kept_test, "valid": res.accuracy, "seconds": wall, "probe_test": probe_test,
            "probe_valid": res.probe_accuracy, "stage_test": cb.at, "kept": (res.kept or {}).get("stage"),
            "reached_s": (res.kept or {}).get("seconds_to_accuracy"), "stopped": res.stopped, "ft_epochs": n_ft,
            "timings": res.timings, "peak_lr": res.peak_lr, "ft_peak_lr": res.ft_peak_lr,
            "stages": [{k: v for k, v in s.items() if k in ("stage", "epochs", "valid_loss", "accuracy", "train_loss",
                                                             "seconds")} for s in res.stages],
            "run_dir": str(res.run_dir), "test_s": t_test[0], **extra}


def run_fastai(view: Path, size: int, seed: int) -> dict:
    "fastai's three lines with its defaults (bs 64, fine_tune(3), base_lr 2e-3), on the offline weights."
    from fastai.callback.progress import ProgressCallback
    from fastai.torch_core import set_seed
    from fastai.vision.all import ImageDataLoaders, Normalize, Resize, accuracy, aug_transforms, vision_learner
    from fastlearn.core.models import create_model, model_stats
    t0 = time.perf_counter()
    set_seed(seed, reproducible=True)
    mean, std = model_stats(ARCH)
    dls = ImageDataLoaders.from_folder(view, train="train", valid="valid", item_tfms=Resize(size),
                                       batch_tfms=[*aug_transforms(), Normalize.from_stats(mean, std)], seed=seed)
    # fastai would download the timm weights by name; hand it the same offline ImageNet model (its body: cut=-2,
    # as fastai's TimmBody keeps forward_features) and let it build its own head
    body = create_model(ARCH, None, pretrained=True)
    learn = vision_learner(dls, lambda pretrained=True, **kw: body, n_out=dls.c, metrics=accuracy, normalize=False,
                           cut=-2)
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a: None
    learn.fine_tune(3)
    _, acc = learn.validate()
    wall = time.perf_counter() - t0
    return {"test": _test_accuracy(learn, _images(view / "test")), "valid": float(acc), "seconds": wall}


def run_tutorial(view: Path, size: int, seed: int, epochs: int = 25) -> dict:
    "The PyTorch tutorial's fine-tuning recipe, as written there: its final epoch, and its best epoch on valid."
    import copy
    import torch
    from torch import nn
    from torchvision import datasets, transforms
    from fastlearn.core.models import create_model, model_stats
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    mean, std = model_stats(ARCH)
    tfms = {"train": transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                         transforms.ToTensor(), transforms.Normalize(mean, std)]),
            "eval": transforms.Compose([transforms.Resize(size * 256 // 224), transforms.CenterCrop(size),
                                        transforms.ToTensor(), transforms.Normalize(mean, std)])}
    ds = {s: datasets.ImageFolder(view / s, tfms["train" if s == "train" else "eval"]) for s in ("train", "valid", "test")}
    dl = {s: torch.utils.data.DataLoader(ds[s], batch_size=4, shuffle=s == "train", num_workers=2)
          for s in ("train", "valid", "test")}
    model = create_model(ARCH, len(ds["train"].classes), pretrained=True)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)

    def acc(split):
        model.eval()
        with torch.no_grad():
            return sum(int((model(x).argmax(1) == y).sum()) for x, y in dl[split]) / len(ds[split])
    best, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        for x, y in dl["train"]:
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
        sched.step()
        v = acc("valid")
        if v > best:
            best, best_state = v, copy.deepcopy(model.state_dict())
    wall = time.perf_counter() - t0
    final_test = acc("test")
    model.load_state_dict(best_state)
    return {"test": final_test, "test_best": acc("test"), "valid": best, "seconds": wall}


def child(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    view, out = Path(a.view), Path(a.out)
    if a.one == "fastai":
        res = run_fastai(view, a.size, a.seed)
    elif a.one == "tutorial":
        res = run_tutorial(view, a.size, a.seed, a.tutorial_epochs)
    else:
        res = run_fastlearn(view, json.loads(a.overrides), a.size, a.seed, out)
    print("RESULT " + json.dumps(res, default=str), flush=True)


# -- the comparison -----------------------------------------------------------------------------------

def _spawn(method: str, overrides: dict, view: Path, a, seed: int, log: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", method, "--overrides", json.dumps(overrides), "--view", str(view),
           "--size", str(a.size), "--seed", str(seed), "--threads", str(a.threads), "--out", str(Path(a.out) / "runs"),
           "--tutorial-epochs", str(a.tutorial_epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    Path(log).with_suffix(".out").write_text(p.stdout)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}, see {log}", "seconds": time.perf_counter() - t}
    return json.loads(lines[-1][len("RESULT "):])


def _variants(a) -> dict[str, dict]:
    "Method name -> recipe overrides: 'transfer' (the defaults) and every --variant NAME:key=value,..."
    from fastlearn.core.recipes import parse_overrides
    out = {"transfer": {}} if "transfer" in a.methods.split(",") else {}
    for v in a.variant:
        name, _, kv = v.partition(":")
        out[name] = parse_overrides([x for x in kv.split(",") if x])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="*", help="image folders (<class>/ subfolders, or train/ + valid/ holding them)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--max-per-class", type=int, default=None, help="training images per class")
    p.add_argument("--valid-per-class", type=int, default=None, help="default: max(10, max-per-class / 4)")
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="transfer,fastai", help="comma-separated: transfer, fastai, tutorial")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... a transfer variant")
    p.add_argument("--tutorial-epochs", type=int, default=25)
    p.add_argument("--out", default="runs/real_data", help="views, logs and run folders go here")
    p.add_argument("--json", default=None, help="also write all results to this JSON file (after every run)")
    p.add_argument("--report", nargs="+", help="print the tables of these saved --json files and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--view", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return child(a)
    if a.report:
        return report([r for f in a.report for r in json.loads(Path(f).read_text())])
    if not a.data:
        p.error("give at least one data folder")
    variants = _variants(a)
    baselines = [m for m in a.methods.split(",") if m in BASELINES]
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for src in a.data:
        name = Path(src).name
        for seed in a.seeds:
            view = out / "views" / f"{name}-{a.max_per_class}-s{seed}"
            info = make_view(Path(src), view, a.max_per_class, a.valid_per_class, a.test_per_class, seed)
            for m in list(variants) + baselines:
                res = _spawn(m if m in BASELINES else "transfer", variants.get(m, {}), view, a, seed,
                             out / f"{name}-{a.max_per_class}-s{seed}-{m}.log")
                row = {"dataset": name, "per_class": a.max_per_class, "size": a.size, "seed": seed, "method": m,
                       "overrides": variants.get(m, {}), **info, **res}
                results.append(row)
                print(_line(row), flush=True)
                if a.json:
                    Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    report(results)


# -- the tables -----------------------------------------------------------------------------------------

def _f(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['dataset']:<19}{r['method']:<12} ERROR {r['error']}"
    stages = " ".join(f"{n}:{a:.3f}" for n, a in r.get("stage_test", []) if n != "probe")
    return (f"{r['dataset']:<19}{r['method']:<12}{_f(r.get('probe_test')):>7}{_f(r['test']):>7}{_f(r['valid']):>7}"
            f"{r['seconds']:>8.1f}{_f(r.get('reached_s'), '.1f'):>8}  {r.get('kept') or '':<6}"
            f"{'stopped' if r.get('stopped') else '':<8}{stages}")


def _groups(results):
    "(dataset, per_class) -> {method: [rows over seeds]}"
    out: dict = {}
    for r in results:
        if "error" not in r:
            out.setdefault((r["dataset"], r["per_class"]), {}).setdefault(r["method"], []).append(r)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def report(results: list[dict]) -> None:
    import torch
    sizes = sorted({r.get("size") for r in results if r.get("size")})
    print(f"\n{ARCH} (offline ImageNet weights), {sizes} px, CPU, torch {torch.__version__}; TEST accuracy "
          f"(mean over seeds); probe = the head on cached features before fine-tuning; stages: test at each stage end")
    print(f"{'dataset':<19}{'method':<12}{'probe':>7}{'test':>7}{'valid':>7}{'wall s':>8}{'reach s':>8}  kept  "
          f"        stage ends")
    for r in results:
        print(_line(r))
    groups = _groups(results)
    methods = list(dict.fromkeys(r["method"] for r in results))
    fl = [m for m in methods if m not in BASELINES]
    print("\nper method, mean over datasets (test accuracy; wall s; x fastai wall):")
    for m in methods:
        rows = [g[m] for g in groups.values() if m in g]
        acc = _mean(_mean(x["test"] for x in rs) for rs in rows)
        sec = _mean(_mean(x["seconds"] for x in rs) for rs in rows)
        ratio = _mean(_mean(x["seconds"] for x in g[m]) / _mean(x["seconds"] for x in g["fastai"])
                      for g in groups.values() if m in g and "fastai" in g)
        print(f"  {m:<12} test {acc:.4f}  wall {sec:7.1f}  x fastai {ratio:.2f}  ({len(rows)} sets)")
    extras = ("probe_test", "probe_flip_test", "test", "kept_flip_test", "ens_test", "ens_kept_test")
    if any(k in r for r in results for k in extras[1:]):
        print("\nprediction averaging, scored offline (mean test accuracy over datasets): probe, probe + flip TTA, kept, "
              "kept + flip TTA, probe & FT end averaged, probe & kept averaged")
        for m in fl:
            rows = [g[m] for g in groups.values() if m in g]
            print(f"  {m:<12}" + "".join(f"{_mean(_mean(x.get(k) for x in rs) for rs in rows):>8.4f}" for k in extras))
    for m in fl:
        _targets(m, groups)
    if len(fl) > 1:
        _lodo(fl, groups)


def _targets(m: str, groups: dict) -> None:
    "Issue 24's targets for variant `m`, on test accuracy."
    lines, gains = [], []
    for (name, pc), g in groups.items():
        if m not in g:
            continue
        rs = g[m]
        probe, kept = _mean(x.get("probe_test") for x in rs), _mean(x["test"] for x in rs)
        if probe == probe:
            if probe < 0.97:
                gains.append(kept - probe)
            if kept < probe - 0.005:
                lines.append(f"MISS {name}/{pc}: kept {kept:.3f} < probe {probe:.3f} - 0.5 pt")
        if "fastai" in g:
            fa, fa_s, s = _mean(x["test"] for x in g["fastai"]), _mean(x["seconds"] for x in g["fastai"]), \
                _mean(x["seconds"] for x in rs)
            ok = kept >= fa + 0.02 and s <= 0.7 * fa_s
            lines.append(f"{'PASS' if ok else 'MISS'} {name}/{pc}: {kept:.3f} vs fastai {fa:.3f} (+2 pt: "
                         f"{'yes' if kept >= fa + 0.02 else 'no'}), wall {s:.0f} s vs {fa_s:.0f} s "
                         f"({s / fa_s:.2f}x, <= 0.7x: {'yes' if s <= 0.7 * fa_s else 'no'})")
        for x in rs:  # where fine-tuning could not help (the probe kept): the run's end vs probe + 1.5 FT epochs
            ft = [st for st in x.get("stages", []) if st["stage"] != "head" and st.get("epochs")]
            if x.get("kept") == "head" and ft and x.get("reached_s") is not None:
                # on the run's clock, less the test passes this bench adds (the probe's and each stage end's, all
                # inside the fine-tuning stages' seconds); older results without test_s are left out
                test_s = x.get("test_s")
                if test_s is None:
                    continue
                epoch_s = (sum(st["seconds"] for st in ft) - test_s) / sum(st["epochs"] for st in ft)
                end = (x.get("timings") or {}).get("total", x["seconds"]) - test_s
                limit = x["reached_s"] + 1.5 * epoch_s
                lines.append(f"{'PASS' if end <= limit else 'MISS'} {name}/{pc}: the probe kept; the run ended at "
                             f"{end:.0f} s, probe at {x['reached_s']:.0f} s + 1.5 fine-tuning epochs of {epoch_s:.0f} s "
                             f"= {limit:.0f} s")
    mean_gain = _mean(gains)
    print(f"\ntargets for {m}: kept - probe on sets with probe < 0.97: mean {mean_gain * 100:+.1f} pt over "
          f"{len(gains)} sets ({'PASS' if mean_gain >= 0.01 else 'MISS'} >= +1.0)")
    for line in lines:
        print("  " + line)


def _ft_end(x: dict) -> float | None:
    "Test accuracy where fine-tuning ended (the last stage end), whatever keep-best kept."
    ends = [a for n, a in x.get("stage_test", []) if n != "probe"]
    return ends[-1] if ends else None


def _lodo(variants: list[str], groups: dict) -> None:
    """Leave one dataset out: for each dataset, the variant with the best mean test accuracy over the other datasets
    (every size), and its accuracy on the held-out dataset next to the best variant there. Scored twice: on the kept
    weights (what the user gets) and where fine-tuning ended (what the fine-tuning rule itself did)."""
    names = sorted({n for n, _ in groups})
    variants = [v for v in variants if all(v in g for g in groups.values())]  # compared on the same sets only
    if len(variants) < 2:
        return
    for what, score in (("kept", lambda x: x["test"]), ("fine-tuning end", _ft_end)):
        print(f"\nleave-one-dataset-out choice among {variants}, scored on the {what} test accuracy:")
        held = []
        for name in names:
            def mean_on(keep):
                return {v: _mean(_mean(score(x) for x in g[v]) for (n, _), g in groups.items() if keep(n) and v in g)
                        for v in variants}
            others, mine = mean_on(lambda n: n != name), mean_on(lambda n: n == name)
            pick = max(others, key=lambda v: (others[v] if others[v] == others[v] else -1))
            best = max(mine, key=lambda v: (mine[v] if mine[v] == mine[v] else -1))
            held.append((mine[pick], mine[best]))
            print(f"  {name:<19} chosen on the others: {pick:<14} here {mine[pick]:.4f} (best here {best} "
                  f"{mine[best]:.4f})")
        print(f"  held-out mean of the chosen: {_mean(h[0] for h in held):.4f}; of the best per set (oracle): "
              f"{_mean(h[1] for h in held):.4f}")


if __name__ == "__main__":
    main()
