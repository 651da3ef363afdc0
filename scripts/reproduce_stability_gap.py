"""The stability gap with and without replay: old-task accuracy evaluated densely around task boundaries.

With evaluation every few steps, the accuracy of earlier tasks drops sharply right after a new task starts
and partly recovers (the stability gap, De Lange et al.). Rows: no replay and 25% experience replay, under
SFT (and GRPO with --paradigms sft,grpo). Columns: mean gap depth over boundaries (``stability_gap``),
minimum and worst-case old-task accuracy, final forgetting and average accuracy, mean ± 95% CI over seeds;
plus a plot of the mean old-task accuracy curve of each row. The claims checked: the gap exists under
sequential fine-tuning, and replay makes it shallower.

    python scripts/reproduce_stability_gap.py --quick
    python scripts/reproduce_stability_gap.py
    python scripts/reproduce_stability_gap.py --real
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.aggregate import completed_results  # noqa: E402
from analysis.plots import old_task_curve, plot_old_task_curves  # noqa: E402
from analysis.tables import Point, parse_args, run_points, write_table  # noqa: E402

METRICS = ["stability_gap", "stability_gap_significant", "min_acc", "wc_acc", "forgetting", "avg_acc"]


def points(paradigms: list[str], every: int) -> dict[str, Point]:
    out = {}
    for p in paradigms:
        dense = [f"objective={p}", f"eval.every_n_steps={every}"]
        out[f"{p}_none"] = Point(f"{p.upper()} no replay", None, dense, {"paradigm": p, "replay": 0.0})
        out[f"{p}_er25"] = Point(f"{p.upper()} replay 25%", "er", dense, {"paradigm": p, "replay": 0.25})
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "results/stability_gap", paradigms="sft")
    t0 = time.perf_counter()
    pts = points(args.paradigms, 5 if args.quick else 10)
    run_points(args.out, "stability_gap", pts, range(args.seeds), args.quick, args.extra, real=args.real)
    groups, ends = {}, []
    for name, p in pts.items():
        runs = completed_results(args.out / name)
        if runs:
            groups[p.label] = [old_task_curve(json_lines(Path(r["dir"]) / "curves.jsonl"), r["tasks"]) for r in runs]
            ends = runs[0]["task_end_iters"][:-1]
    plot = plot_old_task_curves(groups, ends, args.out / "old_task_curves.png",
                                title="mean accuracy of earlier tasks (shaded: range over seeds)")
    md, _ = write_table(args.out, "Stability gap with and without replay (toy scale)", pts, METRICS,
                        [f"![old-task curves]({plot.name})"])
    print("\n" + md + f"\n\nwritten: {args.out}/table.md, table.tex, runs.csv, {plot.name} ({time.perf_counter() - t0:.0f} s)")


def json_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


if __name__ == "__main__":
    main()
