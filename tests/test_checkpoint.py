"""Checkpoints: atomic, pruned, safe to load, and a resumed run equals the uninterrupted one bitwise."""
import errno
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from safetensors.torch import load_file

import fastlearn
import fastlearn.base.files as files
import fastlearn.run.checkpoint as ckmod
from fastlearn.run.checkpoint import Checkpointer, latest_checkpoint, plain, read_state, recipe_diff, resume_state
from fastlearn.base.rng import rng_state, set_rng_state
from fastlearn.base.errors import CheckpointError
from fastlearn.train.learner import transfer_learner
from fastlearn.core.recipes import Recipe
from fastlearn.train.runner import run_recipe
from conftest import needs_cuda, synthetic_dls

TESTS = Path(__file__).resolve().parent
# one stage (scratch), 2 epochs x 4 batches: small enough for in-process runs
# bs=16 and size=32 as synthetic_dls yields them: the recipe describes the learner (run_recipe records the learner's)
SMALL = dict(arch="test_resnet", pretrained=False, lr=1e-3, lr_find=False, size=32, bs=16, augment=False,
             strategy="scratch", epochs=2, keep_last=2)


def _learner(seed=0):
    set_seed(seed, reproducible=True)
    return transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)


def _weights(path):
    return load_file(str(path))


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class StopAt(Callback):
    "Simulates a crash: raises once the run has finished `step` training batches (after any checkpoint there)."
    order = 95

    def __init__(self, step):
        self.at, self.n = step, 0

    def after_batch(self):
        if self.training and len(self.yb):
            self.n += 1
            if self.n == self.at:
                raise KeyboardInterrupt(f"simulated crash after step {self.at}")


# -- pure helpers ---------------------------------------------------------------------------------

def test_rng_state_round_trip_restores_every_stream():
    dls = synthetic_dls()
    st = plain(rng_state(dls))
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)), dls.train.rng.random())
    set_rng_state(st, dls)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)), dls.train.rng.random()) == draws


def test_recipe_diff_names_changed_keys_and_ignores_bookkeeping():
    a = Recipe(**SMALL).to_dict()
    b = Recipe(**{**SMALL, "lr": 2e-3, "keep_last": 5, "keep_checkpoints": True, "description": "x"}).to_dict()
    assert recipe_diff(a, b) == ["lr: 0.001 -> 0.002"]
    assert recipe_diff(a, {**a, "moms": [0.95, 0.85]}) == []  # a TOML/torch round trip turns tuples into lists


def test_plain_converts_numpy_and_refuses_objects():
    out = plain({"a": np.float64(0.5), "b": np.arange(3), "c": (1, [np.int64(2)])})
    assert type(out["a"]) is float and isinstance(out["b"], torch.Tensor) and out["c"] == (1, [2])
    with pytest.raises(CheckpointError, match=r"state\['f'\] holds a function"):
        plain({"f": lambda: 0})


# -- writing, pruning, loading ---------------------------------------------------------------------

def test_checkpointer_writes_loadable_plain_state_and_prunes(tmp_path):
    learn = _learner()
    ck = Checkpointer(tmp_path, every_epochs=1, keep_last=1, every_steps=3, recipe=Recipe(**SMALL))
    learn.fit_stage(3, 1e-3, cbs=[ck])
    d = tmp_path / "checkpoints"
    # steps 3, 4 (epoch 1), 6, 8 (epoch 2), 9, 12 (epoch 3): the last one plus the best by valid loss are kept
    assert [p.name for p in ck.written] == [f"ckpt-{s}.pt" for s in (3, 4, 6, 8, 9, 12)]
    kept = sorted(int(p.stem.split("-")[1]) for p in d.glob("ckpt-*.pt"))
    assert kept == sorted({12, ck.best[1]}) and ck.best[1] in (4, 8, 12)
    assert sorted(p.name for p in d.glob("ckpt-*.safetensors")) == sorted(f"ckpt-{s}.safetensors" for s in kept)
    assert latest_checkpoint(tmp_path) == d / "ckpt-12.pt"
    assert not list(d.glob(".*tmp"))
    st = torch.load(d / "ckpt-12.pt", weights_only=True)  # plain data only
    assert st["position"] == {"step": 12, "stage": 0, "epoch": 3, "iter": 0, "stage_epochs": 3}
    assert st["recipe"]["arch"] == "test_resnet" and st["optimizer"]["state"]
    assert _same_weights(_weights(d / "ckpt-12.safetensors"),
                         {k: v.detach().cpu() for k, v in learn.model.state_dict().items()})


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, monkeypatch, umask, mode):
    "Issue 22: mkstemp's 0600 made run folders unreadable to colleagues; files get what open() would give."
    old = os.umask(umask)
    try:
        assert files.file_mode() == mode
        monkeypatch.setattr(files, "_PROC_STATUS", str(tmp_path / "no-proc"))  # no /proc: set the umask and put it back
        assert files.file_mode() == mode and os.umask(umask) == umask
        monkeypatch.undo()
        ckmod.atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
        ckmod.atomic_write(tmp_path / "s.pt", lambda tmp: torch.save({"a": 1}, tmp))
        ckmod.save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")  # safetensors >= 0.8 writes 0600 itself
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == \
        {n: oct(mode) for n in ("a.txt", "s.pt", "w.safetensors")}


def test_prune_finished_keeps_the_latest_checkpoint(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    for s in (4, 9, 12):
        (d / f"ckpt-{s}.pt").write_bytes(b"state")
        (d / f"ckpt-{s}.safetensors").write_bytes(b"weights")
    (d / "kept.safetensors").write_bytes(b"kept")
    (d / ".ckpt-13.pt.ab12.tmp").write_bytes(b"partial")
    (d / "latest").write_text("ckpt-9\n")                        # the pointer decides, not the highest number
    gone = ckmod.prune_finished(tmp_path, keep=("kept.safetensors",))
    assert sorted(p.name for p in d.iterdir()) == ["ckpt-9.pt", "ckpt-9.safetensors", "kept.safetensors", "latest"]
    assert sorted(p.name for p in gone) == [".ckpt-13.pt.ab12.tmp", "ckpt-12.pt", "ckpt-12.safetensors", "ckpt-4.pt",
                                            "ckpt-4.safetensors"]
    assert ckmod.prune_finished(tmp_path / "no-run") == []      # nothing written: nothing to do


def test_link_in_place_stores_the_bytes_once(tmp_path):
    a, b = tmp_path / "model.safetensors", tmp_path / "kept.safetensors"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert ckmod.link_in_place(a, b) and os.path.samefile(a, b) and not list(tmp_path.glob(".*"))
    ckmod.atomic_write(a, lambda tmp: tmp.write_bytes(b"new"))  # writers replace files: the link never changes b
    assert b.read_bytes() == b"same"


def test_resume_state_refuses_other_recipe_and_version(tmp_path, monkeypatch):
    learn = _learner()
    learn.fit_stage(1, 1e-3, cbs=[Checkpointer(tmp_path, recipe=Recipe(**SMALL))])
    assert resume_state(tmp_path, Recipe(**SMALL)).step == 4
    with pytest.raises(CheckpointError, match=r"different recipe \(lr: 0.001 -> 0.01\)"):
        resume_state(tmp_path, Recipe(**{**SMALL, "lr": 1e-2}))
    monkeypatch.setattr(ckmod, "library_version", lambda: "9.9")
    with pytest.raises(CheckpointError, match=rf"fastlearn '{re.escape(fastlearn.__version__)}', this is '9.9'"):
        resume_state(tmp_path)


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_recipe(_learner(), Recipe(**SMALL), run_dir=tmp_path, resume=True)


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "checkpoints"
    d.mkdir()
    with open(d / "ckpt-4.pt", "wb") as f:
        pickle.dump({"position": Evil()}, f)
    (d / "ckpt-4.safetensors").write_bytes(b"")
    (d / "latest").write_text("ckpt-4\n")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        resume_state(tmp_path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_state(d / "ckpt-4.pt")
    assert not marker.exists()


# -- crashes and full disks during a write: the previous checkpoint survives, resume is exact ----------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "The uninterrupted run: final weights and the per-step trace (LR, momentum, loss)."
    run = run_recipe(_learner(), Recipe(**SMALL), run_dir=tmp_path_factory.mktemp("ref"), checkpoint_steps=3)
    return _weights(run.run_dir / "model.safetensors"), (run.run_dir / "trace.csv").read_text()


def _resume_matches(run_dir, ref):
    res = run_recipe(_learner(), Recipe(**SMALL), run_dir=run_dir, resume=True, checkpoint_steps=3)
    assert _same_weights(_weights(res.run_dir / "model.safetensors"), ref[0])
    assert (res.run_dir / "trace.csv").read_text() == ref[1]


def test_fast_mode_resumes_and_ends_where_the_uninterrupted_run_does(tmp_path, reference):
    "deterministic=false (cuDNN autotuner on CUDA): a resume is not promised bitwise, only the same run, finished."
    fast = Recipe(**SMALL, deterministic=False)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_interrupted(6), fast, run_dir=tmp_path, checkpoint_steps=3)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    res = run_recipe(_learner(), fast, run_dir=tmp_path, resume=True, checkpoint_steps=3)
    got, want = _weights(res.run_dir / "model.safetensors"), reference[0]
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-4) for k in got)
    trace = (res.run_dir / "trace.csv").read_text().splitlines()
    assert len(trace) == len(reference[1].splitlines())  # every step, once
    run_recipe(_learner(), Recipe(**SMALL), run_dir=tmp_path / "again")  # the CPU default puts the mode back
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark


def _interrupted(step):
    "A learner whose run crashes after `step` training batches."
    learn = _learner()
    learn.add_cb(StopAt(step))
    return learn


def test_crash_mid_epoch_then_resume_is_bitwise_exact(tmp_path, reference):
    # crash after step 6 = mid epoch 2 (checkpoints at steps 3, 4, 6): weights and LR/momentum/loss per step equal
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_interrupted(6), Recipe(**SMALL), run_dir=tmp_path, checkpoint_steps=3)
    assert read_state(latest_checkpoint(tmp_path))["position"] == \
        {"step": 6, "stage": 0, "epoch": 1, "iter": 2, "stage_epochs": 2}
    _resume_matches(tmp_path, reference)


def test_crash_at_epoch_boundary_then_resume_is_bitwise_exact(tmp_path, reference):
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_interrupted(5), Recipe(**SMALL), run_dir=tmp_path, checkpoint_steps=3)
    assert read_state(latest_checkpoint(tmp_path))["position"]["iter"] == 0  # ckpt-4, end of epoch 1
    _resume_matches(tmp_path, reference)


def _fail_at_step6(monkeypatch, target, exc):
    "Make `target` (module, name) write half its bytes and raise `exc` when it writes checkpoint 6."
    mod, name = target
    real = getattr(mod, name)

    def flaky(obj, path, *a, **k):
        real(obj, path, *a, **k)
        if ".ckpt-6." in str(path):
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise exc
    monkeypatch.setattr(mod, name, flaky)


@pytest.mark.parametrize("case", ["crash_in_state_write", "enospc_in_weights_write", "replace_fails"])
def test_failed_checkpoint_write_keeps_previous_and_resume_is_exact(tmp_path, reference, monkeypatch, case):
    import safetensors.torch
    if case == "crash_in_state_write":
        _fail_at_step6(monkeypatch, (torch, "save"), KeyboardInterrupt("killed while writing"))
        expected = KeyboardInterrupt
    elif case == "enospc_in_weights_write":
        _fail_at_step6(monkeypatch, (safetensors.torch, "save_file"), OSError(errno.ENOSPC, "No space left on device"))
        expected = CheckpointError
    else:
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == "latest" and "ckpt-6" in Path(src).read_text():
                raise OSError(errno.EIO, "I/O error")
            real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
        expected = CheckpointError
    with pytest.raises(expected) as e:
        run_recipe(_learner(), Recipe(**SMALL), run_dir=tmp_path, checkpoint_steps=3)
    if expected is CheckpointError:
        assert "ckpt-4) is intact" in str(e.value)
        assert case != "enospc_in_weights_write" or "disk is full" in str(e.value)
    monkeypatch.undo()
    d = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == d / "ckpt-4.pt"       # the pointer never moved
    assert not list(d.glob(".*.tmp"))                           # no partial temp file left behind
    assert case == "replace_fails" or not (d / "ckpt-6.pt").exists()  # never a partial file under a final name
    assert resume_state(tmp_path, Recipe(**SMALL)).step == 4    # the previous checkpoint loads
    (d / ".ckpt-6.pt.abc.tmp").write_bytes(b"partial")         # what a SIGKILL mid-write leaves: ignored, pruned
    _resume_matches(tmp_path, reference)
    assert not (d / ".ckpt-6.pt.abc.tmp").exists()


# -- SIGKILL a training process, resume in a new one ---------------------------------------------

SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.use_deterministic_algorithms(True); torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from conftest import synthetic_dls
    from fastai.callback.core import Callback
    from fastai.torch_core import set_seed
    from fastlearn.train.learner import transfer_learner
    from fastlearn.core.recipes import Recipe
    from fastlearn.train.runner import run_recipe
    run_dir, mode = sys.argv[1], sys.argv[2]

    class Marker(Callback):  # after the Checkpointer (90): says when checkpoint `mode` exists, then waits to be killed
        order = 95
        def _check(self):
            ck = getattr(self.learn, "checkpointer", None)  # absent in learn.validate()
            if mode.startswith("kill=") and ck is not None and ck.written and ck.written[-1].name == f"ckpt-{{mode[5:]}}.pt":
                print("CHECKPOINT", ck.written[-1].name, flush=True)
                time.sleep(300)
        def after_batch(self): self._check()
        def after_epoch(self): self._check()

    set_seed(0, reproducible=True)
    learn = transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)
    learn.add_cb(Marker())
    r = Recipe(arch="test_resnet", pretrained=False, lr=1e-3, lr_find=False, size=32, augment=False, strategy="full")
    run_recipe(learn, r, run_dir=run_dir, resume=mode == "resume", checkpoint_steps=3)
    print("DONE", flush=True)
""").format(tests=str(TESTS))


def _script(tmp_path, run_dir, mode, **kw):
    (tmp_path / "train.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(tmp_path / "train.py"), str(run_dir), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    p = _script(tmp, tmp / "run", "full")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 4, 18])  # mid-epoch in stage 1; end of stage 1; mid epoch 2 of stage 4
def test_sigkill_then_resume_matches_uninterrupted_run_bitwise(tmp_path, full_run, kill_after):
    p = _script(tmp_path, tmp_path / "run", f"kill={kill_after}")
    for line in p.stdout:
        if line.startswith("CHECKPOINT"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()[-3000:]
    st = read_state(latest_checkpoint(tmp_path / "run"))
    assert st["position"]["step"] == kill_after
    r = _script(tmp_path, tmp_path / "run", "resume")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0 and "DONE" in out, err[-3000:]
    assert _same_weights(_weights(tmp_path / "run/model.safetensors"), _weights(full_run / "model.safetensors"))
    assert (tmp_path / "run/trace.csv").read_text() == (full_run / "trace.csv").read_text()  # LR, momentum, loss
    cols = lambda p: [line.split(",")[:-1] for line in p.read_text().splitlines()]  # noqa: E731 (all but seconds)
    assert cols(tmp_path / "run/metrics.csv") == cols(full_run / "metrics.csv")


def _image_folder(root: Path) -> Path:
    "3 classes of 32x32 PNGs (train 16, valid 6 each), a colour channel per class plus noise."
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("valid", 6)):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.random((32, 32, 3)) * 80).astype(np.uint8)
                a[..., c] += 120
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("precision", ["auto", pytest.param("fp16", marks=needs_cuda)])
def test_resume_with_augmentation_from_an_image_folder_is_bitwise_exact(tmp_path, precision):
    """The real pipeline: files, fastai aug_transforms, flips, random erasing; a crash mid-epoch 2. On a GPU
    (the data's default device there) 'auto' is bf16 and fp16 also restores the GradScaler's scale."""
    from fastlearn.train.learner import learner_from_recipe
    data = _image_folder(tmp_path / "data")
    r = Recipe(arch="test_resnet", pretrained=False, lr=1e-3, lr_find=False, size=32, bs=8, augment=True,
               flip=True, random_erasing=0.25, strategy="scratch", epochs=2, precision=precision)

    def run(run_dir, stop=None, resume=False):
        learn, _ = learner_from_recipe(data, r, progress=False)
        if stop:
            learn.add_cb(StopAt(stop))
        return run_recipe(learn, r, run_dir=run_dir, resume=resume, checkpoint_steps=2)

    ref = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", stop=9)  # 6 batches per epoch: the latest checkpoint is step 8, batch 2 of epoch 2
    assert read_state(latest_checkpoint(tmp_path / "run"))["position"] == \
        {"step": 8, "stage": 0, "epoch": 1, "iter": 2, "stage_epochs": 2}
    res = run(tmp_path / "run", resume=True)
    assert _same_weights(_weights(res.run_dir / "model.safetensors"), _weights(ref.run_dir / "model.safetensors"))
    assert (res.run_dir / "trace.csv").read_text() == (ref.run_dir / "trace.csv").read_text()


def test_pickled_learner_needs_trust_and_crafted_pickle_never_runs(tmp_path, image_folder):
    import pickle
    from fastlearn.core.weights import load_learner
    from fastlearn.data.dls import image_dls
    from fastlearn.base.errors import CheckpointError
    from fastlearn.train.learner import transfer_learner
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_learner(evil)
    assert not marker.exists()
    learn = transfer_learner(image_dls(image_folder, size=32, bs=8), "test_resnet", pretrained=False, progress=False)
    learn.export(tmp_path / "export.pkl")          # our splitter and opt_func pickle
    back = load_learner(tmp_path / "export.pkl", trust=True)
    x = torch.randn(2, 3, 32, 32)
    learn.model.eval(); back.model.eval()
    assert torch.equal(learn.model(x), back.model(x))
