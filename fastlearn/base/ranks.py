"""Ranks: which process this is under torchrun (nccl on GPUs, gloo on CPUs) and the collectives every layer uses
(broadcast a value from rank 0, the largest of an int, a barrier). One process: each is a no-op."""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import FastlearnError


__all__ = ["world_size", "rank", "is_main_process", "is_distributed", "global_batch_size", "init_distributed",
           "broadcast_object", "all_reduce_max", "barrier", "main_process_first", "group_device", "DEFAULT_TIMEOUT_S"]


DEFAULT_TIMEOUT_S = 1800.0  # 30 min, torch's gloo default: the longest a rank waits for the others in a collective


def _group_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    "Number of training processes (1 when not launched by torchrun/accelerate)."
    return dist.get_world_size() if _group_up() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    "This process's global rank (0 when not distributed)."
    return dist.get_rank() if _group_up() else int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    "True on the one process that prints and writes files (rank 0)."
    return rank() == 0


def is_distributed() -> bool:
    "True when several processes train together."
    return world_size() > 1


def global_batch_size(bs: int, grad_accum: int = 1) -> int:
    "Samples per optimizer step over all ranks: per-device batch x processes x accumulation steps."
    return bs * world_size() * grad_accum


def group_device() -> torch.device:
    "Where tensors for a collective must live: the current CUDA device for nccl, the CPU otherwise (gloo)."
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _require_group(what: str) -> bool:
    "False when single-process; raises when launched with several processes but the group was never joined."
    if _group_up():
        return dist.get_world_size() > 1
    if world_size() > 1:
        raise FastlearnError(f"{what}: WORLD_SIZE={world_size()} but this process has not joined the process "
                             f"group; call fastlearn.distributed.init_distributed() first (or use distributed_ctx)")
    return False


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> bool:
    """Join the process group that torchrun (or `accelerate launch`) describes in the environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT); nccl when CUDA is available, else gloo. Collectives that wait
    longer than `timeout_s` fail instead of hanging. Returns False (and does nothing) for one process."""
    if _group_up():
        return dist.get_world_size() > 1
    if world_size() <= 1:
        return False
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise FastlearnError(f"WORLD_SIZE={world_size()} but MASTER_ADDR/MASTER_PORT are not set; launch with "
                             f"`torchrun --nproc_per_node=N ...` instead of starting processes by hand")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        local, n_gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= n_gpus:
            raise FastlearnError(f"LOCAL_RANK={local} but this machine has {n_gpus} CUDA device(s): nccl needs one "
                                 f"GPU per process; start at most {n_gpus} per node (torchrun "
                                 f"--nproc_per_node={n_gpus}), or train on the CPU with gloo by hiding the GPUs "
                                 f"(CUDA_VISIBLE_DEVICES='')")
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def broadcast_object(obj, src: int = 0):
    "`obj` as rank `src` has it, on every rank (any picklable value); `obj` itself for one process."
    if not _require_group("broadcast_object"):
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=group_device())
    return box[0]


def all_reduce_max(n: int) -> int:
    "The largest of every rank's integer `n` (one tiny all-reduce); `n` itself for one process."
    if not _require_group("all_reduce_max"):
        return n
    t = torch.tensor([int(n)], dtype=torch.int64, device=group_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    "Wait until every rank gets here (nothing for one process)."
    if _require_group("barrier"):
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (downloads, caches, a new run folder), the other ranks after it.
    If rank 0 fails inside, it raises without reaching the barrier, and torchrun stops the others."""
    active = _require_group("main_process_first")
    if active and not is_main_process():
        dist.barrier()
    yield
    if active and is_main_process():
        dist.barrier()
