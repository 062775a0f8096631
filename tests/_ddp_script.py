"""Helper for tests/test_distributed.py: run by torchrun on 2 CPU processes (gloo), or imported for the
one-process reference. Not collected by pytest (no test_ prefix).

    python -m torch.distributed.run --nproc_per_node=2 --master_port=P tests/_ddp_script.py train OUT
    python -m torch.distributed.run --nproc_per_node=2 --master_port=P tests/_ddp_script.py fail OUT exc|nan|hang

`train` writes OUT/rank{r}.pt per rank (a test-only dump: weights, samples seen, metrics) and, from rank 0
only, one run folder under OUT/runs. `fail` makes rank 1 raise / produce a NaN loss / hang at batch 3.
"""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import torch
import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle)
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import SGD
from torch import nn

N_TRAIN, N_VALID, GLOBAL_BS, EPOCHS, LR = 72, 30, 16, 3, 0.3  # 72 % 16 != 0: drop_last drops a batch
FAIL_AT = 3  # training batch at which rank 1 fails


def data(seed: int = 0):
    "Train and valid (x, y) pairs: 3x8x8 noise, each class lifting its own channel a little (learnable, not trivial)."
    g = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_VALID
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g)
    x[torch.arange(n), y] += 0.3
    pairs = list(zip(x, y))
    return pairs[:N_TRAIN], pairs[N_TRAIN:]


class SeenSamples(Callback):
    "Records, per epoch, which training samples this process saw (by the sample's first pixel)."
    def __init__(self, train):
        self.lookup = {float(x[0, 0, 0]): i for i, (x, _) in enumerate(train)}
        self.epochs, self.n_batches = [], []

    def before_epoch(self):
        self.epochs.append([])

    def before_train(self):
        self.n_batches.append(len(self.dl))  # what fastai schedules by: must match what a rank yields

    def before_batch(self):
        if self.training:
            self.epochs[-1] += [self.lookup[v] for v in self.xb[0][:, 0, 0, 0].tolist()]


def mlp_learner(bs: int, cbs=()):
    "A BatchNorm-free MLP (DDP's averaged gradient equals the global batch's), SGD, shuffled data."
    train, valid = data()
    dls = DataLoaders.from_dsets(train, valid, bs=bs, shuffle=True, device="cpu", num_workers=0)
    dls.train.rng.seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 3))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, metrics=accuracy,
                   cbs=list(cbs))


def resnet_learner(bs: int):
    "timm test_resnet (BatchNormAct2d layers) on synthetic blobs, SGD, everything trainable."
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import synthetic_dls
    from fastlearn.train.learner import transfer_learner
    torch.manual_seed(0)
    learn = transfer_learner(synthetic_dls(n=96, bs=bs), "test_resnet", pretrained=False, opt="sgd",
                             progress=False)
    learn.freeze_top(-1)
    return learn


def train(out: Path) -> None:
    from fastai.distributed import teardown_distrib
    from fastlearn.core.weights import save_weights
    from fastlearn.core.lr_finder import lr_find
    from fastlearn.base.ranks import broadcast_object, init_distributed, is_main_process, main_process_first, rank, world_size
    from fastlearn.fit.distributed import distributed_ctx
    from fastlearn.run.records import new_run_dir
    init_distributed(timeout_s=60)
    W, r = world_size(), rank()
    with main_process_first():
        run_dir = new_run_dir(out / "runs", "ddp") if is_main_process() else None
    run_dir = broadcast_object(run_dir)
    seen = SeenSamples(data()[0])
    learn = mlp_learner(GLOBAL_BS // W, [seen])
    with distributed_ctx(learn):
        learn.fit_one_cycle(EPOCHS, LR)
        values = [list(map(float, v)) for v in learn.recorder.values]  # validate() below resets the record
        final = [float(v) for v in learn.validate()]
    dump = {"state": learn.model.state_dict(), "seen": seen.epochs, "values": values, "validate": final,
            "run_dir": str(run_dir), "n_batches": seen.n_batches}
    if is_main_process():
        save_weights(learn.model, run_dir / "model.safetensors")
        with open(run_dir / "metrics.csv", "w", newline="") as f:
            csv.writer(f).writerows(dump["values"])
    probe = mlp_learner(GLOBAL_BS // W)
    probe.remove_cb(ProgressCallback)  # one progress table in the log: the training's
    with distributed_ctx(probe):
        before = {k: v.clone() for k, v in probe.model.state_dict().items()}
        found = lr_find(probe, num_it=40)
        dump["lr_find"] = {"peak": broadcast_object(found.peak), "own_peak": found.peak, "lrs": found.lrs,
                           "losses": found.losses, "diverged": found.diverged,
                           "restored": all(torch.equal(before[k], v) for k, v in probe.model.state_dict().items())}
    rn = resnet_learner(16 // W)
    with distributed_ctx(rn):  # BatchNorm without sync_bn (SyncBatchNorm needs CUDA)
        rn.fit(1, 0.05)
    dump["resnet"] = rn.model.state_dict()
    dump["resnet_norms"] = sorted({type(m).__name__ for m in rn.model.modules() if "Norm" in type(m).__name__})
    torch.save(dump, out / f"rank{r}.pt")
    teardown_distrib()


class Sabotage(Callback):
    "On rank 1 at training batch FAIL_AT: raise, turn the loss into NaN, or hang (alive, never answering)."
    order = 5  # before DDPTrainer (11) looks at the loss

    def __init__(self, how: str, rank: int):
        self.how, self.rank, self.n = how, rank, 0

    def after_loss(self):
        if not self.training:
            return
        self.n += 1
        if self.rank != 1 or self.n != FAIL_AT:
            return
        if self.how == "exc":
            raise RuntimeError(f"injected failure on rank 1 at batch {FAIL_AT}")
        if self.how == "nan":
            self.learn.loss_grad = self.learn.loss_grad * float("nan")
        if self.how == "hang":
            time.sleep(600)


def fail(out: Path, how: str) -> None:
    from fastlearn.fit.distributed import distributed_ctx
    from fastlearn.base.ranks import init_distributed, rank, world_size
    init_distributed(timeout_s=10)
    learn = mlp_learner(GLOBAL_BS // world_size(), [Sabotage(how, rank())])
    with distributed_ctx(learn, timeout_s=10):
        learn.fit(2, 0.1)
    (out / f"finished{rank()}").write_text("this rank trained to the end")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "train":
        train(out)
    else:
        fail(out, sys.argv[3])
