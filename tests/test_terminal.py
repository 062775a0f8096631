"""The command line in a terminal (a pseudo-terminal, as `script` or an ssh session gives): the live progress bar,
Ctrl-C typed at the terminal, the printed resume command, and the resumed run's bar and summary. Piped runs
(tests/test_interrupt.py) never draw the bar, so only these reach that code (issue 22: every resume crashed there)."""
import json
import os
import pty
import re
import select
import shlex
import signal
import sys
import time

import pytest

from fastlearn.run.checkpoint import latest_checkpoint, read_state
from conftest import write_image_folder

TINY = ["arch=test_resnet", "pretrained=false", "size=32", "bs=4", "lr_find=false", "lr=1e-3", "num_workers=0"]
# `fastlearn train` with hooks that make the run slow enough to type Ctrl-C at a chosen moment: BATCH_S seconds per
# training batch, EPOCH_END_S seconds at each epoch's end (after its progress line, before the stop check)
PACED = """
import os, sys, time
import fastlearn.train.interrupt as it
batch_s, epoch_s = float(os.environ.get("BATCH_S", 0)), float(os.environ.get("EPOCH_END_S", 0))
after_batch, after_epoch = it.StopOnSignal.after_batch, it.StopOnSignal.after_epoch
def paced(self):
    if self.training and len(self.yb):
        time.sleep(batch_s)
    after_batch(self)
def paused(self):
    time.sleep(epoch_s)
    after_epoch(self)
it.StopOnSignal.after_batch, it.StopOnSignal.after_epoch = paced, paused
from fastlearn.cli import main
sys.exit(main(sys.argv[1:]))
"""
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\r")


class Terminal:
    "`python -c PACED ARGV` on a pseudo-terminal `cols` wide: its controlling terminal, as a shell's foreground job."

    def __init__(self, argv, cols: int = 80, **env):
        env = {**{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}, "TERM": "xterm-256color",
               "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty's slave is its stdin, stdout, stderr and controlling terminal
            try:
                import fcntl, struct, termios  # noqa: E401
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, cols, 0, 0))
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # even where pytest runs with SIGINT ignored
                os.execve(sys.executable, [sys.executable, "-c", PACED, *argv], env)
            finally:
                os._exit(127)
        self.raw, self.code = b"", None

    @property
    def text(self) -> str:
        "What was written to the terminal, without colour and cursor codes."
        return _ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def _read(self, timeout: float) -> bool:
        "Read what is there; False once the child has closed the terminal."
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:  # EIO: every process holding the slave has exited
                data = b""
            if not data:
                return False
            self.raw += data
        return True

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.text)
            if m:
                return m
            if not self._read(0.05):
                break
        raise AssertionError(f"no {pattern!r} on the terminal; it shows:\n{self.text[-3000:]}")

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")  # the terminal sends SIGINT to its foreground process group

    def wait(self, timeout: float = 180) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self._read(0.2):
            pass
        for _ in range(int(timeout * 10)):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
            pid, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.code = os.waitstatus_to_exitcode(status)
        return self.code


def _interrupted(term: Terminal, where: str) -> list[str]:
    "The resume command of an interrupted run, checked: exit 130 and one line that says where it stopped."
    assert term.wait() == 130, term.text[-3000:]
    lines = re.findall(r"fastlearn: .*", term.text)  # on the line the terminal echoed ^C on, or its own
    assert len(lines) == 1 and "Traceback" not in term.text, term.text[-3000:]
    assert re.fullmatch(rf"fastlearn: interrupted \(SIGINT\) at {where}: checkpoint \S+ saved; resume with: "
                        rf"fastlearn train .* --resume .*", lines[0]), lines[0]
    argv = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert argv[:2] == ["fastlearn", "train"]
    return argv[1:]


def _header_cells(text: str) -> list[str]:
    "The summary table's headers as printed: each column's header lines joined by a space (a folded word shows)."
    rows = [line.strip().strip("┃").split("┃") for line in text.splitlines() if line.strip().startswith("┃")]
    return [" ".join(r[j].strip() for r in rows if r[j].strip()) for j in range(len(rows[0]))]


def _finished(term: Terminal, stage_bar: str) -> str:
    "The resumed run's terminal: exit 0, no traceback, its live bar drawn with a loss, one result line, 80 columns."
    assert term.wait() == 0, term.text[-3000:]
    text = term.text
    assert "Traceback" not in text and "Error" not in text, text[-3000:]
    assert re.search(stage_bar + r" [━╸╺ ]*\d+/12 loss \d+\.\d{4}", text), text[-3000:]  # the live bar, with a loss
    results = list(re.finditer(r"accuracy=\d\.\d{4} time=\d+\.\ds", text))
    assert len(results) == 1, text[-3000:]                                           # the result, once
    assert "run folder: " in text
    start = text.rindex("┏", 0, results[0].start())                                  # the table above it
    table = text[start:text.index("┘", start) + 1]
    assert max(len(l) for l in table.splitlines()) <= 80, table
    assert _header_cells(table) == ["stage", "groups", "epochs", "peak LR", "train loss", "valid loss", "accuracy",
                                    "seconds"], table
    return text


@pytest.mark.slow
def test_ctrl_c_mid_epoch_then_resume_in_a_terminal(tmp_path):
    data, run = write_image_folder(tmp_path / "data"), tmp_path / "run"
    args = ["train", "transfer", "--data", str(data), "--run-dir", str(run), *TINY, "strategy=scratch", "epochs=2"]
    term = Terminal(args, BATCH_S=0.25)  # 12 batches an epoch, a quarter of a second each
    term.expect(r"all epoch 2/2 [━╸╺ ]*[2-6]/12 loss \d")  # the live bar, mid epoch 2
    term.ctrl_c()
    argv = _interrupted(term, r"stage 1/1 epoch 2/2 batch \d+/12")
    assert argv == args[:6] + ["--resume"] + args[6:]
    before = read_state(latest_checkpoint(run))["extra"]["seconds"]
    assert before >= 13 * 0.25  # the first process's training: epoch 1 and part of epoch 2, paced

    term = Terminal(argv, BATCH_S=0.1)
    term.expect(r"resuming \S+ from ckpt-\d+\.pt: stage 1/1 epoch 2/2 from batch \d+")
    text = _finished(term, "all epoch 2/2")
    # the run's seconds count both processes: the first one's, as its checkpoint recorded them, and this one's
    total, earlier = map(float, re.search(r"accuracy=\d\.\d{4} time=(\d+\.\d)s reached=\d+\.\ds \((\d+\.\d)s of it before the resume\)",
                                          text).groups())
    assert earlier == round(before, 1) and total > before
    assert json.loads((run / "summary.json").read_text())["seconds"] >= before


@pytest.mark.slow
def test_ctrl_c_at_a_stage_end_then_resume_in_a_terminal(tmp_path):
    data, run = write_image_folder(tmp_path / "data"), tmp_path / "run"
    args = ["train", "transfer", "--data", str(data), "--run-dir", str(run), *TINY, "strategy=full",
            "head_epochs=1", "unfreeze_epochs=0", "epochs=1"]  # two stages: the head, then all groups
    term = Terminal(args, EPOCH_END_S=3)
    term.expect(r"\[head\] epoch 1/1 .* time \d+\.\ds")  # the head stage's last epoch has ended: Ctrl-C now
    term.ctrl_c()
    argv = _interrupted(term, r"stage 1/2 after epoch 1/1")

    term = Terminal(argv, BATCH_S=0.1)
    term.expect(r"resuming \S+ from ckpt-\d+\.pt: stage 1/2 done")
    text = _finished(term, "all epoch 1/1")
    assert re.search(r"│ head .*│\n│ all ", text), text[-2000:]  # the finished stage's row kept, the new one added
