"""Running on Lightning's distributed strategies: replicated state, sharded batches, rank-0 files.

Lightning's DDP launcher starts the other ranks by re-running the same command (with ``LOCAL_RANK``
set), so every rank builds the same model, components and evaluator from the same seeds and runs the
same task loop; only the batches differ. The design that keeps this correct without a home-made layer:

- every batch sampler yields the *global* batch; rank ``r`` of ``W`` trains on rows ``r::W`` of it
  (GRPO groups stay whole: a prompt's G completions are sampled on the rank that holds the prompt);
- DDP averages the gradients, so each optimizer step sees the whole global batch;
- everything else (replay buffers, averaging, evaluation, regularizer anchors) is a deterministic
  function of the replicated model and seeds, so it is identical on every rank without communication;
- rank 0 owns the run directory; rank r > 0 writes into ``RUN_DIR/.rank<r>`` (its own lock, checkpoints
  and logs, so a resumed run restores every rank in step) and logs nothing to W&B.
"""

from __future__ import annotations

import os

DDP_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")


def global_rank(trainer_cfg: dict) -> int:
    """This process's rank (0 before Lightning has launched the others, and without a launcher)."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:  # srun made the processes
        return int(os.environ["SLURM_PROCID"])
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", "0") or 0)
    return node * (world_size(trainer_cfg) // int(trainer_cfg.get("num_nodes", 1))) + local


def world_size(trainer_cfg: dict) -> int:
    """Processes the trainer config runs: ``devices x num_nodes`` under a distributed strategy, else 1."""
    strategy = str(trainer_cfg.get("strategy", "auto"))
    if not strategy.startswith(DDP_STRATEGIES):
        return 1
    devices = trainer_cfg.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        import torch

        devices = torch.cuda.device_count() if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") else os.cpu_count()
    n = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    return n * int(trainer_cfg.get("num_nodes", 1))


class ShardBatches:
    """A batch sampler's batches, each cut to this rank's rows ``rank::world``."""

    def __init__(self, batch_sampler, rank: int, world: int):
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            yield list(batch)[self.rank::self.world]


def stream_device(trainer_cfg: dict):
    """The device the model stays on between fits: this rank's GPU for GPU trainers, else the CPU."""
    import torch

    acc = str(trainer_cfg.get("accelerator", "cpu"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")
