"""W&B mirrors the local files; a W&B failure is a warning, never a stopped run."""

import json
import logging
import shutil
import subprocess
from pathlib import Path


from cl.run import run
from cl.tracking import SafeWandbLogger
from tests.conftest import compose_cfg, run_cli

SMALL = ("experiment=smoke", "stream.steps_per_task=10")


def test_offline_run_reaches_wandb_with_global_iter_and_matrix_table(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = run_cli(*SMALL, "logger=wandb_offline", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    leet = shutil.which("wandb", path=str(Path(__import__("sys").executable).parent)) or "wandb"
    dump = subprocess.run([leet, "leet", "inspect", "--json", str(runs[0])], capture_output=True, text=True,
                          timeout=120)
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout
    assert '"cl/global_iter"' in text
    assert "eval/stream/sub2" in text and "train/loss" in text
    assert "acc_matrix" in text


def test_safe_logger_turns_failures_into_one_warning(tmp_path, caplog):
    logger = SafeWandbLogger(project="t", save_dir=str(tmp_path), offline=True, mode="offline")

    class Broken:
        def log(self, *_a, **_k):
            raise ConnectionError("service down")

    logger._experiment = Broken()
    with caplog.at_level(logging.WARNING):
        logger.log({"a": 1})
        logger.log({"a": 2})
    assert logger.broken
    assert sum("W&B log failed" in r.getMessage() for r in caplog.records) == 1


def test_wandb_init_failure_does_not_stop_the_run(tmp_path, cache_dir, monkeypatch):
    import wandb

    def boom(*_a, **_k):
        raise RuntimeError("wandb init exploded")

    monkeypatch.setattr(wandb, "init", boom)
    cfg = compose_cfg(*SMALL, "logger=wandb_offline", f"cache_dir={cache_dir}")
    res = run(cfg, tmp_path / "run")
    assert res["status"] == "completed"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "completed"


def test_each_multirun_job_gets_its_own_wandb_run(tmp_path, cache_dir):
    proc = run_cli("-m", *SMALL, "logger=wandb_offline", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].name != runs[1].name
