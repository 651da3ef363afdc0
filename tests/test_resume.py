"""Resume after a crash: SIGKILL parity, atomic checkpoints, safe loading, non-finite losses, W&B faults."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cl import checkpoint as ck
from cl.run import run
from tests.conftest import ROOT, compose_cfg, run_cli

sys.path.insert(0, str(ROOT / "scripts"))
import resume_check  # noqa: E402
from cl.core.components import Component

# Bitwise parity at the default threads (all cores).
SFT3 = ("experiment=smoke", "stream.tasks=[sub2,mul21,add3]", "stream.steps_per_task=60", "eval.every_n_steps=10",
        "checkpoint.every_n_steps=7", "replay=derpp", "regularizer=agem")
GRPO3 = ("experiment=smoke", "stream.tasks=[sub2,mul21,add3]", "objective=grpo", "objective.group_size=4",
         "objective.kl_coef=0.05", "objective.ppo_epochs=2", "stream.steps_per_task=16", "stream.batch_size=4",
         "eval.every_n_steps=5", "checkpoint.every_n_steps=3", "replay=er", "regularizer=ewc", "regularizer.ewc.coef=10")


@pytest.mark.parametrize("args", [SFT3, GRPO3], ids=["sft", "grpo"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, cache_dir, args):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = run_cli(*args, f"hydra.run.dir={whole}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    where = resume_check.kill_midway(args, resumed, random.Random())
    assert json.loads((resumed / "results.json").read_text())["status"] == "running", where
    proc = run_cli(*args, f"hydra.run.dir={resumed}")  # the same command
    assert proc.returncode == 0, where + proc.stderr[-3000:]
    assert "[resume]" in proc.stdout, where
    assert resume_check.compare(whole, resumed) == [], where
    a = json.loads((whole / "results.json").read_text())
    assert len(a["acc_matrix"]) == 3 and a["metrics"]["compute"]["optimizer_steps"] > 0
    if "objective=grpo" in args:
        assert a["metrics"]["compute"]["tokens_generated"] > 0
    assert not (resumed / "checkpoints").exists(), "checkpoints are removed once results are complete"


def test_completed_run_is_skipped_when_the_command_is_repeated(tmp_path, cache_dir):
    out = tmp_path / "run"
    args = ("experiment=smoke", "stream.steps_per_task=5", f"hydra.run.dir={out}")
    assert run_cli(*args).returncode == 0
    before = (out / "results.json").read_text()
    proc = run_cli(*args)
    assert proc.returncode == 0 and "already completed" in proc.stdout
    assert (out / "results.json").read_text() == before


def test_same_command_maps_to_the_same_directory_and_different_ones_do_not_collide():
    a = ck.run_key(["optimizer.lr=0.001", "seed=1"])
    assert a == ck.run_key(["seed=1", "optimizer.lr=0.001"])  # order on the command line does not matter
    assert a.startswith("seed=1,optimizer.lr=0.001-")  # experiment/objective/seed first
    assert ck.run_key(["seed=1"]) != ck.run_key(["seed=2"])
    assert ck.run_key(["seed=1", "resume=never", "logger=none", "checkpoint.every_n_steps=5"]) == ck.run_key(["seed=1"])
    assert ck.run_key(["x=" + "a" * 300]) != ck.run_key(["x=" + "a" * 299 + "b"])  # long names: the hash decides
    assert "/" not in ck.run_key(["model.name_or_path=/data/m"])
    assert ck.run_key([]).startswith("default-")


def _linear_ckpt(run_dir: Path, value: float) -> None:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, value)
    ck.save(run_dir, model, {"value": value, "rng": ck.rng_state()})


def test_crash_during_a_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    _linear_ckpt(tmp_path, 1.0)
    _linear_ckpt(tmp_path, 2.0)
    root = tmp_path / ck.CKPT_DIR
    assert sorted(p.name for p in root.iterdir()) == ["last"]  # the replaced one is renamed away, then deleted
    # killed while writing the next one: a partial temporary directory next to an intact ``last``
    (root / "tmp-999").mkdir()
    (root / "tmp-999" / "model.safetensors").write_bytes(b"partial")
    assert ck.latest(tmp_path) == root / "last" and ck.load_state(root / "last")["value"] == 2.0
    # killed between the two renames: ``last`` moved to ``prev``, the new one not yet in place
    os.replace(root / "last", root / "prev")
    assert ck.latest(tmp_path) == root / "prev"
    model = torch.nn.Linear(2, 2)
    ck.load_model_weights(ck.latest(tmp_path), model)
    assert torch.all(model.weight == 2.0)


def test_checkpoint_state_is_loaded_with_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _linear_ckpt(tmp_path, 1.0)
    torch.save({"evil": Payload()}, tmp_path / ck.CKPT_DIR / "last" / "state.pt")
    with pytest.raises(ck.CheckpointError, match="cannot be read as a checkpoint"):
        ck.load_state(tmp_path / ck.CKPT_DIR / "last")


def test_rng_state_round_trip():
    import numpy as np

    state = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_component_state_capture_restores_modules_generators_and_buffers():
    from replay.buffers import ReservoirBuffer

    class Comp(Component):
        ckpt_attrs = ("teacher", "gen", "rng", "buffer", "anchor", "count")

    template = torch.nn.Linear(3, 3)
    c = Comp()
    c.teacher, c.gen, c.rng = torch.nn.Linear(3, 3), torch.Generator().manual_seed(5), random.Random(7)
    c.buffer, c.anchor, c.count = ReservoirBuffer(4, seed=1), {"w": torch.ones(2)}, 3
    c.buffer.add([{"prompt": str(i), "answer": "x", "task": "t"} for i in range(10)])
    saved = ck.component_states([c])
    d = Comp()
    d.teacher, d.gen, d.rng, d.buffer, d.anchor, d.count = None, torch.Generator(), random.Random(), ReservoirBuffer(4, seed=9), None, 0
    ck.load_component_states([d], saved, template)
    assert torch.equal(d.teacher.weight, c.teacher.weight) and not d.teacher.weight.requires_grad
    assert torch.equal(torch.rand(2, generator=d.gen), torch.rand(2, generator=c.gen))
    assert d.rng.random() == c.rng.random()
    assert d.buffer.items == c.buffer.items and d.count == 3 and torch.equal(d.anchor["w"], torch.ones(2))


def test_incompatible_checkpoint_names_the_differing_field(tmp_path, cache_dir):
    out = tmp_path / "run"
    args = ("experiment=smoke", "stream.steps_per_task=5", f"hydra.run.dir={out}", "checkpoint.keep_after_completion=true")
    assert run_cli(*args).returncode == 0
    res = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps({**res, "status": "running"}))  # as if interrupted
    proc = run_cli(*args, "optimizer.lr=0.002")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds an interrupted run made from other inputs: config (optimizer.lr: 0.001 -> 0.002)" in errors[0]
    assert "resume=never" in errors[0]
    # a checkpoint whose run recorded no fingerprint is still checked field by field when it is loaded
    res = json.loads((out / "results.json").read_text())
    del res["provenance"]["fingerprint"]
    (out / "results.json").write_text(json.dumps(res))
    proc = run_cli(*args, "optimizer.lr=0.002")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "checkpoint from an incompatible config: optimizer.lr (checkpoint 0.001, now 0.002)" in errors[0]


def test_a_second_copy_of_a_running_command_stops_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with ck.RunLock(out):  # held (by this process: another open file, as a second run would hold)
        assert f"process {os.getpid()} on" in (out / ".lock.owner").read_text()
        with pytest.raises(ck.CheckpointError, match=rf"in use by process {os.getpid()} on "):
            run(compose_cfg("experiment=smoke"), out)
    assert not (out / ".lock.owner").exists()  # released (.lock itself stays: unlinking it is racy)
    (out / ".lock").write_text("left by a killed run")  # an unlocked file: nothing holds it
    with ck.RunLock(out):
        pass


@pytest.fixture
def smoke_base(cache_dir, tmp_path):
    """The smoke experiment's base model, built (or found in the cache) before a test patches training: a patch
    keyed on the step count would otherwise hit the base stage when this test runs alone."""
    from tests.conftest import base_model

    base_model(compose_cfg("experiment=smoke", f"cache_dir={cache_dir}"), tmp_path / "base")


def _nan_at(monkeypatch, iters: set[int]):
    from cl.objectives.sft import SFTObjective

    real = SFTObjective.step

    def step(self, module, batch):
        loss, logs = real(self, module, batch)
        if module.global_iter + 1 in iters:
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(SFTObjective, "step", step)


def test_nonfinite_loss_stops_with_partial_results_and_keeps_the_last_checkpoint(tmp_path, cache_dir, smoke_base,
                                                                                   monkeypatch):
    _nan_at(monkeypatch, {38})  # task 2, step 8
    out = tmp_path / "run"
    cfg = compose_cfg("experiment=smoke", f"cache_dir={cache_dir}", "checkpoint.every_n_steps=5")
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at task 2 step 8 \(global_iter 38\)"):
        run(cfg, out)
    res = json.loads((out / "results.json").read_text())
    assert res["status"].startswith("failed: FloatingPointError: non-finite loss")
    assert res["completed_tasks"] == 1 and len(res["acc_matrix"]) == 1
    state = ck.load_state(ck.latest(out))
    assert (state["task_idx"], state["step_in_task"]) == (1, 5)  # the last good point before the fault
    # the same run resumed from that checkpoint with the bad batch skipped
    res = run(compose_cfg("experiment=smoke", f"cache_dir={cache_dir}", "checkpoint.every_n_steps=5",
                          "train.nonfinite=skip"), out)
    assert res["status"] == "completed" and res["resumed_from"] == {"task_idx": 1, "step_in_task": 5}
    assert res["metrics"]["compute"]["skipped_nonfinite_steps"] == 1


def test_nonfinite_loss_can_skip_the_batch_and_count_it(tmp_path, cache_dir, smoke_base, monkeypatch):
    _nan_at(monkeypatch, {3, 40})
    cfg = compose_cfg("experiment=smoke", f"cache_dir={cache_dir}", "train.nonfinite=skip")
    res = run(cfg, tmp_path / "run")
    assert res["status"] == "completed"
    assert res["metrics"]["compute"]["skipped_nonfinite_steps"] == 2
    assert res["metrics"]["compute"]["optimizer_steps"] == 60


def test_nan_from_a_user_verifier_stops_a_grpo_run_naming_the_task(tmp_path, cache_dir):
    from tasks.base import VerifierError

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(60)))
    task = f"{{name: qa, train: {data}, verifier: function, function: 'tests.helpers:nan_verifier'}}"
    cfg = compose_cfg("experiment=smoke", f"cache_dir={cache_dir}", "objective=grpo", "objective.group_size=2",
                      "stream.steps_per_task=3", "stream.batch_size=2", f"stream.tasks=[{task}]")
    with pytest.raises(VerifierError, match=r"task 'qa': verifier nan_verifier returned nan for completion 0"):
        run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"].startswith("failed: VerifierError")


def test_wandb_failing_mid_run_leaves_complete_local_files(tmp_path, cache_dir, monkeypatch):
    from cl.tracking import SafeWandbLogger

    calls = {"n": 0}
    real = SafeWandbLogger.experiment.fget

    class Flaky:
        def __init__(self, inner):
            self.inner = inner

        def log(self, *a, **k):
            calls["n"] += 1
            if calls["n"] >= 3:
                raise ConnectionError("W&B service went away")
            return self.inner.log(*a, **k)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(SafeWandbLogger, "experiment", property(lambda self: Flaky(real(self))))
    cfg = compose_cfg("experiment=smoke", f"cache_dir={cache_dir}", "logger=wandb_offline", "eval.every_n_steps=10")
    res = run(cfg, tmp_path / "run")
    assert calls["n"] >= 3, "the failure was not exercised"
    assert res["status"] == "completed" and len(res["acc_matrix"]) == 2
    lines = (tmp_path / "run" / "curves.jsonl").read_text().splitlines()
    points = {json.loads(x)["global_iter"] for x in lines}
    assert points == {0, 10, 20, 30, 40, 50, 60}


def test_killed_sweep_rerun_completes_only_the_missing_jobs(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    args = ("-m", "experiment=smoke", "seed=0,1,2", "stream.steps_per_task=20", f"hydra.sweep.dir={sweep}")
    proc = subprocess.Popen([sys.executable, "-m", "cl.run", *args], cwd=ROOT, env=resume_check.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def completed():
        out = {}
        for p in sweep.glob("*/results.json"):
            try:
                if json.loads(p.read_text())["status"] == "completed":
                    out[p] = p.read_text()
            except (OSError, ValueError):
                pass
        return out

    deadline = time.time() + 240
    while not completed() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = completed()
    assert 1 <= len(first) < 3, "the sweep must be killed after its first job and before its last"
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("already completed") == len(first)
    assert "3 completed, 0 failed" in rerun.stdout  # the sweep summary
    for p, text in first.items():
        assert p.read_text() == text  # finished work is never redone
    assert len(completed()) == 3
