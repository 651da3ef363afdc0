"""Continual-evaluation metrics over per-iteration curves (De Lange et al., ICLR 2023; A-GEM's LCA).

Inputs are the rows of ``curves.jsonl`` (``global_iter``, ``eval_task``, ``kind``, ``acc``) and the
task boundaries ``ends[j]`` = global_iter at the end of stream task j. ``A_j(n)`` is the accuracy on
task j at evaluation point n. With evaluation only at task boundaries the metrics still follow their
definitions but at that coarse resolution (e.g. ``min_acc`` reduces to the worst boundary value).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

Series = list[tuple[int, float]]


def task_series(curves: Iterable[dict], tasks: Sequence[str]) -> dict[str, Series]:
    """``{task: [(global_iter, acc), ...]}`` for stream tasks, sorted, one value per iteration."""
    points: dict[str, dict[int, float]] = defaultdict(dict)
    for row in curves:
        if row["eval_task"] in tasks and row["kind"] in ("stream", "future"):
            points[row["eval_task"]][int(row["global_iter"])] = float(row["acc"])
    return {t: sorted(points[t].items()) for t in tasks}


def _after(series: Series, lo: int, hi: float = float("inf")) -> list[float]:
    return [a for n, a in series if lo < n <= hi]


def min_acc(series: dict[str, Series], tasks: Sequence[str], ends: Sequence[int]) -> float:
    """Mean over earlier tasks j < T of the minimum of ``A_j(n)`` after ``t_j`` (final value)."""
    vals = [min(_after(series[t], ends[j]), default=np.nan) for j, t in enumerate(tasks[:-1])]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def wc_acc(series: dict[str, Series], tasks: Sequence[str], ends: Sequence[int]) -> float:
    """Worst-case accuracy at the final point: ``(1/k) A_k(now) + (1 - 1/k) min_acc``, k = #tasks."""
    k = len(tasks)
    last = series[tasks[-1]][-1][1] if series[tasks[-1]] else float("nan")
    if k == 1:
        return float(last)
    return float(last / k + (1 - 1 / k) * min_acc(series, tasks, ends))


def _windowed(points: Series, w: int, sign: float) -> float:
    """Largest ``sign * (v_a - v_b)`` (at least 0) over evaluation pairs ``a`` before ``b`` that are at most
    ``w`` iterations apart; NaN when no two points are that close (the window is below the resolution)."""
    best, pairs = 0.0, 0
    for i, (nb, vb) in enumerate(points):
        for na, va in points[:i]:
            if 0 < nb - na <= w:
                pairs += 1
                best = max(best, sign * (va - vb))
    return best if pairs else float("nan")


def _mean_defined(vals: list[float]) -> float:
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def windowed_forgetting(series: dict[str, Series], tasks: Sequence[str], ends: Sequence[int], w: int) -> float:
    """``WF^w`` (De Lange et al. 2023): for each task j, the largest drop ``A_j(a) - A_j(b)`` between two
    evaluations at most ``w`` training iterations apart, both at or after task j's end; averaged over the
    tasks with such a pair. NaN when no task has one (``w`` below the evaluation spacing, or one task)."""
    return _mean_defined([_windowed([(n, a) for n, a in series[t] if n >= ends[j]], w, +1.0)
                          for j, t in enumerate(tasks)])


def windowed_plasticity(series: dict[str, Series], tasks: Sequence[str], ends: Sequence[int], w: int) -> float:
    """``WP^w``: the largest rise ``A_j(b) - A_j(a)`` between two evaluations at most ``w`` iterations apart
    while task j is trained (``starts[j] <= n <= ends[j]``); averaged over tasks with such a pair, NaN
    when none has one."""
    starts = [0] + list(ends[:-1])
    return _mean_defined([_windowed([(n, a) for n, a in series[t] if starts[j] <= n <= ends[j]], w, -1.0)
                          for j, t in enumerate(tasks)])


def lca(series: dict[str, Series], tasks: Sequence[str], ends: Sequence[int], first: int = 10) -> float:
    """Learning-curve area: mean of the first ``first`` evaluations of each task while it is learned."""
    starts = [0] + list(ends[:-1])
    vals = []
    for j, t in enumerate(tasks):
        seg = [a for n, a in series[t] if starts[j] <= n <= ends[j]][:first]
        if seg:
            vals.append(float(np.mean(seg)))
    return float(np.mean(vals)) if vals else float("nan")


def stability_gaps(series: dict[str, Series], tasks: Sequence[str], ends: Sequence[int],
                   tolerance: float = 0.01) -> list[dict]:
    """Per (task j, later boundary m): depth = ``A_j`` just before the boundary minus its minimum within
    task m; recovery = iterations from the boundary until ``A_j`` is back within ``tolerance`` of the
    pre-boundary value inside task m (``None`` = never)."""
    out = []
    for j, t in enumerate(tasks):
        for m in range(j + 1, len(tasks)):
            boundary = ends[m - 1]
            pre = [a for n, a in series[t] if n == boundary]
            inside = [(n, a) for n, a in series[t] if boundary < n <= ends[m]]
            if not pre or not inside:
                continue
            depth = pre[0] - min(a for _, a in inside)
            rec = next((n - boundary for n, a in inside if a >= pre[0] - tolerance), None)
            out.append({"task": t, "boundary_task": tasks[m], "depth": float(depth), "recovery_iters": rec})
    return out


def curve_metrics(curves: Iterable[dict], tasks: Sequence[str], ends: Sequence[int],
                  windows: Sequence[int] = (50, 150)) -> dict:
    """All curve metrics of one run, as stored in ``results.json["metrics"]``; ``wf_<w>``/``wp_<w>`` for
    each window ``w`` in training iterations (``eval.windows``)."""
    series = task_series(list(curves), tasks)
    gaps = stability_gaps(series, tasks, ends)
    out = {
        "min_acc": min_acc(series, tasks, ends),
        "wc_acc": wc_acc(series, tasks, ends),
        "lca": lca(series, tasks, ends),
        "stability_gap": float(np.mean([g["depth"] for g in gaps])) if gaps else 0.0,
        "stability_gaps": gaps,
    }
    for w in windows:
        out[f"wf_{w}"] = windowed_forgetting(series, tasks, ends, w)
        out[f"wp_{w}"] = windowed_plasticity(series, tasks, ends, w)
    return out
