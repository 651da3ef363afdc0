"""A report of one paper table: per-task curves, accuracy matrices and the metric table.

    python -m analysis.wandb_report results/ctbench_quick --table ctbench            # local: report.md + PNGs
    python -m analysis.wandb_report results/ctbench --table ctbench --online --entity ME --project cl-suite

Locally (always) it writes ``ROOT/report/report.md`` with, per point of the table, the seed-averaged
per-task accuracy curves and the seed-averaged accuracy matrix, plus the table itself (``table.md``
written by the reproduction script). With ``--online`` it also builds the same report in W&B (needs
``pip install wandb-workspaces`` and a W&B login): a Markdown block with the table, and a panel grid over the
table's runs (W&B group = the table, job type = the point) with one line plot per stream task against
``cl/global_iter`` grouped by point (mean and range over seeds), the general-task mean, and bar charts of
the table's metrics; the matrices are the runs' ``acc_matrix`` tables.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from analysis import plots
from analysis.aggregate import completed_results

METRICS = ["avg_acc", "forgetting", "new_acc", "general_retention"]


def _curves(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "curves.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def mean_curves(runs: list[dict]) -> list[dict]:
    """curves.jsonl lines averaged over runs at each (global_iter, eval_task, kind)."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    proto: dict[tuple, dict] = {}
    for r in runs:
        for c in _curves(r["dir"]):
            k = (c["global_iter"], c["eval_task"], c["kind"])
            acc[k].append(c["acc"])
            proto.setdefault(k, c)
    return [{**proto[k], "acc": float(np.mean(v))} for k, v in sorted(acc.items(), key=lambda kv: kv[0][0])]


def local_report(root: Path, out: Path | None = None) -> Path:
    """Write ``report.md`` with the table and, per point, mean curves and the mean accuracy matrix."""
    root = Path(root)
    out = Path(out or root / "report")
    out.mkdir(parents=True, exist_ok=True)
    table = (root / "table.md").read_text() if (root / "table.md").exists() else "(no table.md: run the script first)"
    lines = [table, ""]
    for point in sorted(p for p in root.iterdir() if p.is_dir() and p.name != out.name):
        runs = completed_results(point)
        if not runs:
            continue
        tasks, ends = runs[0]["tasks"], runs[0]["task_end_iters"]
        curves_png = plots.plot_curves(mean_curves(runs), tasks, ends, out / f"{point.name}_curves.png")
        R = np.mean([r["acc_matrix"] for r in runs], axis=0).tolist()
        G = np.mean([r["general_matrix"] for r in runs], axis=0).tolist() if runs[0].get("general_matrix") else None
        matrix_png = plots.plot_matrix(R, tasks, out / f"{point.name}_matrix.png", G, runs[0].get("general_tasks"))
        lines += [f"## {point.name} ({len(runs)} seeds)", "",
                  f"![curves]({curves_png.name}) ![matrix]({matrix_png.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_wandb_report(table: str, root: Path, project: str, entity: str | None = None, metrics=METRICS):
    """The W&B report object for ``table`` (not saved): the Markdown table and a panel grid over the runs
    of W&B group ``table``, grouped by job type (the point)."""
    import wandb_workspaces.reports.v2 as wr

    root = Path(root)
    runs = [r for p in sorted(root.iterdir()) if p.is_dir() for r in completed_results(p)]
    tasks = runs[0]["tasks"] if runs else []
    md = (root / "table.md").read_text() if (root / "table.md").exists() else ""
    runset = wr.Runset(entity=entity or "", project=project, name=table, filters=f"Group == '{table}'",
                       groupby=["JobType"])
    curves = [wr.LinePlot(title=f"{t} accuracy", x="cl/global_iter", y=[f"eval/stream/{t}"],
                          groupby_aggfunc="mean", groupby_rangefunc="minmax") for t in tasks]
    curves.append(wr.LinePlot(title="general tasks (mean)", x="cl/global_iter", y=["eval/general_mean"],
                              groupby_aggfunc="mean", groupby_rangefunc="minmax"))
    bars = [wr.BarPlot(title=m, metrics=[m], groupby_aggfunc="mean", groupby_rangefunc="stderr") for m in metrics]
    report = wr.Report(project=project, entity=entity or "", title=f"cl-suite: {table}",
                       description=f"Runs of W&B group '{table}', one job type per table point.")
    report.blocks = [
        wr.H1(f"{table}"),
        wr.MarkdownBlock(text=md),
        wr.H2("Per-task accuracy during the stream (mean and range over seeds, per point)"),
        wr.PanelGrid(runsets=[runset], panels=curves),
        wr.H2("Metrics"),
        wr.PanelGrid(runsets=[runset], panels=bars),
        wr.P("Accuracy matrices: each run's 'acc_matrix' table; seed means in the local report."),
    ]
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="a reproduction script's output root (table.md and one folder per point)")
    ap.add_argument("--table", required=True, help="the table's W&B group (the script's table name)")
    ap.add_argument("--online", action="store_true", help="also save the report to W&B")
    ap.add_argument("--project", default="cl-suite")
    ap.add_argument("--entity", default=None)
    args = ap.parse_args()
    path = local_report(args.root)
    print(f"local report: {path}")
    if args.online:
        try:
            report = build_wandb_report(args.table, args.root, args.project, args.entity)
            report.save()
        except ImportError:
            raise SystemExit("error: --online needs `pip install wandb-workspaces`; the local report is written") from None
        except Exception as e:  # offline, no login, no such project
            raise SystemExit(f"error: W&B report not saved ({type(e).__name__}: {e}); the local report is written") from None
        print(f"W&B report: {report.url}")


if __name__ == "__main__":
    main()
