import json
import math

import pytest

from analysis.aggregate import completed_results, markdown_table, mean_ci, summarise, t95
from analysis.plots import plot_pareto


def test_mean_ci_by_hand():
    mean, sd, ci = mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert sd == pytest.approx(0.1)
    assert ci == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    m1, sd1, ci1 = mean_ci([0.5])
    assert m1 == 0.5 and math.isnan(sd1) and math.isnan(ci1)
    assert t95(100) == 1.96 and t95(12) == t95(10)


def test_completed_results_skip_failed_and_broken(tmp_path):
    for name, status in (("a", "completed"), ("b", "failed: boom"), ("c", "completed")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"status": status, "metrics": {"x": 1.0}}))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.json").write_text("{not json")
    runs = completed_results(tmp_path)
    assert [r["dir"].rsplit("/", 1)[-1] for r in runs] == ["a", "c"]
    table = markdown_table({"m": summarise(runs, ["x"])}, ["x"])
    assert "| m | 2 | +1.000 ± 0.000 |" in table


def test_pareto_plot_is_written(tmp_path):
    pts = [{"paradigm": p, "lr": lr, "new_acc": a, "forgetting": f}
           for p, lr, a, f in [("SFT", "1e-4", 0.7, 0.3), ("SFT", "3e-5", 0.6, 0.1), ("GRPO", "1e-4", 0.6, 0.05)]]
    path = plot_pareto(pts, tmp_path / "p.png", x="forgetting", y="new_acc", x_better="low")
    assert path.stat().st_size > 1000
