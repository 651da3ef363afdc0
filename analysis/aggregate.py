"""Collecting run results from sweep directories and summarising them across seeds."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

# two-sided 95% Student-t quantiles by degrees of freedom (n - 1)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """95% two-sided t quantile for ``df`` degrees of freedom (nearest tabulated value below; 1.96 beyond 30)."""
    if df < 1:
        return float("nan")
    if df > 30:
        return 1.96
    return _T95[max(k for k in _T95 if k <= df)]


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, sample std, half-width of the 95% t confidence interval)``; std and CI are nan for n < 2."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(vals) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, sd, t95(n - 1) * sd / math.sqrt(n)


def _results(root: str | Path, keep) -> list[dict]:
    """Every readable ``results.json`` under ``root`` whose status passes ``keep`` (each gets its ``dir``)."""
    out = []
    for p in sorted(Path(root).rglob("results.json")):
        try:
            res = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if keep(str(res.get("status", ""))):
            res["dir"] = str(p.parent)
            out.append(res)
    return out


def completed_results(root: str | Path) -> list[dict]:
    """All ``results.json`` with ``status == completed`` under ``root`` (each gets its ``dir``)."""
    return _results(root, lambda status: status == "completed")


def failed_results(root: str | Path) -> list[dict]:
    """All ``results.json`` under ``root`` whose status is ``failed: <reason>``."""
    return _results(root, lambda status: status.startswith("failed"))


def mark_failed(label: str, root: str | Path) -> str:
    """``label`` with a note when jobs of this point failed and no later run with the same config completed."""
    done = [r["config"] for r in completed_results(root)]
    failed = [r for r in failed_results(root) if r["config"] not in done]
    if not failed:
        return label
    return f"{label} [FAILED {len(failed)} job(s): {failed[0]['status'][len('failed: '):][:60]}]"


def summarise(runs: Iterable[dict], metrics: Sequence[str]) -> dict[str, tuple[float, float, float, int]]:
    """``{metric: (mean, std, ci95, n)}`` over runs."""
    runs = list(runs)
    return {m: (*mean_ci([r["metrics"].get(m) for r in runs]), len(runs)) for m in metrics}


def format_cell(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:+.3f}" if math.isnan(ci) else f"{mean:+.3f} ± {ci:.3f}"


def markdown_table(rows: dict[str, dict[str, tuple]], metrics: Sequence[str]) -> str:
    """Rows ``{label: summarise(...)}`` as a Markdown table of mean ± 95% CI (n seeds)."""
    head = "| method | n | " + " | ".join(metrics) + " |"
    lines = [head, "|---|---|" + "---|" * len(metrics)]
    for label, summ in rows.items():
        n = next(iter(summ.values()))[3] if summ else 0
        lines.append(f"| {label} | {n} | " + " | ".join(format_cell(summ[m][0], summ[m][2]) for m in metrics) + " |")
    return "\n".join(lines)


def tex_escape(s: str) -> str:
    return s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


def markdown_to_latex(md: str) -> str:
    """Every Markdown table in ``md`` (as this module writes them) as a booktabs LaTeX table captioned with
    the heading above it; ``+0.123 ± 0.045`` cells become ``$+0.123 \\pm 0.045$``."""

    def cell(s: str) -> str:
        s = s.strip()
        if " ± " in s:
            m, ci = s.split(" ± ", 1)
            return f"${m} \\pm {ci}$"
        return f"${s}$" if s[:1] in "+-" and s[1:2].isdigit() else tex_escape(s)

    out, heading, block = [], "", []

    def flush():
        if len(block) >= 2:
            rows = [[c for c in r.strip().strip("|").split("|")] for r in block if not set(r) <= set("|-: ")]
            ncol = len(rows[0])
            out.extend(["\\begin{table}[t]", "\\centering"] + ([f"\\caption{{{tex_escape(heading)}}}"] if heading else [])
                       + ["\\begin{tabular}{l" + "r" * (ncol - 1) + "}", "\\toprule",
                          " & ".join(tex_escape(c.strip()) for c in rows[0]) + " \\\\", "\\midrule"]
                       + [" & ".join([tex_escape(r[0].strip())] + [cell(c) for c in r[1:]]) + " \\\\" for r in rows[1:]]
                       + ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""])
        block.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            block.append(line)
            continue
        flush()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
    flush()
    return "\n".join(out)


def write_markdown_and_latex(root: str | Path, md: str) -> None:
    """``root/table.md`` and the same tables as ``root/table.tex``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(md)
    (root / "table.tex").write_text(markdown_to_latex(md))
