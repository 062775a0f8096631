"""fastlearn's presets vs fastai's `fine_tune(3)` vs the PyTorch transfer-learning tutorial, on real image folders.

For each folder, side by side on this machine, with the same architecture (tf_efficientnet_lite0, offline
ImageNet weights), the same image size and the same train/valid split:

- fastlearn `transfer` and `auto`, with their defaults (`learner_from_recipe` + `run_recipe`);
- fastai's documented three lines, fastai's defaults: `ImageDataLoaders.from_folder(item_tfms=Resize(size),
  batch_tfms=aug_transforms())` (bs 64), `vision_learner(dls, arch, metrics=accuracy).fine_tune(3)`;
- the PyTorch tutorial recipe ("Transfer learning for computer vision", fine-tuning the whole network):
  RandomResizedCrop + flip, batch 4, SGD lr 1e-3 momentum 0.9, StepLR(7, 0.1), 25 epochs; its best and its
  final validation accuracy.

Each (folder, method, seed) runs in a fresh process (as a user would run it alone); wall seconds are measured
inside it, from building the data to the final validation. A folder with `train/` and `valid/`, `val/` or
`validation/` keeps its split; a folder of `<class>/` subfolders gets a seeded 80/20 split per class. Both are
capped with `--max-per-class` (training images per class; validation gets half that) so a whole comparison fits
a 2-core machine. The split is written once as a folder of symlinks that every method reads.

    python bench/real_data.py /data/clothing /data/flowers /data/signs /data/covid digits \\
        --size 224 --max-per-class 60 --seeds 0 --threads 2

Prints one table (dataset, images, classes, method, accuracy, wall seconds, time ratio to fastai, lr_find's
share of the run), one parseable `summary dataset=...` line per dataset, and the targets met or missed.
`--methods` runs a subset; `--json PATH` also writes every result.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ARCH = "tf_efficientnet_lite0"
METHODS = ("transfer", "auto", "fastai", "tutorial")
VALID_NAMES = ("valid", "val", "validation")
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


# -- the split every method reads -------------------------------------------------------------------

def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _classes(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def make_view(src: Path, dest: Path, max_per_class: int | None, seed: int) -> dict:
    "Write `dest/{train,valid}/<class>/` as symlinks into `src`; returns counts. Same seed, same split."
    rng = random.Random(seed)
    valid_dir = next((src / n for n in VALID_NAMES if (src / "train").is_dir() and (src / n).is_dir()), None)
    picks: dict[str, dict[str, list[Path]]] = {"train": {}, "valid": {}}
    cap_v = None if max_per_class is None else max(1, max_per_class // 2)
    if valid_dir is not None:
        for split, d in (("train", src / "train"), ("valid", valid_dir)):
            for c in _classes(d):
                files = _images(c)
                rng.shuffle(files)
                cap = max_per_class if split == "train" else cap_v
                picks[split][c.name] = files[:cap] if cap else files
    else:
        for c in _classes(src):
            files = _images(c)
            rng.shuffle(files)
            n_valid = max(1, round(0.2 * len(files)))
            valid, train = files[:n_valid], files[n_valid:]
            picks["train"][c.name] = train[:max_per_class] if max_per_class else train
            picks["valid"][c.name] = valid[:cap_v] if cap_v else valid
    if dest.exists():
        import shutil
        shutil.rmtree(dest)
    for split, classes in picks.items():
        for c, files in classes.items():
            if not files:
                continue
            d = dest / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(files):
                (d / f"{i:05d}{f.suffix.lower()}").symlink_to(f.resolve())
    n_train = sum(len(v) for v in picks["train"].values())
    n_valid = sum(len(v) for v in picks["valid"].values())
    return {"n_train": n_train, "n_valid": n_valid, "n_classes": len([c for c, v in picks["train"].items() if v])}


# -- one method, in its own process ------------------------------------------------------------------

def run_fastlearn(view: Path, recipe: str, size: int, seed: int, out: Path) -> dict:
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
    t0 = time.perf_counter()
    learn, r = learner_from_recipe(view, recipe, {"size": size, "seed": seed})
    swept = [0.0]  # lr_find's wall time, for versions whose RunResult has no `timings`
    find_lr = learn.find_lr

    def timed_find_lr(*args, **kw):
        t = time.perf_counter()
        try:
            return find_lr(*args, **kw)
        finally:
            swept[0] += time.perf_counter() - t
    learn.find_lr = timed_find_lr
    res = run_recipe(learn, r, runs_root=out)
    wall = time.perf_counter() - t0
    losses = [s["valid_loss"] for s in res.stages if "valid_loss" in s]
    jumps = [b / a for a, b in zip(losses, losses[1:]) if a > 0]
    timings = getattr(res, "timings", {}) or {}
    probe = getattr(res, "probe_accuracy", None)
    if probe is None and "linear-probe accuracy" in (res.why or ""):
        import re
        probe = float(re.search(r"linear-probe accuracy ([0-9.]+)", res.why).group(1))
    return {"accuracy": res.accuracy, "seconds": wall, "lr_find_s": timings.get("lr_find", swept[0]),
            "max_stage_jump": max(jumps, default=0.0), "strategy": res.strategy, "peak_lr": res.peak_lr,
            "probe_acc": probe, "kept": getattr(res, "kept", None),
            "stages": [{k: v for k, v in s.items() if k in ("stage", "epochs", "valid_loss", "accuracy", "peak_lr",
                                                             "seconds")} for s in res.stages],
            "run_dir": str(res.run_dir)}


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
    return {"accuracy": float(acc), "seconds": time.perf_counter() - t0}


def run_tutorial(view: Path, size: int, seed: int, epochs: int = 25) -> dict:
    "The PyTorch tutorial's fine-tuning recipe, as written there (best and final validation accuracy)."
    import torch
    from torch import nn
    from torchvision import datasets, transforms
    from fastlearn.core.models import create_model, model_stats
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    mean, std = model_stats(ARCH)
    tfms = {"train": transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                         transforms.ToTensor(), transforms.Normalize(mean, std)]),
            "valid": transforms.Compose([transforms.Resize(size * 256 // 224), transforms.CenterCrop(size),
                                         transforms.ToTensor(), transforms.Normalize(mean, std)])}
    ds = {s: datasets.ImageFolder(view / s, tfms[s]) for s in ("train", "valid")}
    dl = {s: torch.utils.data.DataLoader(ds[s], batch_size=4, shuffle=s == "train", num_workers=4)
          for s in ("train", "valid")}
    model = create_model(ARCH, len(ds["train"].classes), pretrained=True)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    best, accs = 0.0, []
    for ep in range(epochs):
        model.train()
        for x, y in dl["train"]:
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
        sched.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in dl["valid"]:
                correct += int((model(x).argmax(1) == y).sum())
        accs.append(correct / len(ds["valid"]))
        best = max(best, accs[-1])
        print(f"tutorial epoch {ep + 1}/{epochs}: valid accuracy {accs[-1]:.4f} at {time.perf_counter() - t0:.0f} s",
              flush=True)
    return {"accuracy": accs[-1], "best": best, "seconds": time.perf_counter() - t0, "per_epoch": accs}


def child(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    view, out = Path(a.view), Path(a.out)
    if a.one in ("transfer", "auto"):
        res = run_fastlearn(view, a.one, a.size, a.seed, out)
    elif a.one == "fastai":
        res = run_fastai(view, a.size, a.seed)
    else:
        res = run_tutorial(view, a.size, a.seed, a.tutorial_epochs)
    print("RESULT " + json.dumps(res), flush=True)


# -- the comparison ----------------------------------------------------------------------------------

def _spawn(method: str, view: Path, a, seed: int, log: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", method, "--view", str(view), "--size", str(a.size), "--seed", str(seed),
           "--threads", str(a.threads), "--out", str(Path(a.out) / "runs"), "--tutorial-epochs", str(a.tutorial_epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    f_out = p.stdout
    Path(log).with_suffix(".out").write_text(f_out)
    lines = [line for line in f_out.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}, see {log}", "seconds": time.perf_counter() - t}
    return json.loads(lines[-1][len("RESULT "):])


def _dataset_name(src: str) -> str:
    return Path(src).name if src != "digits" else "digits"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="*", help="image folders (train/+valid/ or <class>/ subfolders), or 'digits'")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--max-per-class", type=int, default=None, help="training images per class (valid: half)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--tutorial-epochs", type=int, default=25)
    p.add_argument("--out", default="runs/real_data", help="views, logs and run folders go here")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--view", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return child(a)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not a.data:
        p.error(f"unknown method(s) {bad}; choose from {METHODS}" if bad else "give at least one data folder")
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for src in a.data:
        name = _dataset_name(src)
        if src == "digits":
            from fastlearn.data.samples import sample
            src = str(sample("digits"))
        for seed in a.seeds:
            view = out / "views" / f"{name}-s{seed}"
            info = make_view(Path(src), view, a.max_per_class, seed)
            for m in methods:
                print(f"# {name} seed {seed}: {m} ({info['n_train']} train / {info['n_valid']} valid, "
                      f"{info['n_classes']} classes)", flush=True)
                res = _spawn(m, view, a, seed, out / f"{name}-s{seed}-{m}.log")
                results.append({"dataset": name, "seed": seed, "method": m, **info, **res})
                print("  " + json.dumps({k: v for k, v in res.items() if k not in ("stages", "per_epoch")}),
                      flush=True)
    report(results, a)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def report(results: list[dict], a) -> None:
    import torch
    print(f"\n{ARCH} (offline ImageNet weights), {a.size} px, max {a.max_per_class} train images/class, seeds "
          f"{a.seeds}, CPU x{a.threads} threads, torch {torch.__version__}; mean over seeds")
    hdr = f"{'dataset':<12}{'train/valid':>12}{'cls':>5}  {'method':<10}{'acc':>8}{'best':>8}{'wall s':>9}" \
          f"{'x fastai':>9}{'lr_find':>8}{'jump':>6}  notes"
    print(hdr)
    print("-" * len(hdr))
    checks = []
    for name in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == name and "error" not in r]
        by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
        fa_t = _mean(r["seconds"] for r in by["fastai"])
        summary = {"dataset": name}
        for m in METHODS:
            rs = by[m]
            if not rs:
                continue
            acc, secs = _mean(r["accuracy"] for r in rs), _mean(r["seconds"] for r in rs)
            best = _mean(r.get("best") for r in rs) if m == "tutorial" else None
            share = _mean(r.get("lr_find_s", 0) / r["seconds"] for r in rs) if m in ("transfer", "auto") else None
            jump = max((r.get("max_stage_jump", 0) for r in rs), default=0) if m in ("transfer", "auto") else None
            notes = ""
            if m in ("transfer", "auto"):
                notes = f"peak {_mean(r.get('peak_lr') for r in rs):.1e}"
                if m == "auto":
                    notes += f", chose {','.join(sorted({r['strategy'] for r in rs}))}"
                    probes = [r.get("probe_acc") for r in rs if r.get("probe_acc") is not None]
                    if probes:
                        notes += f", probe {_mean(probes):.4f}"
                kept = {(k.get("stage", "?") if isinstance(k, dict) else str(k)) for k in (r.get("kept") for r in rs) if k}
                if kept:
                    notes += f", kept {','.join(sorted(kept))}"
            ratio = secs / fa_t if fa_t == fa_t and fa_t > 0 else float("nan")
            r0 = rs[0]
            print(f"{name:<12}{str(r0['n_train']) + '/' + str(r0['n_valid']):>12}{r0['n_classes']:>5}  {m:<10}"
                  f"{acc:>8.4f}{best if best is not None else float('nan'):>8.4f}{secs:>9.1f}{ratio:>9.2f}"
                  f"{share * 100 if share is not None else float('nan'):>7.1f}%"
                  f"{jump if jump is not None else float('nan'):>6.2f}  {notes}")
            summary.update({f"{m}_acc": round(acc, 4), f"{m}_s": round(secs, 1)})
            if best is not None:
                summary["tutorial_best"] = round(best, 4)
            if share is not None:
                summary[f"{m}_lr_find_share"] = round(share, 4)
        errors = [r for r in results if r["dataset"] == name and "error" in r]
        for r in errors:
            print(f"{name:<12}{'':>17}  {r['method']:<10}  ERROR {r['error']}")
        print("summary " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
        checks += _targets(name, summary, by)
    if checks:
        print("\ntargets (transfer/auto acc >= max(fastai, tutorial final) - 0.5 pt, wall <= 1.0x fastai, "
              "lr_find <= 10%, stage valid-loss jump <= 2x, auto >= its probe):")
        for line in checks:
            print("  " + line)


def _targets(name: str, s: dict, by: dict) -> list[str]:
    out = []
    ref = max([s[k] for k in ("fastai_acc", "tutorial_acc") if k in s], default=None)
    for m in ("transfer", "auto"):
        if f"{m}_acc" not in s:
            continue
        if ref is not None:
            ok = s[f"{m}_acc"] >= ref - 0.005
            out.append(f"{'PASS' if ok else 'MISS'} {name} {m} accuracy {s[f'{m}_acc']:.4f} vs bar {ref - 0.005:.4f}")
        if "fastai_s" in s:
            ratio = s[f"{m}_s"] / s["fastai_s"]
            out.append(f"{'PASS' if ratio <= 1.0 else 'MISS'} {name} {m} time {ratio:.2f}x fastai")
        share = s.get(f"{m}_lr_find_share", 0)
        out.append(f"{'PASS' if share <= 0.10 else 'MISS'} {name} {m} lr_find share {share * 100:.1f}%")
        jump = max((r.get("max_stage_jump", 0) for r in by[m]), default=0)
        out.append(f"{'PASS' if jump <= 2.0 else 'MISS'} {name} {m} max stage valid-loss jump {jump:.2f}x")
    for r in by["auto"]:
        if r.get("probe_acc") is not None:
            ok = r["accuracy"] >= r["probe_acc"] - 1e-9
            out.append(f"{'PASS' if ok else 'MISS'} {name} auto seed {r['seed']} {r['accuracy']:.4f} vs its probe "
                       f"{r['probe_acc']:.4f}")
    return out


if __name__ == "__main__":
    main()
