"""Where a GPU step's time goes, and what each speed option buys, on a ~0.5B Qwen2 (Qwen2.5-0.5B's shape, random
weights): SFT tokens/s and MFU for each training variant, a kernel profile of 3 plain-loop SFT steps, rollout
tokens/s of ``generate`` against ``rollout_backend=hf_fast`` (``cl.generation.decode_ids``) with the greedy
tokens of both compared, and whole GRPO steps with each backend and with TRL's ``GRPOTrainer`` on the same settings
(target: the suite with ``hf_fast`` >= 1.5x TRL's steps/s). Every ratio is against a baseline measured
in the same run; MFU is against the bf16 matrix-product peak measured in the same run.

    python scripts/bench_gpu.py [--quick] [--parts sft,rollouts,grpo] [--variants eager,fused,...] [--json F]
    python scripts/bench_gpu.py --parts profile        # only the kernel profile of 3 plain-loop SFT steps
    python scripts/bench_gpu.py --device cpu --size 1m --steps 2 --warmup 1    # every code path, on CPUs

SFT variants (comma-separated, each a fresh model and optimizer, Lightning's Trainer, bf16-mixed):
``eager`` (the default recipe: AdamW, foreach), ``fused`` (AdamW ``fused=True``: ``+optimizer.fused=true``),
``b32`` / ``fused_b32`` (the same at batch 32), ``compile`` (``train.compile=true`` + fused AdamW), ``manual``
(fused AdamW, a plain PyTorch loop without Lightning; autocast keeps its weight-cast cache there, which Lightning
turns off), ``manual_b32`` (the plain loop at batch 32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale as bs  # noqa: E402
from cl.core.data import PromptFormat  # noqa: E402
from tasks.registry import build_task  # noqa: E402

SIZE = "qwen0.5b"
DEV = "cuda"


def sync() -> None:
    bs.sync(DEV)


def log(msg: str) -> None:
    print(msg, flush=True)


def sft_module(variant: str, batch: int, seq: int, steps: int):
    return bs.sft_setup(SIZE, DEV, batch, seq, steps, compile_train="compile" in variant,
                        fused="fused" in variant or "manual" in variant or variant == "compile")


def bench_sft_variant(variant: str, batch: int, seq: int, steps: int, warmup: int, pk: float) -> dict:
    b = 32 if "b32" in variant else batch
    model, module, loader = sft_module(variant, b, seq, steps + warmup)
    if "manual" in variant:
        sec = manual_steps(module, loader, steps, warmup)
    else:
        sec = 1.0 / bs.suite_steps_per_second(module, loader, steps + warmup, warmup, sync=sync,
                                             **bs.trainer_kwargs(DEV, "bf16-mixed"))
    tokens = b * seq / sec
    flops = tokens * bs.train_flops_per_token(model, seq)
    r = {"part": "sft", "variant": variant, "batch": b, "seq": seq, "step_s": sec, "tokens_per_s": tokens,
         "flops": flops, "mfu": flops / pk, "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0}
    log(f"SFT {variant:>16}: {b}x{seq}  {sec * 1e3:7.1f} ms/step  {tokens:9,.0f} tokens/s  "
        f"{flops / 1e12:6.1f} TFLOP/s  MFU {r['mfu']:6.1%}  peak mem {r['max_mem_gb']:.1f} GiB")
    del model, module, loader
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return r


def _train_step(module, batch, opt):
    with torch.autocast(DEV, dtype=torch.bfloat16):
        loss, _ = module.objective.step(module, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def plain_loop(module, loader, n: int):
    """``module``'s optimizer and ``n`` batches on the device, for steps without the Trainer (``_train_step``)."""
    module.model.train()
    it = iter(loader)
    return module.make_optimizer(module.model.parameters()), [{k: v.to(DEV) for k, v in next(it).items()}
                                                              for _ in range(n)]


def manual_steps(module, loader, steps: int, warmup: int) -> float:
    opt, batches = plain_loop(module, loader, steps + warmup)
    for b in batches[:warmup]:
        _train_step(module, b, opt)
    sync()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        _train_step(module, b, opt)
    sync()
    return (time.perf_counter() - t0) / steps


def profile_sft(batch: int, seq: int, out: Path | None) -> dict:
    """Kernel time by kind over 3 eager steps (fused AdamW, plain loop): the top kernels and the GPU-busy share."""
    from torch.profiler import ProfilerActivity, profile

    model, module, loader = sft_module("fused", batch, seq, 8)
    opt, batches = plain_loop(module, loader, 5)
    for b in batches[:2]:
        _train_step(module, b, opt)
    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches[2:]:
            _train_step(module, b, opt)
        sync()
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
              and not getattr(e, "is_user_annotation", False) and "#" not in e.key]  # kernels, not annotations
    total = sum(e.self_device_time_total for e in events) / 1e6
    events.sort(key=lambda e: -e.self_device_time_total)
    log(f"profile: 3 steps, wall {wall * 1e3:.0f} ms (profiled), kernel time {total * 1e3:.0f} ms "
        f"({total / wall:.0%} of wall)")
    top = []
    for e in events[:25]:
        t = e.self_device_time_total / 1e6
        top.append({"kernel": e.key[:110], "ms": t * 1e3 / 3, "share": t / total, "calls": e.count // 3})
        log(f"  {t / total:6.1%}  {t * 1e3 / 3:8.2f} ms/step  x{e.count // 3:<5} {e.key[:110]}")
    ops = sorted([e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU
                  and e.key.startswith("aten::")], key=lambda e: -e.device_time_total)[:20]
    log("  by aten op (device time incl. children, per step):")
    for e in ops:
        log(f"    {e.device_time_total / 3e3:8.2f} ms  x{e.count // 3:<5} {e.key}")
    if out is not None:
        prof.export_chrome_trace(str(out))
    del model, module, loader, opt
    torch.cuda.empty_cache()
    return {"part": "profile", "wall_s": wall / 3, "kernel_s": total / 3, "top": top}


# -- rollouts ------------------------------------------------------------------------------------------------
def rollouts(prompts_n: int, group: int, new: int, repeats: int) -> list[dict]:
    from cl.generation import decode_ids, generate_ids

    model, tok = bs.build_model(SIZE, 256, DEV)
    model.eval()
    fmt = PromptFormat(tok)
    task = build_task("add3", 2000, 50, 0)
    prompts = fmt.prompt_ids(list(task.train["prompt"][:prompts_n]))
    kw = dict(max_new_tokens=new, do_sample=True, top_p=0.99, num_return_sequences=group)
    fns = {"generate": partial(generate_ids, model, prompts, fmt, **kw),
           "hf_fast": partial(decode_ids, model, prompts, fmt, **kw),  # on CUDA: the step as a CUDA graph
           "hf_fast_no_graph": partial(decode_ids, model, prompts, fmt, static_step=False, **kw)}
    times = {k: [] for k in fns}
    model.generation_config.min_new_tokens = new
    with torch.autocast(DEV, dtype=torch.bfloat16):
        for fn in fns.values():
            fn()
        sync()
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t)
    model.generation_config.min_new_tokens = None
    tokens = prompts_n * group * new
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    for k, v in rate.items():
        log(f"rollouts bf16 autocast {k:>18}: {v:9,.0f} tokens/s  ({tokens / v * 1e3:7.1f} ms per batch)  "
            f"{v / rate['generate']:.2f}x generate")
    same = {}
    for precision in ("fp32", "bf16"):  # greedy tokens: graph replay vs the eager step vs generate
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=precision == "bf16"):
            g = generate_ids(model, prompts, fmt, max_new_tokens=new)
            f = decode_ids(model, prompts, fmt, max_new_tokens=new)
            e = decode_ids(model, prompts, fmt, max_new_tokens=new, static_step=False)
        same[precision] = {"graph_vs_eager_step": sum(a == b for a, b in zip(f, e)) / len(f),
                           "graph_vs_generate": sum(a == b for a, b in zip(f, g)) / len(f),
                           "eager_step_vs_generate": sum(a == b for a, b in zip(e, g)) / len(f)}
        log(f"rollouts greedy {precision}: rows identical (of {len(f)}): " +
            ", ".join(f"{k} {v:.0%}" for k, v in same[precision].items()))
    del model, fns
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return [{"part": "rollouts", "tokens": tokens, "rate": rate, "greedy_same": same}]


def grpo(backend: str, pk: float, steps: int) -> dict:
    """Whole GRPO steps (16 prompts x G 8, 64 new tokens, KL 0.01 against a reference copy, lr 1e-6, fused
    AdamW on a GPU, gradients clipped at norm 1) with one rollout backend, or ``trl``: TRL's ``GRPOTrainer``
    (which samples with ``generate``) on the same model, prompts and settings (``bench_grpo.trl_run``)."""
    prompts, group, new = 16, 8, 64
    if backend == "trl":
        import tempfile

        import bench_grpo

        model, tok = bs.build_model(SIZE, 256, DEV)
        task = build_task("add3", 2000, 50, 0)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(f"{d}/model")  # TRL loads its reference copy from the model's path
            model.config._name_or_path = f"{d}/model"
            rate = bench_grpo.trl_run(model, tok, task, 0.01, steps + 1, 1, f"{d}/trl", prompts=prompts,
                                      group=group, new_tokens=new, lr=1e-6, device=DEV, sync=sync,
                                      max_grad_norm=1.0,
                                      **({"optim": "adamw_torch_fused"} if DEV == "cuda" else {}))
        r = {"part": "grpo", "step_s": 1 / rate, "tokens_per_s": prompts * group * new * rate, "mfu": float("nan")}
        del model
    else:
        r = bs.bench_grpo(SIZE, DEV, "bf16-mixed", prompts, group, new, steps + 1, 1, rollout_backend=backend,
                          fused=DEV == "cuda")
        r["mfu"] = r["flops"] / pk
    r.update(backend=backend, gen_tokens_per_s=r["tokens_per_s"])
    log(f"GRPO {backend:>8}: {r['step_s']:6.2f} s/step  {r['tokens_per_s']:9,.0f} gen tokens/s  MFU {r['mfu']:6.1%}")
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return r


QUICK = ["--variants", "eager,fused,manual,fused_b32", "--steps", "4", "--warmup", "2", "--repeats", "1",
         "--grpo-steps", "2"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="sft,rollouts,grpo", help="any of sft, profile, rollouts, grpo")
    ap.add_argument("--variants", default="eager,fused,manual,b32,fused_b32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8, help="timed SFT steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--backends", default="hf_fast,hf,trl", help="rollout backends for GRPO steps; trl: TRL's "
                    "GRPOTrainer on the same settings (skipped when trl is not installed)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rollout batches per backend")
    ap.add_argument("--grpo-steps", type=int, default=3, help="timed GRPO steps per backend (after one warm-up)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of every code path (use a small --size)")
    ap.add_argument("--size", default="qwen0.5b", choices=list(bs.SIZES))
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    ap.add_argument("--trace", type=Path, help="write the profiler's chrome trace here")
    return ap


def measure(args) -> list[dict]:
    global DEV, SIZE
    DEV, SIZE = args.device, args.size
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU (run on CPUs with --device cpu --size 1m)")
    rows: list[dict] = []
    failed: list[str] = []

    def save():
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))

    log(f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU'} | torch {torch.__version__} | transformers "
        f"{__import__('transformers').__version__}")
    pk = bs.matmul_peak(DEV, torch.bfloat16, warmup_s=3.0 if DEV == "cuda" else 0.0)
    log(f"bf16 matmul peak {pk / 1e12:.1f} TFLOP/s")
    rows.append({"part": "peak", "flops": pk})
    for part in args.parts.split(","):
        jobs = {"sft": [partial(bench_sft_variant, v, args.batch_size, args.seq_len, args.steps, args.warmup, pk)
                        for v in args.variants.split(",")],
                "profile": [partial(profile_sft, args.batch_size, args.seq_len, args.trace)],
                "rollouts": [partial(rollouts, 16, 8, 64, args.repeats)],
                "grpo": [partial(grpo, b, pk, args.grpo_steps) for b in backends(args.backends)]}.get(part)
        if jobs is None:
            raise SystemExit(f"error: --parts: unknown '{part}'; allowed: sft, profile, rollouts, grpo")
        for job in jobs:  # a failure is reported and the others still run (one short GPU lease, many readings)
            try:
                got = job()
                rows.extend(got if isinstance(got, list) else [got])
            except Exception as e:
                import traceback

                traceback.print_exc()
                failed.append(f"{part} {job.args[0] if part in ('sft', 'grpo') else ''}".strip())
                log(f"{failed[-1]}: FAILED {type(e).__name__}: {str(e)[:300]}")
                if DEV == "cuda":
                    torch.cuda.empty_cache()
            save()
    if failed:
        raise SystemExit(f"error: failed: {', '.join(failed)} (the others are above)")
    return summary_rows(rows, pk)


def backends(names: str) -> list[str]:
    out = names.split(",")
    if "trl" in out and importlib.util.find_spec("trl") is None:
        log("GRPO trl: skipped, trl is not installed (pip install trl)")
        out.remove("trl")
    return out


def summary_rows(rows: list[dict], pk: float) -> list[dict]:
    """The benchmark table's lines: MFU per SFT variant (target 35% for the 0.5B model on a GPU), the Trainer
    against a plain loop, rollouts against ``generate`` (target 2x on a GPU) and GRPO steps per backend."""
    from benchlib import row

    gpu = DEV == "cuda"
    out = []
    sft = {r["variant"]: r for r in rows if r["part"] == "sft"}
    for v, r in sft.items():
        out.append(row(f"{DEV} SFT {SIZE} {v} {r['batch']}x{r['seq']} (bf16-mixed): model TFLOP/s vs bf16 matmul peak "
                       "(MFU)", r["flops"] / 1e12, pk / 1e12, 0.35 if gpu and SIZE == "qwen0.5b" else None))
    for trainer, loop in (("fused" if "fused" in sft else "eager", "manual"), ("fused_b32", "manual_b32")):
        if trainer in sft and loop in sft:  # the plain loop uses fused AdamW: compare like with like
            out.append(row(f"{DEV} SFT {SIZE}: tokens/s through the suite's Trainer ({trainer}) vs a plain loop "
                           f"(fused), batch {sft[trainer]['batch']}", sft[trainer]["tokens_per_s"],
                           sft[loop]["tokens_per_s"], None))
    for r in rows:
        if r["part"] == "rollouts":
            out.append(row(f"{DEV} rollouts {SIZE}: hf_fast ({'CUDA graph' if gpu else 'eager'} step) vs generate, "
                           "tokens/s (16x8 seqs x 64 tokens, bf16 autocast)", r["rate"]["hf_fast"],
                           r["rate"]["generate"], 2.0 if gpu else None))
            out.append(row(f"{DEV} rollouts {SIZE}: hf_fast without the static step vs generate, tokens/s",
                           r["rate"]["hf_fast_no_graph"], r["rate"]["generate"], None))
    grpo_rows = {r["backend"]: r for r in rows if r["part"] == "grpo"}
    if "hf_fast" in grpo_rows and "hf" in grpo_rows:
        out.append(row(f"{DEV} GRPO {SIZE} steps/s: rollout_backend=hf_fast vs hf (16 prompts x G 8, 64 tokens)",
                       1 / grpo_rows["hf_fast"]["step_s"], 1 / grpo_rows["hf"]["step_s"], None))
    for b in ("hf_fast", "hf"):
        if b in grpo_rows and "trl" in grpo_rows:
            out.append(row(f"{DEV} GRPO {SIZE} steps/s: suite (rollout_backend={b}) vs TRL GRPOTrainer (same settings)",
                           1 / grpo_rows[b]["step_s"], 1 / grpo_rows["trl"]["step_s"],
                           1.5 if gpu and b == "hf_fast" else None))
    return out


if __name__ == "__main__":
    from benchlib import bench_main

    bench_main(parser(), measure, QUICK)
