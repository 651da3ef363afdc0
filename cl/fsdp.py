"""``trainer=fsdp``: fully sharded training inside each task (PyTorch FSDP2 through Lightning's
``ModelParallelStrategy``), the whole model between tasks.

The stream loop does much of its work outside the training step (boundary evaluation, frozen reference
and teacher copies, averaging, task vectors, adapter merges); all of it reads whole weights. So a fit
trains a *sharded copy* of the model and hands the whole weights back when it ends:

- ``configure_model`` (Lightning calls it at the start of every fit, after the process group exists):
  the whole model is copied, each decoder layer and then the root are wrapped with ``fully_shard`` on the
  strategy's device mesh, and the copy trains: parameters, gradients and optimizer state are sharded
  over the ranks (each rank holds 1/W of them). The whole model waits on the CPU meanwhile.
- ``on_fit_end``: every parameter is all-gathered (``DTensor.full_tensor``) into the whole model, which
  takes over again; boundary evaluation, component hooks and checkpoints then see ordinary tensors,
  exactly as under DDP (``cl.dist``).
- Forward passes inside a fit (in-task evaluation points, GRPO rollouts) go through FSDP2's hooks, which
  gather each layer's weights on use; generation passes ``synced_gpus`` so ranks whose completions end at
  different lengths keep stepping together.
- Checkpoints inside a task hold each rank's own shard of the optimizer state (``to_local``; restored
  onto the same mesh by ``from_local``) and the whole weights, gathered for the save.

Components that read or write parameters inside the training step (L2/EWC anchors, RegLoRA, EMA,
Reptile, k-FPF) would see shards; ``cl.validate`` refuses them under this strategy with the reason.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

STRATEGY = "fsdp2"


def is_fsdp(trainer_cfg: dict) -> bool:
    return str(trainer_cfg.get("strategy", "auto")) == STRATEGY


def make_strategy(world: int):
    """Lightning's FSDP2 strategy: data parallel over all ranks, no tensor parallelism."""
    from pytorch_lightning.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6 (trainer=fsdp needs it)
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def synced_generation(model: nn.Module) -> bool:
    """Whether ``generate`` must keep all ranks stepping together (a sharded model under several ranks)."""
    import torch.distributed as dist

    return is_sharded(model) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def block_classes(model: nn.Module) -> set[str]:
    """The model's transformer-block class names (transformers' ``_no_split_modules``), the FSDP units."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


class Sharding:
    """Shards the model for a fit and gathers it back (see the module docstring).

    Args:
        offload_whole: keep the whole model on the CPU while the sharded copy trains (on GPUs the whole
            weights then cost no accelerator memory during a fit).
    """

    def __init__(self, offload_whole: bool = True):
        self.offload_whole = offload_whole
        self.whole: nn.Module | None = None
        self.home: torch.device | None = None
        self.local_fraction: float | None = None  # of the parameters this rank holds during a fit

    def shard(self, model: nn.Module, mesh) -> nn.Module:
        """A sharded copy of ``model`` on ``mesh``; ``model`` is kept (on the CPU) until ``gather``."""
        from torch.distributed.fsdp import fully_shard

        blocks = block_classes(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} declares no transformer blocks (_no_split_modules); "
                             "trainer=fsdp cannot choose its sharding units")
        self.whole, self.home = model, next(model.parameters()).device
        if self.offload_whole and self.home.type != "cpu":
            model.to("cpu")  # copied there too: fully_shard moves only each rank's shards to the device
        sharded = copy.deepcopy(model)
        for unit in [m for m in sharded.modules() if type(m).__name__ in blocks]:
            fully_shard(unit, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        self.local_fraction = local_fraction(sharded)
        return sharded

    def gather(self, sharded: nn.Module) -> nn.Module:
        """The whole model with the sharded copy's current weights (a collective: every rank calls it)."""
        from torch.distributed.tensor import DTensor

        whole = self.whole
        assert whole is not None, "gather without shard"
        target = whole.state_dict()
        with torch.no_grad():
            for name, value in sharded.state_dict().items():
                full = value.full_tensor() if isinstance(value, DTensor) else value
                target[name].copy_(full)
        return whole

    def release(self) -> nn.Module:
        """The whole model back on its device; the sharded copy is dropped."""
        whole, self.whole = self.whole, None
        return whole.to(self.home)


def local_fraction(model: nn.Module) -> float:
    """The share of ``model``'s parameter elements that live on this rank."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    return local / max(1, sum(p.numel() for p in params))


def local_optimizer_state(state: dict) -> dict:
    """An optimizer ``state_dict`` with every sharded tensor replaced by this rank's shard (plain tensors:
    what ``torch.load(weights_only=True)`` reads back)."""
    from torch.distributed.tensor import DTensor

    out = {k: v for k, v in state.items() if k != "state"}
    out["state"] = {i: {k: (v.to_local().clone() if isinstance(v, DTensor) else v) for k, v in s.items()}
                    for i, s in state["state"].items()}
    return out


def sharded_optimizer_state(state: dict, params: list[nn.Parameter]) -> dict:
    """The inverse of ``local_optimizer_state`` for this rank's sharded ``params`` (same mesh and world
    size as when it was saved; a shard that does not fit raises)."""
    from torch.distributed.tensor import DTensor

    by_index = dict(enumerate(params))
    out = {k: v for k, v in state.items() if k != "state"}
    out["state"] = {}
    for i, s in state["state"].items():
        p = by_index[int(i)]
        conv = {}
        for k, v in s.items():
            if isinstance(p, DTensor) and torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() > 0:
                if v.shape != p.to_local().shape:
                    raise ValueError(f"optimizer state {k} of parameter {i}: shard {tuple(v.shape)} does not fit "
                                     f"{tuple(p.to_local().shape)} (saved under another world size?)")
                v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
            conv[k] = v
        out["state"][i] = conv
    return out

