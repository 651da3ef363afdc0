"""Several jobs of a sweep at once on one machine, in worker processes forked from the sweep's process.

``hydra/launcher=cl_parallel`` (conf/hydra/launcher/cl_parallel.yaml). Hydra's joblib launcher starts loky
workers: fresh interpreters that import torch, Lightning and transformers again before their first job, a
fixed cost of seconds per sweep that a short sweep feels (docs/benchmarks.md measures both). Forked
workers inherit the sweep process's imports.

Each job runs as Hydra's basic launcher runs it (``hydra.core.utils.run_job`` with the job's sweep config,
``hydra.job.num`` = its index), in the same directory. Jobs are handed out in order to whichever worker is
free. ``hydra.launcher.n_jobs`` in each job's config is the number of workers actually running (fewer
when the sweep has fewer jobs), so ``cl.run.set_threads`` gives each job cores // workers torch threads.
Every job's config is composed in the sweep's process before any worker starts, so a bad override stops
the sweep before anything runs. Hydra callbacks: ``on_job_start`` runs in the worker, as the job starts;
``on_job_end`` runs in the sweep's process with the job's returned result, so a callback that collects jobs
(the sweep summary) sees all of them. Ctrl-C, or a worker that dies (killed for memory, say), stops the
sweep: the other workers are killed (a killed run resumes from its last checkpoint when the sweep is run
again).

Forking needs a parent without running threads or an initialised GPU: the sweep's process only composes
configs (it never trains), and the launcher refuses to fork when CUDA is initialised or other Python
threads run. Native threads (thread pools of OpenMP, MKL, tokenizers) are invisible to that check; the
sweep's process starts none of its own, since it never computes. Where ``fork`` is not available
(Windows; macOS, where it is unsafe) use ``hydra/launcher=joblib``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import sys
import threading
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra._internal.callbacks import Callbacks
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# What every job needs (its composed config among them), set in the sweep's process just before the workers
# are forked, so workers inherit it instead of receiving it pickled (the task function need not be picklable).
# Hydra's plugin scan re-executes this module when a job in a worker creates its plugin registry again:
# the value must survive that.
_SHARED: tuple | None = globals().get("_SHARED")


def _execute(i: int) -> JobReturn:
    """The sweep's ``i``-th job in a worker: Hydra's ``run_job`` on its composed config."""
    hydra_context, configs, task_function, singleton_state = _SHARED
    setup_globals()
    Singleton.set_state(singleton_state)
    ret = run_job(hydra_context=hydra_context, config=configs[i], task_function=task_function,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    return portable(ret)


def _round_trips(value: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
        return True
    except Exception:
        return False


def portable(ret: JobReturn) -> JobReturn:
    """``ret`` as plain data for its trip back to the sweep's process: its configs without their structured
    types (components' configs are dataclasses made at run time, which do not pickle by reference), and a
    return value or exception that does not survive pickling replaced by its text. An exception keeps its
    traceback as a note (pickling drops tracebacks)."""
    for name in ("cfg", "hydra_cfg"):
        value = getattr(ret, name, None)
        if isinstance(value, DictConfig):
            setattr(ret, name, OmegaConf.create(OmegaConf.to_container(value, resolve=False)))
    value = ret._return_value
    if isinstance(value, BaseException):
        text = "".join(traceback.format_exception(value))
        if _round_trips(value):
            value.add_note(f"in the sweep's worker:\n{text}")
        else:
            ret._return_value = RuntimeError(text)
    elif not _round_trips(value):
        ret._return_value = repr(value)
    return ret


def job_config(ret: JobReturn) -> DictConfig:
    """The job's config with its ``hydra`` node (as ``run_job`` passes it to ``on_job_end``), from the plain
    configs :func:`portable` returned."""
    cfg = ret.cfg.copy() if ret.cfg is not None else OmegaConf.create({})
    with open_dict(cfg):
        cfg.hydra = ret.hydra_cfg.hydra if ret.hydra_cfg is not None else {}
    return cfg


class _StartOnly(Callbacks):
    """The sweep's callbacks as a worker runs them: ``on_job_start`` there, ``on_job_end`` in the sweep's
    process (``ForkLauncher.launch``)."""

    def __init__(self, inner: Callbacks) -> None:
        self.callbacks = list(inner.callbacks)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        pass


def _stop(pool: ProcessPoolExecutor) -> None:
    """Kill the workers (running jobs included) and drop the queued jobs. SIGKILL, not SIGTERM: Lightning
    turns SIGTERM into an exception that a sweep job records as a failure before its worker takes the next
    queued job."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


class ForkLauncher(Launcher):
    """``n_jobs`` forked workers, each running one job at a time (negative: joblib's rule, -1 = one per core;
    0 is refused)."""

    def __init__(self, n_jobs: int = 2) -> None:
        self.n_jobs = int(n_jobs)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def workers(self, n: int) -> int:
        """Workers for ``n`` jobs: ``n_jobs`` read by ``cl.run.jobs_at_once``, at most one per job."""
        from cl.run import jobs_at_once

        return max(1, min(jobs_at_once(self.n_jobs), n))

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
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise RuntimeError("hydra/launcher=cl_parallel: CUDA is initialised in this process and does not "
                               "survive a fork; use hydra/launcher=joblib hydra.launcher.n_jobs=N")
        n = self.workers(len(job_overrides))
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"cl_parallel: {len(job_overrides)} jobs, {n} at once in forked workers; sweep output dir: {sweep_dir}")
        for idx, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
                sweep_config.hydra.job.num = idx
                sweep_config.hydra.launcher.n_jobs = n  # the jobs really running at once share the cores
            configs.append(sweep_config)
        callbacks = self.hydra_context.callbacks
        worker_context = HydraContext(config_loader=self.hydra_context.config_loader, callbacks=_StartOnly(callbacks))
        _SHARED = (worker_context, configs, self.task_function, Singleton.get_state())
        pool = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("fork"))
        rets: list[JobReturn] = []
        try:
            futures = [pool.submit(_execute, i) for i in range(len(configs))]
            for future in futures:
                ret = future.result()
                callbacks.on_job_end(config=job_config(ret), job_return=ret)
                rets.append(ret)
        except BaseException:
            _stop(pool)
            raise
        else:
            pool.shutdown(wait=True)
        finally:
            _SHARED = None
        return rets
