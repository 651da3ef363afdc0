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
- Optimizer state goes through ``torch.distributed.checkpoint``, keyed by parameter name, so it fits any
  number of ranks: a checkpoint inside a task has every rank write its shard into one directory
  (``dcp.save``; rank 0's checkpoint holds it), a resumed fit reads the shards it needs (``dcp.load``,
  resharded when the rank count changed). An optimizer carried across tasks
  (``train.reset_optimizer_per_task=false``) is gathered whole onto rank 0's CPU at the end of a fit and
  broadcast back into the next fit's shards (the state ``get_optimizer_state_dict``/
  ``set_optimizer_state_dict`` give with ``full_state_dict``), which is also what a boundary checkpoint
  keeps. The weights are gathered whole for every checkpoint.

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


def _resharded(model: nn.Module) -> nn.Module:
    """``model`` with every FSDP unit's parameters back in their sharded form: a forward outside backward
    (an evaluation point, a rollout) leaves the root unit's parameters gathered, and the optimizer's
    parameters are the sharded ones, which the state-dict helpers look up by name."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


SHARDS = "optim"  # a mid-task checkpoint's optimizer shards: a torch.distributed.checkpoint directory


def save_optimizer_shards(model: nn.Module, optimizer, path) -> dict:
    """Every rank writes its shard of the optimizer state into ``path`` with ``torch.distributed.checkpoint``
    (a collective: it returns once rank 0 has written the metadata after every rank's data). The state is
    keyed by parameter name (``get_optimizer_state_dict``), so it can be loaded onto any number of ranks.
    Returns what the checkpoint's ``state.pt`` keeps in place of the state: ``{"shards": SHARDS}``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(_resharded(model), optimizer)}, checkpoint_id=str(path))
    return {"shards": SHARDS}


def load_optimizer_shards(model: nn.Module, optimizer, path) -> None:
    """Load a ``save_optimizer_shards`` directory into this fit's sharded ``optimizer`` (a collective),
    resharding it when the run now has another number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(_resharded(model), optimizer)}  # this mesh's layout (initialises the state)
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The whole optimizer state keyed by parameter name, gathered onto rank 0's CPU (a collective; the
    other ranks get an empty dict): what an optimizer carried from one fit to the next, and a task-boundary
    checkpoint, keep. Wrapped as ``{"full_on_rank0": ...}`` so every rank sees the same structure."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"full_on_rank0": get_optimizer_state_dict(_resharded(model), optimizer, options=opts)}


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Load a ``full_optimizer_state`` into this fit's sharded ``optimizer``: rank 0 broadcasts it, each
    rank keeps its shard (a collective; any number of ranks)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = state["full_on_rank0"] if dist.get_rank() == 0 else {}
    set_optimizer_state_dict(_resharded(model), optimizer, full,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
