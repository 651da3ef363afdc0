"""One paper table = named points run over seeds, collected into a tidy table and written as Markdown,
LaTeX and CSV.

A reproduction script declares its points (``{directory: Point}``), calls :func:`run_points` (each point is
a resumable Hydra multirun over seeds, ``analysis.sweep.run_sweep``; its W&B runs share the table's group
and carry the table and point as tags, so W&B's own grouping rebuilds the table) and :func:`write_table`
(mean, std and 95% CI over seeds per point; failed jobs marked in the row label).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from analysis.aggregate import (
    Table, as_table, completed_results, failed_results, format_cell, latex_table, mark_failed, mean_ci,
    write_report,
)
from analysis.sweep import QUICK, QUICK_RL, parallel_overrides, run_sweep

SCALARS = ("avg_acc", "new_acc", "bwt", "fwt", "forgetting", "general_retention", "min_acc", "wc_acc",
           "stability_gap", "stability_gap_significant", "general_retention_unreplayed", "forward_kl_sampled_mean",
           "forward_kl_tf_mean", "kl_base_general_final", "lca", "wf_50", "wp_50")


@dataclass
class Point:
    """One row of a table: a label, the experiment preset and overrides, and free columns (e.g. paradigm)."""

    label: str
    experiment: str | None = None
    overrides: list[str] = field(default_factory=list)
    columns: dict = field(default_factory=dict)

    @property
    def paradigm(self) -> str:
        return self.columns.get("paradigm", "")


def wandb_overrides(table: str, point: str) -> list[str]:
    """W&B grouping of a table's runs (ignored with ``logger=none``; never part of the run directory)."""
    return [f"logger.group={table}", f"logger.tags=[{table},{point}]", f"logger.job_type={point}"]


def run_points(root: Path, table: str, points: dict[str, Point], seeds: Sequence[int], quick: bool,
               extra: Sequence[str] = (), real: bool = False) -> list[dict]:
    """Run every point's missing seeds (resumable); returns the jobs that failed in this invocation. With
    ``real`` each point also gets its paradigm's papers' hyperparameters (a point's own overrides win)."""
    failed = []
    for name, p in points.items():
        ov = [*(QUICK if quick else []), *(QUICK_RL if quick and p.paradigm == "grpo" else []),
              *real_overrides(real, p.paradigm), *p.overrides, *wandb_overrides(table, name), *extra]
        failed += run_sweep(root / name, p.experiment, list(seeds), ov)
    return failed


def tidy(root: Path, points: dict[str, Point]) -> pd.DataFrame:
    """One row per job (completed or failed): point, label, the point's columns, seed, status, scalar
    metrics and compute figures."""
    rows = []
    for name, p in points.items():
        for r in completed_results(root / name) + failed_results(root / name):
            m = r.get("metrics", {})
            row = {"point": name, "label": p.label, **p.columns, "seed": r.get("config", {}).get("seed"),
                   "status": r.get("status"), "dir": r.get("dir")}
            row.update({k: m.get(k) for k in SCALARS})  # these columns always; every other scalar metric too
            row.update({k: v for k, v in m.items() if k not in row and (v is None or isinstance(v, (int, float)))})
            row["tokens_generated"] = m.get("compute", {}).get("tokens_generated")
            row["wall_seconds"] = r.get("provenance", {}).get("wall_seconds")
            rows.append(row)
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame, metrics: Sequence[str], by: str = "point") -> pd.DataFrame:
    """Mean, std and 95% CI half-width (Student t) per point and metric over completed seeds."""
    done = df[df["status"] == "completed"] if len(df) else df
    out = []
    for key, g in done.groupby(by, sort=False):
        row = {by: key, "n": len(g)}
        for m in metrics:
            mean, sd, ci = mean_ci(list(g[m].dropna()))
            row.update({f"{m}_mean": mean, f"{m}_std": sd, f"{m}_ci95": ci})
        out.append(row)
    return pd.DataFrame(out)


def table(root: Path, points: dict[str, Point], summ: pd.DataFrame, metrics: Sequence[str]) -> Table:
    """One row per point: its label (failed jobs marked), n completed seeds, mean ± 95% CI per metric."""
    by_point = {r["point"]: r for r in summ.to_dict("records")}
    records = []
    for name, p in points.items():
        r = by_point.get(name)
        records.append({"point": mark_failed(p.label, root / name), "n": r["n"] if r else 0,
                        **{m: format_cell(r[f"{m}_mean"], r[f"{m}_ci95"]) if r else "-" for m in metrics}})
    return as_table(pd.DataFrame(records, columns=["point", "n", *metrics]))


def latex(root: Path, points: dict[str, Point], summ: pd.DataFrame, metrics: Sequence[str], caption: str) -> str:
    """The same table as booktabs LaTeX, mean $\\pm$ 95% CI (n seeds)."""
    return latex_table(table(root, points, summ, metrics).frame, caption)


def paired_differences(df: pd.DataFrame, pairs: Sequence[tuple[str, str]], metrics: Sequence[str],
                       alpha: float = 0.05) -> pd.DataFrame:
    """Point ``a`` minus point ``b`` per seed (the same seed means the same data draw and training order, so
    differences are paired by seed, never by position), for every pair and metric: the mean difference with
    its 95% t interval over the seeds completed in both (a seed missing the metric in either run drops out
    of that metric only), the paired t-test p, the same p Bonferroni-adjusted over every row of this family
    (``tests`` = pairs x metrics), and the exact sign-flip p (distribution-free; with n seeds it cannot go
    below 2^(1-n)). The same non-zero difference on every seed leaves the t-test undefined: p is NaN and
    ``constant`` is set. A point with several completed runs of one seed (merged job folders) uses the
    first by directory name, with a warning; an empty frame gives rows with n = 0."""
    import warnings

    from analysis.fronts import paired_t_p, sign_flip_p

    cols = {"point", "seed", "status"}
    done = df[df["status"] == "completed"] if len(df) and cols <= set(df.columns) else pd.DataFrame(columns=[*cols])
    done = done[done["seed"].notna()]

    def runs(point: str) -> pd.DataFrame:
        v = done[done["point"] == point]
        v = v.sort_values("dir") if "dir" in v.columns else v
        dup = sorted(set(v.loc[v["seed"].duplicated(), "seed"]))
        if dup:
            warnings.warn(f"{point}: several completed runs of seed(s) {dup}; the first by directory is used",
                          stacklevel=3)
        return v.drop_duplicates("seed").set_index("seed")

    m_tests = max(1, len(pairs) * len(metrics))
    rows = []
    for a, b in pairs:
        va, vb = runs(a), runs(b)
        seeds = sorted(set(va.index) & set(vb.index))
        for metric in metrics:
            xa = va[metric] if metric in va.columns else pd.Series(dtype=float)
            xb = vb[metric] if metric in vb.columns else pd.Series(dtype=float)
            d = [float(xa[s]) - float(xb[s]) for s in seeds if s in xa.index and s in xb.index
                 and pd.notna(xa[s]) and pd.notna(xb[s])]
            mean, _, ci = mean_ci(d)
            constant = len(d) >= 2 and max(d) - min(d) <= 1e-12 and abs(mean) > 1e-12
            p = float("nan") if constant else paired_t_p(d)
            p_exact = sign_flip_p(d) if d else float("nan")
            rows.append({"a": a, "b": b, "metric": metric, "n": len(d), "diff_mean": mean, "diff_ci95": ci,
                         "p": p, "p_adj": min(1.0, p * m_tests) if p == p else float("nan"),
                         "p_exact": p_exact, "p_exact_adj": min(1.0, p_exact * m_tests) if p_exact == p_exact
                         else float("nan"), "constant": constant, "tests": m_tests, "alpha": alpha})
    return pd.DataFrame(rows)


def paired_section(df: pd.DataFrame, pairs: Sequence[tuple[str, str]], metrics: Sequence[str],
                   labels: dict[str, str], csv: Path | None = None,
                   lead: str = "Paired differences over seeds") -> tuple[pd.DataFrame, list[str]]:
    """:func:`paired_differences` of ``df`` (written to ``csv`` when given) and its Markdown lines under a
    sentence that names the Bonferroni family, its size read from the differences themselves."""
    d = paired_differences(df, pairs, metrics)
    if csv is not None:
        d.to_csv(csv, index=False)
    n = int(d["tests"].iat[0]) if len(d) else 0
    return d, [f"{lead}; Bonferroni over the {n} rows of this family.", "", paired_markdown(d, labels), ""]


def _p(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


def paired_reading(r: dict) -> str:
    """One row's reading: resolved only when the Bonferroni-adjusted paired t-test p is at most alpha, and
    then whether the distribution-free sign-flip test agrees (with 3 seeds it cannot: 2^(1-3) = 0.25 before
    adjustment)."""
    side = "a higher" if r["diff_mean"] > 0 else "a lower"
    if r["n"] < 2:
        return "too few seeds"
    if r.get("constant"):
        return f"{side} by the same amount on every seed: t-test undefined, not resolved"
    if not r["p_adj"] <= r["alpha"]:
        return "not resolved"
    return f"{side} (resolved{'; the sign-flip test agrees' if r['p_exact_adj'] <= r['alpha'] else '; t-test only'})"


def paired_markdown(diffs: pd.DataFrame, labels: dict[str, str]) -> str:
    """``paired_differences`` as a Markdown table with ``paired_reading`` per row."""
    lines = ["| a - b | metric | n | mean difference ± 95% CI | p (t) | p adjusted | p sign-flip (adjusted) | reading |",
             "|---|---|---|---|---|---|---|---|"]
    for r in diffs.to_dict("records"):
        lines.append(f"| {labels.get(r['a'], r['a'])} - {labels.get(r['b'], r['b'])} | {r['metric']} | {r['n']} | "
                     f"{format_cell(r['diff_mean'], r['diff_ci95'])} | {_p(r['p'])} | {_p(r['p_adj'])} | "
                     f"{_p(r['p_exact'])} ({_p(r['p_exact_adj'])}) | {paired_reading(r)} |")
    return "\n".join(lines)


def write_table(root: Path, title: str, points: dict[str, Point], metrics: Sequence[str],
                notes: Sequence[str] = ()) -> tuple[str, pd.DataFrame]:
    """Write ``table.md`` (with ``notes``: plot links, findings), ``table.tex``, ``runs.csv`` (tidy, one row
    per job) and ``summary.csv`` under ``root``; returns the Markdown and the tidy frame."""
    df = tidy(root, points)
    summ = summary(df, metrics) if len(df) else pd.DataFrame(columns=["point", "n"])
    blocks = [f"# {title}", "", "Mean ± 95% CI over seeds (n per row).", "", table(root, points, summ, metrics), "",
              *notes]
    write_report(root, [*blocks, ""])
    df.to_csv(root / "runs.csv", index=False)
    summ.to_csv(root / "summary.csv", index=False)
    return "\n".join(blocks), df


# -- the command line every table script shares --------------------------------------------------------------
# real models on GPUs: the same table with Qwen2.5-1.5B-Instruct (hub id or a local copy; chat template on),
# no embedded base stage, bf16 on one GPU (add trainer=ddp for all GPUs of a node), and the papers'
# hyperparameters per paradigm (RFT-CPT's code: SFT through LLaMA-Factory at lr 1e-5, cosine, 10% warm-up;
# GRPO through EasyR1 at lr 1e-6, G = 8, rollouts long enough for the task's answers)
REAL = ["model=qwen2_5_1_5b_instruct", "base=none", "trainer=gpu"]
REAL_SCHEDULE = ["train.decay=cosine", "train.min_lr_ratio=0.0", "train.warmup_steps=15"]  # 10% of 150 steps/task
REAL_PARADIGM = {"sft": ["optimizer.lr=1e-5"],
                 "grpo": ["optimizer.lr=1e-6", "objective.group_size=8", "objective.max_new_tokens=64"]}


def real_overrides(real: bool, paradigm: str, schedule: bool = True) -> list[str]:
    """A point's --real hyperparameters for its paradigm: the schedule (unless the point compares schedules
    itself: ``schedule=False``) and the paradigm's lr and rollout settings; none without --real."""
    if not real:
        return []
    return [*(REAL_SCHEDULE if schedule else []), *REAL_PARADIGM.get(paradigm, [])]


def parse_args(description: str, default_out: str, paradigms: str = "sft,grpo"):
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="toy budget (40 steps per task, G=4): minutes on a laptop")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--paradigms", default=paradigms, help="comma list of sft, grpo")
    ap.add_argument("--real", action="store_true", help="real model and the papers' hyperparameters: " + " ".join(REAL)
                    + " " + " ".join(REAL_SCHEDULE) + "; SFT " + " ".join(REAL_PARADIGM["sft"]) + "; GRPO "
                    + " ".join(REAL_PARADIGM["grpo"]) + " (a point's own settings and extra overrides win)")
    ap.add_argument("--out", type=Path, default=None, help=f"output root (default: {default_out}[_quick|_real])")
    ap.add_argument("--jobs", type=int, default=1, help="sweep jobs at once on this machine (hydra/launcher="
                    "cl_parallel: forked workers, each with cores / jobs threads)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = ap.parse_args()
    args.paradigms = [p.strip() for p in args.paradigms.split(",") if p.strip()]
    if not args.paradigms or set(args.paradigms) - {"sft", "grpo"}:
        raise SystemExit(f"error: --paradigms: allowed sft, grpo; got {args.paradigms}")
    suffix = ("_real" if args.real else "") + ("_quick" if args.quick else "")
    args.out = args.out or Path(f"{default_out}{suffix}")
    args.extra = (REAL if args.real else []) + parallel_overrides(args.jobs) + list(args.overrides)
    return args
