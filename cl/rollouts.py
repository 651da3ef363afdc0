"""Where GRPO's rollouts are generated: HF ``generate`` on the training model (``hf``, the default), a
minimal decode loop on the training model (``hf_fast``: ``cl.generation.decode_ids``, the same tokens for
the same logits and RNG, faster at small models where ``generate``'s per-step overhead dominates), or a
vLLM engine colocated on the same GPU, its weights synced from the trainer before each rollout.

``objective.rollout_backend=vllm`` (needs ``pip install vllm`` and a CUDA GPU):

- the engine is built at the first rollout from the run's model path (vLLM loads models from paths; the
  first sync replaces those weights), with ``gpu_memory_utilization`` of the GPU for its weights and KV
  cache, beside the trainer;
- before every rollout whose weights changed since the last sync (a new optimizer step, a new task: task-end
  averaging or merging also changes them) each parameter goes to the engine through its model's
  ``load_weights`` and the prefix cache is reset (the colocate path of TRL's ``VLLMGeneration``, which this
  follows): LoRA layers go as base + adapter delta under the plain model's names, FSDP shards are gathered
  one parameter at a time (every rank takes part), tied weights go once;
- sampling: ``n = group_size`` completions per prompt with the objective's temperature and top-p; each
  prompt's request carries a seed drawn from the global torch RNG, so rollouts follow the run's seed and a
  resumed run draws the same seeds;
- completions are cut after the first end-of-sequence token and keep it, as on the HF path;
- the engine also returns each sampled token's log-prob after temperature and top-p
  (``logprobs_mode="processed_logprobs"``), and GRPO weights the loss by the trainer-to-sampler probability
  ratio (``importance_sampling``: TRL's ``vllm_importance_sampling_*``, same modes and defaults), because
  vLLM's kernels and precision make its samples slightly off-policy for the trainer.

The HF path is unchanged when the backend is ``hf``. Under DDP/FSDP every rank runs its own engine for
its share of the prompts (``distributed_executor_backend="external_launcher"``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cl.core.data import PromptFormat
from cl.generation import cut_after_eos, decode_ids, generate_ids

BACKENDS = ("hf", "hf_fast", "vllm")


class RolloutBackendError(RuntimeError):
    """The configured rollout backend cannot run here; the message says why and what to do."""


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def make_backend(name: str, vllm: dict | None = None, compile_step: bool = False):
    if name == "hf":
        return HFRollouts()
    if name == "hf_fast":
        return HFFastRollouts(compile_step)
    if name == "vllm":
        return VLLMRollouts(**(vllm or {}))
    raise ValueError(f"objective.rollout_backend: '{name}' is not one of {', '.join(BACKENDS)}")


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class HFRollouts:
    """Sampling with transformers' ``generate`` on the model being trained."""

    name = "hf"
    correction = None  # samples come from the model being trained: on-policy
    sample = staticmethod(generate_ids)  # how completions are drawn (hf_fast: decode_ids, same signature)
    sample_options: dict = {}  # passed to ``sample`` besides the sampling settings

    def mark_stale(self) -> None:
        pass

    def generate(self, module, prompts: list[list[int]], fmt: PromptFormat, n: int, max_new_tokens: int,
                 temperature: float, top_p: float) -> tuple[list[list[int]], None]:
        """``n`` completions per prompt (prompt-major), and no sampler log-probs."""
        return self.sample(module.model, prompts, fmt, max_new_tokens=max_new_tokens, do_sample=True,
                           temperature=temperature, top_p=top_p, num_return_sequences=n,
                           **self.sample_options), None


class HFFastRollouts(HFRollouts):
    """Sampling with ``cl.generation.decode_ids``: the same tokens as ``generate`` for the same logits and
    RNG, through a minimal decode loop (one prefill per distinct prompt, its cache repeated for the group)."""

    name = "hf_fast"
    sample = staticmethod(decode_ids)

    def __init__(self, compile_step: bool = False) -> None:
        self.sample_options = {"compile_step": True} if compile_step else {}  # objective.rollout_compile


def vllm_weights(model: nn.Module):
    """``(name, tensor)`` for every parameter under the names of the plain transformers model, as vLLM's
    ``load_weights`` expects them: LoRA layers as base + their active adapters' delta (computed, the model is
    not touched: a merge/unmerge round trip would drift the base weights by rounding at every sync), adapter
    tensors and peft prefixes left out, FSDP shards gathered (a collective), tied weights once."""
    from torch.distributed.tensor import DTensor

    deltas: dict[str, torch.Tensor] = {}
    peft_prefix = getattr(model, "prefix", None) if hasattr(model, "peft_config") else None
    if peft_prefix is not None:
        from peft.tuners.lora import LoraLayer

        for mname, m in model.named_modules():
            if isinstance(m, LoraLayer):
                active = [a for a in m.active_adapters if a in m.lora_A and a not in m.merged_adapters]
                if active:
                    deltas[f"{mname}.base_layer.weight"] = sum(m.get_delta_weight(a) for a in active)
    for name, p in model.named_parameters():  # tied weights appear once
        data = p.full_tensor() if isinstance(p, DTensor) else p.data
        if peft_prefix is not None:
            if name in deltas:
                data = data + deltas[name].to(data.dtype)
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if peft_prefix in name or "original_module" in name:
                continue
            name = name.replace("modules_to_save.default.", "")
        yield name, data.detach()


class VLLMRollouts:
    """A vLLM engine colocated with the trainer (see the module docstring).

    Args:
        gpu_memory_utilization: share of the GPU's memory vLLM reserves (weights + KV cache).
        max_model_len: longest prompt + completion; None: the model's own limit.
        enforce_eager: no CUDA graphs (less memory, slower decode).
        dtype: vLLM's weight dtype (``auto``: the model's).
        importance_sampling: the sampler correction (``cl.objectives.grpo_loss.sampler_correction``):
            ``sequence_mask`` (TRL's default), ``sequence_truncate``, ``token_mask``, ``token_truncate``, or
            ``none`` (treat vLLM's samples as on-policy).
        is_clip_min, is_clip_max: its bounds (TRL's defaults: none and 3.0).
    """

    name = "vllm"

    def __init__(self, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 enforce_eager: bool = False, dtype: str = "auto", importance_sampling: str | None = "sequence_mask",
                 is_clip_min: float | None = None, is_clip_max: float | None = 3.0):
        from cl.objectives.grpo_loss import SAMPLER_CORRECTIONS

        self.gpu_memory_utilization, self.max_model_len = gpu_memory_utilization, max_model_len
        self.enforce_eager, self.dtype = enforce_eager, dtype
        if importance_sampling in (None, "none"):
            self.correction = None
        elif importance_sampling in SAMPLER_CORRECTIONS:
            self.correction = {"mode": importance_sampling, "clip_min": is_clip_min, "clip_max": is_clip_max}
        else:
            raise ValueError(f"objective.vllm.importance_sampling: '{importance_sampling}' is not one of "
                             f"{', '.join(SAMPLER_CORRECTIONS)}, none")
        self.llm = None
        self.synced_at: tuple | None = None  # (task_idx, global_iter) of the weights the engine holds
        self.syncs = 0

    @staticmethod
    def check_available(key: str = "objective.rollout_backend") -> None:
        """Raise, naming the setting ``key`` that asked for vLLM, where vLLM or a GPU is missing."""
        short = key.rpartition(".")[2] if key == "objective.rollout_backend" else key
        if not vllm_available():
            raise RolloutBackendError(f"{key}=vllm: vLLM is not installed (pip install vllm); use {short}=hf")
        if not torch.cuda.is_available():
            raise RolloutBackendError(f"{key}=vllm: needs a CUDA GPU (none visible); use {short}=hf")

    def mark_stale(self) -> None:
        """The weights changed outside an optimizer step (a task boundary): sync at the next rollout."""
        self.synced_at = None

    def _engine(self, module):
        """The engine, made on first use from ``module.model``'s ``name_or_path``."""
        if self.llm is None:
            self.check_available()
            from vllm import LLM

            # vLLM loads a model from its path (the run's base: hub id, local directory or base-stage cache);
            # the first sync then replaces those weights with the trainer's current ones
            path = getattr(module.model, "name_or_path", None)
            if not path:
                raise RolloutBackendError("objective.rollout_backend=vllm: the model has no name_or_path to load "
                                          "into vLLM")
            # in-process engine (external_launcher turns vLLM's engine-core subprocess off, which is what
            # exposes the model for load_weights), told this process's place in the job, as TRL's colocate
            # mode does; under DDP/FSDP it joins the process group Lightning made
            rank, world = _rank_and_world()
            os.environ.update(RANK=str(rank), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0") or "0", WORLD_SIZE=str(world))
            os.environ.setdefault("MASTER_ADDR", "localhost")
            if not os.environ.get("MASTER_PORT"):
                os.environ["MASTER_PORT"] = str(_free_port())
            self.llm = LLM(model=str(path), skip_tokenizer_init=True, dtype=self.dtype,
                           gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
                           enforce_eager=self.enforce_eager, seed=rank, distributed_executor_backend="external_launcher",
                           max_num_batched_tokens=4096,
                           # log-probs after temperature and top-p: what the sampler drew from (as TRL sets it)
                           logprobs_mode="processed_logprobs")
        return self.llm

    def sync(self, module) -> None:
        """Push the trainer's current weights into the engine (every rank calls it: FSDP gathers)."""
        llm = self._engine(module)
        target = llm.llm_engine.model_executor.driver_worker.model_runner.model
        with torch.no_grad():
            for name, tensor in vllm_weights(module.model):
                target.load_weights([(name, tensor)])
        llm.reset_prefix_cache()
        self.syncs += 1

    def generate(self, module, prompts: list[list[int]], fmt: PromptFormat, n: int, max_new_tokens: int,
                 temperature: float, top_p: float) -> tuple[list[list[int]], list[list[float]] | None]:
        """``n`` completions per prompt (prompt-major) and, with a sampler correction, the engine's log-prob
        of each of their tokens (NaN for an end-of-sequence token it stopped on without returning)."""
        from vllm import SamplingParams

        version = (module.task_idx, module.global_iter)
        if self.synced_at != version:
            self.sync(module)
            self.synced_at = version
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the run's RNG: same seeds on a resume
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 stop_token_ids=[fmt.eos_id], seed=seed + i,
                                 logprobs=0 if self.correction else None) for i in range(len(prompts))]
        outputs = self._engine(module).generate([{"prompt_token_ids": list(p)} for p in prompts],
                                                sampling_params=params, use_tqdm=False)
        comps: list[list[int]] = []
        logps: list[list[float]] = []
        for out in outputs:
            if len(out.outputs) != n:
                raise RolloutBackendError(f"vLLM returned {len(out.outputs)} completions for a prompt, expected {n}")
            for c in out.outputs:
                ids = _completion_ids(c, fmt.eos_id)
                comps.append(ids)
                if self.correction:
                    logps.append(_sampled_logprobs(c, ids))
        return comps, (logps if self.correction else None)

    def push(self, model) -> None:
        """Push ``model``'s current weights for evaluation (once per evaluation point); the rollouts push
        again at their next call."""
        self.sync(_Holder(model))
        self.synced_at = None

    def greedy(self, model, prompts: list[list[int]], fmt: PromptFormat, max_new_tokens: int,
               push: bool = True) -> list[list[int]]:
        """Greedy completions (``eval.backend=vllm``): the model's current weights are pushed first unless
        ``push`` is False (the caller pushed them for this point), then one temperature-0 completion per
        prompt that stops only at the run's eos (as ``generate_ids``), cut after it."""
        from vllm import SamplingParams

        holder = _Holder(model)
        if push:
            self.push(model)
        params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=[fmt.eos_id],
                                ignore_eos=True)
        outputs = self._engine(holder).generate([{"prompt_token_ids": list(p)} for p in prompts],
                                                sampling_params=params, use_tqdm=False)
        return [_completion_ids(out.outputs[0], fmt.eos_id) for out in outputs]


class _Holder:
    """A bare model in the shape the engine's calls take (the training holder's ``.model``)."""

    def __init__(self, model):
        self.model = model


def _completion_ids(completion, eos_id: int) -> list[int]:
    """A vLLM completion's tokens cut after the first eos (``cut_after_eos``), with the eos put back where
    the engine stopped on it without returning it."""
    ids = cut_after_eos([list(completion.token_ids)], eos_id)[0]
    if eos_id not in ids and getattr(completion, "finish_reason", None) == "stop":
        ids.append(eos_id)
    return ids


def _sampled_logprobs(completion, ids: list[int]) -> list[float]:
    """The engine's log-prob of each token in ``ids`` (``completion.logprobs``: one ``{token_id: Logprob}``
    per generated position); NaN where it has none."""
    per_pos = list(completion.logprobs or [])
    out = []
    for i, tok in enumerate(ids):
        entry = per_pos[i].get(tok) if i < len(per_pos) and per_pos[i] is not None else None
        out.append(float("nan") if entry is None else float(entry.logprob))
    return out
