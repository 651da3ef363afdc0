import numpy as np
import pytest

from analysis.curve_metrics import curve_metrics, stability_gaps
from analysis.metrics import (avg_acc, bwt, forgetting, forgetting_curve, forgetting_per_task, fwt,
                              general_retention, matrix_metrics, new_acc)

R = [[0.9, 0.1, 0.2],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.7]]
B = [0.1, 0.2, 0.25]


def test_matrix_metrics_by_hand():
    assert avg_acc(R) == pytest.approx((0.5 + 0.7 + 0.7) / 3)
    assert new_acc(R) == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert bwt(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert fwt(R, B) == pytest.approx(((0.1 - 0.2) + (0.3 - 0.25)) / 2)
    assert forgetting_per_task(R) == pytest.approx([0.9 - 0.5, 0.8 - 0.7])
    assert forgetting(R) == pytest.approx(0.25)
    assert forgetting_curve(R) == pytest.approx([0.0, 0.3, 0.25])


def test_forgetting_uses_the_best_earlier_value_not_the_diagonal():
    # task 0 improves after task 1 (backward transfer) and then drops: f uses the max (0.95).
    M = [[0.5, 0.0], [0.95, 0.9]]
    M3 = [[0.5, 0.0, 0.0], [0.95, 0.9, 0.0], [0.6, 0.9, 0.8]]
    assert forgetting_per_task(M) == pytest.approx([0.5 - 0.95])
    assert forgetting_per_task(M3) == pytest.approx([0.35, 0.0])


def test_general_retention_and_single_task_edge_cases():
    assert general_retention([[0.9, 0.5], [0.8, 0.3]], [1.0, 0.6]) == pytest.approx(((0.8 - 1.0) + (0.3 - 0.6)) / 2)
    one = matrix_metrics([[0.7]], [0.2], [[0.9]], [1.0])
    assert one["bwt"] == 0.0 and one["forgetting"] == 0.0 and one["fwt"] == 0.0
    assert one["general_retention"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="square"):
        avg_acc([[0.1, 0.2]])


def _curves(series: dict[str, list[tuple[int, float]]], items: int = 200):
    return [{"global_iter": n, "eval_task": t, "kind": "stream", "acc": a, "n": items} for t, s in series.items()
            for n, a in s]


def test_stability_gap_depth_and_recovery_on_a_hand_built_curve():
    # task a learned in [0, 10]; task b in (10, 20]. a dips from 0.9 to 0.4 at 12, back to 0.9 at 16.
    a = [(0, 0.1), (5, 0.6), (10, 0.9), (12, 0.4), (14, 0.7), (16, 0.9), (18, 0.88), (20, 0.85)]
    b = [(0, 0.0), (10, 0.1), (12, 0.3), (14, 0.5), (16, 0.7), (18, 0.8), (20, 0.9)]
    curves = _curves({"a": a, "b": b})
    gaps = stability_gaps(curves, ["a", "b"], [10, 20])
    se_pre, se_min = (0.9 * 0.1 / 200) ** 0.5, (0.4 * 0.6 / 200) ** 0.5
    assert gaps == [{"task": "a", "boundary_task": "b", "depth": pytest.approx(0.5),
                     "depth_se": pytest.approx((se_pre ** 2 + se_min ** 2) ** 0.5), "significant": True,
                     "n_items": 200, "tolerance": pytest.approx(1.96 * 2 ** 0.5 * se_pre), "recovery_iters": 6}]
    m = curve_metrics(curves, ["a", "b"], [10, 20], windows=(1, 2, 5, 100))
    assert m["min_acc"] == pytest.approx(0.4)
    assert m["wc_acc"] == pytest.approx(0.9 / 2 + 0.4 / 2)
    assert m["stability_gap"] == pytest.approx(0.5)
    # WF^2 over a after its end: consecutive drops 0.5, 0.02, 0.03 -> 0.5; b has one point after its end.
    assert m["wf_2"] == pytest.approx(0.5)
    # windows are training iterations (De Lange et al. 2023), not evaluation counts: WP^2 sees no pair of
    # a's points (5 iterations apart) and b's rises of 0.2 per 2 iterations; WP^5 sees a's 0.5 (0 -> 5)
    # and b's 0.4 (0.1 -> 0.5 over 10 -> 14)
    assert m["wp_2"] == pytest.approx(0.2)
    assert m["wp_5"] == pytest.approx((0.5 + 0.4) / 2)
    # a window below the evaluation spacing measures nothing: NaN (null in results.json), not 0
    assert np.isnan(m["wf_1"]) and np.isnan(m["wp_1"])
    assert m["lca"] == pytest.approx((((0.1 + 0.6 + 0.9) / 3) + ((0.1 + 0.3 + 0.5 + 0.7 + 0.8 + 0.9) / 6)) / 2)


def test_no_recovery_is_reported_as_none():
    a = [(10, 0.9), (15, 0.5), (20, 0.6)]
    b = [(10, 0.0), (15, 0.5), (20, 0.8)]
    gaps = stability_gaps(_curves({"a": a, "b": b}), ["a", "b"], [10, 20])
    assert gaps[0]["recovery_iters"] is None and gaps[0]["depth"] == pytest.approx(0.4)


def test_recovery_counts_only_points_after_the_dip():
    # the first point inside task b is still at the pre-boundary level; the dip comes later and stays
    a = [(10, 0.9), (12, 0.9), (14, 0.3), (16, 0.35), (20, 0.4)]
    b = [(10, 0.0), (12, 0.2), (14, 0.4), (16, 0.6), (20, 0.8)]
    gap = stability_gaps(_curves({"a": a, "b": b}), ["a", "b"], [10, 20])[0]
    assert gap["depth"] == pytest.approx(0.6) and gap["recovery_iters"] is None  # not 2 (the pre-dip point)
    flat = [(10, 0.9), (12, 0.89), (20, 0.9)]  # a dip within the noise needs no recovery
    assert stability_gaps(_curves({"a": flat, "b": b}), ["a", "b"], [10, 20])[0]["recovery_iters"] == 0


def test_stability_gap_compares_the_same_items_before_and_inside_a_task():
    # boundary points score 200 items, inner points a 40-item prefix; the boundary rows carry their
    # accuracy on that prefix (acc_at), which is what the inner values are compared with
    rows = [{"global_iter": 10, "eval_task": "a", "kind": "stream", "acc": 0.9, "n": 200, "boundary": True,
             "acc_at": {"40": 0.8}},
            {"global_iter": 15, "eval_task": "a", "kind": "stream", "acc": 0.75, "n": 40, "boundary": False},
            {"global_iter": 20, "eval_task": "a", "kind": "stream", "acc": 0.88, "n": 200, "boundary": True,
             "acc_at": {"40": 0.825}}]
    gap = stability_gaps(rows, ["a", "b"], [10, 20])[0]
    assert gap["n_items"] == 40 and gap["depth"] == pytest.approx(0.8 - 0.75)  # not 0.9 - 0.75 (unlike items)
    # 0.05 on 40 items is within the noise: not significant, and no recovery is needed (0)
    assert not gap["significant"] and gap["tolerance"] == pytest.approx(1.96 * 2 ** 0.5 * (0.8 * 0.2 / 40) ** 0.5)
    assert gap["recovery_iters"] == 0


def test_forgetting_counts_only_rows_after_the_task_was_trained():
    # task 1 was known before it was trained (0.9 after task 0, transfer) and reached only 0.6 by its own
    # training: forgetting after task 2 is 0.6 - 0.3 (rows l >= j), not 0.9 - 0.3 (Chaudhry's l < k)
    R3 = [[0.8, 0.9, 0.0],
          [0.7, 0.6, 0.0],
          [0.7, 0.3, 0.5]]
    assert forgetting_per_task(R3) == pytest.approx([0.8 - 0.7, 0.6 - 0.3])
    chaudhry = [max(R3[l][j] for l in range(2)) - R3[2][j] for j in range(2)]
    assert chaudhry[1] == pytest.approx(0.6) and forgetting_per_task(R3)[1] != pytest.approx(chaudhry[1])


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, float("inf")])
def test_metrics_refuse_values_that_are_not_accuracies(bad):
    M = [[0.5, 0.2], [0.4, bad]]
    with pytest.raises(ValueError, match=r"accuracy matrix: entry \(1, 1\) is .*must be finite numbers in \[0, 1\]"):
        matrix_metrics(M, [0.1, 0.2])
    with pytest.raises(ValueError, match="base accuracies: entry 1"):
        fwt([[0.5, 0.2], [0.4, 0.3]], [0.1, bad])
    with pytest.raises(ValueError, match="general accuracy matrix"):
        general_retention([[0.5], [bad]], [0.4])


def test_results_files_are_strict_json_with_the_reason_for_each_null(tmp_path):
    import json

    from cl.results import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"metrics": {"min_acc": float("nan"), "x": [1.0, float("inf")]}, "a": 1})
    text = (tmp_path / "r.json").read_text()
    res = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON literal {c}"))
    assert res["metrics"] == {"min_acc": None, "x": [1.0, None]} and res["a"] == 1
    assert "stream of >= 2 tasks" in res["null_values"]["metrics.min_acc"]
    assert res["null_values"]["metrics.x[1]"] == "not a finite number (inf)"
