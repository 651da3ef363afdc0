"""Markdown report of one run or several runs side by side: ``python -m analysis.report RUN_DIR [...]``.

Reads each run's ``results.json`` and ``curves.jsonl`` (the results contract) and writes
``report.md`` with a metric table (one column per run), each run's accuracy matrix, the stability
gaps, and the plots (curves, matrix heatmap, stability-gap zoom, forgetting vs KL across runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis import plots

SUMMARY = ["avg_acc", "new_acc", "bwt", "fwt", "forgetting", "general_retention", "min_acc", "wc_acc",
           "stability_gap", "wf_50", "wp_50", "lca", "forward_kl_sampled_mean", "forward_kl_tf_mean", "kl_base_general_final",
           "eval_time_fraction"]


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    res_path = run_dir / "results.json"
    if not res_path.exists():
        raise FileNotFoundError(f"{run_dir}: no results.json (not a run directory?)")
    res = json.loads(res_path.read_text())
    curves_path = run_dir / "curves.jsonl"
    res["curves"] = [json.loads(x) for x in curves_path.read_text().splitlines() if x.strip()] \
        if curves_path.exists() else []
    res["dir"] = str(run_dir)
    return res


def _label(res: dict, all_runs: list[dict]) -> str:
    cfg = res.get("config", {})
    obj = cfg.get("objective", {}).get("_target_", "?").rsplit(".", 1)[-1].replace("Objective", "").lower()
    label = f"{obj} lr={cfg.get('optimizer', {}).get('lr')} seed={cfg.get('seed')}"
    if sum(_base_label(r) == _base_label(res) for r in all_runs) > 1:
        label += f" ({Path(res['dir']).name})"
    return label


def _base_label(res: dict) -> str:
    cfg = res.get("config", {})
    return f"{cfg.get('objective')}{cfg.get('optimizer', {}).get('lr')}{cfg.get('seed')}"


def _fmt(v) -> str:
    return f"{v:+.3f}" if isinstance(v, (int, float)) and v == v else "-"


def _matrix_md(res: dict) -> str:
    tasks, gen = res["tasks"], res.get("general_tasks", [])
    head = "| after | " + " | ".join(tasks + [f"[g] {g}" for g in gen]) + " |"
    sep = "|" + "---|" * (1 + len(tasks) + len(gen))
    rows = ["| base | " + " | ".join(f"{a:.3f}" for a in res["base_acc"] + res.get("general_base", [])) + " |"]
    for i, t in enumerate(tasks):
        g = res["general_matrix"][i] if res.get("general_matrix") else []
        rows.append(f"| {i + 1}: {t} | " + " | ".join(f"{a:.3f}" for a in res["acc_matrix"][i] + g) + " |")
    return "\n".join([head, sep, *rows])


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write ``out/report.md`` and its plots; returns the Markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    labels = [_label(r, runs) for r in runs]
    md = ["# Continual post-training report", ""]
    md += ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(runs)]
    for key in SUMMARY:
        vals = [r.get("metrics", {}).get(key) for r in runs]
        if any(isinstance(v, (int, float)) for v in vals):
            md.append(f"| {key} | " + " | ".join(_fmt(v) for v in vals) + " |")
    md.append("")
    md.append("Runs: " + "; ".join(f"`{r['dir']}` ({r.get('status')})" for r in runs))
    md.append("")
    kl_points = []
    for i, (r, label) in enumerate(zip(runs, labels)):
        sub = out / f"run{i}"
        md += [f"## {label}", "", _matrix_md(r), ""]
        ends = r.get("task_end_iters") or []
        if r["curves"] and ends:
            p = plots.plot_curves(r["curves"], r["tasks"], ends, sub / "curves.png", title=label)
            md.append(f"![curves]({p.relative_to(out)})")
            p = plots.plot_stability_gap(r["curves"], r["tasks"], ends, sub / "stability_gap.png")
            if p:
                md.append(f"![stability gap]({p.relative_to(out)})")
        p = plots.plot_matrix(r["acc_matrix"], r["tasks"], sub / "matrix.png", r.get("general_matrix"),
                              r.get("general_tasks", []), title=label)
        md.append(f"![matrix]({p.relative_to(out)})")
        gaps = r.get("metrics", {}).get("stability_gaps", [])
        if gaps:
            md += ["", "| task | boundary (start of) | depth ± se (items) | recovery (iters) |", "|---|---|---|---|"]
            md += [f"| {g['task']} | {g['boundary_task']} | {g['depth']:+.3f} ± {g.get('depth_se', float('nan')):.3f} "
                   f"({g.get('n_items', '?')}){'' if g.get('significant', True) else ', within noise'} | "
                   f"{g['recovery_iters'] if g['recovery_iters'] is not None else 'not within the task'} |"
                   for g in gaps]
        for rec in r.get("shift", []):
            if rec["task_idx"] > 0:
                f = r["acc_matrix"][rec["task_idx"] - 1][rec["task_idx"] - 1] - r["acc_matrix"][rec["task_idx"]][rec["task_idx"] - 1]
                kl = rec.get("forward_kl_sampled", rec.get("forward_kl_tf", rec.get("forward_kl")))
                kl_points.append({"label": label, "forward_kl": kl, "forgetting of previous task": f})
        md.append("")
    if kl_points:
        p = plots.plot_forgetting_vs_kl(kl_points, out / "forgetting_vs_kl.png", x="forward_kl",
                                        y="forgetting of previous task")
        md += ["## Forgetting vs KL(pi_0 || pi) on the new task", "",
               "One point per task boundary: the drop of the previous task against the forward KL "
               "measured on the new task's prompts (sampled from pi_0 where measured).", "", f"![forgetting vs kl]({p.relative_to(out)})", ""]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Markdown report (tables + plots) for one or more run directories")
    ap.add_argument("runs", nargs="+", help="run directories containing results.json")
    ap.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report for one run, ./report otherwise)")
    args = ap.parse_args(argv)
    out = args.out or (str(Path(args.runs[0]) / "report") if len(args.runs) == 1 else "report")
    try:
        path = write_report(args.runs, out)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"report: {path}")


if __name__ == "__main__":
    main()
