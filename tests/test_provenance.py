"""The same command, the same inputs: a rerun into a directory that holds a run made from other inputs is
refused and leaves the directory as it was; results.json records what produced it; run.log keeps the
console."""

import json
from pathlib import Path

from cl.results import fingerprint_diff, input_fingerprint
from tests.conftest import run_cli

SHORT = ("experiment=smoke", "stream.steps_per_task=3", "eval.every_n_steps=null", "shift=none",
         "logger=none")


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _user_task(path: Path, rows: int, offset: int = 0) -> str:
    path.write_text("".join(json.dumps({"prompt": f"Q{i + offset}", "answer": str((i + offset) % 10)}) + "\n"
                            for i in range(rows)))
    return f"stream.tasks=[sub2,{{name: mine, train: {path}}}]"


def test_edited_user_data_is_refused_and_the_directory_kept(tmp_path, cache_dir):
    data, out = tmp_path / "mine.jsonl", tmp_path / "run"
    task = _user_task(data, 40)
    first = run_cli(*SHORT, task, f"hydra.run.dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["provenance"]["fingerprint"]["data_files"][str(data)] != "missing"
    before = _snapshot(out)

    _user_task(data, 40, offset=1)  # the same command, the file edited
    second = run_cli(*SHORT, task, f"hydra.run.dir={out}")
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"data file {data} changed" in errors[0] and "resume=never" in errors[0], second.stderr
    assert "already completed" not in second.stdout
    assert _snapshot(out) == before


def test_other_overrides_into_a_completed_runs_directory_are_refused(tmp_path, cache_dir):
    out = tmp_path / "run"
    first = run_cli(*SHORT, f"hydra.run.dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(out)
    assert ".hydra/overrides.yaml" in before and "run.log" in before

    second = run_cli(*SHORT, "optimizer.lr=3e-4", f"hydra.run.dir={out}")
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optimizer.lr: 0.001 -> 0.0003" in errors[0], second.stderr
    assert _snapshot(out) == before, "a refused rerun must leave the directory byte-identical"

    same = run_cli(*SHORT, f"hydra.run.dir={out}")  # the same command: skipped as before
    assert same.returncode == 0 and "already completed" in same.stdout
    over = run_cli(*SHORT, "optimizer.lr=3e-4", "resume=never", f"hydra.run.dir={out}")
    assert over.returncode == 0, over.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["config"]["optimizer"]["lr"] == 3e-4


def test_results_record_machine_versions_and_a_timestamped_run_log(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = run_cli(*SHORT, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    prov = json.loads((out / "results.json").read_text())["provenance"]
    m = prov["machine"]
    assert m["torch_threads"] >= 1 and isinstance(m["isa"], list) and m["cores"] >= 1
    assert prov["packages"]["torch"] and set(prov["fingerprint"]) == {"config_sha256", "data_files", "base_model", "code"}
    assert prov["fingerprint"]["base_model"].startswith("base-")
    log = (out / "run.log").read_text().splitlines()
    assert any("Accuracy matrix" in line for line in log) and any("avg_acc" in line for line in log)
    assert all(line[:4].isdigit() and line[10] == " " for line in log), log[:3]  # "YYYY-MM-DD HH:MM:SS ..."
    base = json.loads((out / "results.json").read_text())["base_model"]
    assert "health" in base and isinstance(base["health"]["ok"], bool)


def test_fingerprint_diff_names_what_changed():
    cfg = {"optimizer": {"lr": 1e-4}, "seed": 0, "logger": {"kind": "none"}}
    a = input_fingerprint(cfg, "base-x")
    assert fingerprint_diff(a, cfg, input_fingerprint(cfg, "base-x"), cfg) == []
    other_logger = {**cfg, "logger": {"kind": "wandb"}}  # where a run logs does not change its results
    assert fingerprint_diff(a, cfg, input_fingerprint(other_logger, "base-x"), other_logger) == []
    lr = {**cfg, "optimizer": {"lr": 3e-4}}
    assert fingerprint_diff(a, cfg, input_fingerprint(lr, "base-x"), lr) == ["config (optimizer.lr: 0.0001 -> 0.0003)"]
    assert fingerprint_diff(a, cfg, input_fingerprint(cfg, "base-y"), cfg) == ["base model (base-x -> base-y)"]
