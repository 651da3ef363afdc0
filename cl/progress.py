"""Progress display: Lightning's bar on a terminal, plain periodic lines otherwise (logs, CI, SLURM)."""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


def is_tty() -> bool:
    return sys.stdout.isatty()


class PlainProgress(pl.Callback):
    """Prints ``[label] step s/N loss x | last eval ...`` every ``every`` steps and at the end."""

    def __init__(self, label: str, every: int = 50, status=None):
        self.label, self.every, self.status = label, max(1, every), status
        self.t0 = 0.0

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = getattr(pl_module, "step_in_task", trainer.global_step)  # a resumed task counts on
        total = getattr(pl_module, "task_steps", None) or trainer.max_steps
        if step % self.every and step != total:
            return
        loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
        extra = f" | {self.status()}" if self.status else ""
        rate = trainer.global_step / max(1e-9, time.perf_counter() - self.t0)
        print(f"[{self.label}] step {step}/{total} loss {loss:.4f} ({rate:.1f} it/s){extra}",
              flush=True)


class StatusRichBar(RichProgressBar):
    """Lightning's rich bar with the stream status (task k/T, old-task accuracy) among its metrics."""

    def __init__(self, status=None):
        super().__init__(leave=True)
        self.status = status

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self.status is not None:
            items["stream"] = self.status()
        return items
