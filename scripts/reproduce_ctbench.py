"""MLLM-CTBench-style table: continual-learning methods under SFT and under GRPO on one stream.

Rows: sequential fine-tuning (no mitigation), EWC (online, lambda 100), LwF-style KL distillation to the
task-start model (coef 1, T 2), experience replay (25% of each batch, reservoir buffer) and task-vector
merging (mean of the task vectors after each task), each under SFT and under GRPO (G 8, k3 KL 0.01 to the
task-start model) at the same learning rate and budget. Columns: average accuracy after the last task,
forgetting, backward transfer, new-task accuracy and general-capability retention, mean ± 95% CI over
seeds. The benchmark's claims checked here: RL-based fine-tuning forgets less than SFT under sequential
training, and replay is the strongest mitigation for SFT. Both are read as paired differences over seeds
(a seed fixes the data draw and the training order, so run s of one row pairs with run s of another), with
the paired t-test Bonferroni-adjusted within each claim's family of comparisons and the exact sign-flip
test beside it.

    python scripts/reproduce_ctbench.py --quick      # toy budget, 3 seeds
    python scripts/reproduce_ctbench.py              # default budget (150 steps x 16 per task)
    python scripts/reproduce_ctbench.py --real       # Qwen2.5-1.5B-Instruct on a GPU, same table
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from analysis.tables import (  # noqa: E402
    Point, paired_section, parse_args, run_points, tidy, write_table,
)

METRICS = ["avg_acc", "forgetting", "bwt", "new_acc", "general_retention"]
METHODS = {  # name: (label, experiment)
    "seq": ("sequential FT", None),
    "ewc": ("EWC", "ewc"),
    "lwf": ("LwF (KL)", "lwf"),
    "replay": ("replay 25%", "er"),
    "merge": ("task-vector merge", "merge"),
}


def points(paradigms: list[str]) -> dict[str, Point]:
    return {f"{p}_{m}": Point(f"{p.upper()} {label}", exp, [f"objective={p}"], {"paradigm": p, "method": m})
            for p in paradigms for m, (label, exp) in METHODS.items()}


def comparisons(paradigms: list[str]) -> dict[str, tuple[list[tuple[str, str]], list[str]]]:
    """The claims' families of paired comparisons: {title: (pairs of point names, metrics)}."""
    fam = {}
    if {"sft", "grpo"} <= set(paradigms):
        fam["Claim 1: RL forgets less than SFT under every method (GRPO - SFT, same method, same seed)"] = (
            [(f"grpo_{m}", f"sft_{m}") for m in METHODS], ["forgetting", "general_retention", "new_acc"])
    for p in paradigms:
        fam[f"Claim 2 ({p.upper()}): replay is the strongest mitigation (replay - each other row, same seed)"] = (
            [(f"{p}_replay", f"{p}_{m}") for m in METHODS if m != "replay"], ["forgetting", "general_retention"])
    return fam


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "results/ctbench")
    t0 = time.perf_counter()
    pts = points(args.paradigms)
    run_points(args.out, "ctbench", pts, range(args.seeds), args.quick, [*args.extra, "shift=none"], real=args.real)
    df = tidy(args.out, pts)
    labels = {name: p.label for name, p in pts.items()}
    notes, frames = [], []
    for title, (pairs, metrics) in comparisons(args.paradigms).items():
        d, lines = paired_section(df, pairs, metrics, labels, lead="Paired over seeds")
        frames.append(d.assign(family=title))
        notes += [f"## {title}", "", "Lower forgetting is better; higher general_retention and new_acc are better.",
                  *lines]
    if frames:
        pd.concat(frames).to_csv(args.out / "paired.csv", index=False)
    md, _ = write_table(args.out, "MLLM-CTBench-style methods x paradigms (toy scale)", pts, METRICS, notes)
    print("\n" + md + f"\n\nwritten: {args.out}/table.md, table.tex, runs.csv, paired.csv ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
