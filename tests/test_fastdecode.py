"""The Llama-family decode kernel (``cl.fastdecode``) against the transformers model it reads: prefill and
step logits, greedy tokens and sampled tokens, for each family it accepts (grouped-query attention, q/k/v
biases, q/k norms), through peft LoRA, and its refusals."""

from __future__ import annotations

import pytest
import torch

from cl.core.data import collate_prompts
from cl.fastdecode import cxx_compiler

SIZES = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _model(kind: str, seed: int = 0):
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind]
    extra = {"head_dim": 16} if kind == "qwen3" else {}
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**SIZES, **extra))
    with torch.no_grad():  # random norms and biases, so a missed one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, SIZES["vocab_size"], (int(n),), generator=g).tolist() for n in (5, 9, 3, 9, 7, 6)]


def _reference_logits(model, prompts, steps: list[list[int]]):
    """The model's own next-token logits after the prompts and after each appended column of ``steps``."""
    b = collate_prompts(prompts, 0)
    ids, mask = b["input_ids"], b["attention_mask"]
    out = []
    for col in [None] + steps:
        if col is not None:
            ids = torch.cat([ids, torch.tensor(col)[:, None]], -1)
            mask = torch.cat([mask, torch.ones(len(col), 1, dtype=mask.dtype)], -1)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out.append(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float())
    return out


def _lora(model, targets: list[str]):
    """``model`` under a peft LoRA on ``targets`` whose B is random (peft starts it at zero), in eval mode."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def _kernel_prefill(model, prompts, total: int = 12):
    """The kernel's next-token logits for left-padded ``prompts`` (asserts the kernel accepts ``model``)."""
    from cl.fastdecode import kernel_for

    kernel, why = kernel_for(model)
    assert kernel is not None, why
    b = collate_prompts(prompts, 0)
    pos = (b["attention_mask"].cumsum(-1) - 1).masked_fill(b["attention_mask"] == 0, 0)
    with torch.no_grad():
        return kernel.prefill(b["input_ids"], b["attention_mask"], pos, total)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_kernel_logits_match_the_model_step_by_step(kind):
    from cl.fastdecode import kernel_for

    model = _model(kind)
    prompts = _prompts()
    steps = [[5 + i + j for i in range(len(prompts))] for j in range(4)]
    kernel, why = kernel_for(model)
    assert kernel is not None, why
    b = collate_prompts(prompts, 0)
    mask = b["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = _reference_logits(model, prompts, steps)
        got = [kernel.prefill(b["input_ids"], mask, pos, b["input_ids"].size(1) + len(steps))]
        p = pos[:, -1:]
        for col in steps:
            mask = torch.cat([mask, torch.ones(len(col), 1, dtype=mask.dtype)], -1)
            p = p + 1
            got.append(kernel.step(torch.tensor(col)[:, None], mask, p))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_static_step_matches_the_step_and_the_model(kind):
    """The fixed-shape step (what a CUDA graph replays; eager here) writes its slot from a device-side index and
    attends over the whole buffer with the unfilled part masked: the model's logits at every step."""
    from cl.fastdecode import kernel_for

    model = _model(kind, seed=11)
    prompts = _prompts(12)
    steps = [[7 + 2 * i + j for i in range(len(prompts))] for j in range(5)]
    kernel, why = kernel_for(model)
    assert kernel is not None, why
    b = collate_prompts(prompts, 0)
    mask = b["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    total = b["input_ids"].size(1) + len(steps) + 3  # slack at the end: masked, never filled
    with torch.no_grad():
        ref = _reference_logits(model, prompts, steps)
        got = [kernel.prefill(b["input_ids"], mask, pos, total)]
        step = kernel.static_step(graph=False)
        p = pos[:, -1:]
        for col in steps:
            mask = torch.cat([mask, torch.ones(len(col), 1, dtype=mask.dtype)], -1)
            p = p + 1
            got.append(step(torch.tensor(col)[:, None], mask, p))
    assert kernel.filled == b["input_ids"].size(1) + len(steps)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_decode_through_the_static_step_gives_generates_tokens():
    """``decode_ids`` with the static step (on CUDA a graph replay; forced here on CPU): the greedy and sampled
    tokens of ``generate``, also with n completions per prompt and through a LoRA adapter."""
    from cl.generation import decode_ids, generate_ids

    fmt = _Fmt()
    for model in (_model("qwen2", seed=13), _lora(_model("llama", seed=14), ["q_proj", "down_proj"])):
        prompts = _prompts(15)
        assert decode_ids(model, prompts, fmt, 9, static_step=True) == generate_ids(model, prompts, fmt, 9)
        torch.manual_seed(3)
        a = generate_ids(model, prompts, fmt, 9, do_sample=True, top_p=0.9)
        torch.manual_seed(3)
        assert decode_ids(model, prompts, fmt, 9, do_sample=True, top_p=0.9, static_step=True) == a
        torch.manual_seed(4)
        b = decode_ids(model, prompts, fmt, 9, do_sample=True, top_p=0.9, num_return_sequences=3, static_step=True)
        torch.manual_seed(4)
        c = decode_ids(model, prompts, fmt, 9, do_sample=True, top_p=0.9, num_return_sequences=3, static_step=False)
        assert b == c and len(b) == 3 * len(prompts)


def _prefilled(model, prompts, extra: int):
    from cl.fastdecode import kernel_for

    kernel = kernel_for(model)[0]
    b = collate_prompts(prompts, 0)
    mask = b["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    kernel.prefill(b["input_ids"], mask, pos, b["input_ids"].size(1) + extra)
    return kernel, mask, pos


def test_static_step_under_bf16_autocast_matches_the_step():
    """Under autocast the new keys and values are bf16 while the buffers keep the weights' dtype (as the step's
    narrowed copy casts them): the static step writes them the same way."""
    model = _model("qwen2", seed=18)
    prompts = _prompts(19)
    outs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for static in (False, True):
            kernel, mask, pos = _prefilled(model, prompts, 3)
            step = kernel.static_step(graph=False) if static else kernel.step
            got, p = [], pos[:, -1:]
            for j in range(3):
                mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], -1)
                p = p + 1
                got.append(step(torch.full((len(prompts), 1), 5 + j), mask, p))
            outs.append(got)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=5e-2, rtol=2e-2)


def test_static_step_guards_and_a_failed_capture_names_the_way_out(monkeypatch):
    from cl.fastdecode import StaticStep

    model = _model("llama", seed=20)
    prompts = _prompts(21)
    with torch.no_grad():
        kernel, mask, pos = _prefilled(model, prompts, 1)
        step = kernel.static_step(graph=False)
        m = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], -1)
        step(torch.full((len(prompts), 1), 5), m, pos[:, -1:] + 1)
        with pytest.raises(ValueError, match="buffer positions are filled"):
            step(torch.full((len(prompts), 1), 5), m, pos[:, -1:] + 2)
        kernel, mask, pos = _prefilled(model, prompts, 2)
        stale = kernel.static_step(graph=False)
        b = collate_prompts(prompts, 0)
        kernel.prefill(b["input_ids"], mask, pos, b["input_ids"].size(1) + 2)
        with pytest.raises(RuntimeError, match="prefilled again"):
            stale(torch.full((len(prompts), 1), 5), m, pos[:, -1:] + 1)
        # a capture that fails: the thread goes back to its stream and the error names rollout_backend=hf
        streams = []
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "the stream before")
        monkeypatch.setattr(torch.cuda, "set_stream", streams.append)
        monkeypatch.setattr(torch.cuda, "device", lambda d: __import__("contextlib").nullcontext())

        def fail(self):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(StaticStep, "_capture", fail)
        kernel, mask, pos = _prefilled(model, prompts, 2)
        with pytest.raises(RuntimeError, match=r"could not be captured.*rollout_backend=hf"):
            kernel.static_step(graph=True)(torch.full((len(prompts), 1), 5), m, pos[:, -1:] + 1)
        assert streams == ["the stream before"]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_kernel_decode_gives_generates_greedy_and_sampled_tokens(kind):
    from cl.generation import decode_ids, generate_ids

    model = _model(kind, seed=3)
    fmt = _Fmt()
    prompts = _prompts(4)
    assert decode_ids(model, prompts, fmt, 10) == generate_ids(model, prompts, fmt, 10)
    assert decode_ids(model, prompts, fmt, 10) == decode_ids(model, prompts, fmt, 10, use_kernel=False)
    torch.manual_seed(7)
    a = generate_ids(model, prompts, fmt, 10, do_sample=True, temperature=0.8, top_p=0.95)
    torch.manual_seed(7)
    b = decode_ids(model, prompts, fmt, 10, do_sample=True, temperature=0.8, top_p=0.95)
    assert a == b
    # n completions per prompt: the shared prefill draws as the per-copy loop does
    torch.manual_seed(9)
    c = decode_ids(model, prompts, fmt, 10, do_sample=True, num_return_sequences=3)
    torch.manual_seed(9)
    d = decode_ids(model, prompts, fmt, 10, do_sample=True, num_return_sequences=3, use_kernel=False)
    assert c == d and len(c) == 3 * len(prompts)


class _Fmt:
    """The slice of ``PromptFormat`` the decoders read."""
    pad_id, eos_id, suppress_ids = 0, 2, ()


def test_kernel_through_peft_lora_matches_the_adapted_model():
    from cl.generation import decode_ids, generate_ids

    model = _lora(_model("llama", seed=5), ["q_proj", "v_proj", "down_proj", "lm_head"])
    prompts = _prompts(6)
    got = _kernel_prefill(model, prompts)
    with torch.no_grad():
        ref = _reference_logits(model, prompts, [])[0]
        with model.disable_adapter():
            off_ref = _reference_logits(model, prompts, [])[0]
            off = _kernel_prefill(model, prompts)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(off, off_ref, atol=2e-5, rtol=1e-4)
    assert (ref - off_ref).abs().max() > 1e-2  # the adapter changes the logits, so both checks mean something
    assert decode_ids(model, prompts, _Fmt(), 8) == generate_ids(model, prompts, _Fmt(), 8)


def test_kernel_refuses_what_it_does_not_reproduce():
    from peft import LoraConfig, get_peft_model

    from cl.fastdecode import kernel_for

    model = _model("llama")
    model.train()
    assert kernel_for(model)[0] is None and "training" in kernel_for(model)[1]
    dora = get_peft_model(_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).eval()
    assert kernel_for(dora)[0] is None and "LoRA" in kernel_for(dora)[1]
    import transformers

    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=1, n_head=2)).eval()
    assert kernel_for(gpt2)[0] is None and "gpt2" in kernel_for(gpt2)[1]
    merged = get_peft_model(_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    merged.merge_adapter()
    assert kernel_for(merged)[0] is not None  # merged and active: the base weight holds the delta
    with merged.disable_adapter():  # peft would unmerge before the base forward
        assert kernel_for(merged)[0] is None


def test_kernel_follows_the_configs_sliding_window():
    """Mistral's window is a config setting (its attention module has none): a sequence longer than the
    window is left to the model's own forward, which applies it, so tokens still match generate."""
    import transformers

    from cl.fastdecode import kernel_for
    from cl.generation import decode_ids, generate_ids

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(**SIZES, sliding_window=6)).eval()
    kernel = kernel_for(model)[0]
    assert kernel is not None and kernel.fits(6) and not kernel.fits(7)
    prompts = _prompts(8)
    assert decode_ids(model, prompts, _Fmt(), 6) == generate_ids(model, prompts, _Fmt(), 6)


def test_kernel_with_one_token_prompts():
    from cl.generation import decode_ids, generate_ids

    model = _model("llama", seed=2)
    prompts = [[5], [7], [9, 4]]
    assert decode_ids(model, prompts, _Fmt(), 5) == generate_ids(model, prompts, _Fmt(), 5)
    assert decode_ids(model, prompts[:2], _Fmt(), 5) == generate_ids(model, prompts[:2], _Fmt(), 5)


def test_kernel_with_bf16_base_and_fp32_lora_as_peft_stores_them():
    """peft keeps LoRA weights in fp32 over a bf16 base (autocast_adapter_dtype): the kernel casts as peft's
    forward does, so its logits are the adapted model's to bf16 rounding."""
    model = _lora(_model("qwen2", seed=4).to(torch.bfloat16), ["q_proj", "v_proj", "up_proj"])
    assert any(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_A" in n)
    prompts = _prompts(9)
    got = _kernel_prefill(model, prompts)
    with torch.no_grad():
        ref = _reference_logits(model, prompts, [])[0]
        with model.disable_adapter():
            off = _reference_logits(model, prompts, [])[0]
    assert (ref - off).abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


needs_cxx = pytest.mark.skipif(cxx_compiler() is None, reason="torch.compile on CPUs needs a C++ compiler")


@needs_cxx
def test_compiled_step_gives_the_models_logits_and_generates_tokens(monkeypatch):
    """``decode_ids(compile_step=True)`` (``objective.rollout_compile``): the static step through torch.compile,
    with the buffer rounded up to a multiple of ``COMPILE_BUCKET``: the model's logits step by step, and the
    greedy and sampled tokens of ``generate``, also through a LoRA adapter; a weight changed in place (as the
    optimizer does) is read by the graph already compiled."""
    from cl import fastdecode
    from cl.generation import COMPILE_BUCKET, decode_ids, generate_ids

    torch._dynamo.reset()  # no variants left from other tests: these compile here
    before = _compiled_graphs()
    model = _model("qwen2", seed=23)
    prompts = _prompts(24)
    steps = [[7 + 2 * i + j for i in range(len(prompts))] for j in range(4)]
    kernel, mask, pos = _prefilled(model, prompts, len(steps) + 2)
    with torch.no_grad():
        ref = _reference_logits(model, prompts, steps)[1:]
        step = kernel.static_step(graph=False, compiled=True)
        got, p = [], pos[:, -1:]
        for col in steps:
            mask = torch.cat([mask, torch.ones(len(col), 1, dtype=mask.dtype)], -1)
            p = p + 1
            got.append(step(torch.tensor(col)[:, None], mask, p))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    totals, prefill = [], fastdecode.LlamaKernel.prefill
    monkeypatch.setattr(fastdecode.LlamaKernel, "prefill",
                        lambda self, *a, **k: totals.append(a[3]) or prefill(self, *a, **k))
    fmt = _Fmt()
    for model in (model, _lora(_model("llama", seed=25), ["q_proj", "down_proj"])):
        assert decode_ids(model, prompts, fmt, 9, compile_step=True) == generate_ids(model, prompts, fmt, 9)
        torch.manual_seed(5)
        a = generate_ids(model, prompts, fmt, 9, do_sample=True, top_p=0.9, num_return_sequences=2)
        torch.manual_seed(5)
        assert decode_ids(model, prompts, fmt, 9, do_sample=True, top_p=0.9, num_return_sequences=2,
                          compile_step=True) == a
    assert totals and all(t % COMPILE_BUCKET == 0 and t >= 9 + max(map(len, prompts)) for t in totals)
    compiled = _compiled_graphs()
    assert compiled > before  # the steps ran compiled, not eagerly
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.add_(0.5)
    assert decode_ids(model, prompts, fmt, 9, compile_step=True) == generate_ids(model, prompts, fmt, 9)
    assert _compiled_graphs() == compiled  # the same graph, with the new weight


def test_a_failed_compile_names_the_way_out(monkeypatch):
    """A compilation failure (Dynamo's or Inductor's; its message may be empty) says how to turn compiling off;
    an error of the step itself passes through as it is."""
    from torch._dynamo.exc import TorchDynamoException

    from cl import fastdecode

    raised = []
    monkeypatch.setattr(fastdecode, "compiled_step", lambda: lambda *a: (_ for _ in ()).throw(raised[-1]))
    model = _model("llama", seed=26)
    prompts = _prompts(27)
    with torch.no_grad():
        kernel, mask, pos = _prefilled(model, prompts, 1)
        assert kernel.static_step(graph=True, compiled=True).compiled is False  # on CUDA: the graph instead
        step = kernel.static_step(graph=False, compiled=True)
        m = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], -1)
        call = lambda: step(torch.full((len(prompts), 1), 5), m, pos[:, -1:] + 1)  # noqa: E731
        raised.append(TorchDynamoException("CppCompileError: C++ compile error\nmore lines"))
        with pytest.raises(RuntimeError, match=r"rollout_compile: torch.compile of the decode step failed "
                                               r"\(TorchDynamoException: CppCompileError: C\+\+ compile "
                                               r"error\); set objective.rollout_compile=false"):
            call()
        raised.append(TorchDynamoException())
        with pytest.raises(RuntimeError, match=r"failed \(TorchDynamoException: TorchDynamoException\(\)\); set"):
            call()
        raised.append(RuntimeError("out of memory"))
        with pytest.raises(RuntimeError, match="^out of memory$"):
            call()
