import json
import re
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
    assert "| m | 2 | +1.000 ± 0.000 |" in re.sub(r" {2,}", " ", table)


def test_pareto_plot_is_written(tmp_path):
    pts = [{"paradigm": p, "lr": lr, "new_acc": a, "forgetting": f}
           for p, lr, a, f in [("SFT", "1e-4", 0.7, 0.3), ("SFT", "3e-5", 0.6, 0.1), ("GRPO", "1e-4", 0.6, 0.05)]]
    path = plot_pareto(pts, tmp_path / "p.png", x="forgetting", y="new_acc", x_better="low")
    assert path.stat().st_size > 1000


def test_a_failing_job_does_not_stop_the_sweep_and_its_point_is_marked(tmp_path, cache_dir):
    from analysis.aggregate import completed_results, mark_failed
    from analysis.sweep import run_sweep

    out = tmp_path / "point"
    failed = run_sweep(out, "smoke", [0], ["stream.steps_per_task=-1,3", "shift=none", "logger=none"])
    assert len(failed) == 1 and failed[0]["status"].startswith("failed: ConfigError: stream.steps_per_task")
    assert len(completed_results(out)) == 1  # the other job of the same multirun ran to the end
    assert mark_failed("SFT", out).startswith("SFT [FAILED 1 job(s): ConfigError: stream.steps_per_task")
    assert mark_failed("SFT", out / "nothing-here") == "SFT"
