"""The averaging Pareto front on the default stream: WiSE alpha sweep, partwise and AMA, for SFT and GRPO.

After every task the weights become ``alpha * theta_task_start + (1 - alpha) * theta_task_end``
(``alpha = 0``: no averaging; ``alpha = 1``: every task undone), for alpha in {0, 0.2, 0.4, 0.6, 0.8, 1.0};
plus partwise averaging (two layer blocks, alphas 0.4 / 0.1, the rest 0.2) and AMA (learned per-layer
alphas with mean 0.2). Each point runs over seeds as a Hydra multirun (resumable). Plots new-task
accuracy against forgetting and against general retention, mean +- std over seeds with each paradigm's
Pareto frontier, and prints the table (mean +- 95% CI). AMA's and partwise's claim, that they beat uniform
averaging, is read as paired differences over seeds against WiSE 0.2 (AMA's mean alpha; partwise's 0.4 / 0.1
/ 0.2 blocks average about 0.25 per layer), with the
paired t-test Bonferroni-adjusted over the comparisons of a paradigm and the exact sign-flip test beside it.

    python scripts/reproduce_averaging.py --quick   # toy budget (base stage cached)
    python scripts/reproduce_averaging.py           # full: 3 seeds, default budget
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.aggregate import (  # noqa: E402
    completed_results, mark_failed, markdown_table, write_report, summarise,
)
from analysis.plots import plot_pareto  # noqa: E402
from analysis.tables import (  # noqa: E402
    REAL, Point, paired_section, real_overrides, tidy,
)
from analysis.sweep import QUICK, QUICK_RL, parallel_overrides, run_sweep  # noqa: E402

METRICS = ["avg_acc", "forgetting", "new_acc", "general_retention"]
ALPHAS = ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]


def points(paradigms: list[str]) -> dict[str, tuple[str, str, str, list[str]]]:
    """``{directory: (paradigm, setting, experiment, overrides)}``."""
    out = {}
    for p in paradigms:
        for a in ALPHAS:
            out[f"{p}_wise{a}"] = (p, f"wise {a}", "wise", [f"objective={p}", f"averaging.wise.alpha={a}"])
        out[f"{p}_partwise"] = (p, "partwise", "partwise", [f"objective={p}"])
        out[f"{p}_ama"] = (p, "AMA", "ama", [f"objective={p}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy budget: 40 steps per task, G=4, boundary-only eval")
    ap.add_argument("--real", action="store_true", help="real model and the papers' hyperparameters per paradigm "
                    "(analysis.tables.REAL, REAL_PARADIGM; needs a GPU and the model)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="sweep jobs at once (hydra/launcher=cl_parallel)")
    ap.add_argument("--paradigms", default="sft,grpo")
    ap.add_argument("--out", default=None, help="output root (default: results/averaging[_quick])")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = ap.parse_args()
    paradigms = [p.strip() for p in args.paradigms.split(",") if p.strip()]
    if set(paradigms) - {"sft", "grpo"}:
        raise SystemExit(f"error: --paradigms: allowed sft, grpo; got {paradigms}")
    root = Path(args.out or f"results/averaging{'_real' if args.real else ''}{'_quick' if args.quick else ''}")
    extra = (QUICK if args.quick else []) + (REAL if args.real else []) + parallel_overrides(args.jobs)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    todo = points(paradigms)
    for name, (p, _, exp, ov) in todo.items():
        run_sweep(root / name, exp, seeds, [*extra, *(QUICK_RL if args.quick and p == "grpo" else []),
                                            *real_overrides(args.real, p), *ov, *args.overrides])
    rows, pts = {}, []
    for name, (p, setting, _, _) in todo.items():
        runs = completed_results(root / name)
        rows[mark_failed(f"{p.upper()} {setting}", root / name)] = summarise(runs, METRICS)
        pts += [{"paradigm": p.upper(), "setting": setting, **{m: r["metrics"][m] for m in METRICS}} for r in runs]
    p1 = plot_pareto(pts, root / "pareto_forgetting.png", x="forgetting", y="new_acc", x_better="low",
                     annotate="setting", title="averaging: new-task accuracy vs forgetting (mean ± std)")
    p2 = plot_pareto(pts, root / "pareto_general.png", x="general_retention", y="new_acc", x_better="high",
                     annotate="setting", title="averaging: new-task accuracy vs general retention")
    lines = ["# Averaging at toy scale (default stream)", "", markdown_table(rows, METRICS), "",
             f"![forgetting]({p1.name})", f"![general]({p2.name})", ""]
    labels = {name: f"{p.upper()} {setting}" for name, (p, setting, _, _) in todo.items()}
    df = tidy(root, {name: Point(label) for name, label in labels.items()})
    for p in paradigms:
        pairs = [(f"{p}_ama", f"{p}_wise0.2"), (f"{p}_partwise", f"{p}_wise0.2")]
        metrics = ["forgetting", "general_retention", "new_acc", "avg_acc"]
        lines += [f"## {p.upper()}: learned (AMA, mean 0.2) and partwise alphas against uniform WiSE 0.2", "",
                  *paired_section(df, pairs, metrics, labels, root / f"paired_{p}.csv", "Paired over seeds")[1]]
    write_report(root, lines)
    (root / "points.json").write_text(json.dumps(pts, indent=1))
    print("\n" + "\n".join(lines))
    print(f"\nwritten: {root / 'table.md'}, {p1}, {p2} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
