"""Comparing paradigms at equal learning: learning-rate fronts and forgetting at matched new-task gain.

A paradigm that learns less also forgets less, so "which forgets less" is only meaningful at the same
amount learned (RL's Razor compares forgetting at matched new-task performance). Each paradigm is run at
several learning rates (its *front*); each run's **new-task gain** is how far training on each task moved
its accuracy above the base model's, averaged over the stream's tasks:

    gain = mean_k (A[k, k] - base_acc[k])

(``A[k, k]``: accuracy on task k right after training it; ``base_acc[k]``: the untouched base model's).
A front is the per-learning-rate means (over seeds) of (gain, metric) on its **rising branch**: the
learning rates from the smallest up to the one with the largest mean gain. Past that peak a larger
learning rate learns less and forgets more (training destabilises: dominated points), and keeping those
points would fold the curve back over gains it already covers. The branch's points, sorted by gain and
joined by straight lines, are the front; a metric **at matched gain** g is read off that line by linear
interpolation, and is undefined outside the front's gain range (no extrapolation).

Only seeds completed in every (paradigm, learning rate) cell are used, so every point of every front
averages the same seeds (a seed whose run failed at one learning rate would otherwise bias that point).

Intervals come from a paired bootstrap over seeds: one draw resamples seed indices with replacement, the
same indices for every paradigm and learning rate (a seed fixes the base model, data and evaluation subset
when the sweep varies them, and the training order), recomputes every front and reads every paradigm at
every level. The difference between two paradigms at a level is computed inside each draw, so its interval
is that of the paired difference. A draw in which a level falls outside a front does not count for that
level; the share of draws that did is reported.

With a handful of seeds a percentile bootstrap cannot resolve small tail probabilities (if every seed's
difference has the same sign, every draw's does), so the **verdict** is not read off the bootstrap: each
seed's own fronts give a per-seed difference at the level, and a paired t-test of their mean
(``scipy.stats.ttest_1samp``) gives a p-value, Bonferroni-adjusted over every difference in the table.
The exact sign-flip p-value (all 2^n sign patterns, no normality assumed) is reported beside it; with n
seeds it cannot go below 2^(1-n), so a verdict that only the t-test supports says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Runs = Mapping[str, Mapping[float, Mapping[int, dict]]]  # paradigm -> lr -> seed -> results.json


def task_gain(result: dict) -> float:
    """Mean over the stream's tasks of (accuracy right after training the task - the base model's)."""
    acc, base = result["acc_matrix"], result["base_acc"]
    if len(acc) != len(base):
        raise ValueError(f"acc_matrix has {len(acc)} rows for {len(base)} base accuracies")
    return float(np.mean([acc[k][k] - base[k] for k in range(len(base))]))


def run_value(result: dict, metric: str) -> float:
    """``gain`` or a metric of ``results.json``'s ``metrics`` (null: NaN)."""
    if metric == "gain":
        return task_gain(result)
    v = result["metrics"].get(metric)
    return float("nan") if v is None else float(v)


def front_points(runs: Mapping[float, Mapping[int, dict]], metric: str, seeds: Sequence[int] | None = None,
                 rising: bool = True) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Per learning rate, the mean gain and mean ``metric`` over ``seeds`` (a multiset: bootstrap draws
    repeat seeds; default every seed), both over the same runs: a run whose ``metric`` is null counts in
    neither. With ``rising`` only the rising branch (learning rates up to the one with the largest mean
    gain). Sorted by gain. Learning rates without any usable run are left out."""
    pts = []
    for lr, by_seed in runs.items():
        chosen = [by_seed[s] for s in (seeds if seeds is not None else sorted(by_seed)) if s in by_seed]
        chosen = [r for r in chosen if not math.isnan(run_value(r, metric))]
        if not chosen:
            continue
        pts.append((float(np.mean([task_gain(r) for r in chosen])),
                    float(np.mean([run_value(r, metric) for r in chosen])), lr))
    if rising and pts:
        pts.sort(key=lambda p: p[2])  # by learning rate: keep up to the largest gain
        peak = max(range(len(pts)), key=lambda i: pts[i][0])
        pts = pts[: peak + 1]
    pts.sort()
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts]), [p[2] for p in pts]


def common_seeds(runs: Runs) -> list[int]:
    """Seeds completed in every (paradigm, learning rate) cell."""
    cells = [set(by_seed) for by_lr in runs.values() for by_seed in by_lr.values()]
    return sorted(set.intersection(*cells)) if cells else []


def restrict(runs: Runs, seeds: Sequence[int]) -> dict:
    """``runs`` with only ``seeds`` in every cell."""
    keep = set(seeds)
    return {p: {lr: {s: r for s, r in by_seed.items() if s in keep} for lr, by_seed in by_lr.items()}
            for p, by_lr in runs.items()}


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided exact p-value of a zero mean of paired differences: the share of the 2^n sign patterns
    whose |mean| is at least the observed one (the observed pattern included)."""
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=float)
    n = len(d)
    if n == 0:
        return float("nan")
    signs = np.array(np.meshgrid(*[[1.0, -1.0]] * n)).reshape(n, -1).T  # [2^n, n]
    means = np.abs((signs * d).mean(axis=1))
    return float(np.mean(means >= abs(d.mean()) - 1e-12))


def at_gain(gains: np.ndarray, values: np.ndarray, level: float) -> float:
    """The front's ``values`` at gain ``level`` by linear interpolation; NaN outside its gain range."""
    ok = ~np.isnan(values)
    gains, values = gains[ok], values[ok]
    if len(gains) == 0 or level < gains[0] or level > gains[-1]:
        return float("nan")
    return float(np.interp(level, gains, values))


def gain_levels(runs: Runs, n: int = 3) -> list[float]:
    """``n`` gain levels spread inside the range every paradigm's front (rising branch) covers (at 1/(n+1)
    ... n/(n+1) of it); empty when the fronts' gain ranges do not overlap."""
    lo, hi = -math.inf, math.inf
    for by_lr in runs.values():
        g, _, _ = front_points(by_lr, "gain")
        if len(g) == 0:
            return []
        lo, hi = max(lo, g[0]), min(hi, g[-1])
    if not lo < hi:
        return []
    return [float(lo + (hi - lo) * (i + 1) / (n + 1)) for i in range(n)]


def matched_gain(runs: Runs, metrics: Sequence[str], levels: Sequence[float], n_boot: int = 2000,
                 seed: int = 0, alpha: float = 0.05) -> list[dict]:
    """Every paradigm's ``metrics`` at each gain level, and every pair's difference, with paired bootstrap
    intervals over seeds.

    Returns one row per (metric, level, paradigm or "A - B" pair): ``estimate`` (from all seeds), ``lo``/
    ``hi`` (the ``1 - alpha`` percentile interval), ``lo_adj``/``hi_adj`` (Bonferroni over every pair
    difference in the table: ``1 - alpha / m``), ``coverage`` (share of draws in which the level was inside
    the front(s)), and ``n_seeds``.
    """
    paradigms = list(runs)
    seeds = common_seeds(runs)
    if not seeds:
        raise ValueError("no seed completed in every (paradigm, learning rate) cell")
    runs = restrict(runs, seeds)
    pairs = [(a, b) for i, a in enumerate(paradigms) for b in paradigms[i + 1:]]
    m_tests = max(1, len(pairs) * len(metrics) * len(levels))
    rng = np.random.default_rng(seed)
    draws = [list(rng.choice(seeds, size=len(seeds), replace=True)) for _ in range(n_boot)]

    def read(sample: Sequence[int] | None) -> dict:
        out = {}
        for metric in metrics:
            for p in paradigms:
                g, v, _ = front_points(runs[p], metric, sample)
                for level in levels:
                    out[(metric, level, p)] = at_gain(g, v, level)
            for a, b in pairs:
                for level in levels:
                    out[(metric, level, f"{a} - {b}")] = out[(metric, level, a)] - out[(metric, level, b)]
        return out

    point = read(None)
    boot = [read(s) for s in draws]
    rows = []
    for key, est in point.items():
        metric, level, who = key
        vals = np.array([b[key] for b in boot])
        vals = vals[~np.isnan(vals)]
        adj = alpha / m_tests if " - " in who else alpha
        q = (lambda a: np.percentile(vals, [100 * a / 2, 100 * (1 - a / 2)])) if len(vals) else (
            lambda a: (float("nan"), float("nan")))
        lo, hi = q(alpha)
        lo_adj, hi_adj = q(adj)
        row = {"metric": metric, "gain": level, "who": who, "estimate": est, "lo": float(lo), "hi": float(hi),
               "lo_adj": float(lo_adj), "hi_adj": float(hi_adj), "coverage": len(vals) / n_boot,
               "n_seeds": len(seeds), "tests": m_tests}
        if " - " in who:  # the per-seed paired differences and their exact sign-flip test
            a, b = who.split(" - ")
            per_seed = {}
            for s in seeds:
                one = restrict(runs, [s])
                va = at_gain(*front_points(one[a], metric)[:2], level)
                vb = at_gain(*front_points(one[b], metric)[:2], level)
                per_seed[s] = va - vb
            valid = [d for d in per_seed.values() if not math.isnan(d)]
            row.update({"per_seed": per_seed, **paired_tests(valid, m_tests), "alpha": alpha})
        rows.append(row)
    return rows


def matched_within_seed(runs: Runs, metrics: Sequence[str], fractions: Sequence[float] = (0.25, 0.5, 0.75),
                        alpha: float = 0.05) -> list[dict]:
    """Every pair's ``metrics`` difference at matched gain **inside each seed**, for sweeps whose seeds vary
    the base model.

    When each seed brings its own base model, the bases learn by different amounts, and one gain level for
    every seed (``gain_levels`` on the mean fronts) may lie inside the fronts of few seeds. Here each seed
    is read on its own: its fronts (rising branches of its own runs) give the gain range both paradigms of
    a pair reach on that base, ``[lo_s, hi_s]`` (from the gains alone, so a seed's level is the same for
    every metric), and the level for fraction f is ``lo_s + f (hi_s - lo_s)``. Both paradigms are read at
    that level, so each seed's difference is a matched one, on one base; the levels differ between seeds.
    A seed whose fronts do not overlap (or only touch) is left out (``n_valid`` counts those read). The
    verdict's inputs are those of ``matched_gain``: a paired t-test on the per-seed differences,
    Bonferroni-adjusted over every difference in this table, and the exact sign-flip test; the t interval
    reported is the unadjusted 95% one.

    Returns one row per (metric, fraction, pair) with ``estimate`` (the mean per-seed difference), ``lo``/
    ``hi`` (the t interval of that mean; NaN below 2 seeds), the mean per-seed level ``gain`` and its range
    ``gain_min``/``gain_max``, each paradigm's mean value (``a_mean``/``b_mean``), ``per_seed`` (seed ->
    difference), ``levels`` (seed -> its level), ``n_valid``, ``p``/``p_adj``/``p_exact``/``p_exact_adj``,
    ``tests``, ``alpha``.
    """
    from scipy import stats

    paradigms = list(runs)
    seeds = common_seeds(runs)
    if not seeds:
        raise ValueError("no seed completed in every (paradigm, learning rate) cell")
    pairs = [(a, b) for i, a in enumerate(paradigms) for b in paradigms[i + 1:]]
    m_tests = max(1, len(pairs) * len(metrics) * len(fractions))
    one = {s: restrict(runs, [s]) for s in seeds}
    gains = {(p, s): front_points(one[s][p], "gain")[0] for p in paradigms for s in seeds}
    ranges = {}  # (a, b) -> seed -> the gain range both of that seed's fronts reach (from the gains alone:
    for a, b in pairs:  # one level per seed for every metric, which a null metric value cannot move)
        ranges[(a, b)] = {}
        for s in seeds:
            ga, gb = gains[(a, s)], gains[(b, s)]
            if len(ga) and len(gb) and max(ga[0], gb[0]) < min(ga[-1], gb[-1]):  # touching fronts: left out
                ranges[(a, b)][s] = (max(ga[0], gb[0]), min(ga[-1], gb[-1]))
    rows = []
    for metric in metrics:
        fronts = {(p, s): front_points(one[s][p], metric)[:2] for p in paradigms for s in seeds}
        for f in fractions:
            for a, b in pairs:
                per_seed, levels, va_all, vb_all = {}, {}, [], []
                for s, (lo, hi) in ranges[(a, b)].items():
                    level = float(lo + f * (hi - lo))
                    va, vb = at_gain(*fronts[(a, s)], level), at_gain(*fronts[(b, s)], level)
                    if math.isnan(va) or math.isnan(vb):
                        continue
                    per_seed[s], levels[s] = va - vb, level
                    va_all.append(va)
                    vb_all.append(vb)
                diffs, lv, n = list(per_seed.values()), list(levels.values()), len(per_seed)
                mean = _mean(diffs)
                half = (float(stats.t.ppf(1 - alpha / 2, n - 1) * np.std(diffs, ddof=1) / math.sqrt(n)) if n >= 2
                        else float("nan"))
                rows.append({"metric": metric, "fraction": f, "who": f"{a} - {b}", "estimate": mean,
                             "lo": mean - half, "hi": mean + half, "gain": _mean(lv),
                             "gain_min": min(lv, default=float("nan")), "gain_max": max(lv, default=float("nan")),
                             "a_mean": _mean(va_all), "b_mean": _mean(vb_all),
                             "per_seed": per_seed, "levels": levels, "n_seeds": len(seeds),
                             **paired_tests(diffs, m_tests), "tests": m_tests, "alpha": alpha})
    return rows


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def paired_tests(diffs: Sequence[float], m_tests: int) -> dict:
    """``n_valid``, the paired t-test's ``p`` and the exact sign-flip ``p_exact`` of per-seed differences
    (NaN ones dropped), each also Bonferroni-adjusted over ``m_tests`` (``p_adj``, ``p_exact_adj``)."""
    valid = [d for d in diffs if not math.isnan(d)]
    p_t, p_x = paired_t_p(valid), sign_flip_p(valid)
    return {"n_valid": len(valid), "p": p_t, "p_adj": float("nan") if math.isnan(p_t) else min(1.0, p_t * m_tests),
            "p_exact": p_x, "p_exact_adj": float("nan") if math.isnan(p_x) else min(1.0, p_x * m_tests)}


def paired_t_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of a paired t-test that the per-seed differences have mean 0 (NaN below 2 seeds;
    0 when every difference is the same non-zero value, 1 when every one is 0, both up to rounding)."""
    from scipy import stats

    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=float)
    if len(d) < 2:
        return float("nan")
    if np.ptp(d) <= 1e-12:  # the same difference on every seed (up to rounding): no spread to test against
        return 0.0 if abs(d.mean()) > 1e-12 else 1.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def verdict(row: dict, lower_is_better: bool) -> str:
    """A pair difference's reading from the paired t-test on per-seed differences, Bonferroni-adjusted
    over the table, with whether the distribution-free sign-flip test agrees."""
    a, b = row["who"].split(" - ")
    n = row.get("n_valid", 0)
    if n < 2:
        return f"inconclusive (the gain lies inside the fronts of {n} seed(s) only)"
    if not row["p_adj"] <= row["alpha"]:
        return f"no difference resolved (adjusted p {row['p_adj']:.2f}, {n} seeds)"
    mean = float(np.mean([d for d in row["per_seed"].values() if not math.isnan(d)]))
    first_better = (mean < 0) if lower_is_better else (mean > 0)
    exact = ("; the sign-flip test agrees" if row["p_exact_adj"] <= row["alpha"] else
             f"; t-test only: the sign-flip test cannot go below p {min(1.0, 2.0 ** (1 - n) * row['tests']):.2f} "
             f"adjusted with {n} seeds")
    return f"{a if first_better else b} better (adjusted p {row['p_adj']:.3f}, {n} seeds{exact})"


def interior_best(runs: Mapping[float, Mapping[int, dict]], metric: str = "avg_acc") -> tuple[float, bool]:
    """The learning rate with the best mean ``metric`` and whether it is interior to the grid (not its
    smallest or largest learning rate): a best point at an end means the grid should be extended."""
    means = {lr: np.nanmean([run_value(r, metric) for r in by_seed.values()]) for lr, by_seed in runs.items() if by_seed}
    lrs = sorted(means)
    best = max(lrs, key=lambda lr: means[lr])
    return best, 0 < lrs.index(best) < len(lrs) - 1


def plot_fronts(runs: Runs, metric: str, levels: Sequence[float], path, title: str | None = None):
    """Each paradigm's front (mean gain vs mean ``metric`` per learning rate, lr labels, seed spread as
    error bars), with the matched-gain levels as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for p, by_lr in runs.items():
        g, v, lrs = front_points(by_lr, metric, rising=False)  # every point, the dominated ones hollow
        on = set(front_points(by_lr, metric)[2])
        gs = [np.std([task_gain(r) for r in by_lr[lr].values()]) for lr in lrs]
        vs = [np.nanstd([run_value(r, metric) for r in by_lr[lr].values()]) for lr in lrs]
        line = ax.errorbar([x for x, lr in zip(g, lrs) if lr in on], [y for y, lr in zip(v, lrs) if lr in on],
                           xerr=[e for e, lr in zip(gs, lrs) if lr in on], yerr=[e for e, lr in zip(vs, lrs) if lr in on],
                           marker="o", capsize=3, label=f"{p} (front)")
        off = [i for i, lr in enumerate(lrs) if lr not in on]
        if off:
            ax.scatter([g[i] for i in off], [v[i] for i in off], facecolors="none",
                       edgecolors=line[0].get_color(), label=f"{p} past its peak gain")
        for x, y, lr in zip(g, v, lrs):
            ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for level in levels:
        ax.axvline(level, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("new-task gain over the base model (mean over tasks)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} against new-task gain, one point per learning rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fronts_by_seed(runs: Runs, metric: str, path, levels: Mapping[int, float] | None = None):
    """One panel per seed (common to every cell): each paradigm's points of that seed alone, its rising
    branch joined, points past its peak hollow, and the seed's own matched level (``levels``: seed -> gain)
    as a dashed line. Shows what a mean front hides when the seeds vary the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = common_seeds(runs)
    fig, axes = plt.subplots(1, len(seeds), figsize=(2.9 * len(seeds), 3.2), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], seeds):
        for i, (p, by_lr) in enumerate(runs.items()):
            one = restrict({p: by_lr}, [s])[p]
            g, v, lrs = front_points(one, metric, rising=False)
            on = set(front_points(one, metric)[2])
            color = f"C{i}"
            ax.plot([x for x, lr in zip(g, lrs) if lr in on], [y for y, lr in zip(v, lrs) if lr in on],
                    marker="o", color=color, label=p)
            off = [j for j, lr in enumerate(lrs) if lr not in on]
            ax.scatter([g[j] for j in off], [v[j] for j in off], facecolors="none", edgecolors=color)
        if levels and s in levels:
            ax.axvline(levels[s], color="grey", lw=0.8, ls="--")
        ax.set_title(f"seed {s}", fontsize=9)
        ax.set_xlabel("new-task gain", fontsize=8)
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{metric} against gain, each seed's own fronts (hollow: past the peak gain)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
