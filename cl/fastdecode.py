"""A decode kernel for the Llama family (Llama, Mistral, Qwen2, Qwen3) that reads the model's own weights: one
preallocated key/value buffer per layer, the rotary table computed once per call by the model's own rotary
module, and each layer written as the handful of tensor operations it is, without transformers' per-step
machinery (mask construction, cache objects, module dispatch). ``cl.generation.decode_ids`` uses it when
``kernel_for(model)`` accepts the model and falls back to its ``DynamicCache`` loop otherwise.

It computes what the transformers model computes, operation for operation (RMSNorm in float32 as
``LlamaRMSNorm``; rotary embedding as ``apply_rotary_pos_emb``; scaled-dot-product attention over the
valid positions; SiLU-gated MLP; peft LoRA layers as ``base(x) + B(A(x)) * scale`` per active adapter, in
peft's order). The attention kernel sees an explicit mask where transformers may pass none, so the logits
agree to float rounding (``tests/test_fastdecode.py`` checks logits and greedy tokens against the model).

Not accepted (the caller falls back): other architectures, vision-language models, activations other than
SiLU, dynamic or long-rope rotary scaling, a sliding window shorter than the sequence, modules replaced by
anything but ``nn.Linear`` or a plain peft LoRA ``Linear`` (DoRA and other variants, MoRA, ...), models
not in eval mode.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _linear_plan(m: nn.Module):
    """``(weight, bias, [(A, B, B_bias, scale), ...])`` for a plain linear or a vanilla peft LoRA linear, else
    ``None``."""
    if type(m) is nn.Linear:
        return (m.weight, m.bias, [])
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if type(m) is not LoraLinear or type(m.base_layer) is not nn.Linear:
        return None
    base = m.base_layer
    if m.merged:  # the delta is in the base weight; disabled, peft would unmerge it first
        return None if m.disable_adapters else (base.weight, base.bias, [])
    if m.disable_adapters:
        return (base.weight, base.bias, [])
    extra = []
    for name in m.active_adapters:
        if name not in m.lora_A.keys():
            continue
        if name in getattr(m, "lora_variant", {}) or m.use_dora.get(name, False):
            return None
        a, b = m.lora_A[name], m.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear:
            return None
        extra.append((a.weight, b.weight, b.bias, m.scaling[name]))
    return (base.weight, base.bias, extra)


def _apply(plan, x: torch.Tensor) -> torch.Tensor:
    w, b, loras = plan
    y = F.linear(x, w, b)
    if not loras:
        return y
    dtype = y.dtype
    for a, bw, bb, scale in loras:  # peft: input cast to the adapter's dtype, sum promoted, result cast back
        y = y + F.linear(F.linear(x.to(a.dtype), a), bw, bb) * scale
    return y.to(dtype)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _is_rms(m) -> bool:
    return type(m).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def kernel_for(model: nn.Module) -> tuple["LlamaKernel | None", str]:
    """``(kernel, "")`` when the kernel reproduces ``model``, else ``(None, reason)``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES or getattr(config, "vision_config", None) is not None:
        return None, f"model type {kind!r} is not one of {', '.join(FAMILIES)}"
    if inner.training:
        return None, "model in training mode"
    if getattr(config, "hidden_act", None) != "silu":
        return None, f"activation {config.hidden_act!r}"
    body = getattr(inner, "model", None)
    rotary = getattr(body, "rotary_emb", None)
    rope = str(getattr(rotary, "rope_type", ""))
    if rotary is None or "dynamic" in rope or "longrope" in rope:
        return None, f"rotary type {rope!r}"
    if type(body.embed_tokens) is not nn.Embedding or not _is_rms(body.norm):
        return None, "embedding or final norm replaced"
    head = _linear_plan(inner.lm_head)
    if head is None:
        return None, "lm_head replaced"
    layers = []
    for layer in body.layers:
        att, mlp = layer.self_attn, layer.mlp
        mods = [getattr(att, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
               [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        plans = [_linear_plan(m) if m is not None else None for m in mods]
        if any(p is None for p in plans):
            return None, ("a projection is neither nn.Linear nor a plain peft LoRA Linear (DoRA and other "
                          "variants, merged-and-disabled adapters and other modules are not reproduced)")
        if not (_is_rms(layer.input_layernorm) and _is_rms(layer.post_attention_layernorm)):
            return None, "layer norm replaced"
        qk = (getattr(att, "q_norm", None), getattr(att, "k_norm", None))
        if kind == "qwen3" and not all(_is_rms(n) for n in qk):
            return None, "q/k norm replaced"
        layers.append(dict(plans=plans, ln1=layer.input_layernorm, ln2=layer.post_attention_layernorm,
                           qk=qk if kind == "qwen3" else None, scaling=att.scaling, head_dim=att.head_dim,
                           window=getattr(att, "sliding_window") if hasattr(att, "sliding_window")
                           else getattr(config, "sliding_window", None)))
    return LlamaKernel(body, head, layers), ""


class LlamaKernel:
    """Prefill and single-token steps over a static key/value buffer (see the module docstring)."""

    def __init__(self, body: nn.Module, head, layers: list[dict]):
        self.body, self.head, self.layers = body, head, layers
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cos = self.sin = None
        self.filled = 0

    def _rope_tables(self, total: int, like: torch.Tensor) -> None:
        pos = torch.arange(total, device=like.device)[None]
        cos, sin = self.body.rotary_emb(like, pos)
        self.cos, self.sin = cos[0], sin[0]  # [total, head_dim]

    def _layer(self, i: int, x: torch.Tensor, rope: tuple, mask: torch.Tensor, start) -> torch.Tensor:
        """One decoder layer over ``x`` ``[b, s, hidden]`` written at positions ``start ..``: an int (keys and
        values then span the positions filled so far), or a one-element tensor (a single token; keys and
        values span the whole buffer, ``mask`` hides what is not filled: fixed shapes for a CUDA graph)."""
        spec = self.layers[i]
        q_p, k_p, v_p, o_p, g_p, u_p, d_p = spec["plans"]
        ln1, ln2 = spec["ln1"], spec["ln2"]
        b, s, _ = x.shape
        hd = spec["head_dim"]
        h = _rms(x, ln1.weight, ln1.variance_epsilon)
        q = _apply(q_p, h).view(b, s, -1, hd)
        k = _apply(k_p, h).view(b, s, -1, hd)
        v = _apply(v_p, h).view(b, s, -1, hd).transpose(1, 2)
        if spec["qk"] is not None:
            qn, kn = spec["qk"]
            q, k = _rms(q, qn.weight, qn.variance_epsilon), _rms(k, kn.weight, kn.variance_epsilon)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if torch.is_tensor(start):  # static shapes: write at a device-side index, attend over the whole buffer
            self.k[i].index_copy_(2, start, k.to(self.k[i].dtype))
            self.v[i].index_copy_(2, start, v.to(self.v[i].dtype))
            keys, values = self.k[i], self.v[i]
        else:
            self.k[i].narrow(2, start, s).copy_(k)
            self.v[i].narrow(2, start, s).copy_(v)
            keys, values = self.k[i].narrow(2, 0, start + s), self.v[i].narrow(2, 0, start + s)
        if s == 1:  # one query: two batched products beat the fused kernel's blocking at these sizes
            groups = q.size(1) // keys.size(1)
            qg = q.view(b, keys.size(1), groups, hd)  # query heads of one key/value head together (GQA)
            scores = torch.matmul(qg, keys.transpose(2, 3)) * spec["scaling"]
            scores = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
            att = torch.matmul(scores, values).view(b, q.size(1), 1, hd)
        else:
            gqa = keys.size(1) != q.size(1)
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=spec["scaling"],
                                                 enable_gqa=gqa)
        x = x + _apply(o_p, att.transpose(1, 2).reshape(b, s, -1))
        h = _rms(x, ln2.weight, ln2.variance_epsilon)
        return x + _apply(d_p, F.silu(_apply(g_p, h)) * _apply(u_p, h))

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, start) -> torch.Tensor:
        x = F.embedding(ids, self.body.embed_tokens.weight, self.body.embed_tokens.padding_idx)
        rope = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [b, 1, s, head_dim]
        for i in range(len(self.layers)):
            x = self._layer(i, x, rope, mask, start)
        x = _rms(x[:, -1:], self.body.norm.weight, self.body.norm.variance_epsilon)
        return _apply(self.head, x)[:, -1].float()

    def fits(self, total: int) -> bool:
        """Whether ``total`` positions fit every layer's attention window."""
        return all(spec["window"] is None or total <= spec["window"] for spec in self.layers)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, total: int, repeat: int = 1):
        """Next-token logits (float32) of left-padded prompts ``ids`` ``[b, L]``, each row's buffer then
        repeated ``repeat`` times (rows ``i*repeat .. i*repeat+repeat-1`` copy prompt ``i``); ``total``: the
        buffer length (prompt + new tokens)."""
        b, length = ids.shape
        w = self.body.embed_tokens.weight
        kv = [(spec["plans"][1][0].size(0) // spec["head_dim"], spec["head_dim"]) for spec in self.layers]
        self.k = [w.new_zeros(b, h, total, d) for h, d in kv]
        self.v = [w.new_zeros(b, h, total, d) for h, d in kv]
        self._rope_tables(total, w)
        valid = mask.bool()
        attend = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()[None] & valid[:, None, :]
        attend |= torch.eye(length, dtype=torch.bool, device=ids.device)[None]  # a pad query sees itself (no NaN)
        logits = self._run(ids, pos, attend[:, None], 0)
        if repeat > 1:
            self.k = [t.repeat_interleave(repeat, 0) for t in self.k]
            self.v = [t.repeat_interleave(repeat, 0) for t in self.v]
            logits = logits.repeat_interleave(repeat, 0)
        self.filled = length
        return logits

    def step(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Next-token logits after appending ``ids`` ``[n, 1]`` at positions ``pos`` ``[n, 1]``; ``mask``: the
        attention mask over every position so far including this one (``[n, filled + 1]``)."""
        logits = self._run(ids, pos, mask.bool()[:, None, None, :], self.filled)  # True: may attend
        self.filled += 1
        return logits

    def static_step(self, graph: bool | None = None, compiled: bool = False) -> "StaticStep":
        """A drop-in for ``step`` with fixed shapes (keys and values over the whole buffer, the unfilled part
        masked): on CUDA replayed as one CUDA graph per call (``graph=None``: when the buffers are on a CUDA
        device), which removes the per-kernel launch cost that bounds small-batch decoding there; elsewhere,
        with ``compiled``, run through ``torch.compile`` (:func:`compiled_step`). Call after ``prefill``."""
        graph = self.k[0].is_cuda if graph is None else graph
        return StaticStep(self, graph, compiled=compiled and not graph)


def _static_run(kernel: "LlamaKernel", ids, pos, mask, slot) -> torch.Tensor:
    return kernel._run(ids, pos, mask, slot)


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would build CPU kernels with (``$CXX``, else ``c++``/``g++``/``clang++``), or None."""
    import os
    import shutil

    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


@functools.cache
def compiled_step():
    """The static step through ``torch.compile`` (Inductor; ``dynamic=False``), one function per process: it
    fuses the ~30 small operations of each layer (norms, rotary, masking, softmax, SiLU, residuals) that
    dominate a single-token step at small sizes on CPUs. Compiled once per variant (rows, buffer length,
    dtype, autocast state, the model's layer structure); kernels of later batches of a variant reuse it
    (Dynamo guards on shapes, not on the tensors' identity), and weights updated in place by the optimizer
    are read afresh at every call. Past ``torch._dynamo.config.recompile_limit`` variants (8) in a process,
    Dynamo runs new ones eagerly and logs a warning."""
    return torch.compile(_static_run, dynamic=False)


class StaticStep:
    """``LlamaKernel.step`` over static input buffers. The first call runs the step eagerly on a side stream
    (twice: the warm-up CUDA graphs need; each run writes the same key/value slot, so repeating is harmless) and
    captures it; every call copies its inputs into the buffers and replays the graph. With ``graph=False``
    the same static step runs eagerly (what the CPU tests check against ``step``), or compiled
    (``compiled``: :func:`compiled_step`). A failed capture raises with
    the way out (``rollout_backend=hf``), after putting the thread back on its stream."""

    def __init__(self, kernel: LlamaKernel, graph: bool, compiled: bool = False):
        self.kernel, self.graph, self.compiled = kernel, graph, compiled
        ref = kernel.k[0]
        n, total = ref.size(0), ref.size(2)
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=ref.device)
        self.pos = torch.zeros(n, 1, dtype=torch.long, device=ref.device)
        self.mask = torch.zeros(n, 1, 1, total, dtype=torch.bool, device=ref.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=ref.device)
        self.cuda_graph = None
        self.out: torch.Tensor | None = None
        self.buffer = ref.data_ptr()  # the key/value buffers the graph writes: a new prefill replaces them

    def _forward(self) -> torch.Tensor:
        if not self.compiled:
            return self.kernel._run(self.ids, self.pos, self.mask, self.slot)
        try:
            return compiled_step()(self.kernel, self.ids, self.pos, self.mask, self.slot)
        except torch._dynamo.exc.TorchDynamoException as e:  # tracing or Inductor's build (a C++ compiler) failed
            first = (str(e).strip().splitlines() or [repr(e)])[0][:300]
            raise RuntimeError(f"objective.rollout_compile: torch.compile of the decode step failed "
                               f"({type(e).__name__}: {first}); set objective.rollout_compile=false") from e

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        if k.k[0].data_ptr() != self.buffer:
            raise RuntimeError("StaticStep: the kernel was prefilled again; make a new static step after prefill")
        if k.filled >= self.mask.size(-1):
            raise ValueError(f"StaticStep: all {self.mask.size(-1)} buffer positions are filled")
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.mask[:, 0, 0, : mask.size(1)].copy_(mask.bool())
        self.slot.fill_(k.filled)
        if not self.graph:
            out = self._forward()
        else:
            if self.cuda_graph is None:
                prev = torch.cuda.current_stream(self.ids.device)
                try:
                    with torch.cuda.device(self.ids.device):
                        self._capture()
                except RuntimeError as e:  # a failed capture can leave the thread on the capture stream
                    torch.cuda.set_stream(prev)
                    raise RuntimeError(f"rollout_backend=hf_fast: the decode step could not be captured as a CUDA "
                                       f"graph ({str(e)[:300]}); use objective.rollout_backend=hf") from e
            self.cuda_graph.replay()
            out = self.out.clone()
        k.filled += 1
        return out

    def _capture(self) -> None:
        # autocast's weight-cast cache would hand the graph tensors freed when the autocast region ends
        on = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if on else torch.bfloat16
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.autocast("cuda", dtype=dtype, enabled=on, cache_enabled=False):
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self.cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.cuda_graph, capture_error_mode="thread_local"):
                self.out = self._forward()
