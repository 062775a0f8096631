"""Random-kill soak: train a tiny recipe with `fastlearn train`, SIGKILL it at random training steps, inside
checkpoint writes and at random times, and resume until done. Every final model must equal the uninterrupted
run's bitwise, and after every kill the run folder's latest checkpoint must load.

    python tools/soak.py                          # 20 runs, seed 0
    python tools/soak.py --runs 5 --seed 3 --json soak.json

Kill points (seeded): `step S` (after training batch S), `write ckpt-S weights|state|pointer` (in the first
checkpoint written at step >= S: its weights temp file written but not renamed / its state temp file half
written / state in place but the `latest` pointer not moved yet), `time T` (T seconds after the start, wherever
that lands: data checks, training, a checkpoint write, the final outputs).

Each attempt is a process forked from this one after it imported torch, timm and fastlearn (an interpreter takes
5-10 s to import them here; a fork, milliseconds). The child runs `fastlearn.cli.main(argv)`, what the
`fastlearn` command runs, and is killed with a real SIGKILL. This process never runs torch code itself until
the runs are over (forking after torch has started its thread pools is not safe).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
torch.set_num_threads(1)
import fastlearn.run.checkpoint as ck  # noqa: E402
import fastlearn.cli  # noqa: E402
import fastlearn.train.runner  # noqa: E402,F401  (and everything `fastlearn train` imports, once, before forking)
import fastlearn.train.recipe_callbacks, fastlearn.data.dls, fastlearn.train.learner, fastlearn.core.models, fastlearn.fit.precision  # noqa: E402,F401
import timm  # noqa: E402,F401
from conftest import write_image_folder  # noqa: E402

RECIPE = ["transfer", "--checkpoint-steps", "4", "arch=test_resnet", "pretrained=false", "size=32", "bs=8",
          "lr_find=false", "lr=1e-3", "head_epochs=1", "unfreeze_epochs=1", "epochs=2", "keep_last=2",
          "num_workers=0"]  # 48 images: 6 batches an epoch, 4 stages, 30 steps; checkpoints every 4 and each epoch
PHASES = ("weights", "state", "pointer")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kill: dict | None, log_ckpts: Path | None) -> None:
    "In the child: make it SIGKILL itself at `kill` (step and write kinds); log checkpoint names if asked."
    real_write, real_after_batch = ck.atomic_write, ck.Checkpointer.after_batch
    hit = {"step": None}

    def write(path, fn):
        path = Path(path)
        m = re.fullmatch(r"ckpt-(\d+)\.(safetensors|pt)", path.name)
        if log_ckpts is not None and m and m.group(2) == "pt":
            with open(log_ckpts, "a") as f:
                f.write(m.group(1) + "\n")
        if kill and kill["kind"] == "write":
            if m and int(m.group(1)) >= kill["step"] and hit["step"] in (None, int(m.group(1))):
                hit["step"] = int(m.group(1))
                if kill["phase"] == "weights" and m.group(2) == "safetensors":
                    return real_write(path, lambda tmp: (fn(tmp), _die()))
                if kill["phase"] == "state" and m.group(2) == "pt":
                    def half(tmp):
                        fn(tmp)
                        data = Path(tmp).read_bytes()
                        Path(tmp).write_bytes(data[: len(data) // 2])
                        _die()
                    return real_write(path, half)
            if path.name == "latest" and kill["phase"] == "pointer" and hit["step"] is not None:
                _die()
        return real_write(path, fn)

    def after_batch(self):
        real_after_batch(self)
        if kill and kill["kind"] == "step" and len(self.yb) and self.global_step == kill["step"]:
            _die()
    ck.atomic_write, ck.Checkpointer.after_batch = write, after_batch


def attempt(argv: list[str], kill: dict | None, log: Path, log_ckpts: Path | None = None, limit_s: float = 600):
    "Fork a `fastlearn` run; kill it as `kill` says. Returns (exit code or -signal, seconds)."
    sys.stdout.flush(); sys.stderr.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: `fastlearn train ...`, output to `log`
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            _arm(kill, log_ckpts)
            code = fastlearn.cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    deadline = t0 + (kill["at_s"] if kill and kill["kind"] == "time" else limit_s)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, time.perf_counter() - t0


def check_folder(run_dir: Path, out: Path) -> dict:
    "In a forked child (this process runs no torch code yet): the latest checkpoint and its weights load."
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            latest = ck.latest_checkpoint(run_dir)
            res = {"ok": True, "latest": None}
            if latest is not None:
                st = ck.resume_state(run_dir)  # version, the state file (weights_only) and the weights file beside it
                from safetensors.torch import load_file
                load_file(str(st.weights))
                res = {"ok": True, "latest": latest.stem}
        except BaseException as e:
            res = {"ok": False, "latest": None, "error": f"{type(e).__name__}: {e}"}
        out.write_text(json.dumps(res))
        os._exit(0)
    os.waitpid(pid, 0)
    return json.loads(out.read_text())


def plan(rng: random.Random, i: int, total_steps: int, ckpt_steps: list[int], run_s: float) -> list[dict]:
    """1-3 kill points for run `i`, the first of kind i % 3 (so that a few runs cover every kind); step and write
    kills in increasing step order, write kills at distinct checkpoints."""
    kinds = ["step", "write", "time"]
    chosen = [kinds[i % 3]] + [rng.choice(kinds) for _ in range(rng.randint(0, 2))]
    kills, used = [], set()
    for kind in chosen:
        if kind == "step":
            kills.append({"kind": "step", "step": rng.randrange(1, total_steps)})
        elif kind == "write":
            s = rng.choice([c for c in ckpt_steps if c not in used] or ckpt_steps)
            used.add(s)
            kills.append({"kind": "write", "step": s, "phase": rng.choice(PHASES)})
        else:
            kills.append({"kind": "time", "at_s": round(rng.uniform(0.05, run_s), 2)})
    ordered = iter(sorted((k for k in kills if k["kind"] != "time"), key=lambda k: k["step"]))
    return [k if k["kind"] == "time" else next(ordered) for k in kills]


def describe(k: dict) -> str:
    if k["kind"] == "step":
        return f"step {k['step']}"
    if k["kind"] == "write":
        return f"write ckpt-{k['step']} {k['phase']}"
    return f"time {k['at_s']:.2f}s"


def outcome(k: dict) -> str:
    "A kill point and what the run folder held after it."
    if not k.get("reached", True):
        return f"{k['what']} -> not reached (the run got past it first)"
    if not k["loads"]:
        return f"{k['what']} -> latest UNREADABLE ({k.get('error')})"
    return f"{k['what']} -> " + (f"latest {k['latest_after']} loads" if k["latest_after"] else "no checkpoint yet")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    work = Path(a.work or tempfile.mkdtemp(prefix="fastlearn-soak-"))
    data = write_image_folder(work / "data")
    base = lambda run: ["train", RECIPE[0], "--data", str(data), "--run-dir", str(run), *RECIPE[1:]]  # noqa: E731

    ref = work / "ref"
    code, ref_s = attempt(base(ref), None, work / "ref.log", log_ckpts=work / "ref-ckpts.txt")
    if code != 0:
        print((work / "ref.log").read_text()[-3000:])
        raise SystemExit(f"soak: the uninterrupted run failed (exit {code})")
    ckpt_steps = sorted({int(x) for x in (work / "ref-ckpts.txt").read_text().split()})
    total = ckpt_steps[-1]
    print(f"soak: N={a.runs} runs, seed {a.seed}: `fastlearn {' '.join(base('RUN'))}` ({total} steps, checkpoints "
          f"at steps {ckpt_steps}; the uninterrupted run took {ref_s:.1f}s)", flush=True)

    rng = random.Random(a.seed)
    runs = []
    for i in range(a.runs):
        run, kills = work / f"run-{i}", plan(rng, i, total, ckpt_steps, ref_s)
        rec = {"run": i, "kills": [], "attempts": 0, "stale_locks_taken_over": 0, "error": None}
        for j, kill in enumerate(kills + [None]):
            resume = run.exists() and any(run.iterdir())
            log = work / f"run-{i}-attempt-{j}.log"
            code, secs = attempt(base(run) + (["--resume"] if resume else []), kill, log)
            rec["attempts"] += 1
            text = log.read_text()
            rec["stale_locks_taken_over"] += "took over the lock" in text
            if code == -signal.SIGKILL and kill is not None:
                check = check_folder(run, log.with_suffix(".check.json"))
                rec["kills"].append({**kill, "what": describe(kill), "after_s": round(secs, 2),
                                     "latest_after": check.get("latest"), "loads": check["ok"],
                                     **({"error": check["error"]} if not check["ok"] else {})})
                continue
            if code == 0:
                if kill is not None:  # an earlier kill landed past this point: the run finished first
                    rec["kills"].append({**kill, "what": describe(kill), "reached": False})
                break
            rec["error"] = f"attempt {j} exited {code}: {text[-2000:]}"
            break
        runs.append(rec)
        errors = f"; ERROR {rec['error'][:300]}" if rec["error"] else ""
        print(f"run {i}: " + "; ".join(map(outcome, rec["kills"])) + f"; {rec['attempts']} starts{errors}", flush=True)

    # all forks done: compare in this process now
    from safetensors.torch import load_file
    ref_w = load_file(str(ref / "model.safetensors"))
    for rec in runs:
        path = work / f"run-{rec['run']}" / "model.safetensors"
        w = load_file(str(path)) if path.exists() else {}
        rec["equal"] = rec["error"] is None and w.keys() == ref_w.keys() and all(torch.equal(w[k], ref_w[k]) for k in w)
        left = [str(p) for p in (work / f"run-{rec['run']}").rglob(".*.tmp")]
        rec["temp_files_left"] = left
    kills = [k for r in runs for k in r["kills"] if k.get("reached", True)]
    ok = all(r["equal"] and not r["temp_files_left"] for r in runs) and all(k["loads"] for k in kills)
    by_kind = {kind: sum(k["kind"] == kind for k in kills) for kind in ("step", "write", "time")}
    report = {"n": a.runs, "seed": a.seed, "total_steps": total, "checkpoint_steps": ckpt_steps, "runs": runs,
              "kills": len(kills), "kills_by_kind": by_kind, "ok": ok,
              "seconds": round(time.perf_counter() - t_start, 1)}
    print(f"soak: {'PASS' if ok else 'FAIL'}: {sum(r['equal'] for r in runs)}/{a.runs} final models bitwise equal to "
          f"the uninterrupted run's; {len(kills)} kills ({by_kind['step']} at a step, {by_kind['write']} inside a "
          f"checkpoint write, {by_kind['time']} at a random time), after every one the latest checkpoint "
          f"{'loaded' if all(k['loads'] for k in kills) else 'did NOT always load'}; "
          f"{sum(r['stale_locks_taken_over'] for r in runs)} stale locks taken over; no temp files left: "
          f"{all(not r['temp_files_left'] for r in runs)}; {report['seconds']}s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
