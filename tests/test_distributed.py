"""fastlearn.distributed: data sharding and validation loaders in process, then real DDP runs: two CPU
processes (gloo) launched by torchrun (tests/_ddp_script.py), compared with a one-process run."""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastai.callback.progress import ProgressCallback
from fastai.data.load import DataLoader
from fastai.distributed import DistributedDL
from fastai.torch_core import to_detach
from torch import nn

from fastlearn.fit.distributed import FullValidDL, ShardedDL, _put_back, distributed_ctx
from fastlearn.base.ranks import broadcast_object, global_batch_size, is_main_process, rank, world_size
from fastlearn.base.errors import FastlearnError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _ddp_script as S  # noqa: E402


# -- in process: loaders and helpers ----------------------------------------------------------------

class _LocalSharded(ShardedDL):
    "A rank's ShardedDL without a process group: every rank shuffles with the same seed, as rank 0 would."
    gathered = None

    def _broadcast(self, t, rank):
        return t

    def _to_detach(self, b, cpu=True, gather=True):  # fastai's hook "so we can override for test"
        return self.gathered


def _dl(n, bs, drop_last, seed=0):
    dl = DataLoader(list(range(n)), bs=bs, shuffle=True, drop_last=drop_last)
    dl.rng.seed(seed)
    return dl


@pytest.mark.parametrize("n,W,bs,drop_last", [(72, 2, 8, True), (72, 2, 8, False), (10, 3, 2, False),
                                              (11, 2, 3, True), (96, 4, 4, True)])
def test_shards_are_strided_disjoint_and_sized(n, W, bs, drop_last):
    ranks = [_LocalSharded(_dl(n, bs, drop_last), rank=r, world_size=W) for r in range(W)]
    per_rank = [[list(b.tolist()) for b in dl] for dl in ranks]
    for dl, batches in zip(ranks, per_rank):
        assert len(dl) == len(batches)  # the length fastai's schedulers use is what a rank yields
    perm = next(iter(_dl(n, n, False))).tolist()  # the epoch's shuffle, as one process iterates it
    padded = perm + perm[: (-n) % W]
    for r, batches in enumerate(per_rank):
        seen = [i for b in batches for i in b]
        assert seen == padded[r::W][: len(seen)]
    if n % W == 0:  # no padding: global batch k is batch k of one process at batch W*bs
        single = [sorted(b.tolist()) for b in _dl(n, bs * W, drop_last)]
        dist = [sorted(i for r in range(W) for i in per_rank[r][k]) for k in range(len(per_rank[0]))]
        assert dist == single
        assert len({i for b in dist for i in b}) == sum(map(len, dist))  # no sample twice in an epoch


def test_fastai_distributed_dl_length_is_wrong_with_drop_last():
    "Why ShardedDL overrides __len__: fastai counts the whole dataset's batches (72//8=9 -> 10//2=5)."
    ours = _LocalSharded(_dl(72, 8, True), rank=0, world_size=2)
    assert len(list(ours)) == len(ours) == 4
    assert DistributedDL.__len__(ours) == 5


def test_gathered_batches_lose_exactly_the_padding():
    n, W, bs = 10, 3, 2  # 4 per rank, 12 with padding: ranks 1 and 2 each end with a repeated sample
    ranks = [_LocalSharded(_dl(n, bs, False), rank=r, world_size=W) for r in range(W)]
    got = []
    for batches in zip(*ranks):
        ranks[0].gathered = torch.cat(batches)  # what all_gather would return on every rank
        got += ranks[0].to_detach(batches[0]).tolist()
    assert sorted(got) == list(range(n))


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the CPU-only failure")
def test_fastai_broadcast_needs_cuda():
    "Why ShardedDL overrides _broadcast: fastai's moves the indices to CUDA, so gloo on CPU cannot shuffle."
    with pytest.raises((RuntimeError, AssertionError)):
        DistributedDL._broadcast(None, [3, 1, 2], 0)


def test_full_valid_dl_is_whole_and_never_gathers(monkeypatch):
    dl = FullValidDL(DataLoader(list(range(30)), bs=8))
    assert [i for b in dl for i in b.tolist()] == list(range(30))
    monkeypatch.setenv("WORLD_SIZE", "2")  # fastai's to_detach would all_gather here (and fail: no group)
    with pytest.raises(ValueError, match="process group"):
        to_detach(torch.arange(3))
    assert dl.to_detach(torch.arange(3)).tolist() == [0, 1, 2]


def test_sync_bn_conversion_is_undone_with_shared_weights():
    from timm.layers import convert_sync_batchnorm
    from fastlearn.core.models import bn_layers, create_model
    model = create_model("test_resnet", 3, pretrained=False)
    saved = bn_layers(model)
    w = {n: m.weight for n, m in saved.items()}
    convert_sync_batchnorm(model)
    converted = bn_layers(model)
    assert all(isinstance(m, nn.SyncBatchNorm) for m in converted.values())
    assert all(converted[n].weight is w[n] for n in w)  # trained in place through the SyncBatchNorm
    _put_back(model, saved)
    assert all(model.get_submodule(n) is m for n, m in saved.items())


def test_helpers_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert (world_size(), rank(), is_main_process()) == (1, 0, True)
    assert broadcast_object({"peak": 1e-3}) == {"peak": 1e-3}
    assert global_batch_size(32, grad_accum=2) == 64
    learn = S.mlp_learner(16)
    before = list(learn.cbs)
    with distributed_ctx(learn) as same:
        assert same is learn and list(learn.cbs) == before
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FastlearnError, match="init_distributed"):
        broadcast_object(1)


# -- two processes under torchrun ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout=240, gpus: bool = False):
    "Two processes under torchrun; on the CPU with gloo (GPUs hidden) unless `gpus`."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(HERE / "_ddp_script.py"), *map(str, args)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    rc, log, _ = _torchrun("train", out)
    assert rc == 0, log[-3000:]
    return out, log, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def reference():
    "The same training on one process at the global batch size (16 = 2 ranks x 8)."
    seen = S.SeenSamples(S.data()[0])
    learn = S.mlp_learner(S.GLOBAL_BS, [seen])
    learn.remove_cb(ProgressCallback)
    learn.fit_one_cycle(S.EPOCHS, S.LR)
    return learn, seen


@pytest.mark.distributed
def test_ranks_end_with_identical_weights(ddp_run):
    _, _, (d0, d1) = ddp_run
    for key in ("state", "resnet"):  # resnet: BatchNorm statistics too (rank 0's, broadcast after training)
        assert d0[key].keys() == d1[key].keys()
        for k in d0[key]:
            assert torch.equal(d0[key][k], d1[key][k]), (key, k)
    assert d0["resnet_norms"] == ["BatchNorm2d"]  # the Learner gets its own (non-DDP) model back


@pytest.mark.distributed
def test_ddp_equals_one_process_at_the_global_batch(ddp_run, reference):
    # Without BatchNorm, the mean of the two ranks' gradients (batch 8 each) is the gradient of the
    # 16-sample global batch, and strided shards make global batch k the one-process batch k: the runs
    # differ only by float summation order. (With BatchNorm, per-rank batch statistics differ from the
    # global batch's; sync_bn fixes that but SyncBatchNorm runs only on CUDA.)
    _, _, (d0, d1) = ddp_run
    learn, seen = reference
    for k, v in learn.model.state_dict().items():
        torch.testing.assert_close(d0["state"][k], v, atol=1e-6, rtol=0)
    assert d0["n_batches"] == d1["n_batches"] == seen.n_batches == [4] * S.EPOCHS  # 72 // 16, one-cycle ends
    for e in range(S.EPOCHS):
        r0, r1 = d0["seen"][e], d1["seen"][e]
        assert not set(r0) & set(r1) and len(r0) == len(r1) == 32  # different shards...
        glob = [sorted(r0[k * 8:(k + 1) * 8] + r1[k * 8:(k + 1) * 8]) for k in range(4)]
        assert glob == [sorted(seen.epochs[e][k * 16:(k + 1) * 16]) for k in range(4)]  # ...same global batches
    assert d0["seen"][0] != d0["seen"][1]  # reshuffled each epoch


@pytest.mark.distributed
def test_validation_is_the_full_set_once_and_the_same_on_every_rank(ddp_run, reference):
    _, _, (d0, d1) = ddp_run
    assert d0["values"] == d1["values"]  # rank 0's record on every rank: callbacks decide alike
    learn, _ = reference
    torch.testing.assert_close(torch.tensor(d0["values"]), torch.tensor(learn.recorder.values), atol=1e-5, rtol=0)
    # the final model evaluated by one process on all 30 validation samples, each once
    model = S.mlp_learner(S.GLOBAL_BS).model
    model.load_state_dict(d0["state"])
    x, y = map(torch.stack, zip(*S.data()[1]))
    with torch.no_grad():
        logits = model(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    loss = nn.functional.cross_entropy(logits, y).item()
    assert d0["validate"][1] == pytest.approx(acc, abs=1e-6)
    assert d0["validate"][0] == pytest.approx(loss, abs=1e-5)
    assert acc > 0.4  # learned something (3 classes): the comparison is not between two chance levels


@pytest.mark.distributed
def test_lr_find_sweeps_once_at_the_global_batch(ddp_run):
    # One sweep on both ranks together (the loss it watches is averaged over ranks), so it measures the
    # batch size that trains: 2 x 8; the same sweep as one process at batch 16, and rank 0's peak everywhere.
    from fastlearn.core.lr_finder import lr_find
    _, _, (d0, d1) = ddp_run
    f0, f1 = d0["lr_find"], d1["lr_find"]
    assert f0["restored"] and f1["restored"]  # weights back exactly as before the sweep, on each rank
    assert f0["losses"] == f1["losses"] and f0["peak"] == f1["peak"] == f0["own_peak"]
    ref = lr_find(S.mlp_learner(S.GLOBAL_BS), num_it=40)
    assert len(f0["lrs"]) == len(ref.lrs)  # 40 steps unless diverged: len(dls.train) is the shard's inside
    torch.testing.assert_close(torch.tensor(f0["losses"]), torch.tensor(ref.losses), atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_only_rank0_writes_and_prints(ddp_run):
    out, log, (d0, d1) = ddp_run
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1 and d0["run_dir"] == d1["run_dir"] == str(runs[0])
    assert sorted(p.name for p in runs[0].iterdir()) == ["metrics.csv", "model.safetensors"]
    assert log.count("train_loss") == 1  # one progress table: rank 1's progress callback was removed


def _exit_codes(log: str) -> dict[int, int]:
    "rank -> exit code from torchrun's failure summary."
    return {int(r): int(c) for r, c in re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", log)}


@pytest.mark.distributed
@pytest.mark.parametrize("how,expect", [
    ("exc", [r"rank 1 of 2 failed: RuntimeError.*\n\s*injected failure on rank 1 at batch 3"]),
    ("nan", [rf"rank {r} of 2 failed: NonFiniteError.*\n\s*non-finite training loss on rank\(s\) \[1\] of 2 "
             rf"at epoch 1 batch 3" for r in (0, 1)]),
    pytest.param("hang", [r"rank 0 of 2 failed: RuntimeError.*\n.*Timed out"], marks=pytest.mark.slow),
])
def test_a_failing_rank_stops_every_rank(tmp_path, how, expect):
    # exc: rank 1 raises, torchrun's agent stops rank 0. nan: both ranks agree and raise together.
    # hang: rank 1 sleeps 600 s inside a step; rank 0's collective times out (process group timeout 10 s).
    rc, log, secs = _torchrun("fail", tmp_path, how, timeout=300)
    assert rc != 0
    for pattern in expect:
        assert re.search(pattern, log), log[-3000:]
    codes = _exit_codes(log)
    assert set(codes) == {0, 1} and all(c != 0 for c in codes.values()), codes
    assert not list(tmp_path.glob("finished*"))  # no rank trained on past the failure
    assert secs < 300


@pytest.mark.cuda
@pytest.mark.skipif(not 0 < torch.cuda.device_count() < 2, reason="needs a machine with exactly one CUDA device")
def test_more_processes_than_gpus_is_a_clear_error(tmp_path):
    "nccl needs a GPU per process: 2 processes on 1 GPU stop at init with what to do, not 'invalid device ordinal'."
    rc, log, _ = _torchrun("train", tmp_path, gpus=True, timeout=120)
    assert rc != 0
    assert "LOCAL_RANK=1 but this machine has 1 CUDA device(s)" in log and "CUDA_VISIBLE_DEVICES=''" in log
