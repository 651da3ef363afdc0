"""Prove the base recipe's margin: build the base stage under perturbed numerics and tabulate what comes out.

    python scripts/check_base.py [--base tiny] [--seeds 0 1 2] [--variants threads1 threads2 perturb bf16]
                                 [--out check_base_out] [overrides ...]

Every cell (init seed x variant) builds the base from scratch in its own process (no cache):
``threads1``/``threads2``: ``torch.set_num_threads(1|2)``; ``perturb``: Gaussian noise of relative size
1e-4 added to the initial weights (2 threads); ``bf16``: bf16-mixed autocast for training (2 threads).
The table gives, per task, the mean, min and max greedy accuracy over the cells and pass@8 for the stream
tasks, and checks the recipe's acceptance: every general task >= ``general_health`` in every cell; every
stream task within ``health_band`` of its expected level (``base.expected``) in every cell. Each cell's report is kept as
``OUT/<seed>-<variant>.json``; a rerun reuses finished cells. Exit status 1 when a cell is out of band.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "threads1": {"threads": 1},
    "threads2": {"threads": 2},
    "perturb": {"threads": 2, "perturb": 1e-4},
    "bf16": {"threads": 2, "precision": "bf16-mixed"},
}


def build_cell(base: str, seed: int, variant: str, out: Path, overrides: list[str]) -> dict:
    """Build one base in this process (called in a child process by ``main``)."""
    import torch
    from omegaconf import OmegaConf

    from cl.base_stage import BaseRecipe, _train_base, base_health
    from cl.run import compose_config
    from tasks.stream import build_tasks

    v = VARIANTS[variant]
    torch.set_num_threads(v["threads"])
    cfg = compose_config(f"base={base}", f"base.init_seed={seed}", *overrides)
    b = OmegaConf.to_container(cfg.base, resolve=True)
    recipe = BaseRecipe(**{k: val for k, val in b.items() if k != "kind"})
    d = cfg.data
    tasks = {t.name: t for t in build_tasks(list(recipe.mixture), d.n_train, d.n_eval, d.seed)}
    trainer = {**OmegaConf.to_container(cfg.trainer, resolve=True), "devices": 1, "strategy": "auto",
               "precision": v.get("precision", "32-true")}
    with tempfile.TemporaryDirectory() as tmp:
        report = _train_base(Path(tmp) / "base", OmegaConf.to_container(cfg.model.arch, resolve=True), recipe,
                             tasks, trainer, perturb=v.get("perturb", 0.0))
    report.pop("history", None)
    report.update(seed=seed, variant=variant, threads=torch.get_num_threads(), health=base_health(report, recipe))
    out.write_text(json.dumps(report, indent=1))
    return report


def table(cells: list[dict], recipe) -> tuple[str, list[str]]:
    """The Markdown table over cells, and the acceptance failures (one line each)."""
    names = list(recipe.general) + list(recipe.exposure)
    k = f"pass@{recipe.report_pass_k}"
    lines = ["| task | expected | greedy mean | greedy min | greedy max | "
             f"{k} mean | {k} min | {k} max |", "|---|---|---|---|---|---|---|---|"]
    failures = []
    for n in names:
        g = [c["greedy"][n] for c in cells]
        p = [c[k][n] for c in cells if n in c[k]]
        level = recipe.expected.get(n)
        target = (f">= {recipe.general_health}" if n in recipe.general else
                  f"{level:.2f} +- {recipe.health_band}" if level is not None else "(not set)")
        ps = (f"{statistics.mean(p):.3f} | {min(p):.3f} | {max(p):.3f}" if p else "- | - | -")
        lines.append(f"| {n} | {target} | {statistics.mean(g):.3f} | {min(g):.3f} | {max(g):.3f} | {ps} |")
        for c in cells:
            a = c["greedy"][n]
            bad = (a < recipe.general_health if n in recipe.general else
                   level is not None and abs(a - level) > recipe.health_band)
            if bad:
                failures.append(f"seed {c['seed']} {c['variant']}: {n} {a:.3f} (target {target})")
    if all("greedy_covered" in c for c in cells):  # where each stream task's level comes from
        lines += ["", "| task | covered items: mean | min | max | uncovered items: mean | min | max |",
                  "|---|---|---|---|---|---|---|"]
        for n in recipe.exposure:
            cov = [c["greedy_covered"][n] for c in cells if c["greedy_covered"].get(n) is not None]
            unc = [c["greedy_uncovered"][n] for c in cells if c["greedy_uncovered"].get(n) is not None]
            if cov and unc:
                lines.append(f"| {n} | {statistics.mean(cov):.3f} | {min(cov):.3f} | {max(cov):.3f} | "
                             f"{statistics.mean(unc):.3f} | {min(unc):.3f} | {max(unc):.3f} |")
    steps = [c["steps"] for c in cells]
    secs = [c["seconds"] for c in cells]
    lines.append("")
    lines.append(f"{len(cells)} cells; stop step mean {statistics.mean(steps):.0f} (min {min(steps)}, max "
                 f"{max(steps)}); seconds per build mean {statistics.mean(secs):.0f} (max {max(secs):.0f}); "
                 f"stopped by the cap: {sum(c['stopped_by'] == 'cap' for c in cells)}")
    return "\n".join(lines), failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="check_base_out")
    ap.add_argument("--cell", nargs=2, metavar=("SEED", "VARIANT"), help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.cell:
        build_cell(args.base, int(args.cell[0]), args.cell[1], out / f"{args.cell[0]}-{args.cell[1]}.json", overrides)
        return 0

    from omegaconf import OmegaConf

    from cl.base_stage import BaseRecipe
    from cl.run import compose_config

    b = OmegaConf.to_container(compose_config(f"base={args.base}", *overrides).base, resolve=True)
    recipe = BaseRecipe(**{k: v for k, v in b.items() if k != "kind"})
    cells = []
    todo = [(s, v) for s in args.seeds for v in args.variants]
    for i, (seed, variant) in enumerate(todo):
        path = out / f"{seed}-{variant}.json"
        if not path.exists():
            t0 = time.time()
            print(f"[check_base] cell {i + 1}/{len(todo)}: init seed {seed}, {variant}", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(VARIANTS[variant]["threads"])}
            subprocess.run([sys.executable, __file__, "--base", args.base, "--out", str(out), "--cell", str(seed),
                            variant, *overrides], check=True, cwd=ROOT, env=env)
            print(f"[check_base] cell {i + 1}/{len(todo)} done in {time.time() - t0:.0f} s", flush=True)
        cells.append(json.loads(path.read_text()))
    text, failures = table(cells, recipe)
    print(f"\nbase={args.base}: {len(args.seeds)} init seeds x {', '.join(args.variants)}\n")
    print(text)
    (out / "table.md").write_text(text + "\n")
    if failures:
        print("\nout of band:\n" + "\n".join(failures))
        return 1
    print("\nall cells in band")
    return 0


if __name__ == "__main__":
    sys.exit(main())
