"""Every benchmark script runs to the end at a tiny size and writes well-formed table rows, so a refactor
cannot break one unseen; ``scripts/bench.py`` gathers them into one table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "sft": ["--steps", "6", "--warmup", "2", "--repeats", "1", "--batch-size", "4"],
    "vlm_sft": ["--vision", "--steps", "6", "--warmup", "2", "--repeats", "1", "--batch-size", "4"],
    "replay": ["--steps", "6", "--warmup", "2", "--repeats", "1", "--batch-size", "4"],
    "rollouts": ["--repeats", "1"],
    "grpo": ["--steps", "3", "--warmup", "1", "--repeats", "1", "--kl", "0.01"],
    "eval": ["--n", "10", "--repeats", "1", "--skip-run", "experiment=smoke"],
    "scale": ["--sizes", "1m", "--steps", "2", "--warmup", "1", "--stream-lengths", "2,3", "--stream-steps", "3"],
    "sweep": ["--quick", "--steps-per-task", "3", "experiment=smoke", "eval.every_n_steps=null"],  # --quick + overrides
    "gpu": ["--device", "cpu", "--size", "1m", "--steps", "2", "--warmup", "1",
            "--variants", "eager,manual,fused_b32,manual_b32",
            "--repeats", "1", "--grpo-steps", "1", "--seq-len", "64"],  # its GPU code paths, on CPUs
}


def _check_rows(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        assert set(r) == {"benchmark", "ours", "reference", "ratio", "target", "met"}
        assert math.isfinite(r["ours"]) and r["ours"] > 0 and math.isfinite(r["reference"]) and r["reference"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"])
        assert r["met"] in ("met", "NOT met", "-") and (r["met"] == "-") == (r["target"] is None)


@pytest.mark.parametrize("name", list(TINY))
def test_each_benchmark_runs_to_the_end_at_a_tiny_size(name, tmp_path, cache_dir):
    if name == "grpo":
        pytest.importorskip("trl")
    out = tmp_path / "rows.json"
    script = name.removeprefix("vlm_")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"bench_{script}.py"), *TINY[name], "--rows", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    _check_rows(rows)
    assert "| benchmark" in proc.stdout  # the script prints its table too


def test_bench_gathers_the_tables_and_reports_a_failing_script(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench
        from benchlib import row, rows_markdown
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    calls = []

    def fake(name, quick, extra):
        calls.append((name, quick))
        if name == "grpo":
            return [], 0.1, "error: this benchmark compares against TRL: pip install trl"
        return [row(f"{name} thing", 3.0, 2.0, 1.5), row(f"{name} share", 0.3, 1.0, 0.2, lower_is_better=True)], 0.1, None

    monkeypatch.setattr(bench, "run_one", fake)
    out = tmp_path / "b.md"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--quick", "--only", "sft,grpo", "--write", str(out)])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 1 and calls == [("sft", True), ("grpo", True)]
    text = out.read_text()
    assert "python scripts/bench.py --quick --only sft,grpo" in text and "cores" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["benchmark", "ours", "reference", "ratio", "target", "met"]
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[1:]}
    assert body["sft thing"] == ["3", "2", "1.50", ">= 1.5", "met"]
    assert body["sft share"] == ["0.3", "1", "0.30", "<= 0.2", "NOT met"]
    assert any(k.startswith("bench_grpo.py FAILED: error: this benchmark compares against TRL") for k in body)
    assert rows_markdown([]).startswith("| benchmark")
    monkeypatch.setattr(sys, "argv", ["bench.py", "--only", "nope"])
    with pytest.raises(SystemExit, match="unknown nope"):
        bench.main()
