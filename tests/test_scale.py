"""The scale path's CPU-side logic: distributed helpers, bench_scale on CPU, gpu_check.sh's plan and guards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from cl.dist import ShardBatches, global_rank, stream_device, world_size
from tests.conftest import ROOT, compose_cfg

sys.path.insert(0, str(ROOT / "scripts"))
import bench_scale  # noqa: E402


def test_world_size_and_rank_from_trainer_config(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    cpu = dict(compose_cfg().trainer)
    ddp = dict(compose_cfg("trainer=ddp_cpu").trainer)
    assert world_size(cpu) == 1 and world_size(ddp) == 2
    assert world_size({"strategy": "ddp", "devices": [0, 1, 2], "num_nodes": 2}) == 6
    assert global_rank(ddp) == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("NODE_RANK", "1")
    assert global_rank(ddp) == 3  # node 1, local 1, 2 per node
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert global_rank(ddp) == 5
    assert stream_device(cpu) == torch.device("cpu")


def test_shards_partition_every_global_batch():
    batches = [list(range(i * 8, i * 8 + 8)) for i in range(3)]
    shards = [list(ShardBatches(batches, r, 2)) for r in range(2)]
    for i, b in enumerate(batches):
        assert sorted(shards[0][i] + shards[1][i]) == b and len(shards[0][i]) == len(shards[1][i]) == 4


def test_batch_size_must_split_evenly_over_processes():
    from cl.validate import ConfigError, validate_config
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_cfg("trainer=ddp_cpu", "stream.batch_size=15"), resolve=True)
    with pytest.raises(ConfigError, match="stream.batch_size: must be divisible by the 2 processes"):
        validate_config(cfg)


def test_bench_scale_runs_on_cpu_and_reports_mfu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "scripts/bench_scale.py", "--sizes", "1m", "--parts", "sft,grpo",
                           "--steps", "2", "--warmup", "1", "--batch-size", "4", "--seq-len", "16", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    peak = rows[0]
    assert peak["part"] == "peak" and peak["flops"] > 1e9
    sft = next(r for r in rows if r["part"] == "sft")
    assert 1.0e6 < sft["params"] < 1.1e6 and 0 < sft["mfu"] < 1.5 and sft["tokens_per_s"] > 0
    assert "| sft | 1m |" in proc.stdout and "| grpo | 1m |" in proc.stdout


def test_model_sizes_are_what_the_table_says():
    counts = {}
    for size in SIZES_TO_CHECK:
        with torch.device("meta"):
            model, _ = bench_scale.build_model(size, 128, "meta")
        counts[size] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert 0.9e6 < counts["1m"] < 1.2e6 and 4.5e6 < counts["5m"] < 5.5e6 and 23e6 < counts["25m"] < 28e6
    assert 0.45e9 < counts["qwen0.5b"] < 0.55e9


SIZES_TO_CHECK = ("1m", "5m", "25m", "qwen0.5b")


def test_flops_per_token_counts_the_lm_head_once():
    model, _ = bench_scale.build_model("1m", 64, "cpu")
    n_all = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert bench_scale.matmul_params(model) == n_all  # tied head: the embedding matrix is used once, as the head
    assert bench_scale.train_flops_per_token(model, 10) == 6 * n_all + 12 * 4 * 128 * 10


def test_gpu_check_plans_the_smoke_runs_and_the_0_5b_benchmark(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("== ")]
    assert [x.split()[1] for x in lines] == ["smoke_sft", "smoke_grpo", "smoke_fsdp", "vllm_rollouts", "resume",
                                             "scale_qwen0.5b", "real_math"]
    limits = sum(int(x.split("limit ")[1].split("s)")[0]) for x in lines)
    assert limits <= 11 * 60 - 30, "the check must finish in under 11 minutes"
    assert "trainer=gpu" in lines[0] and "objective=grpo" in lines[1]
    assert "trainer=fsdp" in lines[2] and "objective.rollout_backend=vllm" in lines[3]
    assert "resume_check.py" in lines[4] and "trainer=gpu" in lines[4]
    assert "--sizes qwen0.5b" in lines[5] and "--device cuda" in lines[5] and "bf16-mixed" in lines[5]
    assert "real_check.py --size 0.5b --device cuda" in lines[6]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU guard")
def test_gpu_check_stops_cleanly_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 3
    assert "error: no CUDA GPU visible" in proc.stdout


def test_slurm_launcher_preset_matches_tasks_and_gpus_to_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from cl.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=cl_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.submitit_folder.endswith("/.submitit/%j") and launcher.max_num_timeout > 0


def test_parallel_launcher_preset_and_threads_per_job():
    from hydra import compose, initialize_config_dir

    from cl.run import CONF_DIR, set_threads

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=cl_parallel", "hydra.launcher.n_jobs=2"])
    assert cfg.hydra.launcher._target_.endswith("ForkLauncher") and cfg.hydra.launcher.n_jobs == 2
    import torch

    before = torch.get_num_threads()
    try:
        assert set_threads(None, cfg.hydra) == max(1, (os.cpu_count() or 1) // 2)  # cores shared by the jobs
        assert set_threads(3) == 3  # an explicit count wins
    finally:
        torch.set_num_threads(before)


def test_a_parallel_sweep_runs_every_job_in_forked_workers_and_sums_them_up(tmp_path, cache_dir):
    """Three jobs, two at once: every job completes in its own directory with cores // 2 threads. Run again,
    every job is already complete and the summary still counts all three (job ends are collected in the
    sweep's process, not lost in the workers)."""
    import json

    cmd = [sys.executable, "-m", "cl.run", "-m", "experiment=smoke", "seed=0,1,2", "stream.steps_per_task=2",
           "shift=none", "logger=none", f"cache_dir={cache_dir}", "hydra/launcher=cl_parallel",
           "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    assert sorted(r["config"]["seed"] for r in res) == [0, 1, 2] and {r["status"] for r in res} == {"completed"}
    assert {r["provenance"]["machine"]["torch_threads"] for r in res} == {max(1, (os.cpu_count() or 1) // 2)}
    assert all(p.parent.name.startswith(f"experiment=smoke,seed={s},") for s, p in
               enumerate(sorted(tmp_path.glob("*/results.json"))))
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 completed, 0 failed" in again.stdout and again.stdout.count("already completed") >= 3


@pytest.mark.skipif(sys.platform == "darwin" or sys.platform.startswith("win"), reason="the launcher forks")
def test_the_fork_launcher_refuses_a_multithreaded_parent_and_returns_plain_data():
    """Forking a process with other threads running can deadlock the child, so the launcher refuses; a
    job's configs made from run-time dataclasses come back as plain configs that pickle, and an exception
    that pickles but cannot be loaded comes back as its traceback text."""
    import dataclasses
    import pickle
    import threading

    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from hydra_plugins.cl_launcher.fork_launcher import ForkLauncher, portable

    launcher = ForkLauncher(n_jobs=2)
    launcher.setup(hydra_context=object(), task_function=lambda cfg: None, config=OmegaConf.create({}))
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="busy", daemon=True)
    t.start()
    try:
        with pytest.raises(RuntimeError, match="busy"):
            launcher.launch([["seed=0"]], 0)
    finally:
        stop.set()
        t.join()
    made = dataclasses.make_dataclass("MadeAtRunTime", [("lr", float, 1e-4)])  # like cl.components' configs
    ret = JobReturn(cfg=OmegaConf.create({"model": OmegaConf.structured(made)}), hydra_cfg=OmegaConf.create({}),
                    status=JobStatus.COMPLETED, _return_value=0.5)
    with pytest.raises(Exception):
        pickle.dumps(ret)
    back = pickle.loads(pickle.dumps(portable(ret)))
    assert back.cfg.model.lr == 1e-4 and back.return_value == 0.5

    class TwoArgError(Exception):  # pickles, but unpickling calls __init__ with one argument
        def __init__(self, a, b):
            super().__init__(f"{a} {b}")

    try:
        raise TwoArgError("x", "y")
    except TwoArgError as e:
        failed = JobReturn(cfg=OmegaConf.create({}), hydra_cfg=OmegaConf.create({}), status=JobStatus.FAILED,
                           _return_value=e)
    back = pickle.loads(pickle.dumps(portable(failed)))
    with pytest.raises(RuntimeError, match="TwoArgError"):
        back.return_value

    def job():
        raise ValueError("bad value")

    try:
        job()
    except ValueError as e:
        failed = JobReturn(cfg=OmegaConf.create({}), hydra_cfg=OmegaConf.create({}), status=JobStatus.FAILED,
                           _return_value=e)
    back = pickle.loads(pickle.dumps(portable(failed)))  # pickling drops the traceback; the note keeps it
    with pytest.raises(ValueError, match="bad value") as info:
        back.return_value
    assert "in job" in "".join(info.value.__notes__)


def test_a_parallel_sweep_with_a_bad_job_stops_before_any_job_starts(tmp_path):
    """Every job's config is composed before the workers start: the second job's unknown option stops the
    sweep before the first one trains (the basic launcher would run it and fail on the second)."""
    cmd = [sys.executable, "-m", "cl.run", "-m", "experiment=smoke", "objective=sft,no_such_objective",
           "logger=none", "hydra/launcher=cl_parallel", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no_such_objective" in proc.stderr
    assert not list(tmp_path.glob("*/run.log"))


def test_the_sweep_summary_counts_a_failed_job():
    """A failed job's return value re-raises its exception when read: the summary still lists the job."""
    from pathlib import Path

    from hydra.core.utils import JobReturn, JobStatus

    from analysis.hydra_callback import SweepSummary

    summary = SweepSummary()
    summary.on_multirun_start(config=OmegaConf.create({}))
    for status, value in ((JobStatus.FAILED, RuntimeError("crashed")), (JobStatus.COMPLETED, "refused: other run"),
                          (JobStatus.COMPLETED, 0.5)):
        ret = JobReturn(status=status, _return_value=value)
        job_dir = f"/runs/{status.name}-{value}"
        summary.on_job_end(config=OmegaConf.create({"hydra": {"runtime": {"output_dir": job_dir}}}), job_return=ret)
    assert summary.job_dirs == [Path("/runs/FAILED-crashed"), Path("/runs/COMPLETED-0.5")]
    assert list(summary.refused.values()) == ["other run"]


@pytest.mark.skipif(sys.platform == "darwin" or sys.platform.startswith("win"), reason="the launcher forks")
def test_ctrl_c_stops_a_parallel_sweep_and_its_workers(tmp_path, cache_dir):
    """SIGINT to the sweep's process group (what Ctrl-C sends) ends the sweep within seconds, running jobs
    and queued ones included, with no worker left behind."""
    import signal
    import time

    cmd = [sys.executable, "-m", "cl.run", "-m", "experiment=smoke", "seed=0,1,2,3", "stream.steps_per_task=100000",
           "shift=none", "logger=none", f"cache_dir={cache_dir}", "hydra/launcher=cl_parallel",
           "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len([p for p in tmp_path.glob("*/run.log") if "step " in p.read_text()]) < 2:
            time.sleep(1)  # both workers are training
        assert proc.poll() is None, "the sweep ended before it was interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.time()
        proc.wait(timeout=60)
        assert proc.returncode != 0 and time.time() - t0 < 30
        time.sleep(1)
        left = subprocess.run(["pgrep", "-f", f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True).stdout.split()
        assert not left, f"workers left running: {left}"
        assert not any(p.name.startswith("experiment=smoke,seed=3") for p in tmp_path.iterdir())  # queued job never started
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_fork_launcher_counts_workers_like_joblib():
    from hydra_plugins.cl_launcher.fork_launcher import ForkLauncher

    cores = os.cpu_count() or 1
    assert ForkLauncher(n_jobs=4).workers(2) == 2  # never more workers than jobs
    assert ForkLauncher(n_jobs=2).workers(5) == 2
    assert ForkLauncher(n_jobs=-1).workers(1000) == cores  # -1: one per core
    assert ForkLauncher(n_jobs=-2).workers(1000) == max(1, cores - 1)
    with pytest.raises(ValueError, match="n_jobs: 0"):
        ForkLauncher(n_jobs=0).workers(3)


@pytest.mark.slow
def test_a_parallel_sweep_gives_each_job_the_basic_launchers_results(tmp_path, cache_dir):
    import json

    common = ["-m", "experiment=smoke", "seed=0,1", "stream.steps_per_task=3", "shift=none", f"cache_dir={cache_dir}"]
    for name, extra in (("basic", []), ("parallel", ["hydra/launcher=cl_parallel", "hydra.launcher.n_jobs=2"])):
        proc = subprocess.run([sys.executable, "-m", "cl.run", *common, *extra, f"hydra.sweep.dir={tmp_path / name}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    res = {name: {r["config"]["seed"]: r for r in (json.loads(p.read_text())
                                                   for p in (tmp_path / name).glob("*/results.json"))}
           for name in ("basic", "parallel")}
    assert sorted(res["basic"]) == sorted(res["parallel"]) == [0, 1]
    dirs = {name: sorted(p.parent.name for p in (tmp_path / name).glob("*/results.json")) for name in res}
    assert dirs["basic"] == dirs["parallel"]  # the launcher does not change where a job's results go
    for seed in (0, 1):
        assert res["basic"][seed]["acc_matrix"] == res["parallel"][seed]["acc_matrix"]
        assert res["parallel"][seed]["provenance"]["machine"]["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)


def test_ray_launcher_preset_composes_and_gives_each_job_its_cpus_as_threads():
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    from hydra import compose, initialize_config_dir

    from cl.run import CONF_DIR, set_threads

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=cl_ray", "hydra.launcher.ray.remote.num_cpus=1"])
    assert cfg.hydra.launcher._target_.endswith("RayLauncher")
    assert cfg.hydra.launcher.ray.init.address is None and cfg.hydra.launcher.ray.remote.max_calls == 1
    import torch

    before = torch.get_num_threads()
    try:
        assert set_threads(None, cfg.hydra) == 1
    finally:
        torch.set_num_threads(before)


def test_a_ray_sweep_runs_on_a_local_ray_instance(tmp_path, cache_dir):
    """Two smoke jobs as Ray tasks on a local instance started by the launcher: both complete, land where
    the sweep's subdirectory names say, and ran with the CPUs their task held as torch threads."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    import json

    proc = subprocess.run([sys.executable, "-m", "cl.run", "-m", "experiment=smoke", "seed=0,1", "stream.steps_per_task=2",
                           "eval.every_n_steps=null", "shift=none", f"cache_dir={cache_dir}", "logger=none",
                           "hydra/launcher=cl_ray", "hydra.launcher.ray.init.num_cpus=2",
                           f"hydra.sweep.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    names = sorted(p.parent.name for p in tmp_path.glob("*/results.json"))  # the sweep's own subdir names
    assert len(names) == 2 and "seed=0" in names[0] and "seed=1" in names[1]
    assert sorted(r["config"]["seed"] for r in runs) == [0, 1] and all(r["status"] == "completed" for r in runs)
    assert all(r["provenance"]["machine"]["torch_threads"] == 1 for r in runs)


def test_train_compile_gives_the_eager_loss_and_gradients_and_is_refused_under_fsdp(tiny_model_dir):
    """train.compile: the training forward through torch.compile (same parameters) matches the eager one
    on a batch; evaluation stays eager (model untouched); FSDP refuses it with one line."""
    from functools import partial

    from cl.core.data import SFTCollator
    from cl.model import load_model_and_tokenizer
    from cl.module import ContinualLM
    from cl.objectives.sft import SFTObjective
    from cl.validate import ConfigError, validate_config
    from tests.conftest import compose_cfg

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    batch = SFTCollator(tok.pad_token_id)([([5, 6, 7, 8], [9, 10]), ([5, 6], [11, 12, 13])])
    losses, grads = [], []
    for compiled in (False, True):
        module = ContinualLM(model, SFTObjective(), partial(torch.optim.AdamW, lr=1e-4), compile_train=compiled)
        model.zero_grad(set_to_none=True)
        loss, _ = module.objective.step(module, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert (module._compiled is not None) == compiled and type(module.model) is type(model)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="train.compile"):
        validate_config(OmegaConf.to_container(compose_cfg("trainer=fsdp_cpu", "train.compile=true"), resolve=True))
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"train\.compile"):  # typed by TrainSettings
        compose_cfg("train.compile=abc")
