"""trainer=fsdp (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes (gloo), distributed
resume, and the checks that keep sharded training honest."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

import pytest
from omegaconf import OmegaConf

from cl import checkpoint as ck
from tests.conftest import ROOT, compose_cfg, run_cli

sys.path.insert(0, str(ROOT / "scripts"))
import resume_check  # noqa: E402


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final_model" / "model.safetensors"))


def test_fsdp_cpu_shards_and_matches_the_single_process_run(tmp_path, cache_dir, monkeypatch):
    """Each of the 2 ranks holds half of the parameters while training; the run's accuracy matrices are
    within 0.06 of the single-process run's (3 of 50 eval items, the DDP test's tolerance) and its final
    weights within 1e-4 (measured: 5e-6, float reduction order)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    args = ("experiment=smoke", "save_final_model=true")
    assert run_cli(*args, f"hydra.run.dir={single}").returncode == 0
    proc = run_cli(*args, "trainer=fsdp_cpu", f"hydra.run.dir={fsdp}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[fsdp] rank 0: holds 50.0% of the parameters" in proc.stdout
    assert "[fsdp] rank 1: holds 50.0% of the parameters" in (fsdp / ".rank1" / "stdout.log").read_text()
    a, b = (json.loads((d / "results.json").read_text()) for d in (single, fsdp))
    assert b["status"] == "completed" and b["metrics"]["compute"]["optimizer_steps"] == 60
    for key in ("acc_matrix", "general_matrix"):
        for ra, rb in zip(a[key], b[key], strict=True):
            assert all(abs(x - y) <= 0.06 for x, y in zip(ra, rb, strict=True)), (key, a[key], b[key])
    wa, wb = _weights(single), _weights(fsdp)
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    moved = max(float(v.abs().max()) for v in wa.values())
    assert diff <= 1e-4 < moved, diff


GRPO2 = ("experiment=smoke", "stream.tasks=[sub2,mul21,add3]", "objective=grpo", "objective.group_size=4",
             "objective.kl_coef=0.05", "objective.ppo_epochs=2", "stream.steps_per_task=16", "stream.batch_size=4",
             "eval.every_n_steps=5", "checkpoint.every_n_steps=3", "replay=er",
             "train.reset_optimizer_per_task=false")


@pytest.mark.parametrize("trainer", ["fsdp_cpu", pytest.param("ddp_cpu", marks=pytest.mark.slow)])
def test_distributed_run_killed_inside_a_task_resumes_to_the_uninterrupted_result(tmp_path, cache_dir, monkeypatch,
                                                                                   trainer):
    """GRPO with a KL reference, 2 PPO epochs, replay, in-task evaluation and an optimizer carried across
    tasks, on 2 ranks: SIGKILL of the whole job inside a task, with rank 1 set one checkpoint behind rank 0
    (a kill between the ranks' writes), rerun of the same command -> identical matrices, curves and token
    counts. Covers the per-rank optimizer shards and the RNG states
    restored after the strategy re-seeds its processes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = (*GRPO2, f"trainer={trainer}")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = run_cli(*args, f"hydra.run.dir={whole}", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rng = random.Random()
    for _ in range(6):  # a kill that lands inside a task (not on a boundary checkpoint)
        shutil.rmtree(resumed, ignore_errors=True)
        where = resume_check.kill_midway(args, resumed, rng, checkpoints=2)
        ranks = ck.positions(resumed), ck.positions(resumed / ".rank1")
        if len(ranks[1]) == 2 and ranks[0].keys() == ranks[1].keys() and min(ranks[1])[1] != 0:
            break
    else:
        pytest.fail(f"no kill left both ranks with two checkpoints inside a task; last: {where}")
    # as if the job had been killed between the ranks' writes of the newest checkpoint: rank 1 one behind
    r1 = resumed / ".rank1" / ck.CKPT_DIR
    shutil.rmtree(r1 / "last")
    os.replace(r1 / "prev", r1 / "last")
    where += f"; rank 1 set back to task {min(ranks[1])[0] + 1} step {min(ranks[1])[1]}"
    # both ranks resume from there: rank 0 from its ``prev``, rank 1 from its own state with rank 0's weights
    assert ck.latest_common(resumed, 0, 2) == resumed / ck.CKPT_DIR / "prev"
    rank1 = ck.latest_common(resumed / ".rank1", 1, 2)
    assert (rank1 / "state.pt").is_file() and not (rank1 / "model.safetensors").exists()
    assert ck.rank0_weights(rank1) == resumed / ck.CKPT_DIR / "prev"
    proc = run_cli(*args, f"hydra.run.dir={resumed}", timeout=600)
    assert proc.returncode == 0, where + proc.stderr[-3000:]
    assert "[resume]" in proc.stdout, where
    assert resume_check.compare(whole, resumed) == [], where
    assert json.loads((whole / "results.json").read_text())["metrics"]["compute"]["tokens_generated"] > 0


def _fake_ckpt(run_dir, name, task_idx, step):
    d = run_dir / ck.CKPT_DIR / name
    d.mkdir(parents=True)
    if not run_dir.name.startswith(".rank"):  # ranks > 0 write no weights
        (d / "model.safetensors").write_bytes(b"x")
    (d / "state.pt").write_bytes(b"x")
    (d / ck.POSITION).write_text(json.dumps({"task_idx": task_idx, "step_in_task": step, "global_iter": 0}))


def test_ranks_resume_from_the_newest_checkpoint_they_all_have(tmp_path):
    """A job killed between two ranks' writes: rank 0 got to step 9, rank 1 only to step 6."""
    r0, r1 = tmp_path, tmp_path / ".rank1"
    _fake_ckpt(r0, "prev", 1, 6)
    _fake_ckpt(r0, "last", 1, 9)
    _fake_ckpt(r1, "prev", 1, 3)
    _fake_ckpt(r1, "last", 1, 6)
    assert ck.latest_common(r0, 0, 2) == r0 / ck.CKPT_DIR / "prev"
    assert ck.latest_common(r1, 1, 2) == r1 / ck.CKPT_DIR / "last"
    assert ck.rank0_weights(r1 / ck.CKPT_DIR / "last") == r0 / ck.CKPT_DIR / "prev"
    with pytest.raises(ck.CheckpointError, match="rank 0 holds no weights"):  # rank 0 has moved past step 3
        ck.rank0_weights(r1 / ck.CKPT_DIR / "prev")
    (r0 / ck.CKPT_DIR / "prev" / "model.safetensors").unlink()  # rank 0's state without its weights: not common
    assert ck.latest_common(r1, 1, 2) is None
    shutil.rmtree(r1 / ck.CKPT_DIR)  # a rank without checkpoints: every rank starts over
    assert ck.latest_common(r0, 0, 2) is None


@pytest.mark.parametrize("override", ["regularizer=l2", "regularizer=ewc", "averaging=ema", "meta=reptile",
                                      "meta=kfpf", "adapter=reglora"])
def test_fsdp_refuses_components_that_touch_parameters_inside_the_step(override):
    from cl.validate import ConfigError, validate_config

    key = "adapter.name" if override.startswith("adapter") else override.replace("=", ".")
    cfg = OmegaConf.to_container(compose_cfg("trainer=fsdp_cpu", override), resolve=True)
    with pytest.raises(ConfigError, match=rf"{key}: .*trainer=fsdp holds only shards"):
        validate_config(cfg)
    validate_config(OmegaConf.to_container(compose_cfg("trainer=ddp_cpu", override), resolve=True))


def test_fsdp_presets_compose():
    from cl.dist import world_size
    from cl.fsdp import is_fsdp

    cpu, gpu = (dict(compose_cfg(f"trainer={t}").trainer) for t in ("fsdp_cpu", "fsdp"))
    assert is_fsdp(cpu) and is_fsdp(gpu) and world_size(cpu) == 2
    assert gpu["precision"] == "bf16-mixed" and gpu["accelerator"] == "gpu"
