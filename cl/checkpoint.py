"""Checkpoints that let the same command resume an interrupted stream with nothing lost.

A checkpoint is a directory ``RUN_DIR/checkpoints/last`` holding

- ``model.safetensors``: the stream's model (base + adapters) as safetensors;
- ``state.pt``: everything else as plain containers and tensors, loaded with ``torch.load(weights_only=True)``:
  the loop position (task, step inside the task, global iteration) and the number of ranks that wrote
  it, the optimizer and LR-scheduler states (under FSDP a marker for ``optim/``, below), the accuracy
  matrices so far, the evaluator's counters and the byte length of ``curves.jsonl``,
  every component's state (replay buffers, anchors, teachers, averaging snapshots, GRPO reference),
  the RNG states of torch, numpy and Python, and the resolved config it was written under.

Writes are atomic: the new checkpoint is written to a temporary directory, the old one is renamed to
``prev``, the new one to ``last``, then ``prev`` is removed (renamed away first, so that no half-deleted
directory is ever left under either name). A crash at any point leaves ``last`` or ``prev`` complete;
``latest`` picks whichever exists. ``position.json`` says where in the stream a
checkpoint stands. Under a distributed strategy every rank writes its own state (``RUN_DIR/.rank<r>``), rank
0 alone the weights, and each keeps ``prev`` as well; under FSDP every rank writes its shard of the
optimizer state into rank 0's checkpoint (``optim/``, ``torch.distributed.checkpoint``: ``cl.fsdp``).
``latest_common`` resumes all ranks from the newest position they all have, or, for a checkpoint written
by another number of ranks, every rank from rank 0's copy.

Components hold their state in ``state_dict()``/``load_state_dict()`` (``cl.core.components``: by
default the attributes named in ``ckpt_attrs``); a component whose state cannot be captured sets
``ckpt_attrs = None``, and a run with it writes no checkpoints (``cl.run`` warns; an interrupted run
starts over).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from cl.core.components import resumable
from cl.core.data import VisualIds
from cl.core.steps import InTaskEveryNSteps

CKPT_DIR = "checkpoints"
POSITION = "position.json"  # where in the stream a checkpoint stands, readable without loading it
# config keys that may differ between the interrupted run and the resuming one (train.nonfinite: a run stopped
# by a NaN can be resumed from its last good checkpoint with train.nonfinite=skip)
VOLATILE_KEYS = ("resume", "checkpoint", "logger", "cache_dir", "hydra", "train.nonfinite")


# what a resume on another number of ranks may change (same strategy, same global batch: cl.dist)
RANK_COUNT_KEYS = ("trainer.devices", "trainer.num_nodes")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


VERSION = 2  # 2: the ranks that wrote it; FSDP optimizer state by parameter name (torch.distributed.checkpoint)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (incompatible config, unsupported component)."""


# -- component state ---------------------------------------------------------------------------------------
def capture(value):
    """``value`` as plain containers and tensors (what ``torch.load(weights_only=True)`` accepts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, nn.Module):
        return {"__module__": {k: v.detach() for k, v in value.state_dict().items()}}
    if isinstance(value, torch.Generator):
        return {"__generator__": value.get_state()}
    if isinstance(value, random.Random):
        version, internal, gauss = value.getstate()
        return {"__random__": [version, list(internal), gauss]}
    if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
        return {"__state__": capture(value.state_dict())}
    if isinstance(value, VisualIds):  # prompt ids with their images: both come back
        return {"__visual_ids__": [list(value), capture(value.visual)]}
    if isinstance(value, dict):
        return {str(k): capture(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [capture(v) for v in value]
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def restore(current, saved, template: nn.Module | None = None):
    """The value to assign back: loads into ``current`` where it is a stateful object, builds frozen copies
    of ``template`` for saved modules that do not exist yet (teachers, reference models)."""
    if isinstance(saved, dict) and len(saved) == 1:
        (key, inner), = saved.items()
        if key == "__module__":
            if not isinstance(current, nn.Module):
                if template is None:
                    raise CheckpointError("a saved module needs a template model to be restored into")
                current = copy.deepcopy(template).eval().requires_grad_(False)
            current.load_state_dict(inner, strict=True)
            return current
        if key == "__generator__":
            gen = current if isinstance(current, torch.Generator) else torch.Generator()
            gen.set_state(inner)
            return gen
        if key == "__random__":
            rng = current if isinstance(current, random.Random) else random.Random()
            rng.setstate((inner[0], tuple(inner[1]), inner[2]))
            return rng
        if key == "__state__":
            current.load_state_dict(restore(None, inner, template))
            return current
        if key == "__visual_ids__":
            return VisualIds(inner[0], restore(None, inner[1], template))
    if isinstance(saved, dict):
        return {k: restore(current.get(k) if isinstance(current, dict) else None, v, template) for k, v in saved.items()}
    if isinstance(saved, list):
        return [restore(None, v, template) for v in saved]
    return saved


def component_states(components) -> list[dict]:
    """Every component's ``state_dict()`` as plain containers and tensors, with the component's name."""
    out = []
    for c in components:
        if not resumable(c):
            raise CheckpointError(f"{c.label} cannot be checkpointed")
        out.append({"component": c.label, "state": capture(c.state_dict())})
    return out


def load_component_states(components, states: list[dict], template: nn.Module) -> None:
    """Put saved states back with each component's ``load_state_dict``, component by component in the order
    the run builds them (a checkpoint of other components is refused); stateful values (buffers, generators,
    modules) are loaded into the component's current objects where it has them."""
    names = [s.get("component") for s in states]
    if names != [c.label for c in components]:
        raise CheckpointError(f"checkpoint holds the components {names}, this run builds "
                              f"{[c.label for c in components]}")
    for c, saved in zip(components, states):
        c.load_state_dict(restore(c.state_dict(), saved["state"], template))


def not_resumable(components) -> list[str]:
    """Names of components that declare no checkpointable state."""
    return [c.label for c in components if not resumable(c)]


# -- RNG --------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():  # a requeued job may see fewer GPUs than the writer
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# -- files ------------------------------------------------------------------------------------------------
def save(run_dir: Path, model: nn.Module | None, state: dict, keep_prev: bool = False,
         extra: dict[str, Path] | None = None) -> Path:
    """Write a checkpoint atomically; returns its directory. ``model=None`` writes no weights (ranks > 0 of a
    distributed run: rank 0's checkpoint at the same position holds them). ``keep_prev`` keeps the one
    before it as ``prev`` (distributed runs: a job killed between two ranks' writes resumes from one all
    ranks have). ``extra``: finished directories moved into the checkpoint under the given names before
    it is renamed into place (the FSDP optimizer shards)."""
    from safetensors.torch import save_model

    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if model is not None:
        save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    with open(tmp / "state.pt", "rb+") as f:
        os.fsync(f.fileno())
    for name, d in (extra or {}).items():
        os.replace(d, tmp / name)
    (tmp / POSITION).write_text(json.dumps({k: state.get(k) for k in ("task_idx", "step_in_task", "global_iter",
                                                                        "world")}))
    last, prev = root / "last", root / "prev"
    if last.exists():
        _retire(prev)
        os.replace(last, prev)
    os.replace(tmp, last)
    if not keep_prev:
        _retire(prev)
    return last


def _retire(d: Path) -> None:
    """Delete a checkpoint directory so that a kill at any moment never leaves a half-deleted one under its
    name (which could still look complete, e.g. ``state.pt`` left and ``model.safetensors`` gone): rename it
    away first, then delete."""
    if not d.exists():
        return
    gone = d.with_name(f"retired-{d.name}-{os.getpid()}")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(d, gone)
    shutil.rmtree(gone, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory (``last``, else ``prev`` after a crash mid-swap)."""
    root = Path(run_dir) / CKPT_DIR
    for name in ("last", "prev"):
        d = root / name
        if (d / "model.safetensors").is_file() and (d / "state.pt").is_file():
            return d
    return None


def positions(run_dir: Path, with_world: bool = False) -> dict:
    """``(task_idx, step_in_task) -> checkpoint directory`` for the complete checkpoints in ``run_dir``
    (``with_world``: ``-> (directory, ranks it was written by)``; None for checkpoints that do not say)."""
    out = {}
    for name in ("prev", "last"):
        d = Path(run_dir) / CKPT_DIR / name
        if (d / "state.pt").is_file() and (d / POSITION).is_file():  # complete: renamed into place last
            try:
                pos = json.loads((d / POSITION).read_text())
                key = (int(pos["task_idx"]), int(pos["step_in_task"]))
                out[key] = (d, pos.get("world")) if with_world else d
            except (ValueError, KeyError, TypeError):
                continue
    return out


def rank0_weights(ckpt: Path) -> Path:
    """The checkpoint holding the weights for ``ckpt``: itself, or for a rank > 0 checkpoint (which writes
    none) rank 0's checkpoint at the same position."""
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").is_file():
        return ckpt
    pos = json.loads((ckpt / POSITION).read_text())
    root = ckpt.parent.parent.parent  # RUN_DIR/.rank<r>/checkpoints/<name> -> RUN_DIR
    found = positions(root).get((int(pos["task_idx"]), int(pos["step_in_task"])))
    if found is None or not (found / "model.safetensors").is_file():
        raise CheckpointError(f"{ckpt}: rank 0 holds no weights for its position {pos} under {root}")
    return found


def latest_common(run_dir: Path, rank: int, world: int) -> Path | None:
    """This rank's newest checkpoint at a position every rank of the run has (one process: its newest;
    distributed runs: rank 0 in ``RUN_DIR``, rank r in ``RUN_DIR/.rank<r>``). A job killed between two ranks'
    writes leaves them one checkpoint apart; every rank computes the same answer from the same files, so all
    resume in step (or all start over).

    A checkpoint written by another number of ranks (``position.json``'s ``world``) is resumed from rank 0's
    copy on every rank: it holds the weights, the optimizer state in a form any rank count can load
    (``cl.fsdp``; replicated under DDP) and the replicated component state; the other ranks' copies then
    matter no longer."""
    root = Path(run_dir) if rank == 0 else Path(run_dir).parent
    per_rank = [positions(root if r == 0 else root / f".rank{r}", with_world=True) for r in range(world)]
    same = lambda written_by: written_by is None or int(written_by) == world  # noqa: E731 (None: before ranks were recorded)
    valid = {}
    for pos, (d, written_by) in per_rank[0].items():
        if not same(written_by):  # another rank count: rank 0's copy for all
            if (d / "model.safetensors").is_file():
                valid[pos] = d
        elif world == 1 or ((d / "model.safetensors").is_file()  # the other ranks' weights are rank 0's
                            and all(pos in p and same(p[pos][1]) for p in per_rank)):
            valid[pos] = per_rank[rank][pos][0]
    return valid[max(valid)] if valid else None


def load_state(ckpt: Path, device: torch.device | None = None) -> dict:
    """``state.pt`` of ``ckpt``, its tensors on ``device`` (the resuming rank's; None: where they were saved
    from, or the CPU without a GPU)."""
    try:
        where = device if device is not None else (None if torch.cuda.is_available() else "cpu")
        return torch.load(Path(ckpt) / "state.pt", map_location=where, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{Path(ckpt) / 'state.pt'}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    from safetensors.torch import load_model

    path = Path(ckpt) / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as e:
        raise CheckpointError(f"{path}: does not fit this run's model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit this run's model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring the keys a resume may change."""
    out = []
    for k in sorted(set(saved) | set(current)):
        key = f"{prefix}{k}"
        if key in VOLATILE_KEYS:
            continue
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, key + ".")
        elif a != b:
            out.append(f"{key} (checkpoint {a!r}, now {b!r})")
    return out


def check_compatible(saved_cfg: dict, current_cfg: dict, ckpt: Path, ignore: tuple[str, ...] = ()) -> None:
    diffs = [d for d in config_differences(saved_cfg, current_cfg) if not d.startswith(tuple(k + " " for k in ignore))]
    if diffs:
        raise CheckpointError(f"{ckpt}: checkpoint from an incompatible config: {'; '.join(diffs[:5])}"
                              + (f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else "")
                              + "; rerun with resume=never to start over")


class Checkpointer:
    """Writes the run's checkpoint at task boundaries and every ``every_n_steps`` steps inside tasks.

    Args:
        run_dir: the run directory (``checkpoints/`` goes under it).
        module: the ``ContinualLM``.
        components: the stream components, in the order the run builds them.
        evaluator: the ``ContinualEvaluator`` (counters and the curves file).
        config: the resolved config, stored for the compatibility check on resume.
        every_n_steps: 0 = boundaries only.
        keep_prev: keep the previous checkpoint too (distributed runs, see ``latest_common``).
        write_weights: False for ranks > 0 of a distributed run (the weights are replicated; rank 0 writes
            them, ``rank0_weights`` finds them).
        world: the number of ranks (recorded in each checkpoint; resuming on another number is allowed for
            the distributed strategies, see ``latest_common``).
        shared_dir: rank 0's run directory (where every rank writes the FSDP optimizer shards).
    """

    def __init__(self, run_dir: Path, module, components, evaluator, config: dict, every_n_steps: int = 0,
                 keep_prev: bool = False, write_weights: bool = True, world: int = 1, shared_dir: Path | None = None):
        self.run_dir, self.module, self.components, self.evaluator = Path(run_dir), module, list(components), evaluator
        self.config, self.every_n_steps, self.keep_prev = config, every_n_steps, keep_prev
        self.write_weights, self.world = write_weights, world
        self.shared_dir = Path(shared_dir) if shared_dir is not None else self.run_dir
        self.seconds = 0.0
        for d in (self.run_dir / CKPT_DIR).glob("*"):  # what a killed save left (the lock: no writer now;
            if d.name.startswith(("tmp-", "retired-")):  # FSDP shards are written only inside a save)
                shutil.rmtree(d, ignore_errors=True)

    def callbacks(self, res, phase) -> list[pl.Callback]:
        if not self.every_n_steps:
            return []
        return [InTaskEveryNSteps(self.every_n_steps, lambda m: self.save(m.task_idx, m.step_in_task, res, phase))]

    def save(self, task_idx: int, step_in_task: int, res, phase) -> Path:
        import dataclasses
        import time

        t0 = time.perf_counter()
        ev = self.evaluator
        shards = None
        if getattr(self.module, "sharded", False) and step_in_task > 0:  # FSDP: every rank writes its shard
            shards = self.shared_dir / CKPT_DIR / "tmp-optimizer-shards"
            if self.write_weights:  # rank 0 clears what a killed save left, before any rank writes
                shutil.rmtree(shards, ignore_errors=True)
            _barrier()
            shards.mkdir(parents=True, exist_ok=True)
        optim = self.module.optim_state(step_in_task > 0, shards) if shards else self.module.optim_state(step_in_task > 0)
        state = {
            "version": VERSION, "config": self.config, "task_idx": task_idx, "step_in_task": step_in_task,
            "global_iter": self.module.global_iter, "world": self.world,
            "module": {"trainable_per_task": list(self.module.trainable_per_task),
                       "skipped_steps": self.module.skipped_steps, **optim},
            "result": capture(dataclasses.asdict(res)),
            "evaluator": {"seconds": ev.seconds, "points": ev.points, "old_task_acc": ev.old_task_acc,
                          "curves_bytes": ev.curves_path.stat().st_size if ev.curves_path.exists() else 0},
            "components": component_states(self.components),
            "phase_rows": capture(phase.train.to_list()) if phase is not None else None,
            "rng": rng_state(),
        }
        model = self.module.whole_model()  # under FSDP a collective: every rank gathers, rank 0 writes
        from cl.fsdp import SHARDS

        extra = {SHARDS: shards} if shards is not None and self.write_weights else None  # rank 0's checkpoint holds them
        path = save(self.run_dir, model if self.write_weights else None, state, keep_prev=self.keep_prev, extra=extra)
        self.seconds += time.perf_counter() - t0
        return path

    def load(self, ckpt: Path) -> dict:
        """Restore the module, components, evaluator and RNGs from ``ckpt``; returns the loop state for
        ``run_stream(resume=...)``. Call after everything is built, just before the stream starts."""
        m = self.module
        state = load_state(ckpt, next(m.model.parameters()).device)  # rank 0's copy goes to this rank's device
        if state.get("version") != VERSION:
            raise CheckpointError(f"{ckpt}: written in checkpoint format {state.get('version')}, this code reads "
                                  f"{VERSION}; rerun with resume=never to start over")
        written_by = state.get("world", self.world)
        check_compatible(state["config"], self.config, ckpt,
                         ignore=RANK_COUNT_KEYS if written_by != self.world else ())
        if written_by != self.world:
            print(f"[resume] the checkpoint was written by {written_by} rank(s), this run has {self.world}: every "
                  "rank continues from rank 0's state, the optimizer state resharded (the batches are split anew, "
                  "so the result equals an uninterrupted run's only up to floating-point reduction order)", flush=True)
        weights = rank0_weights(ckpt)
        load_model_weights(weights, m.model)
        load_component_states(self.components, state["components"], m.model)
        if written_by != self.world:
            for c in self.components:
                c.on_rank_count_change()
        m.global_iter_offset = state["global_iter"]
        m.trainable_per_task = list(state["module"]["trainable_per_task"])
        m.skipped_steps = state["module"]["skipped_steps"]
        optim = state["module"]["optimizer"]
        sharded = isinstance(optim, dict) and "shards" in optim  # cl.fsdp.save_optimizer_shards
        m.resume_optim = {"optimizer": None if sharded else optim, "scheduler": state["module"]["scheduler"],
                          "shards_dir": weights / optim["shards"] if sharded else None}
        ev = self.evaluator
        ev.seconds, ev.points, ev.old_task_acc = (state["evaluator"][k] for k in ("seconds", "points", "old_task_acc"))
        n_bytes = state["evaluator"]["curves_bytes"]
        owner = Path(ckpt).parent.parent  # the run directory that wrote the checkpoint
        if owner.resolve() != self.run_dir.resolve():  # a rank the checkpoint's run did not have: rank 0's curves
            with open(owner / ev.curves_path.name, "rb") as src:
                ev.curves_path.write_bytes(src.read(n_bytes))
        with open(ev.curves_path, "ab") as f:  # drop the lines written after the checkpoint
            f.truncate(n_bytes)
        set_rng_state(state["rng"])
        m.resume_rng = state["rng"]  # again when the fit starts: distributed strategies re-seed in their setup
        return state


class RunLock:
    """``RUN_DIR/.lock`` (``filelock``): one process per run directory. Identical commands map to the same
    directory, so a second copy started while the first still runs stops with a clear error instead of
    interleaving writes. The lock is the operating system's (released when its process ends, however it
    ends), so a killed run leaves nothing to clean up; ``RUN_DIR/.lock.owner`` names the holder for the
    message."""

    def __init__(self, run_dir: Path):
        from filelock import FileLock

        self.path = Path(run_dir) / ".lock"
        self.owner = Path(run_dir) / ".lock.owner"
        self.lock = FileLock(self.path, timeout=0)

    def __enter__(self) -> "RunLock":
        import socket

        from filelock import Timeout

        try:
            self.lock.acquire()
        except Timeout:
            try:
                holder = self.owner.read_text().strip()
            except OSError:
                holder = "another process"
            raise CheckpointError(f"{self.path.parent}: in use by {holder} (the same command is already running; "
                                  "a finished run is skipped, an interrupted one resumes)") from None
        self.owner.write_text(f"process {os.getpid()} on {socket.gethostname()}\n")
        return self

    def __exit__(self, *exc) -> None:  # the lock file stays: deleting it could let two processes hold "it"
        self.owner.unlink(missing_ok=True)
        self.lock.release()


# overrides that do not change a run's result, left out of its directory name (resume, logging, paths)
KEY_EXCLUDE = ("resume", "checkpoint.", "logger", "cache_dir", "hydra.", "hydra/", "train.nonfinite")
KEY_FIRST = ("experiment", "objective", "seed")  # shown first: what a reader looks for in a directory list


def run_key(overrides) -> str:
    """A run directory name from the command's overrides (Hydra's ``hydra.overrides.task``): readable prefix
    + hash of the whole, so the same command always lands in the same directory (and resumes there) and
    different commands never collide. Overrides that do not change the result are left out."""
    import hashlib
    import re

    items = [str(o) for o in overrides] if not isinstance(overrides, str) else ([overrides] if overrides else [])
    items = sorted(o for o in items if not o.lstrip("+~").startswith(KEY_EXCLUDE))
    key = lambda o: (next((i for i, k in enumerate(KEY_FIRST) if o.lstrip("+~").startswith(k + "=")), len(KEY_FIRST)), o)  # noqa: E731
    items.sort(key=key)
    text = ",".join(items) or "default"
    slug = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", text)[:80].strip("_") or "run"
    return f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
