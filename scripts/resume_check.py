"""Kill a run with SIGKILL at a random moment, rerun the same command, compare with an uninterrupted run.

    python scripts/resume_check.py OUT_DIR [hydra overrides...]      # e.g. experiment=smoke trainer=gpu

Runs the command once uninterrupted (``OUT_DIR/whole``), once killed at a random moment after its first
checkpoint and rerun (``OUT_DIR/resumed``), then compares the accuracy matrices, ``curves.jsonl`` and the
step counts. Exit status 0 when they are identical, 1 otherwise (on GPUs, non-deterministic kernels can
make even two uninterrupted runs differ; the report says where). ``tests/test_resume.py`` uses the same
functions on CPU.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cl import checkpoint as ck  # noqa: E402



def env() -> dict:
    """The environment of a run started now: read when it starts, so that a variable set after import (the
    tests' base-checkpoint cache, ``CL_CACHE_DIR``) reaches every run of a comparison alike."""
    return {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}


def run(args, out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cl.run", *args, f"hydra.run.dir={out}"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def kill_midway(args, out: Path, rng: random.Random, attempts: int = 4, checkpoints: int = 1) -> str:
    """Start the run, SIGKILL it (with every process it started: the other ranks of a distributed run) at a
    random moment after its first checkpoint (``checkpoints=2``: after rank 0 holds two, ``last`` and
    ``prev``, which distributed runs keep); returns where it stopped."""
    for attempt in range(attempts):
        proc = subprocess.Popen([sys.executable, "-m", "cl.run", *args, f"hydra.run.dir={out}", "resume=never"],
                                cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 600
        while len(ck.positions(out)) < checkpoints and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        delay = rng.uniform(0.0, 1.5 / (attempt + 1))
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and ck.latest(out) is not None:
            state = ck.load_state(ck.latest(out))
            return (f"killed {delay:.2f}s after the first checkpoint; last checkpoint at task "
                    f"{state['task_idx'] + 1} step {state['step_in_task']}")
    raise RuntimeError("the run finished before it could be killed in the middle")


def compare(whole: Path, resumed: Path) -> list[str]:
    """Differences between two run directories' results (empty: identical)."""
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, resumed))
    diffs = [f"status {b['status']}"] if b["status"] != "completed" else []
    for key in ("acc_matrix", "general_matrix", "task_end_iters"):
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)} vs {b.get(key)}")
    for key in ("optimizer_steps", "tokens_generated"):
        x, y = a["metrics"]["compute"].get(key), b["metrics"]["compute"].get(key)
        if x != y:
            diffs.append(f"{key}: {x} vs {y}")
    if (whole / "curves.jsonl").read_text() != (resumed / "curves.jsonl").read_text():
        diffs.append("curves.jsonl differs")
    return diffs


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out, args = Path(sys.argv[1]), sys.argv[2:]
    whole, resumed = out / "whole", out / "resumed"
    t0 = time.perf_counter()
    proc = run(args, whole)
    if proc.returncode != 0:
        raise SystemExit(f"error: the uninterrupted run failed:\n{proc.stderr[-3000:]}")
    where = kill_midway(args, resumed, random.Random())
    proc = run(args, resumed)
    if proc.returncode != 0 or "[resume]" not in proc.stdout:
        raise SystemExit(f"error: the rerun did not resume ({where}):\n{proc.stdout[-1500:]}{proc.stderr[-3000:]}")
    diffs = compare(whole, resumed)
    print(f"resume check ({' '.join(args)}): {where}; "
          + ("identical to the uninterrupted run" if not diffs else "DIFFERS: " + "; ".join(diffs))
          + f" ({time.perf_counter() - t0:.0f} s)")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
