"""Parallel local sweeps: the default experiment as a multi-seed sweep, Hydra's basic launcher (one job
after another, each with every core) against ``hydra/launcher=cl_parallel`` (``--jobs`` at once, each with
cores / jobs threads). Reports jobs per hour for each launcher, their ratio (target >= 1.5x on 2 cores), the
threads each job ran with, and whether every job's accuracy matrices are identical under every launcher.

``cl_parallel`` forks its workers from the sweep's process (``hydra_plugins/cl_launcher``); the same sweep
also runs under Hydra's joblib launcher (``hydra/launcher=joblib``: loky workers, fresh interpreters that
import torch, Lightning and transformers again), so the start-up each costs is measured in the same run: a
sweep's wall time less the jobs' own run time (the busiest worker's sum of job wall times).

It also measures the ceiling the cores allow: seed 0 run alone with cores / jobs threads. If one job at
all cores takes t_all and alone at cores / jobs threads takes t_part, and c = min(jobs, seeds, cores /
threads) jobs really run at once, the parallel sweep can at best finish seeds jobs in ceil(seeds / c) *
t_part against the basic launcher's seeds * t_all: a ceiling of seeds * t_all / (ceil(seeds / c) * t_part)
(2 * t_all / t_part for 2 jobs on 2 cores; memory bandwidth and caches only lower it). t_all and t_part are
the jobs' own wall times; the measured ratio is of whole sweeps, so process start-up counts against both
launchers there. A job that already uses every core well leaves a parallel launcher little to gain; jobs
that slow each other down (shared caches, memory bandwidth, or virtual cores that share a physical one)
fall short of the ceiling by the factor printed as "slower from sharing the machine".

    python scripts/bench_sweep.py                 # 4 seeds, 2 jobs at once
    python scripts/bench_sweep.py --seeds 4 --jobs 2 [overrides...]
    python scripts/bench_sweep.py --quick         # 2 seeds, 40 steps per task

The base stage is built (or found in the cache) before either sweep is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import row  # scripts/benchlib.py (this directory is on sys.path)

ROOT = Path(__file__).resolve().parent.parent


def sweep(out: Path, seeds: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "cl.run", "-m", f"seed={','.join(map(str, range(seeds)))}",
           f"hydra.sweep.dir={out}", "logger=none", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: sweep failed ({' '.join(cmd[3:])}):\n{proc.stderr[-3000:]}")
    return wall


def results(out: Path) -> dict[int, dict]:
    runs = [json.loads(p.read_text()) for p in out.glob("*/results.json")]
    return {r["config"]["seed"]: r for r in runs if r.get("status") == "completed"}


def busiest(runs: dict[int, dict], jobs: int) -> float:
    """The jobs' own run time in a parallel sweep: seeds are dealt to ``jobs`` workers one at a time, in
    order to whichever worker frees first (as the forked launcher does; joblib's loky batches and pre-dispatches,
    so its figure is an approximation), and the busiest worker's sum of
    wall times is the part of the sweep's wall time spent inside the jobs' runs."""
    load = [0.0] * max(1, jobs)
    for seed in sorted(runs):
        load[load.index(min(load))] += runs[seed]["provenance"]["wall_seconds"]
    return max(load)


QUICK = ["--seeds", "2", "--steps-per-task", "40"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--steps-per-task", type=int, default=None, help="stream.steps_per_task of every job")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every job")
    return ap


def measure(args) -> list[dict]:
    import importlib.util

    if args.jobs < 1 or args.seeds < 1:
        raise SystemExit(f"error: --jobs and --seeds must be >= 1, got {args.jobs} and {args.seeds}")
    has_joblib = importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
    cores = os.cpu_count() or 1
    if args.steps_per_task is not None:
        args.overrides = [f"stream.steps_per_task={args.steps_per_task}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("[bench] base stage (built or found in the cache) ...", flush=True)
        sweep(tmp / "warm", 1, [*args.overrides, "stream.steps_per_task=1", "eval.every_n_steps=null"])
        basic = sweep(tmp / "basic", args.seeds, args.overrides)
        print(f"[bench] basic launcher: {args.seeds} jobs in {basic:.1f} s", flush=True)
        jobs = min(args.jobs, args.seeds)  # both parallel launchers then run the same workers, threads alike
        launchers = {"forked": "cl_parallel", **({"loky": "joblib"} if has_joblib else {})}
        walls = {}
        for name, launcher in launchers.items():
            walls[name] = sweep(tmp / name, args.seeds, [*args.overrides, f"hydra/launcher={launcher}",
                                                         f"hydra.launcher.n_jobs={jobs}"])
            print(f"[bench] hydra/launcher={launcher} ({name} workers, {jobs} at once): {args.seeds} jobs in "
                  f"{walls[name]:.1f} s", flush=True)
        if not has_joblib:
            print("[bench] joblib launcher not installed (the [parallel] extra): its comparison is skipped", flush=True)
        part_threads = max(1, cores // jobs)
        sweep(tmp / "alone", 1, [*args.overrides, f"threads={part_threads}"])
        runs = {name: results(tmp / name) for name in ("basic", *launchers)}
        a, b, par = runs["basic"], runs["forked"], walls["forked"]
        alone = results(tmp / "alone")[0]["provenance"]["wall_seconds"]
        full = a[0]["provenance"]["wall_seconds"] if 0 in a else float("nan")
        overhead = (basic - sum(r["provenance"]["wall_seconds"] for r in a.values())) / max(1, len(a))
        same = all(sorted(rs) == list(range(args.seeds)) for rs in runs.values()) and all(
            rs[s][k] == a[s][k] for rs in runs.values() for s in a for k in ("acc_matrix", "general_matrix", "base_acc"))
        startup = {name: walls[name] - busiest(runs[name], jobs) for name in launchers}
        threads = {name: sorted({r["provenance"]["machine"]["torch_threads"] for r in rs.values()})
                   for name, rs in runs.items()}
    ratio = basic / par
    print(f"\nmachine: {os.cpu_count()} cores; threads per job: "
          + ", ".join(f"{name} {t}" for name, t in threads.items()))
    print(f"jobs/hour: basic {3600 * args.seeds / basic:.0f}, parallel {3600 * args.seeds / par:.0f}: "
          f"{ratio:.2f}x (target >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})")
    conc = max(1, min(jobs, cores // part_threads))
    ceiling = args.seeds * full / (math.ceil(args.seeds / conc) * alone)
    beside = sum(r["provenance"]["wall_seconds"] for r in b.values()) / max(1, len(b))
    print(f"one job alone (seed 0): {full:.1f} s at {threads['basic']} threads, {alone:.1f} s at {part_threads}: "
          f"ceiling for {conc} at once {ceiling:.2f}x; measured {ratio:.2f}x ({ratio / ceiling:.0%} of it)")
    print(f"a job beside another ran {beside:.1f} s on average, alone at {part_threads} thread(s) {alone:.1f} s: "
          f"{beside / alone:.2f}x slower from sharing the machine; start-up outside the run {overhead:.1f} s per job "
          f"under the basic launcher")
    print("start-up outside the jobs' run time, per sweep: "
          + ", ".join(f"{name} workers {t:.1f} s" for name, t in startup.items())
          + (f"; the loky sweep took {walls['loky']:.1f} s ({basic / walls['loky']:.2f}x the basic launcher's jobs/hour)"
             if "loky" in walls else ""))
    print(f"identical accuracy matrices per job ({', '.join(runs)}): {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit("error: the launchers gave different accuracy matrices")
    label = " ".join(args.overrides) or "default experiment"
    rows = [row(f"sweep jobs/hour: cl_parallel ({jobs} at once) vs basic launcher, {args.seeds} seeds of "
                f"the {label} (identical matrices)", 3600 * args.seeds / par, 3600 * args.seeds / basic, 1.5),
            row(f"sweep: measured parallel gain vs its ceiling (seeds x t_all / (ceil(seeds / {conc}) x t_part): seed 0 "
                f"alone at all cores and at {part_threads} thread(s))", ratio, ceiling, None)]
    if "loky" in startup:
        rows.append(row("sweep start-up per sweep (s, outside the jobs' run time): cl_parallel's forked workers vs "
                        "joblib's loky", startup["forked"], startup["loky"], None,
                        ratio=startup["forked"] / startup["loky"] if startup["loky"] > 0 else float("nan")))
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import bench_main

    bench_main(parser(), measure, QUICK)
