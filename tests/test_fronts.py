"""Matched-gain comparison: fronts, interpolation, paired bootstrap intervals, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.fronts import (at_gain, front_points, gain_levels, interior_best, matched_gain, task_gain,
                             verdict)


def _run(gain: float, forgetting: float, avg: float = 0.5, base=(0.5, 0.4, 0.2)) -> dict:
    k = len(base)
    acc = [[0.0] * k for _ in range(k)]
    for i, b in enumerate(base):
        acc[i][i] = b + gain
    return {"acc_matrix": acc, "base_acc": list(base), "metrics": {"forgetting": forgetting, "avg_acc": avg}}


def test_task_gain_is_the_mean_diagonal_rise_over_the_base():
    r = {"acc_matrix": [[0.7, 0.1], [0.2, 0.5]], "base_acc": [0.5, 0.4], "metrics": {}}
    assert task_gain(r) == pytest.approx(((0.7 - 0.5) + (0.5 - 0.4)) / 2)


def test_at_gain_interpolates_inside_the_front_and_refuses_to_extrapolate():
    g, v = np.array([0.1, 0.3]), np.array([1.0, 3.0])
    assert at_gain(g, v, 0.2) == pytest.approx(2.0)
    assert math.isnan(at_gain(g, v, 0.05)) and math.isnan(at_gain(g, v, 0.31))


def _two_paradigms(noise: float = 0.01, seeds=range(6)):
    rng = np.random.default_rng(1)
    runs = {"SFT": {}, "GRPO": {}}
    for lr, gain in ((1e-5, 0.1), (1e-4, 0.2), (1e-3, 0.3)):
        runs["SFT"][lr] = {s: _run(gain + rng.normal(0, noise), 2 * gain + rng.normal(0, noise)) for s in seeds}
    for lr, gain in ((1e-6, 0.05), (1e-5, 0.15), (1e-4, 0.25), (1e-3, 0.35)):
        runs["GRPO"][lr] = {s: _run(gain + rng.normal(0, noise), gain + rng.normal(0, noise)) for s in seeds}
    return runs


def test_matched_gain_reads_each_front_at_the_same_gain_with_paired_intervals():
    runs = _two_paradigms()
    levels = gain_levels(runs)
    # overlap of SFT [~0.1, ~0.3] and GRPO [~0.05, ~0.35] is SFT's range: levels inside it, interior
    assert len(levels) == 3 and 0.1 < levels[0] < levels[1] < levels[2] < 0.3
    rows = matched_gain(runs, ["forgetting"], levels, n_boot=400)
    by = {(r["who"], round(r["gain"], 6)): r for r in rows}
    for level in levels:
        sft, grpo = by[("SFT", round(level, 6))], by[("GRPO", round(level, 6))]
        diff = by[("SFT - GRPO", round(level, 6))]
        assert sft["estimate"] == pytest.approx(2 * level, abs=0.03)  # SFT: forgetting = 2 gain
        assert grpo["estimate"] == pytest.approx(level, abs=0.03)  # GRPO: forgetting = gain
        assert diff["estimate"] == pytest.approx(sft["estimate"] - grpo["estimate"])
        assert diff["lo"] <= diff["estimate"] <= diff["hi"] and diff["lo_adj"] <= diff["lo"]
        assert diff["lo_adj"] > 0 and diff["coverage"] > 0.95  # resolved: SFT forgets more at equal gain
        assert verdict(diff, lower_is_better=True).startswith("GRPO better (adjusted p")
        assert diff["tests"] == 3 and diff["n_seeds"] == 6 and diff["n_valid"] == 6
        # every seed's own difference points the same way: the exact test sits at its floor 2^(1-6) x 3 tests
        assert diff["p_exact_adj"] == pytest.approx(3 * 2 ** -5)
        assert "t-test only" in verdict(diff, lower_is_better=True)


def test_matched_gain_no_difference_when_the_fronts_coincide_and_none_without_overlap():
    runs = _two_paradigms(noise=0.05)
    for lr in runs["GRPO"]:  # GRPO now forgets like SFT: forgetting = 2 gain
        for r in runs["GRPO"][lr].values():
            r["metrics"]["forgetting"] = 2 * task_gain(r)
    for lr in runs["SFT"]:
        for r in runs["SFT"][lr].values():
            r["metrics"]["forgetting"] = 2 * task_gain(r)
    rows = matched_gain(runs, ["forgetting"], gain_levels(runs), n_boot=300)
    diffs = [r for r in rows if r["who"] == "SFT - GRPO"]
    assert all(abs(r["estimate"]) < 0.05 for r in diffs)
    assert all(verdict(r, True).startswith("no difference resolved") for r in diffs)
    far = {"A": {1e-4: {0: _run(0.1, 0.1)}, 1e-3: {0: _run(0.2, 0.2)}},
           "B": {1e-4: {0: _run(0.3, 0.1)}, 1e-3: {0: _run(0.4, 0.2)}}}
    assert gain_levels(far) == []


def test_matched_gain_uses_only_seeds_complete_in_every_cell_and_skips_null_metrics():
    runs = _two_paradigms(seeds=range(4))
    del runs["SFT"][1e-4][3]  # seed 3 failed at one learning rate: left out everywhere
    rows = matched_gain(runs, ["forgetting"], gain_levels(runs), n_boot=50)
    assert {r["n_seeds"] for r in rows} == {3}
    by_lr = {1e-4: {0: _run(0.1, 0.2), 1: _run(0.3, 0.4)}}
    by_lr[1e-4][1]["metrics"]["forgetting"] = None  # a null metric drops the run from both means
    g, v, _ = front_points(by_lr, "forgetting")
    assert g[0] == pytest.approx(0.1) and v[0] == pytest.approx(0.2)


def test_exact_sign_flip_and_paired_t_p_values():
    from analysis.fronts import paired_t_p, sign_flip_p

    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)  # all positive: the two extreme patterns of 8
    assert sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)
    from scipy import stats

    d = [0.3, 0.1, 0.2, 0.25, -0.05]
    assert paired_t_p(d) == pytest.approx(stats.ttest_rel(np.array(d) + 1.0, np.ones(5)).pvalue)


def test_front_points_average_the_chosen_seeds_with_repeats():
    by_lr = {1e-4: {0: _run(0.1, 0.2), 1: _run(0.3, 0.4)}}
    g, v, lrs = front_points(by_lr, "forgetting", [0, 0, 1])  # a bootstrap draw repeats seed 0
    assert lrs == [1e-4] and g[0] == pytest.approx((0.1 + 0.1 + 0.3) / 3) and v[0] == pytest.approx((0.2 + 0.2 + 0.4) / 3)


def test_interior_best_flags_a_best_point_at_the_end_of_the_grid():
    grid = {lr: {0: _run(0.1, 0.1, avg=a)} for lr, a in ((1e-5, 0.3), (1e-4, 0.5), (1e-3, 0.4))}
    assert interior_best(grid) == (1e-4, True)
    grid[1e-3][0]["metrics"]["avg_acc"] = 0.9
    assert interior_best(grid) == (1e-3, False)


def test_the_front_is_the_rising_branch_up_to_the_peak_gain():
    by_lr = {1e-5: {0: _run(0.05, 0.01)}, 1e-4: {0: _run(0.2, 0.1)}, 1e-3: {0: _run(0.1, 0.5)}}  # 1e-3 past the peak
    g, v, lrs = front_points(by_lr, "forgetting")
    assert lrs == [1e-5, 1e-4] and g.tolist() == pytest.approx([0.05, 0.2])
    assert front_points(by_lr, "forgetting", rising=False)[2] == [1e-5, 1e-3, 1e-4]  # sorted by gain
    # a matched reading at gain 0.1 uses the rising branch (interpolated 0.01 -> 0.1), not the collapsed 1e-3 point
    assert at_gain(g, v, 0.1) == pytest.approx(0.01 + (0.1 - 0.05) / 0.15 * 0.09)


def test_matched_within_seed_reads_each_seed_on_its_own_base_when_common_levels_miss_most_seeds():
    from scipy import stats

    from analysis.fronts import matched_within_seed

    # seed s's base learns (s + 1) times as much: a gain level common to every seed lies inside few seeds'
    # fronts, while each seed's own fronts still overlap; SFT forgets 2 x gain + .1, GRPO 1 x gain on every base;
    # each paradigm's largest lr collapses (gain below its peak), which the rising branch must drop
    rng = np.random.default_rng(3)
    runs = {"SFT": {}, "GRPO": {}}
    for lr, g in ((1e-5, 0.02), (1e-4, 0.05), (1e-3, 0.08)):
        runs["SFT"][lr] = {s: _run(g * (s + 1), 0.1 + 2 * g * (s + 1) + rng.normal(0, 0.002)) for s in range(5)}
    for lr, g in ((1e-6, 0.01), (1e-5, 0.04), (1e-4, 0.07)):
        runs["GRPO"][lr] = {s: _run(g * (s + 1), g * (s + 1) + rng.normal(0, 0.002)) for s in range(5)}
    runs["SFT"][1e-2] = {s: _run(0.03 * (s + 1), 0.9) for s in range(5)}
    runs["GRPO"][1e-3] = {s: _run(0.03 * (s + 1), 0.9) for s in range(5)}
    common = matched_gain(runs, ["forgetting"], gain_levels(runs), n_boot=50)
    assert max(r["n_valid"] for r in common if " - " in r["who"]) < 5
    rows = matched_within_seed(runs, ["forgetting", "avg_acc"], fractions=(0.25, 0.5))
    assert len(rows) == 4 and {r["tests"] for r in rows} == {4}
    by = {(r["metric"], r["fraction"]): r for r in rows}
    for f in (0.25, 0.5):
        row = by[("forgetting", f)]
        assert row["n_valid"] == 5
        for s, level in row["levels"].items():  # seed s's overlap is [0.02, 0.07] x (s + 1)
            assert level == pytest.approx((0.02 + f * 0.05) * (s + 1))
            assert row["per_seed"][s] == pytest.approx(0.1 + level, abs=0.01)  # .1 + 2 level - level
        assert row["levels"] == by[("avg_acc", f)]["levels"]  # one level per seed, whatever the metric
        d = np.array(list(row["per_seed"].values()))
        half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
        assert row["estimate"] == pytest.approx(d.mean())
        assert (row["lo"], row["hi"]) == pytest.approx((d.mean() - half, d.mean() + half))
        assert row["p"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
        assert row["p_adj"] == pytest.approx(min(1.0, 4 * row["p"]))
        assert row["lo"] > 0 and verdict(row, lower_is_better=True).startswith("GRPO better")
    assert by[("forgetting", 0.25)]["gain_min"] == pytest.approx(0.0325)
    # a seed whose fronts do not overlap is left out, not read by extrapolation; one seed gives no interval
    runs["GRPO"] = {lr: {**by_seed, 4: _run(1.0 + lr, 0.0)} for lr, by_seed in runs["GRPO"].items()}
    (row,) = matched_within_seed(runs, ["forgetting"], fractions=(0.5,))
    assert row["n_valid"] == 4 and 4 not in row["per_seed"]
    one = {p: {lr: {0: c[0]} for lr, c in by_lr.items()} for p, by_lr in runs.items()}
    (row,) = matched_within_seed(one, ["forgetting"], fractions=(0.5,))
    assert row["n_valid"] == 1 and math.isnan(row["lo"]) and math.isnan(row["p"])
    assert verdict(row, True).startswith("inconclusive")


def test_plot_fronts_by_seed_draws_one_panel_per_common_seed(tmp_path):
    import matplotlib.image as mpimg

    from analysis.fronts import plot_fronts_by_seed

    runs = _two_paradigms(seeds=range(3))
    path = plot_fronts_by_seed(runs, "forgetting", tmp_path / "by_seed.png", {0: 0.2, 1: 0.2, 2: 0.2})
    h, w = mpimg.imread(path).shape[:2]
    assert w > 2.5 * h  # three panels side by side
