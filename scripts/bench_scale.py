"""Speed at every size: tokens/s and model FLOP utilisation (MFU) for SFT and GRPO at ~1M, ~5M and ~25M
parameters, and the wall time and evaluation share of a stream as it grows from 2 to 20 tasks.

MFU = achieved model FLOP/s / the peak of a large square matrix product measured in the same run, on
the same device and in the same precision (fp32 for ``32-true``, bf16 for ``bf16-mixed``). Model FLOPs
per trained token = 6 N + 12 L h T (N: parameters in matrix products, the LM head included; L layers,
h hidden size, T sequence length); a GRPO step adds 2 N + 4 L h T per generated token (KV cache)
and 2 N + 4 L h T per token for the reference forward. Training runs through the suite's own path
(ContinualLM, the objective, Lightning's Trainer); SFT batches are random token sequences of a fixed
length so every size sees the same shapes; GRPO uses the add3 task with exactly ``--new-tokens``
tokens per completion. The stream part runs ``cl.run.run`` end to end on user-data tasks (files written
here) with the evaluation caps on (``eval.max_samples_per_point``/``max_samples_per_boundary``) and
without the boundary cap.

Targets (CPU, fp32): SFT at >= 60% of the matmul peak for the 5M model; evaluation share at 20 tasks
<= 1.5x its share at 2 tasks.

    python scripts/bench_scale.py                      # CPU, fp32, everything (~10 min on 2 cores)
    python scripts/bench_scale.py --quick              # 1M and 5M, a few steps, streams of 2 and 8 tasks
    python scripts/bench_scale.py --precision bf16-mixed --parts sft,grpo
    python scripts/bench_scale.py --device cuda --precision bf16-mixed --sizes qwen0.5b --parts sft,grpo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cl.core.data import PromptFormat  # noqa: E402
from cl.model import count_parameters  # noqa: E402
from cl.module import ContinualLM  # noqa: E402
from cl.objectives.grpo import GRPOObjective  # noqa: E402
from cl.objectives.sft import SFTObjective  # noqa: E402
from cl.run import task_loader  # noqa: E402
from cl.schedule import LRSchedule  # noqa: E402
from cl.tokenizer import build_char_tokenizer  # noqa: E402
from tasks.registry import build_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bench_main, row, suite_steps_per_second  # noqa: E402

warnings.filterwarnings("ignore")
transformers.utils.logging.disable_progress_bar()
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

# Llama-style sizes (char vocabulary); qwen0.5b = Qwen2.5-0.5B's shape with random weights (GPU only)
SIZES = {
    "1m": dict(family="llama", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "5m": dict(family="llama", hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=768),
    "25m": dict(family="llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408),
    "qwen0.5b": dict(family="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
}


# -- peak ---------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 1.0, warmup_s: float = 0.0) -> float:
    """FLOP/s of a large square matrix product (n = 2048 on CPU, 8192 on GPU), best of three timings, after
    two products and ``warmup_s`` more seconds of them (a GPU's clocks rise under load)."""
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t0 = time.perf_counter()
    for _ in range(2):
        a @ b
    while time.perf_counter() - t0 < warmup_s:
        a @ b
        sync(device)
    sync(device)
    best = 0.0
    for _ in range(3):
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            k += 1
        sync(device)
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best


# -- models and FLOPs ---------------------------------------------------------------------------------------
def build_model(size: str, max_len: int, device: str):
    spec = dict(SIZES[size])
    family = spec.pop("family")
    tok = build_char_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    spec.setdefault("vocab_size", len(tok))
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs (a 0.5B model's initialisation on CPUs takes a while)
        model = _build(family, spec, max_len, ids)
    model.generation_config = transformers.GenerationConfig(**ids)
    return model, tok


def _build(family: str, spec: dict, max_len: int, ids: dict):
    if family == "llama":
        cfg = transformers.LlamaConfig(max_position_embeddings=max_len, tie_word_embeddings=True,
                                       num_key_value_heads=spec["num_attention_heads"], **spec, **ids)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(max_position_embeddings=max(max_len, 512), tie_word_embeddings=True, **spec, **ids)
        model = transformers.Qwen2ForCausalLM(cfg)
    return model


def matmul_params(model) -> int:
    """Parameters that take part in matrix products: all but the input embedding, plus the LM head (which
    reuses the embedding matrix when tied)."""
    emb = model.get_input_embeddings().weight
    n = count_parameters(model) - emb.numel()
    return n + model.get_output_embeddings().weight.numel()


def train_flops_per_token(model, seq: int) -> float:
    c = model.config
    return 6 * matmul_params(model) + 12 * c.num_hidden_layers * c.hidden_size * seq


def fwd_flops_per_token(model, ctx: int) -> float:
    c = model.config
    return 2 * matmul_params(model) + 4 * c.num_hidden_layers * c.hidden_size * ctx


# -- SFT ----------------------------------------------------------------------------------------------------
class RandomSequences(torch.utils.data.Dataset):
    """Fixed-length random token sequences (the whole sequence is the answer: every token is trained)."""

    def __init__(self, vocab: int, seq: int, n: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def trainer_kwargs(device: str, precision: str) -> dict:
    return {"accelerator": "gpu" if device.startswith("cuda") else "cpu", "devices": 1, "precision": precision,
            "log_every_n_steps": 10**6, "gradient_clip_val": 1.0}


def timed_fit(module, loader, steps: int, warmup: int, device: str, precision: str) -> float:
    """Seconds per optimizer step after ``warmup`` steps, through the suite's Trainer."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return 1.0 / suite_steps_per_second(module, loader, steps, warmup, sync=sync, **trainer_kwargs(device, precision))


def sft_setup(size: str, device: str, batch: int, seq: int, steps: int, compile_train: bool = False,
              fused: bool = False):
    """``(model, module, loader)``: the SFT benchmark's model, its ``ContinualLM`` (AdamW at lr 1e-4, fused when
    asked) and a loader of ``steps`` batches of random sequences."""
    model, _ = build_model(size, seq, device)
    data = RandomSequences(model.config.vocab_size, seq, batch * steps)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
    opt = partial(torch.optim.AdamW, lr=1e-4, **({"fused": True} if fused else {}))
    return model, ContinualLM(model, SFTObjective(), opt, LRSchedule(warmup_steps=0), compile_train=compile_train), loader


def bench_sft(size: str, device: str, precision: str, batch: int, seq: int, steps: int, warmup: int,
              compile_train: bool = False) -> dict:
    model, module, loader = sft_setup(size, device, batch, seq, steps, compile_train)
    sec = timed_fit(module, loader, steps, warmup, device, precision)
    tokens = batch * seq / sec
    return {"part": "sft_compiled" if compile_train else "sft", "size": size, "params": count_parameters(model), "tokens_per_s": tokens,
            "step_s": sec, "flops": tokens * train_flops_per_token(model, seq)}


def bench_grpo(size: str, device: str, precision: str, prompts: int, group: int, new_tokens: int, steps: int,
               warmup: int, rollout_backend: str = "hf", fused: bool = False) -> dict:
    model, tok = build_model(size, 256, device)
    model.generation_config.min_new_tokens = new_tokens  # every completion has exactly new_tokens tokens
    fmt = PromptFormat(tok)
    task = build_task("add3", 2000, 50, 0)
    obj = GRPOObjective(group_size=group, max_new_tokens=new_tokens, kl_coef=0.01, reference="task_start",
                        rollout_backend=rollout_backend)
    obj.bind(fmt, {task.name: task})
    obj.ref_model = __import__("copy").deepcopy(model).eval().requires_grad_(False)
    opt = partial(torch.optim.AdamW, lr=1e-6, **({"fused": True} if fused else {}))
    module = ContinualLM(model, obj, opt, LRSchedule(warmup_steps=0))
    loader = task_loader(fmt, prompts, steps, seed=0, collate_fn=obj.collate_fn(fmt.pad_id))(task, 0)
    before = obj.tokens_generated
    sec = timed_fit(module, loader, steps, warmup, device, precision)
    gen_per_step = (obj.tokens_generated - before) / steps
    prompt_len = sum(len(p) for p in fmt.prompt_ids(task.train["prompt"][:prompts])) / prompts
    seq = prompt_len + new_tokens
    seq_tokens = prompts * group * seq
    flops = (gen_per_step * fwd_flops_per_token(model, seq)  # sampling with the KV cache
             + seq_tokens * fwd_flops_per_token(model, seq)  # reference forward
             + seq_tokens * train_flops_per_token(model, seq))  # policy forward + backward
    return {"part": "grpo", "size": size, "params": count_parameters(model), "tokens_per_s": gen_per_step / sec,
            "step_s": sec, "flops": flops / sec}


# -- stream growth --------------------------------------------------------------------------------------
def user_tasks(root: Path, n: int) -> list[str]:
    """``n`` distinct arithmetic tasks as JSONL files: task k maps ``a,b`` to ``(a + k*b) mod 1000``."""
    import random

    specs = []
    for k in range(n):
        rng = random.Random(k)
        path = root / f"t{k}.jsonl"
        with path.open("w") as f:
            for _ in range(600):
                a, b = rng.randrange(100), rng.randrange(100)
                f.write(json.dumps({"prompt": f"T{k}:{a},{b}=", "answer": str((a + (k + 1) * b) % 1000)}) + "\n")
        specs.append(f"{{name: t{k}, train: '{path}'}}")
    return specs


def bench_stream(n_tasks: int, cap_boundary: bool, steps: int, root: Path) -> dict:
    from cl.run import compose_config, run

    overrides = [
        "base=none", "model.arch.hidden_size=64", "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4",
        "model.arch.intermediate_size=256", f"stream.tasks=[{','.join(user_tasks(root, n_tasks))}]",
        "stream.general=[copy6,add2]", f"stream.steps_per_task={steps}", "eval.every_n_steps=10",
        "eval.n_per_task=100", "eval.max_samples_per_point=200", "shift=none", "logger=none",
        "checkpoint.enabled=false", "data.n_eval=100",
    ] + (["eval.max_samples_per_boundary=200"] if cap_boundary else [])
    cfg = compose_config(*overrides)
    out = root / f"run-{n_tasks}-{int(cap_boundary)}"
    devnull = open(os.devnull, "w")
    stdout, sys.stdout = sys.stdout, devnull
    try:
        t0 = time.perf_counter()
        res = run(cfg, out)
        wall = time.perf_counter() - t0
    finally:
        sys.stdout = stdout
    m = res["metrics"]
    return {"part": "stream", "tasks": n_tasks, "boundary_cap": cap_boundary, "wall_s": wall,
            "eval_s": m["eval_seconds"], "train_s": m["train_seconds"], "eval_share": m["eval_time_fraction"]}


# -- main -----------------------------------------------------------------------------------------------
QUICK = ["--sizes", "1m,5m", "--steps", "4", "--warmup", "1", "--stream-lengths", "2,8", "--stream-steps", "10"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    ap.add_argument("--sizes", default="1m,5m,25m")
    ap.add_argument("--parts", default="sft,grpo,stream")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12, help="timed SFT/GRPO steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--stream-lengths", default="2,20")
    ap.add_argument("--stream-steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also SFT with train.compile (torch.compile; the "
                    "warm-up steps absorb the compilation)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    return ap


def measure(args) -> list[dict]:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU")
    parts = set(args.parts.split(","))
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise SystemExit(f"error: --sizes: unknown {', '.join(bad)}; allowed: {', '.join(SIZES)}")
    rows: list[dict] = []
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    peak = matmul_peak(args.device, dtype)
    print(f"device {name} | precision {args.precision} | matmul peak ({dtype}) {peak / 1e9:,.1f} GFLOP/s", flush=True)
    rows.append({"part": "peak", "device": name, "precision": args.precision, "flops": peak})
    total = args.steps + args.warmup
    for size in sizes:
        if "sft" in parts:
            r = bench_sft(size, args.device, args.precision, args.batch_size, args.seq_len, total, args.warmup)
            r["mfu"] = r["flops"] / peak
            rows.append(r)
            print(f"SFT  {size:>8} {r['params'] / 1e6:8.2f}M params  {r['tokens_per_s']:12,.0f} tokens/s  "
                  f"{r['flops'] / 1e9:9.1f} GFLOP/s  MFU {r['mfu']:6.1%}", flush=True)
            if args.compile:
                c = bench_sft(size, args.device, args.precision, args.batch_size, args.seq_len, total, args.warmup, True)
                c["mfu"], c["eager_tokens_per_s"] = c["flops"] / peak, r["tokens_per_s"]
                rows.append(c)
                print(f"SFT  {size:>8} compiled: {c['tokens_per_s']:12,.0f} tokens/s = "
                      f"{c['tokens_per_s'] / r['tokens_per_s']:.2f}x eager", flush=True)
        if "grpo" in parts:
            r = bench_grpo(size, args.device, args.precision, args.prompts, args.group, args.new_tokens,
                           max(4, total // 2), min(args.warmup, 2))
            r["mfu"] = r["flops"] / peak
            rows.append(r)
            print(f"GRPO {size:>8} {r['params'] / 1e6:8.2f}M params  {r['tokens_per_s']:12,.0f} gen tokens/s "
                  f"{r['flops'] / 1e9:9.1f} GFLOP/s  MFU {r['mfu']:6.1%}", flush=True)
    if "stream" in parts:
        lengths = [int(x) for x in args.stream_lengths.split(",")]
        with tempfile.TemporaryDirectory() as d:
            for cap in (True, False):
                for n in lengths:
                    r = bench_stream(n, cap, args.stream_steps, Path(d))
                    rows.append(r)
                    print(f"stream {n:>3} tasks  boundary cap {'on ' if cap else 'off'}  wall {r['wall_s']:7.1f} s  "
                          f"train {r['train_s']:6.1f} s  eval {r['eval_s']:6.1f} s  eval share {r['eval_share']:6.1%}",
                          flush=True)
    print("\n" + table(rows, lengths if "stream" in parts else []))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return summary_rows(rows, lengths if "stream" in parts else [], args.precision)


def summary_rows(rows: list[dict], lengths: list[int], precision: str) -> list[dict]:
    """The benchmark table's lines: MFU per size (target at 5M) and the evaluation share's growth."""
    out = []
    peak = next(r["flops"] for r in rows if r["part"] == "peak")
    for r in rows:
        if r["part"] in ("sft", "grpo"):
            target = 0.60 if r["part"] == "sft" and r["size"] == "5m" and precision == "32-true" else None
            out.append(row(f"{r['part'].upper()} {r['size']} ({precision}): model GFLOP/s vs matmul peak (MFU)",
                           r["flops"] / 1e9, peak / 1e9, target))
        if r["part"] == "sft_compiled":
            out.append(row(f"SFT {r['size']} ({precision}): tokens/s with train.compile vs eager",
                           r["tokens_per_s"], r["eager_tokens_per_s"], None))
    for cap in (True, False):
        st = {r["tasks"]: r for r in rows if r["part"] == "stream" and r["boundary_cap"] == cap}
        if len(lengths) >= 2 and lengths[0] in st and lengths[-1] in st:
            a, b = st[lengths[0]]["eval_share"], st[lengths[-1]]["eval_share"]
            out.append(row(f"evaluation share, {lengths[-1]} vs {lengths[0]} tasks (boundary cap "
                           f"{'on' if cap else 'off'})", b, a, 1.5, lower_is_better=True))
    return out

def table(rows: list[dict], lengths: list[int]) -> str:
    lines = ["| part | size | params | tokens/s | GFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] in ("sft", "sft_compiled", "grpo"):
            lines.append(f"| {r['part']} | {r['size']} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | "
                         f"{r['flops'] / 1e9:,.1f} | {r['mfu']:.1%} |")
    sft5 = [r for r in rows if r["part"] == "sft" and r["size"] == "5m"]
    if sft5:
        ok = sft5[0]["mfu"] >= 0.60
        lines.append(f"\nSFT 5M MFU {sft5[0]['mfu']:.1%} (target >= 60%: {'met' if ok else 'NOT met'})")
    for cap in (True, False):
        st = {r["tasks"]: r for r in rows if r["part"] == "stream" and r["boundary_cap"] == cap}
        if len(lengths) >= 2 and lengths[0] in st and lengths[-1] in st:
            a, b = st[lengths[0]]["eval_share"], st[lengths[-1]]["eval_share"]
            verdict = "met" if b <= 1.5 * a else "NOT met"
            lines.append(f"eval share {lengths[-1]} vs {lengths[0]} tasks (boundary cap {'on' if cap else 'off'}): "
                         f"{b:.1%} / {a:.1%} = {b / a:.2f}x (target <= 1.5x: {verdict})")
    return "\n".join(lines)


if __name__ == "__main__":
    bench_main(parser(), measure, QUICK)
