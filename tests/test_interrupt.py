"""Ctrl-C and SIGTERM: handlers installed and put back, a checkpoint at the next batch boundary, one line and exit
130/143 from the command line, a second signal stops at once, and resuming is bitwise exact. In process first,
then real `fastlearn train` processes sent real signals (slow)."""
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from safetensors.torch import load_file

import fastlearn.train.interrupt as it
from fastlearn.run.checkpoint import latest_checkpoint, read_state, resume_state
from fastlearn.base.errors import TrainingInterrupted
from fastlearn.train.interrupt import interrupt_guard
from fastlearn.train.learner import transfer_learner
from fastlearn.core.recipes import Recipe
from fastlearn.train.runner import run_recipe
from conftest import synthetic_dls, write_image_folder


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """Python's default SIGINT/SIGTERM handlers, whatever the test process inherited: a shell starts background
    jobs (`cmd &`, nohup) with SIGINT ignored, and the guard rightly leaves an ignored signal ignored."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, h in old.items():
        signal.signal(s, h)

# one stage (scratch), 2 epochs x 4 batches, as in test_checkpoint.py
SMALL = dict(arch="test_resnet", pretrained=False, lr=1e-3, lr_find=False, size=32, augment=False,
             strategy="scratch", epochs=2, keep_last=2)


def _learner():
    set_seed(0, reproducible=True)
    return transfer_learner(synthetic_dls(), "test_resnet", pretrained=False, progress=False)


def _same(a, b) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the guard ------------------------------------------------------------------------------------

def test_guard_installs_and_puts_back_the_previous_handlers(tmp_path):
    mine = lambda s, f: None  # noqa: E731
    old_int, old_term = signal.signal(signal.SIGINT, mine), signal.getsignal(signal.SIGTERM)
    try:
        with interrupt_guard(tmp_path):
            assert signal.getsignal(signal.SIGINT) is it._handler and signal.getsignal(signal.SIGTERM) is it._handler
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is old_term
        with pytest.raises(ZeroDivisionError):
            with interrupt_guard(tmp_path):
                1 / 0
        assert signal.getsignal(signal.SIGINT) is mine and it._active is None
    finally:
        signal.signal(signal.SIGINT, old_int)


def test_guard_does_nothing_off_the_main_thread_and_keeps_ignored_signals_ignored(tmp_path):
    seen = {}

    def body():
        with interrupt_guard(tmp_path) as req:
            seen["req"], seen["handler"] = req, signal.getsignal(signal.SIGINT)
    t = threading.Thread(target=body)
    t.start(); t.join()
    assert seen["req"] is None and seen["handler"] is signal.default_int_handler
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # e.g. started under nohup
    try:
        with interrupt_guard(tmp_path):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is it._handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


def test_signal_outside_a_training_fit_stops_at_once(tmp_path):
    with pytest.raises(TrainingInterrupted) as e:
        with interrupt_guard(tmp_path):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert e.value.exit_code == 130 and e.value.checkpoint is None and not e.value.saved
    assert "nothing saved yet" in str(e.value) and "run_recipe(" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_repeated_signal_counts_once_and_a_later_one_stops_at_once(tmp_path, monkeypatch):
    with pytest.raises(TrainingInterrupted) as e:
        with interrupt_guard(tmp_path) as req:
            req.armed = 1  # as inside a training fit: the first signal only asks for a stop
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the same request (a launcher forwarding it)
            time.sleep(0.05)
            assert req.signum == signal.SIGTERM
            monkeypatch.setattr(it, "REPEAT_S", 0.0)
            os.kill(os.getpid(), signal.SIGTERM)  # the user insists
            time.sleep(5)
    assert e.value.forced and e.value.exit_code == 143
    assert "stopped at once on a second SIGTERM" in str(e.value)


# -- a signal during run_recipe: checkpoint at the boundary, exact resume ---------------------------

class SendSignal(Callback):
    "Sends `sig` to this process once training batch `step` has finished (a user pressing Ctrl-C then)."
    order = 95  # after the Checkpointer, before StopOnSignal

    def __init__(self, step, sig):
        self.step, self.sig, self.n = step, sig, 0

    def after_batch(self):
        if self.training and len(self.yb):
            self.n += 1
            if self.n == self.step:
                os.kill(os.getpid(), self.sig)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = run_recipe(_learner(), Recipe(**SMALL), run_dir=tmp_path_factory.mktemp("ref"))
    return run.run_dir


@pytest.mark.parametrize("step, sig, where, position", [
    (6, signal.SIGINT, "stage 1/1 epoch 2/2 batch 2/4",
     {"step": 6, "stage": 0, "epoch": 1, "iter": 2, "stage_epochs": 2}),
    (4, signal.SIGTERM, "stage 1/1 after epoch 1/2",
     {"step": 4, "stage": 0, "epoch": 1, "iter": 0, "stage_epochs": 2}),
])
def test_signal_checkpoints_at_the_next_batch_boundary_and_resume_is_exact(tmp_path, reference, step, sig, where,
                                                                          position):
    learn = _learner()
    learn.add_cb(SendSignal(step, sig))
    with pytest.raises(TrainingInterrupted) as e:
        run_recipe(learn, Recipe(**SMALL), run_dir=tmp_path)  # checkpoint_steps=0: this one is the stop's own
    err = e.value
    assert err.saved and err.where == where and err.exit_code == 128 + sig
    assert err.checkpoint == tmp_path / "checkpoints" / f"ckpt-{step}.pt" == latest_checkpoint(tmp_path)
    assert read_state(err.checkpoint)["position"] == position
    assert f"checkpoint {tmp_path}/checkpoints/ckpt-{step} saved; resume with: run_recipe(" in str(err)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers back, lock released
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not (tmp_path / "run.lock").exists()
    learn.remove_cb(SendSignal)
    res = run_recipe(_learner(), Recipe(**SMALL), run_dir=tmp_path, resume=True)
    assert _same(res.run_dir / "model.safetensors", reference / "model.safetensors")
    assert (res.run_dir / "trace.csv").read_text() == (reference / "trace.csv").read_text()


def test_resume_before_the_first_checkpoint_starts_from_the_beginning(tmp_path, reference, capsys):
    from fastlearn.run.fingerprint import record_data
    learn = _learner()
    record_data(learn.dls, tmp_path)  # what a run stopped in lr_find leaves: its data.json, no checkpoint
    res = run_recipe(learn, Recipe(**SMALL), run_dir=tmp_path, resume=True)
    assert "has no checkpoint yet (the run stopped before its first one): starting it from the beginning" in \
        capsys.readouterr().out
    assert _same(res.run_dir / "model.safetensors", reference / "model.safetensors")


# -- real processes, real signals ------------------------------------------------------------------

ARGS = ["arch=test_resnet", "pretrained=false", "size=32", "bs=4", "lr_find=false", "lr=1e-3", "strategy=scratch",
        "epochs=3", "num_workers=0"]  # one stage of 3 epochs x 12 batches: a signal after epoch 1 lands mid-stage
SLOW_WRITE = """
import sys, time
import fastlearn.run.checkpoint as ck, fastlearn.train.interrupt as it
real, after_batch = ck.atomic_write, it.StopOnSignal.after_batch
def slow(path, write):  # the checkpoint the stop writes takes 30 s: time for a second Ctrl-C
    if it._active is not None and it._active.signum and str(path).endswith('.pt'):
        def w(tmp):
            write(tmp); print('WRITING', path, flush=True); time.sleep(30)
        return real(path, w)
    return real(path, write)
def marked(self):  # says which batch has finished, so the test's first Ctrl-C lands mid-epoch
    print('BATCH', self.learn.checkpointer.global_step, flush=True)
    after_batch(self)
ck.atomic_write, it.StopOnSignal.after_batch = slow, marked
from fastlearn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(argv, prefix=("-m", "fastlearn.cli")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # a session of its own, as a terminal's foreground job has: the signal reaches it and not pytest; SIGINT at
    # its default even if pytest runs where it is ignored (a background job), so Python's handler is installed
    return subprocess.Popen([sys.executable, *prefix, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _signal_after(p, pattern, sig):
    "Read stdout until a line matches `pattern`, then send `sig` to the process group (as a terminal does)."
    seen = []
    for line in p.stdout:
        seen.append(line)
        if re.search(pattern, line):
            os.killpg(p.pid, sig)
            break
    out, err = p.communicate(timeout=180)
    return "".join(seen) + out, err


def _one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("fastlearn:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _resume_argv(line: str) -> list[str]:
    cmd = shlex.split(line.split("resume with: ", 1)[1])
    assert cmd[:2] == ["fastlearn", "train"]
    return cmd[1:]


@pytest.mark.slow
def test_ctrl_c_then_sigterm_then_resume_is_bitwise_exact(tmp_path, capsys):
    from fastlearn.cli import main
    data = write_image_folder(tmp_path / "data")
    base = ["train", "transfer", "--data", str(data)]
    assert main(base + ["--run-dir", str(tmp_path / "ref"), *ARGS]) == 0  # the uninterrupted run, in process
    run = tmp_path / "run"
    p = _start(base + ["--run-dir", str(run), *ARGS])
    out, err = _signal_after(p, r"\] epoch 1/3 ", signal.SIGINT)
    line = _one_line(err)
    print(line)
    assert p.returncode == 130, err[-3000:]
    m = re.fullmatch(r"fastlearn: interrupted \(SIGINT\) at stage 1/1 (epoch 2/3 batch \d+/12|after epoch [12]/3): "
                     r"checkpoint (\S+) saved; resume with: fastlearn train .*", line)
    assert m, line
    assert Path(m.group(2) + ".pt").exists() and latest_checkpoint(run) == Path(m.group(2) + ".pt")
    argv = _resume_argv(line)
    assert argv == base + ["--run-dir", str(run), "--resume", *ARGS]
    assert not (run / "run.lock").exists()

    p = _start(argv)  # the printed command, stopped by SIGTERM (a scheduler) once it has finished an epoch
    out, err = _signal_after(p, r"\] epoch [23]/3 ", signal.SIGTERM)
    line = _one_line(err)
    print(line)
    assert p.returncode == 143, err[-3000:]
    assert "resuming" in out and re.search(r"\] epoch [23]/3 .* time \d+\.\ds", out, re.M)  # the stage's count goes on
    assert re.match(r"fastlearn: interrupted \(SIGTERM\) at stage 1/1 .*: checkpoint \S+ saved; resume with: ", line)

    p = _start(_resume_argv(line))
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    assert _same(run / "model.safetensors", tmp_path / "ref" / "model.safetensors")
    assert (run / "trace.csv").read_text() == (tmp_path / "ref" / "trace.csv").read_text()


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    p = _start(["train", "transfer", "--data", str(data), "--run-dir", str(run), *ARGS], prefix=("-c", SLOW_WRITE))
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.strip() == "BATCH 15":        # mid epoch 2 (12 batches an epoch)
            os.killpg(p.pid, signal.SIGINT)   # stop at the next boundary: its checkpoint write hangs
        if line.startswith("WRITING"):
            time.sleep(it.REPEAT_S + 0.3)
            t0 = time.perf_counter()
            os.killpg(p.pid, signal.SIGINT)   # the impatient second Ctrl-C
            break
    out, err = p.communicate(timeout=60)
    assert time.perf_counter() - t0 < 20, "the second Ctrl-C waited for the write"
    line = _one_line(err)
    print(line)
    assert p.returncode == 130, err[-3000:]
    assert re.fullmatch(r"fastlearn: stopped at once on a second SIGINT: no new checkpoint, the latest \(\S+ckpt-12\) "
                        r"is intact; resume with: fastlearn train .* --resume .*", line), line
    assert latest_checkpoint(run) == run / "checkpoints" / "ckpt-12.pt"  # epoch 1's, untouched
    assert resume_state(run).step == 12
    assert not list((run / "checkpoints").glob(".*.tmp")) and not (run / "run.lock").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_ctrl_c_under_torchrun_stops_every_rank_at_one_batch(tmp_path):
    """torchrun forwards the terminal's SIGINT to its workers (each in a session of its own). Every rank agrees at
    the next batch boundary; rank 0 writes the checkpoint and prints the one line; the ranks finish together (a
    rank stopping alone would leave the other in a collective until torchrun's 30 s kill)."""
    import socket
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = _start(["--nproc_per_node=2", f"--master_port={port}", "-m", "fastlearn.cli", "train", "transfer", "--data",
                str(data), "--run-dir", str(run), "--distributed", *ARGS], prefix=("-m", "torch.distributed.run"))
    seen = []
    for line in p.stdout:
        seen.append(line)
        if re.search(r"\] epoch 1/3 ", line):
            os.kill(p.pid, signal.SIGINT)  # the launcher, as a terminal's Ctrl-C reaches it
            t0 = time.perf_counter()
            break
    out, err = p.communicate(timeout=120)
    assert time.perf_counter() - t0 < 25, err[-3000:]
    line = _one_line(err)
    print(line)
    assert re.fullmatch(r"fastlearn: interrupted \(SIGINT\) at stage 1/1 .*: checkpoint \S+ saved; resume with: "
                        r"torchrun --standalone --nproc_per_node=2 -m fastlearn.cli train transfer .* --resume "
                        r"--distributed .*", line), line
    assert "failed" not in err and not (run / "run.lock").exists()
    st = resume_state(run)
    assert 6 <= st.step <= 18  # per rank 6 batches an epoch: stopped in epoch 2 or at its boundaries
