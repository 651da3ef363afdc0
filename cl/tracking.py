"""W&B logging that never stops a run.

``SafeWandbLogger`` is Lightning's ``WandbLogger`` with every call guarded: the first failure is
logged as a warning and the logger turns itself off; the local files stay the source of truth.
All metrics are plotted against ``cl/global_iter`` (monotonic over the stream), declared with
``define_metric``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lightning_fabric.loggers.logger import _DummyExperiment
from pytorch_lightning.loggers import WandbLogger

log = logging.getLogger(__name__)
MODES = ("offline", "online", "disabled")


class SafeWandbLogger(WandbLogger):
    """A ``WandbLogger`` whose failures are warnings; ``log(dict)`` logs outside a Trainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.broken = False

    def _break(self, what: str, e: Exception) -> None:
        self.broken = True
        log.warning("W&B %s failed (%s: %s); continuing without W&B, local files are complete",
                    what, type(e).__name__, e)

    def _guard(self, what: str, fn, *args, **kwargs):
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # any W&B problem must not stop training
            self._break(what, e)
            return None

    @property
    def experiment(self):
        """The W&B run, or a do-nothing stand-in once W&B has failed (Lightning calls this directly)."""
        if self.broken:
            return _DummyExperiment()
        try:
            return WandbLogger.experiment.fget(self)
        except Exception as e:
            self._break("init", e)
            return _DummyExperiment()

    def start(self) -> None:
        """Create the run now and declare ``cl/global_iter`` the step metric."""

        def _start():
            run = self.experiment
            run.define_metric("cl/global_iter")
            run.define_metric("*", step_metric="cl/global_iter")

        self._guard("init", _start)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._guard("log", super().log_metrics, metrics, step)

    def log_hyperparams(self, params: Any) -> None:
        self._guard("config", super().log_hyperparams, params)

    def log(self, metrics: dict[str, Any]) -> None:
        self._guard("log", lambda: self.experiment.log(metrics))

    def log_table(self, key: str, columns: list[str], data: list[list[Any]]) -> None:
        self._guard("table", super().log_table, key=key, columns=columns, data=data)

    def log_images(self, images: dict[str, "os.PathLike"]) -> None:
        """Log PNG files as ``wandb.Image``s (one step, keyed by name)."""

        def _log():
            import wandb

            self.experiment.log({k: wandb.Image(str(v)) for k, v in images.items()})

        self._guard("images", _log)

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", lambda: self.experiment.summary.update(values))

    def finalize(self, status: str) -> None:
        # Lightning calls this after every fit; the run is closed once, by ``finish``.
        return None

    def finish(self, exit_code: int = 0) -> None:
        if self._experiment is None:
            return
        try:  # also after a failure: close what W&B still has open (its files, its service connection)
            self._experiment.finish(exit_code=exit_code)
        except Exception as e:
            if not self.broken:
                self._break("finish", e)


def make_logger(kind: str, save_dir: str, project: str | None, mode: str | None, name: str | None = None,
                group: str | None = None, tags: list[str] | None = None, config: dict | None = None,
                run_id: str | None = None, job_type: str | None = None):
    """Build the run's logger: ``SafeWandbLogger`` for ``kind='wandb'``, ``None`` for ``kind='none'``."""
    if kind == "none":
        return None
    if kind != "wandb":
        raise ValueError(f"logger.kind: '{kind}' is not one of wandb, none")
    if mode not in MODES:
        raise ValueError(f"logger.mode: '{mode}' is not one of {', '.join(MODES)}")
    os.makedirs(save_dir, exist_ok=True)
    logger = SafeWandbLogger(project=project, name=name, save_dir=save_dir, offline=(mode == "offline"),
                             mode=mode, group=group, tags=list(tags or []), config=config,
                             log_model=False, id=run_id, resume="allow" if run_id else None, job_type=job_type)
    logger.start()
    return logger
