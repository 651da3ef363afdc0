"""Several jobs of a sweep at once on one machine, in worker processes forked from the sweep's process.

``hydra/launcher=cl_parallel`` (conf/hydra/launcher/cl_parallel.yaml). Hydra's joblib launcher starts loky
workers: fresh interpreters that import torch, Lightning and transformers again before their first job, a
fixed cost of seconds per sweep that a short sweep feels (docs/benchmarks.md measures both). Forked
workers inherit the sweep process's imports, so a job starts as quickly as under the basic launcher.

Each job runs exactly as Hydra's other launchers run it (``hydra.core.utils.run_job`` with the job's
sweep config, ``hydra.job.num`` = its index), in the same directory, and returns its ``JobReturn`` to the
sweep (a failed job's exception included). Jobs are handed out in order to whichever worker is free;
``cl.run.set_threads`` gives each job cores // n_jobs torch threads.

Forking needs a parent that has not started compute threads: the sweep's process only composes configs
(it never trains), and the launcher refuses to fork when its Python has other threads running. Where
``fork`` is not available (Windows; macOS, where it is unsafe) use ``hydra/launcher=joblib``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# What every job needs besides its overrides, set in the sweep's process just before the workers are
# forked, so workers inherit it instead of receiving it pickled (the task function need not be picklable).
# Hydra's plugin scan re-executes this module when a job in a worker creates its plugin registry again:
# the value must survive that.
_SHARED: tuple | None = globals().get("_SHARED")


def _execute(idx: int, overrides: Sequence[str]) -> JobReturn:
    """One job in a worker: the sweep config for ``overrides``, then Hydra's ``run_job``."""
    hydra_context, config, task_function, singleton_state = _SHARED
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    return portable(ret)


def portable(ret: JobReturn) -> JobReturn:
    """``ret`` as plain data for its trip back to the sweep's process: its configs without their structured
    types (components' configs are dataclasses made at run time, which do not pickle by reference), and a
    return value or exception that does not pickle replaced by its ``repr``."""
    for name in ("cfg", "hydra_cfg"):
        value = getattr(ret, name, None)
        if isinstance(value, DictConfig):
            setattr(ret, name, OmegaConf.create(OmegaConf.to_container(value, resolve=False)))
    try:
        pickle.dumps(ret._return_value)
    except Exception:
        text = repr(ret._return_value)
        ret._return_value = RuntimeError(text) if ret.status == JobStatus.FAILED else text
    return ret


class ForkLauncher(Launcher):
    """``n_jobs`` forked workers, each running one job at a time (``n_jobs`` <= 0: one per core)."""

    def __init__(self, n_jobs: int = 2) -> None:
        self.n_jobs = int(n_jobs)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def workers(self, n: int) -> int:
        import os

        cores = os.cpu_count() or 1
        want = self.n_jobs if self.n_jobs > 0 else max(1, cores + 1 + self.n_jobs)
        return max(1, min(want, n))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        global _SHARED
        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        if "fork" not in mp.get_all_start_methods() or sys.platform == "darwin":
            raise RuntimeError("hydra/launcher=cl_parallel forks its workers, which this platform does not "
                               "support safely; use hydra/launcher=joblib hydra.launcher.n_jobs=N")
        others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        if others:
            raise RuntimeError(f"hydra/launcher=cl_parallel: this process runs other threads ({', '.join(others)}), "
                               "so forking it could deadlock; use hydra/launcher=joblib hydra.launcher.n_jobs=N")
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        n = self.workers(len(job_overrides))
        log.info(f"cl_parallel: {len(job_overrides)} jobs, {n} at once in forked workers; sweep output dir: {sweep_dir}")
        for idx, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
        _SHARED = (self.hydra_context, self.config, self.task_function, Singleton.get_state())
        try:
            with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("fork")) as pool:
                futures = [pool.submit(_execute, initial_job_idx + idx, list(overrides))
                           for idx, overrides in enumerate(job_overrides)]
                return [f.result() for f in futures]
        finally:
            _SHARED = None
