"""``ContinualLM``: the one LightningModule of the suite.

Methods are composed into it rather than subclassed: an objective computes the loss of a batch
(SFT, GRPO, ...), and any number of components may add loss terms (regularizers, replay losses).
The module keeps ``global_iter``, the optimizer-step counter across all tasks of the stream
(Lightning's ``global_step`` restarts with every Trainer).
"""

from __future__ import annotations

from typing import Callable, Iterable

import pytorch_lightning as pl
import torch

from cl.core.components import Component
from cl.objectives import Objective
from cl.schedule import LRSchedule, TrainSettings


class ContinualLM(pl.LightningModule):
    """A causal LM trained task after task.

    Args:
        model: a transformers causal LM.
        objective: computes ``(loss, logs)`` for a batch.
        optimizer: ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_``).
        schedule: the per-task LR schedule.
        reset_optimizer_per_task: a fresh optimizer (and its state) for every task; otherwise the
            optimizer state carries over and only the schedule restarts.
        loss_components: stream components (``cl.core.components``); each step their ``extra_loss`` terms
            (where not ``None``) are added to the objective's loss.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
        schedule: LRSchedule = LRSchedule(),
        reset_optimizer_per_task: bool = TrainSettings.reset_optimizer_per_task,
        loss_components: Iterable[Component] = (),
        compile_train: bool = TrainSettings.compile,
    ):
        super().__init__()
        self.compile_train = compile_train  # train.compile: training forwards through torch.compile
        self._compiled: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (model, its compiled wrapper)
        self.model = model
        self.objective = objective
        self.make_optimizer = optimizer
        self.schedule = schedule
        self.reset_optimizer_per_task = reset_optimizer_per_task
        self.loss_components = list(loss_components)
        self.global_iter_offset = 0
        self.task_idx = 0
        self.task_start_iter = 0  # global_iter when the current task began
        self.task_steps: int | None = None  # optimizer steps of the current task (the LR schedule's length)
        self.nonfinite = TrainSettings.nonfinite  # stop | skip: what a non-finite loss does
        self.skipped_steps = 0
        self.resume_optim: dict | None = None  # optimizer/scheduler states to load in configure_optimizers
        self.resume_rng: dict | None = None  # RNG states to restore when the resumed fit starts
        self._scheduler = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.trainable_per_task: list[int] = []
        self.sharding = None  # cl.fsdp.Sharding under trainer=fsdp: each fit trains a sharded copy
        self._carried_optim: dict | None = None  # sharded runs: the optimizer state carried to the next task

    def forward_train(self, **inputs):
        """The model's forward for a training step (objectives call this, not ``self.model``): through
        ``torch.compile`` (dynamic shapes, the same parameters) when ``train.compile``, else the model itself.
        The compiled wrapper is rebuilt when ``self.model`` is replaced (an adapter per task). Evaluation and
        generation always run the model eagerly."""
        if not self.compile_train:
            return self.model(**inputs)
        if self._compiled is None or self._compiled[0] is not self.model:
            self._compiled = (self.model, torch.compile(self.model, dynamic=True))
        return self._compiled[1](**inputs)

    @property
    def global_iter(self) -> int:
        """Optimizer steps taken over the whole stream so far."""
        step = self.trainer.global_step if self._trainer is not None else 0
        return self.global_iter_offset + step

    @property
    def step_in_task(self) -> int:
        return self.global_iter - self.task_start_iter

    def start_task(self, task_idx: int, steps: int | None = None, start_iter: int | None = None) -> None:
        self.task_idx, self.task_steps = task_idx, steps
        self.task_start_iter = self.global_iter_offset if start_iter is None else start_iter

    def optim_state(self, mid_task: bool, shards_dir=None) -> dict:
        """What a checkpoint needs to rebuild the optimizer: its state when it outlives this point (always
        mid-task, across tasks only without a per-task reset) and, mid-task, the LR scheduler's. Sharded
        runs (``trainer=fsdp``) write the state mid-task as shards into ``shards_dir`` (a collective,
        ``cl.fsdp.save_optimizer_shards``) and keep a marker; across tasks the carried state is the whole
        one on rank 0 (``cl.fsdp.full_optimizer_state``)."""
        if self.sharding is not None and not mid_task:
            return {"optimizer": None if self.reset_optimizer_per_task else self._carried_optim, "scheduler": None}
        keep_opt = self._optimizer is not None and (mid_task or not self.reset_optimizer_per_task)
        if keep_opt and self.sharded:
            from cl.fsdp import save_optimizer_shards

            if shards_dir is None:
                raise ValueError("a sharded optimizer state is written by the checkpointer (shards_dir)")
            state = save_optimizer_shards(self.model, self._optimizer, shards_dir)
        else:
            state = self._optimizer.state_dict() if keep_opt else None
        return {"optimizer": state,
                "scheduler": self._scheduler.state_dict() if mid_task and self._scheduler is not None else None}

    def on_train_start(self) -> None:
        """A resumed fit continues with the checkpoint's RNG states: Lightning's distributed strategies
        re-seed every process in their setup (``reset_seed``), after the checkpoint was loaded."""
        if self.resume_rng is not None:
            from cl.checkpoint import set_rng_state

            set_rng_state(self.resume_rng)
            self.resume_rng = None

    # -- trainer=fsdp: a sharded copy trains during each fit (cl.fsdp) ----------------------------------
    def configure_model(self) -> None:
        if self.sharding is not None and not self.sharded:
            first = self.sharding.local_fraction is None
            self.model = self.sharding.shard(self.model, self.device_mesh["data_parallel"])
            if first:
                print(f"[fsdp] rank {self.global_rank}: holds {self.sharding.local_fraction:.1%} of the parameters "
                      f"(and their gradients and optimizer state) while training", flush=True)

    @property
    def sharded(self) -> bool:
        return self.sharding is not None and self.sharding.whole is not None

    def whole_model(self) -> torch.nn.Module:
        """The model with whole weights: ``self.model``, or under a fit of ``trainer=fsdp`` the whole copy
        refreshed from the shards (a collective: all ranks call it at the same point)."""
        return self.sharding.gather(self.model) if self.sharded else self.model

    def on_fit_end(self) -> None:
        if self.sharded:
            from cl.fsdp import full_optimizer_state

            if not self.reset_optimizer_per_task and self._optimizer is not None:
                self._carried_optim = full_optimizer_state(self.model, self._optimizer)
            self.sharding.gather(self.model)
            self.model = self.sharding.release()
            self._optimizer = self._scheduler = None  # they hold the shards

    def end_task(self, steps_taken: int) -> None:
        """Fold the finished Trainer's steps into the offset and detach from that Trainer."""
        self.global_iter_offset += steps_taken
        self.trainer = None

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Lightning's move, except for RL batches' ``prompt_ids`` and ``rows``: Lightning rebuilds each list it
        meets, which would strip prompt ids of their images (``cl.core.data.VisualIds``); the objective moves
        what it builds from them."""
        if isinstance(batch, dict) and "prompt_ids" in batch:
            keep = {k: batch[k] for k in ("prompt_ids", "rows") if k in batch}
            rest = super().transfer_batch_to_device({k: v for k, v in batch.items() if k not in keep}, device,
                                                    dataloader_idx)
            return {**rest, **keep}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs = self.objective.step(self, batch)
        objective_loss = loss
        for component in self.loss_components:
            out = component.extra_loss(self, batch, objective_loss)
            if out is not None:
                loss = loss + out[0]
                logs.update(out[1])
        if not torch.isfinite(loss):
            where = (f"task {self.task_idx + 1} step {self.step_in_task + 1} (global_iter {self.global_iter + 1}): "
                     + ", ".join(f"{k} {float(v):.4g}" for k, v in logs.items() if torch.is_tensor(v) and v.numel() == 1
                                 and not torch.isfinite(v))[:300])
            if self.nonfinite == "skip":  # no backward, no update: AdamW skips parameters without gradients
                self.skipped_steps += 1
                self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
                return None
            raise FloatingPointError(f"non-finite loss {loss.item()} at {where} (set train.nonfinite=skip to skip "
                                     "such batches instead)")
        logs = {f"train/{k}": v for k, v in logs.items()}
        n = batch["input_ids"].size(0) if "input_ids" in batch else len(batch["prompt_ids"])
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False, batch_size=n)
        self.log("cl/global_iter", float(self.global_iter + 1), on_step=True, on_epoch=False)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's clipping, except for fused optimizers (``+optimizer.fused=true``) without a gradient
        scaler: Lightning's mixed-precision plugin refuses to clip any optimizer that unscales inside its
        step, but under ``bf16-mixed`` (and full precision) there is no scaler, so the gradients are clipped
        here as they are, by the same norm or value rule."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and fused and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if len(self.trainable_per_task) <= self.task_idx:  # once per task (a resumed task has it already)
            self.trainable_per_task.append(sum(p.numel() for p in {id(p): p for p in params}.values()))
        resume, self.resume_optim = self.resume_optim or {}, None
        base_lrs = None
        if self.reset_optimizer_per_task or self._optimizer is None:
            self._optimizer = self.make_optimizer(params)
            base_lrs = [g["lr"] for g in self._optimizer.param_groups]  # the configured lrs: the schedule's base
        if self.sharding is not None:  # a carried or checkpointed state, into this fit's shards (cl.fsdp)
            from cl.fsdp import load_full_optimizer_state, load_optimizer_shards

            carried, self._carried_optim = self._carried_optim, None
            state = resume.get("optimizer") or (None if self.reset_optimizer_per_task else carried)
            if resume.get("shards_dir") is not None:
                load_optimizer_shards(self.model, self._optimizer, resume["shards_dir"])
            elif state is not None:
                load_full_optimizer_state(self.model, self._optimizer, state)
            resume = {**resume, "optimizer": None}
        if resume.get("optimizer") is not None:  # before the scheduler, which sets initial_lr only if absent
            self._optimizer.load_state_dict(resume["optimizer"])
        if base_lrs is not None:  # a loaded state's lr is where its schedule stood; the schedule starts from the
            # configured lr on every rank (a state loaded by name, cl.fsdp, brings initial_lr to rank 0 only)
            for group, base in zip(self._optimizer.param_groups, base_lrs):
                group["initial_lr"] = base
        total = self.task_steps or (int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 else 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self._optimizer, self.schedule.lr_lambda(total, self.task_idx))
        if resume.get("scheduler") is not None:  # mid-task: continue the schedule where it stopped
            scheduler.load_state_dict(resume["scheduler"])
            for group, lr in zip(self._optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        self._scheduler = scheduler
        return {"optimizer": self._optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
