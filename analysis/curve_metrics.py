"""Continual-evaluation metrics over per-iteration curves (De Lange et al., ICLR 2023; A-GEM's LCA).

Inputs are the rows of ``curves.jsonl`` (``global_iter``, ``eval_task``, ``kind``, ``acc``) and the
task boundaries ``ends[j]`` = global_iter at the end of stream task j. ``A_j(n)`` is the accuracy on
task j at evaluation point n. With evaluation only at task boundaries the metrics still follow their
definitions but at that coarse resolution (e.g. ``min_acc`` reduces to the worst boundary value).
"""

from __future__ import annotations

import math
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


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def stability_gaps(curves: Iterable[dict], tasks: Sequence[str], ends: Sequence[int], z: float = 1.96) -> list[dict]:
    """Per (task j, later boundary B into task m): the dip of ``A_j`` inside task m, on like items.

    Inner points may score fewer items of a task than boundary points (``eval.max_samples_per_point``);
    every value here is on the items the window's inner points score: boundary rows contribute their
    accuracy on that prefix (``acc_at``, recorded by the evaluator), so the value before the boundary and
    the values inside share their items. With ``n`` such items:

    - ``depth`` = ``pre - min`` (``pre``: the value at B; ``min``: the lowest inside task m, up to and
      including its end), with ``depth_se = sqrt(se(pre)^2 + se(min)^2)``, ``se(p) = sqrt(p (1 - p) / n)``
      (item sampling; the minimum of noisy values is biased low, so a depth below ``z * depth_se`` is not
      told apart from noise: ``significant`` is false);
    - ``recovery_iters``: iterations from B to the first point *after the lowest one* back within
      ``tolerance = max(z * sqrt(2) * se(pre), 1 / n)`` of ``pre`` (``None`` = not within task m; 0 when
      the dip is no deeper than the tolerance).
    """
    rows: dict[str, dict[int, dict]] = defaultdict(dict)
    for row in curves:
        if row["eval_task"] in tasks and row["kind"] in ("stream", "future"):
            rows[row["eval_task"]][int(row["global_iter"])] = row
    out = []
    for j, t in enumerate(tasks):
        for m in range(j + 1, len(tasks)):
            boundary = ends[m - 1]
            window = sorted((n, r) for n, r in rows[t].items() if boundary < n <= ends[m])
            inner = [r["n"] for _, r in window if not r.get("boundary") and r.get("n")]
            n_items = min(inner) if inner else None

            def value(r: dict) -> float | None:
                if n_items is None or r.get("n") == n_items:
                    return float(r["acc"])
                at = (r.get("acc_at") or {}).get(str(n_items))
                return None if at is None else float(at)

            pre_row = rows[t].get(boundary)
            pre = value(pre_row) if pre_row else None
            inside = [(n, v) for n, r in window if (v := value(r)) is not None]
            if pre is None or not inside:
                continue
            k = n_items or int(pre_row.get("n") or 1)
            low = min(v for _, v in inside)
            depth_se = math.sqrt(_binomial_se(pre, k) ** 2 + _binomial_se(low, k) ** 2)
            tolerance = max(z * math.sqrt(2.0) * _binomial_se(pre, k), 1.0 / k)
            # recovery: back within the tolerance after the lowest point (a value before the dip is not a
            # recovery); a dip no deeper than the tolerance needs none (0)
            lowest = min(range(len(inside)), key=lambda i: inside[i][1])
            rec = 0 if pre - low <= tolerance else next(
                (n - boundary for n, v in inside[lowest + 1:] if v >= pre - tolerance), None)
            out.append({"task": t, "boundary_task": tasks[m], "depth": float(pre - low), "depth_se": depth_se,
                        "significant": bool(pre - low > z * depth_se), "n_items": k, "tolerance": tolerance,
                        "recovery_iters": rec})
    return out


def curve_metrics(curves: Iterable[dict], tasks: Sequence[str], ends: Sequence[int],
                  windows: Sequence[int]) -> dict:
    """All curve metrics of one run, as stored in ``results.json["metrics"]``; ``wf_<w>``/``wp_<w>`` for
    each window ``w`` in training iterations (``eval.windows``)."""
    curves = list(curves)
    series = task_series(curves, tasks)
    gaps = stability_gaps(curves, tasks, ends)
    out = {
        "min_acc": min_acc(series, tasks, ends),
        "wc_acc": wc_acc(series, tasks, ends),
        "lca": lca(series, tasks, ends),
        # NaN (null, with the reason) when no pair could be measured on like items
        "stability_gap": float(np.mean([g["depth"] for g in gaps])) if gaps else float("nan"),
        # the share of (task, boundary) dips deeper than their sampling noise (NaN without pairs)
        "stability_gap_significant": float(np.mean([g["significant"] for g in gaps])) if gaps else float("nan"),
        "stability_gaps": gaps,
    }
    for w in windows:
        out[f"wf_{w}"] = windowed_forgetting(series, tasks, ends, w)
        out[f"wp_{w}"] = windowed_plasticity(series, tasks, ends, w)
    return out
