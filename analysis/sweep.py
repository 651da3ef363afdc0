"""Running one point of a reproduction table as a resumable Hydra multirun over seeds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from analysis.aggregate import completed_results, failed_results

ROOT = Path(__file__).resolve().parent.parent
# --quick in every reproduction script: a toy budget that checks the whole pipeline in minutes
QUICK = ["stream.steps_per_task=40", "eval.every_n_steps=null", "eval.n_per_task=100", "shift=none",
         "logger=none"]
QUICK_RL = ["objective.group_size=4"]  # added for GRPO jobs


def parallel_overrides(jobs: int) -> list[str]:
    """Overrides that run ``jobs`` sweep jobs at once (``hydra/launcher=cl_parallel``); none for 1."""
    if jobs < 1:
        raise SystemExit(f"error: --jobs: must be >= 1, got {jobs}")
    return ["hydra/launcher=cl_parallel", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []


def run_sweep(out: Path, experiment: str | None, seeds: list[int], extra: list[str]) -> list[dict]:
    """One Hydra multirun over the seeds still missing under ``out`` (resume = skip completed ones).

    Args:
        out: the point's directory; jobs write ``out/jobs/<overrides-key>`` (one directory per job, the same
            on every invocation, so a job killed midway resumes from its checkpoint).
        experiment: ``conf/experiment`` entry (None: the defaults).
        extra: further Hydra overrides for every job.
    Returns:
        the jobs of this invocation that failed (their results.json say why); the other jobs' results
        stand, and tables mark the point (``analysis.aggregate.mark_failed``).
    """
    done = {r["config"]["seed"] for r in completed_results(out)}
    todo = [s for s in seeds if s not in done]
    if not todo:
        print(f"  {out.name}: all {len(seeds)} seeds complete, skipped", flush=True)
        return []
    sweep_dir = Path(out).resolve() / "jobs"  # the jobs run from the project root: an absolute path
    cmd = [sys.executable, "-m", "cl.run", "-m", *([f"experiment={experiment}"] if experiment else []),
           f"seed={','.join(map(str, todo))}", f"hydra.sweep.dir={sweep_dir}", *extra]
    print(f"  {out.name}: seeds {todo} -> {sweep_dir}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    failed = failed_results(sweep_dir)
    if proc.returncode != 0 and not failed:  # not a job failure the runs recorded: a crash of the sweep itself
        print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"error: sweep {out.name} ({experiment}) failed (exit {proc.returncode})")
    for r in failed:
        print(f"    warning: job {r['dir']} {r['status']}", flush=True)
    completed = len([r for r in completed_results(out) if r["config"]["seed"] in todo])  # read, not assumed
    print(f"    done in {time.perf_counter() - t0:.0f} s ({completed}/{len(todo)} jobs completed)", flush=True)
    return failed
