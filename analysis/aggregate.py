"""Collecting run results from sweep directories and summarising them across seeds."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

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


class Table(str):
    """A table as Markdown text (what reports and terminals show) that keeps its ``frame`` (a pandas
    DataFrame of display cells), from which LaTeX and CSV are written: one path for every table."""

    frame: "pd.DataFrame"


def as_table(frame) -> Table:
    """``frame`` (cells as they should be shown) as a :class:`Table`: Markdown through ``DataFrame.to_markdown``."""
    table = Table(frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True))
    table.frame = frame
    return table


def summary_frame(rows: dict[str, dict[str, tuple]], metrics: Sequence[str], label: str = "method"):
    """Rows ``{label: summarise(...)}`` as a DataFrame of display cells: label, n seeds, mean ± 95% CI."""
    import pandas as pd

    records = []
    for name, summ in rows.items():
        n = next(iter(summ.values()))[3] if summ else 0
        records.append({label: name, "n": n, **{m: format_cell(summ[m][0], summ[m][2]) for m in metrics}})
    return pd.DataFrame(records, columns=[label, "n", *metrics])


def markdown_table(rows: dict[str, dict[str, tuple]], metrics: Sequence[str], label: str = "method") -> Table:
    """Rows ``{label: summarise(...)}`` as a table of mean ± 95% CI (n seeds)."""
    return as_table(summary_frame(rows, metrics, label))


def tex_escape(s: str) -> str:
    return s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


def _tex_cell(s) -> str:
    s = str(s).strip()
    if " ± " in s:
        m, ci = s.split(" ± ", 1)
        return f"${m} \\pm {ci}$"
    return f"${s}$" if s[:1] in "+-" and s[1:2].isdigit() else tex_escape(s)


def latex_table(frame, caption: str = "") -> str:
    """A booktabs LaTeX table of ``frame`` (pandas Styler): the first column (labels) escaped, ``+0.123 ±
    0.045`` cells as ``$+0.123 \\pm 0.045$``, captioned with ``caption``."""
    cells = frame.astype(str).copy()
    first = cells.columns[0]
    for col in cells.columns:
        cells[col] = cells[col].map(tex_escape if col == first else _tex_cell)
    cells.columns = [tex_escape(str(c)) for c in cells.columns]
    return cells.style.hide(axis="index").to_latex(
        hrules=True, caption=tex_escape(caption) if caption else None, position="t",
        position_float="centering", column_format="l" + "r" * (len(cells.columns) - 1))


def latex_tables(blocks: Iterable[str]) -> str:
    """Every :class:`Table` among ``blocks`` (a report's lines) as LaTeX, captioned with the heading above it."""
    out, heading = [], ""
    for block in blocks:
        if isinstance(block, Table):
            out.append(latex_table(block.frame, heading))
        elif str(block).startswith("#"):
            heading = str(block).lstrip("#").strip()
    return "\n".join(out)


def write_report(root: str | Path, blocks: Sequence[str]) -> None:
    """``root/table.md`` (the blocks: headings, tables, notes, one per line) and its tables as ``root/table.tex``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text("\n".join(blocks))
    (root / "table.tex").write_text(latex_tables(blocks))
