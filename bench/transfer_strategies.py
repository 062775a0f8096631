"""The 2x2 transfer presets side by side, and which one `strategy = "auto"` picks.

Same data (default: the bundled digits sample, 1,437 train / 360 valid scans, 10 classes), same offline
pretrained model (tf_efficientnet_lite0), same size, batch size, seed and peak LR for every preset:
linear_probe, fine_tune_top, full_fine_tune, then auto (measures the data with the frozen body, then
runs the strategy it chose). To fit a 2-core CPU the epochs are cut (defaults: head 1, intermediate
unfreezing stages 0 = dropped, last stage 1, so every preset trains 2 epochs) and lr_find is replaced by a
fixed peak LR; the printout says so. Prints a table; the last line is
`auto=<strategy> acc_auto=<..> best=<preset> acc_best=<..>`.

    python bench/transfer_strategies.py [--data digits] [--size 64] [--bs 32] [--lr 5e-3] [--threads 1]
"""
import argparse
import tempfile
import time

import torch

PRESETS = ("linear_probe", "fine_tune_top", "full_fine_tune", "auto")


def run_preset(data: str, name: str, overrides: dict, root: str):
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
    t = time.perf_counter()
    learn, r = learner_from_recipe(data, name, overrides, progress=True)
    res = run_recipe(learn, r, run_dir=f"{root}/{name}")
    return res, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", help="a sample name or an image folder")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3, help="fixed peak LR for every preset (0 = run lr_find)")
    p.add_argument("--head-epochs", type=int, default=1)
    p.add_argument("--unfreeze-epochs", type=int, default=0, help="0 drops the intermediate unfreezing stages")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--stage-lr-mult", type=float, default=None,
                   help="peak LR multiplier per deeper stage (default: the recipe's; it compounds over dropped stages)")
    p.add_argument("--flip", action="store_true", help="horizontal flips (off: a flipped digit is another digit)")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)  # on a shared CPU, 1 thread avoids OpenMP threads waiting on each other
    ov = dict(size=a.size, bs=a.bs, flip=a.flip, head_epochs=a.head_epochs, unfreeze_epochs=a.unfreeze_epochs,
              epochs=a.epochs)
    if a.stage_lr_mult is not None:
        ov["stage_lr_mult"] = a.stage_lr_mult
    ov.update(lr=a.lr, lr_find=False) if a.lr > 0 else ov.update(lr_find=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlearn-strategies-") as root:
        for name in a.presets.split(","):
            res, secs = run_preset(a.data, name, ov, root)
            rows.append((name, res.strategy, res.accuracy, secs, res.why))
            print(f"== {name}: strategy {res.strategy}, accuracy {res.accuracy:.4f}, {secs:.0f}s", flush=True)
    print()
    print(f"data {a.data}, tf_efficientnet_lite0 (offline ImageNet weights), {a.size} px, bs {a.bs}, flip {a.flip}, "
          f"CPU x{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"CUT-DOWN SCHEDULE: head_epochs={a.head_epochs} unfreeze_epochs={a.unfreeze_epochs} epochs={a.epochs}, "
          f"stage_lr_mult={a.stage_lr_mult if a.stage_lr_mult is not None else 'recipe'}, "
          + (f"fixed peak lr={a.lr:g} (no lr_find)" if a.lr > 0 else "lr_find") + "; not the presets' full budgets")
    print(f"{'preset':<16}{'strategy':<15}{'val acc':>9}{'time s':>9}")
    for name, strat, acc, secs, _ in rows:
        print(f"{name:<16}{strat:<15}{acc:>9.4f}{secs:>9.1f}")
    for name, strat, _, _, why in rows:
        if why:
            print(f"{name} chose {strat}: {why}")
    fixed = [r for r in rows if r[0] != "auto"]
    auto = next((r for r in rows if r[0] == "auto"), None)
    if fixed and auto:
        best = max(fixed, key=lambda r: r[2])
        print(f"auto={auto[1]} acc_auto={auto[2]:.4f} best={best[0]} acc_best={best[2]:.4f}")


if __name__ == "__main__":
    main()
