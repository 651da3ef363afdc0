"""Pictures of a run (matplotlib, PNG): accuracy curves with task boundaries, the accuracy-matrix
heatmap, a zoom on the stability gap after each boundary, and forgetting vs KL across runs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _series(curves: list[dict], kinds: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for r in curves:
        if r["kind"] in kinds:
            out[r["eval_task"]][r["global_iter"]] = r["acc"]
    return {k: sorted(v.items()) for k, v in out.items()}


def plot_curves(curves: list[dict], tasks: Sequence[str], ends: Sequence[int], path: str | Path,
                title: str = "") -> Path:
    """Per-task accuracy over ``global_iter`` (dashed before the task is trained), boundaries marked,
    and the mean over general tasks in black."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    stream = _series(curves, ("stream", "future"))
    starts = [0] + list(ends[:-1])
    colors = plt.cm.tab10(np.arange(len(tasks)) % 10)
    for j, t in enumerate(tasks):
        pts = stream.get(t, [])
        before = [(n, a) for n, a in pts if n <= starts[j]]
        after = [(n, a) for n, a in pts if n >= starts[j]]
        if before:
            ax.plot(*zip(*before), "--", color=colors[j], alpha=0.5)
        if after:
            ax.plot(*zip(*after), "-", color=colors[j], label=t, marker="." if len(after) < 40 else None)
    general = _series(curves, ("general",))
    harness = {t: s for t, s in general.items() if t.startswith("lm_eval:")}  # boundaries only: own curves
    general = {t: s for t, s in general.items() if t not in harness}  # the probes, scored at every point
    if general:
        iters = sorted({n for s in general.values() for n, _ in s})
        by = [dict(s) for s in general.values()]
        mean = [np.mean([d[n] for d in by if n in d]) for n in iters]
        ax.plot(iters, mean, color="black", lw=2, label="general (mean)")
    for t, pts in harness.items():
        ax.plot(*zip(*pts), color="black", lw=1, ls="--", marker="s", ms=3, label=t)
    for e in ends[:-1]:
        ax.axvline(e, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("global iteration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "accuracy over the stream (dotted lines: task boundaries)")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_matrix(R: Sequence[Sequence[float]], tasks: Sequence[str], path: str | Path,
                general: Sequence[Sequence[float]] | None = None, general_tasks: Sequence[str] = (),
                title: str = "") -> Path:
    """Heatmap of ``R[i][j]`` (rows: after task i), with the general tasks as extra columns."""
    M = np.asarray(R, dtype=float)
    cols = list(tasks)
    if general is not None and len(general_tasks):
        M = np.concatenate([M, np.asarray(general, dtype=float)], axis=1)
        cols += [f"[g] {g}" for g in general_tasks]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(cols), 1.0 + 0.6 * len(tasks)))
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if M[i, j] < 0.5 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=8)
    if len(tasks) < len(cols):
        ax.axvline(len(tasks) - 0.5, color="white", lw=2)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title or "accuracy matrix")
    return _save(fig, path)


def plot_stability_gap(curves: list[dict], tasks: Sequence[str], ends: Sequence[int], path: str | Path,
                       window: int | None = None) -> Path | None:
    """One panel per later boundary: earlier tasks' accuracy from just before the boundary to
    ``window`` iterations after it (default: the whole next task). None when there is one task."""
    if len(tasks) < 2:
        return None
    stream = _series(curves, ("stream", "future"))
    n = len(tasks) - 1
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5), squeeze=False)
    for m in range(1, len(tasks)):
        ax = axes[0][m - 1]
        b = ends[m - 1]
        hi = b + (window or (ends[m] - b))
        lo = b - max(1, (hi - b) // 5)
        for j in range(m):
            pts = [(x, a) for x, a in stream.get(tasks[j], []) if lo <= x <= hi]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=tasks[j])
        ax.axvline(b, color="gray", ls=":")
        ax.set_title(f"start of {tasks[m]}", fontsize=9)
        ax.set_xlabel("global iteration")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy of earlier tasks")
    return _save(fig, path)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``(slope, intercept, Pearson r)``; r is nan when either variable is constant."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(xs) < 2 or np.ptp(xs) == 0:
        return float("nan"), float("nan"), float("nan")
    slope, intercept = np.polyfit(xs, ys, 1)
    r = float(np.corrcoef(xs, ys)[0, 1]) if np.ptp(ys) > 0 else float("nan")
    return float(slope), float(intercept), r


def plot_forgetting_vs_kl(points: Sequence[dict], path: str | Path, x: str = "forward_kl",
                          y: str = "forgetting", fit: bool = False, title: str = "") -> Path:
    """Scatter of one point per run (``{"label", x, y}``), e.g. forgetting vs KL(pi_0 || pi); with ``fit``
    one least-squares line over all points and its Pearson r in the title."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in points:
        groups[p.get("label", "")].append(p)
    for label, ps in groups.items():
        ax.scatter([p[x] for p in ps], [p[y] for p in ps], label=label or None)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    title = title or f"{y} vs {x}"
    if fit and len(points) >= 2:
        slope, icpt, r = fit_line([p[x] for p in points], [p[y] for p in points])
        if slope == slope:
            xs = np.linspace(min(p[x] for p in points), max(p[x] for p in points), 50)
            ax.plot(xs, slope * xs + icpt, "k--", lw=1, label="least squares, all runs")
            title += f" (r = {r:.2f})"
    if any(groups):
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def old_task_curve(curves: list[dict], tasks: Sequence[str]) -> list[tuple[int, float]]:
    """``(global_iter, mean accuracy of the tasks before the one being trained)`` at each evaluation point
    from the end of the first task on (the quantity whose dip after a boundary is the stability gap). A
    boundary point after task t counts tasks 0..t: they are the earlier tasks of the task that starts
    there, so each dip is drawn from the level it starts at."""
    index = {t: i for i, t in enumerate(tasks)}
    by_iter: dict[int, list[float]] = defaultdict(list)
    for c in curves:
        upto = c["task_idx"] + 1 if c.get("boundary") else c["task_idx"]  # tasks with index < upto are earlier
        if c["kind"] == "stream" and upto >= 1 and index.get(c["eval_task"], 99) < upto:
            by_iter[c["global_iter"]].append(c["acc"])
    return sorted((it, float(np.mean(v))) for it, v in by_iter.items())


def plot_old_task_curves(groups: dict[str, list[list[tuple[int, float]]]], ends: Sequence[int],
                         path: str | Path, title: str = "") -> Path:
    """Mean (over runs) old-task accuracy against the iteration, one line per group, with the spread
    between runs shaded and task boundaries dotted."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, runs in groups.items():
        iters = sorted({it for run in runs for it, _ in run})
        table = [dict(run) for run in runs]
        mean = [np.mean([t[i] for t in table if i in t]) for i in iters]
        lo = [np.min([t[i] for t in table if i in t]) for i in iters]
        hi = [np.max([t[i] for t in table if i in t]) for i in iters]
        line, = ax.plot(iters, mean, marker=".", label=f"{label} (n={len(runs)})")
        ax.fill_between(iters, lo, hi, color=line.get_color(), alpha=0.15)
    for b in ends:
        ax.axvline(b, color="gray", ls=":")
    ax.set_xlabel("global iteration")
    ax.set_ylabel("mean accuracy of earlier tasks")
    ax.set_title(title or "stability gap", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(points: Sequence[dict], path: str | Path, x: str, y: str, x_better: str = "high",
                group: str = "paradigm", annotate: str | None = "lr", title: str = "") -> Path:
    """Mean +- std over seeds per (group, setting) and each group's Pareto frontier: the settings no
    other setting beats on both axes (higher ``y``; lower or higher ``x`` as ``x_better`` says).

    Args:
        points: one dict per run with ``group``, ``annotate`` (the setting) and the metrics ``x``, ``y``.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5))
    groups: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for p in points:
        groups[p[group]][p.get(annotate)].append(p)
    for gi, (g, settings) in enumerate(sorted(groups.items())):
        color = plt.cm.tab10(gi % 10)
        xs, ys = [], []
        for setting, ps in settings.items():
            mx, my = np.mean([p[x] for p in ps]), np.mean([p[y] for p in ps])
            sx = np.std([p[x] for p in ps]) if len(ps) > 1 else 0.0
            sy = np.std([p[y] for p in ps]) if len(ps) > 1 else 0.0
            ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", color=color, capsize=3)
            if annotate:
                ax.annotate(f"{setting}", (mx, my), fontsize=7, xytext=(3, 3), textcoords="offset points")
            xs.append(mx)
            ys.append(my)
        order = np.argsort(xs) if x_better == "low" else np.argsort(xs)[::-1]
        front, best = [], -np.inf
        for i in order:  # walk from the best x; keep points that improve y
            if ys[i] > best:
                front.append((xs[i], ys[i]))
                best = ys[i]
        if front:
            ax.plot(*zip(*sorted(front)), "-s", color=color, markersize=11, markerfacecolor="none",
                    label=f"{g} frontier (squares)")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} vs {x}")
    ax.legend(fontsize=8)
    return _save(fig, path)
