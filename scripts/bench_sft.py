"""Throughput of SFT through the suite (ContinualLM + Lightning Trainer) vs a plain PyTorch loop.

Same model initialisation, same batches (same sampler seed), same optimizer, schedule and gradient
clipping, in one process; runs alternate (plain, suite, plain, suite, ...) and the median steady-state
throughput (steps after a warm-up) of each is compared. Target: suite >= 0.90x plain. With ``--vision``
the model is the embedded tiny LLaVA on the visual task vread (images preprocessed once, when the rows
are tokenized, before the loop: both loops see the same ready pixel tensors); target 0.85x.

    python scripts/bench_sft.py [--quick] [--vision] [--steps 300] [--warmup 30] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from functools import partial

import torch
import transformers

from cl.core.data import model_inputs
from cl.model import build_tiny, load_model_and_tokenizer
from cl.module import ContinualLM
from cl.objectives.sft import SFTObjective, answer_cross_entropy
from cl.run import task_loader
from cl.schedule import LRSchedule
from tasks.registry import build_task

from benchlib import bench_main, row, suite_steps_per_second  # scripts/benchlib.py (this directory is on sys.path)

warnings.filterwarnings("ignore")
transformers.utils.logging.disable_progress_bar()
import logging  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


def plain(model, loader, lr, schedule, steps, warmup) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.lr_lambda(steps))
    model.train()
    t0 = 0.0
    for i, batch in enumerate(loader, start=1):
        logits = model(**model_inputs(batch)).logits
        loss = answer_cross_entropy(logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if i == warmup:
            t0 = time.perf_counter()
    return (steps - warmup) / (time.perf_counter() - t0)


def suite(model, loader, lr, schedule, steps, warmup) -> float:
    module = ContinualLM(model, SFTObjective(), partial(torch.optim.AdamW, lr=lr), schedule)
    return suite_steps_per_second(module, loader, steps, warmup, gradient_clip_val=1.0)


QUICK = ["--steps", "100", "--warmup", "20", "--repeats", "3"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vision", action="store_true", help="the tiny vision-language model on a visual task")
    return ap


def measure(args) -> list[dict]:
    from cl.vision import make_format

    arch = {"image_size": 32} if args.vision else {}
    with tempfile.TemporaryDirectory() as d:
        build_tiny(d, seed=0, **arch)
        base, tok = load_model_and_tokenizer(d)
        fmt = make_format(base, tok, path=d)
    task = build_task("vread" if args.vision else "add3", 5000 if not args.vision else 2000, 100, 0)
    make_loader = task_loader(fmt, args.batch_size, args.steps, seed=0)
    schedule = LRSchedule(warmup_steps=10)
    rates: dict[str, list[float]] = {"plain": [], "suite": []}
    for r in range(args.repeats):
        for name, fn in (("plain", plain), ("suite", suite)):
            torch.manual_seed(0)
            rate = fn(copy.deepcopy(base), make_loader(task, 0), 1e-4, schedule, args.steps, args.warmup)
            rates[name].append(rate)
            print(f"repeat {r + 1}: {name:<5} {rate:7.1f} steps/s", flush=True)
    p, s = statistics.median(rates["plain"]), statistics.median(rates["suite"])
    tokens = sum(len(a) + len(b) for a, b in fmt.encode(list(task.train["prompt"][:1000]),
                                                         list(task.train["answer"][:1000]))) / 1000
    params = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"\nmodel {params:.2f}M params, batch {args.batch_size} x ~{tokens:.0f} tokens, {args.steps} steps "
          f"({args.warmup} warm-up), median of {args.repeats}")
    print(f"plain loop  {p:7.1f} steps/s  ({p * args.batch_size * tokens:,.0f} tokens/s)")
    print(f"suite       {s:7.1f} steps/s  ({s * args.batch_size * tokens:,.0f} tokens/s)")
    what = "tiny VLM SFT" if args.vision else "SFT"
    return [row(f"{what} steps/s: suite vs a plain PyTorch loop (batch {args.batch_size})", s, p,
                0.85 if args.vision else 0.90)]


if __name__ == "__main__":
    bench_main(parser(), measure, QUICK)
