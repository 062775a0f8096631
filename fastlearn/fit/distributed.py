"""Data-parallel training of a fastai `Learner` on several processes, launched by torchrun (nccl on GPUs,
gloo on CPUs).

    torchrun --nproc_per_node=2 train.py        # every process runs the whole script
    # in train.py:
    init_distributed()                          # join torchrun's process group (no-op for one process)
    with main_process_first():                  # rank 0 downloads/caches first
        dls = ...
    learn = ...
    with distributed_ctx(learn):                # DDP while inside; the same Learner afterwards
        learn.fit_one_cycle(3)

Built on fastai's `DistributedTrainer` (accelerate prepares the DDP model) and `DistributedDL`, with what they get
wrong for us fixed (fastai 2.8.12):
- `DistributedDL` moves the shuffled indices to CUDA, failing on a CPU (gloo) group, and its `__len__` counts the
  whole dataset's batches, so with `drop_last` a one-cycle schedule stops early; `ShardedDL` fixes both. Shards are
  strided as in torch's `DistributedSampler`: global batch k of W ranks at batch b is batch k of one process at W*b.
- The loaders are wrapped for the whole `distributed_ctx` block (fastai wraps them per fit), so what reads
  `len(learn.dls.train)` before a fit (lr_find, progress bars) sees a rank's shard.
- Validation: fastai pads the shards and averages `AvgMetric`/`AvgLoss` over ranks with the padding included. Here
  every rank evaluates the whole validation set (`FullValidDL`) and takes rank 0's record (`RankZeroRecord`), so
  metrics are exact and callbacks that read them (early stopping, best checkpoint) decide alike on every rank.
- `sync_bn`: torch's converter turns timm's `BatchNormAct2d` into a `SyncBatchNorm` that drops the activation;
  timm's keeps it. After fit the Learner gets its original modules back (they share the trained parameters).
- Failures: a NaN/Inf training loss on any rank raises `NonFiniteError` on every rank at the same step, before
  the bad gradient is averaged into the weights (fastai's `TerminateOnNaNCallback` stops only that rank, and the
  others hang). An exception on one rank ends its process and torchrun stops the others; the process group timeout
  is the backstop for a rank that hangs.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import LRFinder
from fastai.distributed import DistributedDL, DistributedTrainer, _round_to_multiple
from fastai.torch_core import apply, to_detach
from timm.layers import convert_sync_batchnorm
from torch import nn

from ..base.errors import FastlearnError, NonFiniteError, TrainingInterrupted
from ..base.progress import EpochProgress
from ..core.lr_finder import LRSweep
from ..core.models import bn_layers
from ..base.ranks import DEFAULT_TIMEOUT_S, group_device, broadcast_object, init_distributed, is_main_process, rank, world_size


__all__ = ["distributed_ctx", "ShardedDL", "FullValidDL", "DDPTrainer", "RankZeroRecord"]


# -- data: training shards and the full validation set -----------------------------------------------

class _WrappedDL(DistributedDL):
    @property
    def rng(self):  # the wrapped loader's shuffle RNG, so `learner_snapshot` (lr_find) saves and restores it
        return self.dl.rng

    @rng.setter
    def rng(self, value):
        self.dl.rng = value


class ShardedDL(_WrappedDL):
    "fastai's `DistributedDL` with rank 0's shuffle broadcast on the group's device, strided shards and the shard's length."

    def _broadcast(self, t, rank):
        # fastai's `LongTensor(t).cuda()` fails without a GPU: gloo groups get CPU tensors, nccl the current GPU
        t = torch.tensor(t, dtype=torch.long, device=group_device())
        dist.broadcast(t, rank)
        return t.cpu().tolist()

    def __len__(self):
        # fastai: round(len(dl), W) // W, the whole dataset's batch count; wrong with drop_last.
        per_rank = _round_to_multiple(self.dl.n, self.world_size) // self.world_size
        return per_rank // self.bs if self.drop_last else math.ceil(per_rank / self.bs)

    def get_idxs(self):
        idxs = self._broadcast(list(self.dl.get_idxs()), 0)  # every rank shuffles (same RNG use), rank 0's wins
        self.n = len(idxs)
        self.n_padded = _round_to_multiple(self.n, self.world_size)
        idxs += (idxs * (self.n_padded // self.n))[: self.n_padded - self.n]  # repeat the first few
        return idxs[self.rank::self.world_size]

    def to_detach(self, b, cpu=True, gather=True):
        "Gathered batch without the padding samples (they sit last in the last batch of the top ranks)."
        b = self._to_detach(b, cpu, gather)
        pad = getattr(self, "n_padded", 0) - getattr(self, "n", 0)
        if not (gather and pad and getattr(self, "i", None) == self.n_padded // self.world_size):
            return b
        W = self.world_size

        def _unpad(t):
            if t.ndim == 0:
                return t
            per = len(t) // W
            keep = torch.ones(len(t), dtype=torch.bool)
            keep[[r * per + per - 1 for r in range(W - pad, W)]] = False
            return t[keep.to(t.device)]
        return apply(_unpad, b)


class FullValidDL(_WrappedDL):
    "The whole validation set on every rank, in order, and metrics computed without any all-gather."

    def __init__(self, dl, device=None):
        super().__init__(dl, rank=0, world_size=1, device=device)

    def get_idxs(self):
        idxs = list(self.dl.get_idxs())
        self.n = self.n_padded = len(idxs)
        return idxs

    def to_detach(self, b, cpu=True, gather=True):
        return to_detach(b, cpu, gather=False)  # every rank already holds every prediction


# -- the trainer callback ------------------------------------------------------------------------------

def _put_back(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    "Set each submodule `name` of `model` back to `modules[name]`."
    for name, m in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m)


class DDPTrainer(DistributedTrainer):
    """fastai's `DistributedTrainer` (accelerate wraps the model in DDP for each fit) with our data loaders,
    timm-aware SyncBatchNorm, the Learner's own model back after each fit, and non-finite losses agreed on
    by all ranks. `distributed_ctx` adds it and wraps the loaders for the whole block."""

    def __init__(self, sync_bn: bool = False, **kwargs):
        kwargs.setdefault("cpu", dist.get_backend() != "nccl")  # accelerate sees gloo only with cpu=True
        super().__init__(sync_bn=sync_bn, **kwargs)
        self.orig_model, self._bns, self.old_dls = None, {}, None

    def wrap_dls(self, dls) -> None:
        "Training loader -> `ShardedDL`, the others -> `FullValidDL`, on this rank's device; idempotent."
        if self.old_dls is None:
            self.old_dls = list(dls.loaders)
            dls.loaders = [self._wrap_dl(dl, train=i == 0) for i, dl in enumerate(self.old_dls)]

    def unwrap_dls(self, dls) -> None:
        if self.old_dls is not None:
            dls.loaders, self.old_dls = self.old_dls, None

    def _wrap_dl(self, dl, train: bool = True):
        if isinstance(dl, (ShardedDL, FullValidDL)):
            return dl
        # accelerate's device: cuda:LOCAL_RANK under nccl even if the loaders were built before set_device
        device = self.accelerator.device
        return ShardedDL(dl, device=device) if train else FullValidDL(dl, device=device)

    def before_fit(self):
        self.orig_model = self.learn.model
        if self.sync_bn:
            self._bns = {n: m for n, m in bn_layers(self.orig_model).items() if n}
            model = convert_sync_batchnorm(self.orig_model)  # in place below the root, sharing parameters
        else:
            model = self.orig_model
        self.learn.model = self.accelerator.prepare(model)
        if rank():
            self.learn.logger = lambda *a, **k: None

    def before_train(self):  # loaders passed to fit/validate/get_preds directly are wrapped here
        self.learn.dl = self._wrap_dl(self.learn.dl, train=True)

    def before_validate(self):
        self.learn.dl = self._wrap_dl(self.learn.dl, train=False)

    def after_loss(self):
        if not self.training or self._sweeping():
            return
        bad = (~torch.isfinite(self.learn.loss_grad.detach()).all()).float().reshape(1).to(group_device())
        flags = [torch.zeros_like(bad) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, bad)
        bad_ranks = [r for r, f in enumerate(torch.cat(flags).tolist()) if f]
        if bad_ranks:
            raise NonFiniteError(
                f"non-finite training loss on rank(s) {bad_ranks} of {dist.get_world_size()} at epoch "
                f"{self.epoch + 1} batch {self.iter + 1}; every rank stops here, before the bad gradient is "
                f"averaged into the weights. Lower the LR, set grad_clip, or check that rank's data")

    def _sweeping(self) -> bool:
        # An LR range test is meant to diverge: its own callback stops it, on every rank at once, because
        # the smoothed loss it watches is already all-gathered (averaged) by fastai's Recorder.
        return any(isinstance(cb, (LRSweep, LRFinder)) for cb in self.learn.cbs)

    def after_train(self):
        # DDP keeps the weights equal but not the BatchNorm statistics (each rank updates them with its own
        # batch after DDP broadcast rank 0's): every rank validates, and rank 0 saves, rank 0's.
        model = self.learn.model
        for b in (model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model).buffers():
            dist.broadcast(b.data, 0)

    def after_fit(self):
        self.restore_model()

    def restore_model(self) -> None:
        "Give the Learner back its own model (no DDP, no SyncBatchNorm); idempotent."
        if self.orig_model is not None:
            if self._bns:
                _put_back(self.orig_model, self._bns)
            self.learn.model = self.orig_model
        self.orig_model, self._bns = None, {}


class RankZeroRecord(Callback):
    """Every rank takes rank 0's record of the epoch: BLAS may round differently on each rank, and callbacks that
    compare metrics (early stopping, best checkpoint) must decide alike on every rank or the ranks diverge."""
    order = 55  # after Recorder (50) appends the epoch, before TrackerCallback (60) reads it

    def after_epoch(self):
        rec = getattr(self.learn, "recorder", None)
        if rec is None or not rec.values:
            return
        last = rec.values[-1]
        last[:] = broadcast_object(list(last))
        rec.log[1:1 + len(last)] = last


@contextmanager
def distributed_ctx(learn, sync_bn: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S, **accelerator_kwargs):
    """Train `learn` with DistributedDataParallel inside the block when launched on several processes (torchrun /
    accelerate launch); do nothing for one process. Only rank 0 shows progress; a failing rank says so and re-raises.
    `sync_bn`: batch statistics over the global batch (CUDA only). Every rank must make the same Learner calls inside
    the block (wrapping the model in DDP at each fit, validate, get_preds or lr_find is a collective); work for rank 0
    alone (writing files) goes under `if is_main_process():` with no Learner calls, or after the block."""
    if not init_distributed(timeout_s):
        yield learn
        return
    if sync_bn and dist.get_backend() != "nccl":
        raise FastlearnError(f"sync_bn=True needs CUDA processes (nccl); this group runs {dist.get_backend()!r}, "
                             f"and torch's SyncBatchNorm has no CPU kernel. Set sync_bn = false on CPU")
    trainer = DDPTrainer(sync_bn=sync_bn, **accelerator_kwargs)
    quiet = [] if is_main_process() else [cb for cb in learn.cbs if isinstance(cb, (EpochProgress, ProgressCallback))]
    learn.remove_cbs(quiet)
    record = RankZeroRecord()
    learn.add_cbs([trainer, record])
    trainer.wrap_dls(learn.dls)  # for the whole block: len(learn.dls.train) is a shard's everywhere inside
    try:
        yield learn
    except BaseException as e:
        if not isinstance(e, TrainingInterrupted):  # every rank stopped together on a signal: not a failure
            print(f"fastlearn.distributed: rank {rank()} of {world_size()} failed: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
        raise
    finally:
        trainer.restore_model()
        trainer.unwrap_dls(learn.dls)
        learn.remove_cbs([trainer, record])
        learn.add_cbs(quiet)
