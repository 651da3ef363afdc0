"""Evaluation cost: (a) one-pass teacher-forced scoring vs generate-based greedy scoring on the same
eval sets (identical accuracies required; target >= 5x faster); (b) the share of wall time spent
evaluating at the default schedule on the default stream (target <= 20%).

    python scripts/bench_eval.py [--quick] [--n 200] [--repeats 3] [--skip-run] [Hydra overrides ...]

``--quick`` measures part (a) only, on 100 items per task.

Uses the cached default base checkpoint (trained on first use, ~5 minutes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


from cl.core.data import PromptFormat
from cl.evaluation import EvalSet, Scorer
from cl.run import compose_config, prepare_model, run
from tasks.stream import build_tasks

from benchlib import bench_main, row  # scripts/benchlib.py (this directory is on sys.path)


def part_a(cfg, n: int, repeats: int) -> dict:
    d = cfg.data
    names = list(cfg.stream.tasks) + list(cfg.stream.general)
    tasks = build_tasks(names + [x for x in list(cfg.base.general) + list(cfg.base.exposure) if x not in names],
                        d.n_train, d.n_eval, d.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, _ = prepare_model(cfg, Path(tmp), {t.name: t for t in tasks})
    model.eval()
    fmt = PromptFormat(tok)
    sets = [EvalSet.build(t, fmt, n, seed=0) for t in tasks if t.name in names]
    tf, gen = Scorer(fmt, "teacher_forced"), Scorer(fmt, "generate")
    times = {"teacher_forced": [], "generate": []}
    accs = {}
    for _ in range(repeats):
        for name, scorer in (("teacher_forced", tf), ("generate", gen)):
            t0 = time.perf_counter()
            accs[name] = [scorer.scores(model, es) for es in sets]
            times[name].append(time.perf_counter() - t0)
    same = accs["teacher_forced"] == accs["generate"]
    t_tf, t_gen = statistics.median(times["teacher_forced"]), statistics.median(times["generate"])
    print(f"(a) {len(sets)} tasks x {n} items, median of {repeats}")
    for es, a in zip(sets, accs["teacher_forced"]):
        print(f"    {es.name:<10} acc {sum(a) / len(a):.3f}")
    print(f"    teacher-forced {t_tf:.3f} s | generate {t_gen:.3f} s | speedup {t_gen / t_tf:.1f}x "
          f"(target >= 5x: {'met' if t_gen / t_tf >= 5 else 'NOT met'}) | per-item scores identical: {same}")
    if not same:
        raise SystemExit("error: teacher-forced and generate-based scores differ")
    items = n * len(sets)
    return row(f"evaluation items/s: one teacher-forced pass vs generate ({len(sets)} tasks x {n} items, "
               "identical scores)", items / t_tf, items / t_gen, 5.0)


def part_b(overrides: list[str]) -> dict:
    cfg = compose_config("logger=none", *overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run(cfg, Path(tmp) / "run")
        wall = time.perf_counter() - t0
    m = res["metrics"]
    share_wall = m["eval_seconds"] / wall
    print(f"(b) default stream, eval.every_n_steps={cfg.eval.every_n_steps}, "
          f"max_samples_per_point={cfg.eval.max_samples_per_point}: eval {m['eval_seconds']:.1f} s, "
          f"train {m['train_seconds']:.1f} s, run wall {wall:.1f} s")
    print(f"    evaluation share: {m['eval_time_fraction']:.1%} of train+eval, {share_wall:.1%} of the run's wall "
          f"time (target <= 20%: {'met' if share_wall <= 0.20 else 'NOT met'})")
    return row("evaluation share of a run's wall time (s evaluating vs s run, default schedule)",
               m["eval_seconds"], wall, 0.20, lower_is_better=True)


QUICK = ["--n", "100", "--repeats", "1", "--skip-run"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-run", action="store_true", help="only part (a)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both parts (e.g. base=smoke)")
    return ap


def measure(args) -> list[dict]:
    rows = [part_a(compose_config(*args.overrides), args.n, args.repeats)]
    if not args.skip_run:
        rows.append(part_b(args.overrides))
    return rows


if __name__ == "__main__":
    bench_main(parser(), measure, QUICK)
