"""Training throughput with 25% experience replay vs none, at the same total batch size.

Both runs train the same model (same initial weights) on add3 through the suite's loader and Trainer,
batch 16: without replay every row is new; with replay 4 of the 16 rows per batch come from a buffer of
1000 rows of an earlier task of the same shape (add3 rows of another data seed, so sequence lengths and
therefore compute per batch are the same and only the replay machinery differs: the buffer, the
weighted index draws and the concatenated dataset). Runs alternate (none, replay, none, ...); the median
steady-state steps/s is compared. Target: replay >= 0.95x none.

    python scripts/bench_replay.py [--quick] [--steps 300] [--warmup 30] [--repeats 3] [--fraction 0.25]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
import warnings
from functools import partial

import torch
import transformers

from cl.core.data import PromptFormat
from cl.loop import TaskContext
from cl.model import build_tiny_llama, load_model_and_tokenizer
from cl.module import ContinualLM
from cl.objectives.sft import SFTObjective
from cl.run import task_loader
from cl.schedule import LRSchedule
from replay.mixing import ExperienceReplay
from tasks.registry import build_task

from benchlib import bench_main, row, suite_steps_per_second  # scripts/benchlib.py (this directory is on sys.path)

warnings.filterwarnings("ignore")
transformers.utils.logging.disable_progress_bar()
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


def run(model, loader, steps: int, warmup: int) -> float:
    module = ContinualLM(model, SFTObjective(), partial(torch.optim.AdamW, lr=1e-4), LRSchedule(warmup_steps=10))
    return suite_steps_per_second(module, loader, steps, warmup, gradient_clip_val=1.0)


QUICK = ["--steps", "100", "--warmup", "20", "--repeats", "3"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.25)
    return ap


def measure(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        build_tiny_llama(d, seed=0)
        base, tok = load_model_and_tokenizer(d)
    fmt = PromptFormat(tok)
    task = build_task("add3", 5000, 100, 0)
    old = build_task("add3", 5000, 100, 1)
    er = ExperienceReplay(fraction=args.fraction, capacity=1000)
    er.on_task_end(TaskContext(0, old, None, [old, task]))
    plain = task_loader(fmt, args.batch_size, args.steps, seed=0)
    mixed = task_loader(fmt, args.batch_size, args.steps, seed=0, replay=er)
    rates: dict[str, list[float]] = {"none": [], "replay": []}
    for r in range(args.repeats):
        for name, make in (("none", plain), ("replay", mixed)):
            torch.manual_seed(0)
            t = time.perf_counter()
            loader = make(task, 1)
            build_s = time.perf_counter() - t
            rates[name].append(run(copy.deepcopy(base), loader, args.steps, args.warmup))
            print(f"repeat {r + 1}: {name:<6} {rates[name][-1]:7.1f} steps/s (loader built in {build_s:.2f} s)",
                  flush=True)
    n, m = statistics.median(rates["none"]), statistics.median(rates["replay"])
    print(f"\nbatch {args.batch_size} ({round(args.fraction * args.batch_size)} replayed), {args.steps} steps "
          f"({args.warmup} warm-up), median of {args.repeats}")
    print(f"no replay   {n:7.1f} steps/s")
    print(f"{args.fraction:.0%} replay  {m:7.1f} steps/s")
    return [row(f"SFT steps/s: {args.fraction:.0%} experience replay vs none", m, n, 0.95)]


if __name__ == "__main__":
    bench_main(parser(), measure, QUICK)
