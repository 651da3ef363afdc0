"""Rollout generation speed: transformers' ``generate`` vs the suite's minimal decode loop
(``rollout_backend=hf_fast``, ``cl.generation.decode_ids``: the Llama-family kernel of ``cl.fastdecode``,
and the same loop over the model's own ``DynamicCache``) at GRPO's shapes, on the default tiny model:
8 prompts x G = 8 completions = 64 sequences, exactly 16 new tokens each (``min_new_tokens``), T = 1.0,
top-p 0.99. Calls alternate; the median tokens/s of each is compared (target: hf_fast >= 2x generate).
hf_fast is measured with its eager step and with its step compiled (``objective.rollout_compile=true``:
``decode_ids(compile_step=True)``; the compile time, paid once per shape, is reported separately and left
out of the rate), and the greedy tokens of the compiled step are compared with the eager step's.
``--compile`` also measures the other candidate the design considered: a static KV cache with
transformers' single-token forward compiled by ``torch.compile``.

    python scripts/bench_rollouts.py [--quick] [--repeats 7] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import transformers

from cl.core.data import PromptFormat, collate_prompts
from cl.fastdecode import cxx_compiler
from cl.generation import decode_ids, generate_ids
from cl.model import build_tiny_llama, load_model_and_tokenizer
from tasks.registry import build_task

from benchlib import row  # scripts/benchlib.py (this directory is on sys.path)

warnings.filterwarnings("ignore")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

PROMPTS, G, NEW = 8, 8, 16
QUICK = ["--repeats", "3"]


@torch.no_grad()
def static_compiled(model, prompts, fmt, step):
    """Static-cache decode with ``step`` (the compiled forward) for the single-token steps."""
    from transformers import StaticCache, TopPLogitsWarper

    b = collate_prompts(prompts, fmt.pad_id)
    ids, mask0 = b["input_ids"].repeat_interleave(G, 0), b["attention_mask"].repeat_interleave(G, 0)
    length = ids.size(1)
    pos = (mask0.cumsum(-1) - 1).masked_fill(mask0 == 0, 0)
    cache = StaticCache(config=model.config, max_cache_len=length + NEW)
    mask = torch.zeros(ids.size(0), length + NEW, dtype=torch.long)
    mask[:, :length] = mask0
    top_p = TopPLogitsWarper(0.99)
    logits = model(input_ids=ids, attention_mask=mask0, position_ids=pos, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1].float()
    p, out = pos[:, -1:], []
    for t in range(NEW):
        nxt = torch.multinomial(torch.softmax(top_p(ids, logits), -1), 1)
        out.append(nxt)
        if t + 1 == NEW:
            break
        mask[:, length + t] = 1
        p = p + 1
        logits = step(input_ids=nxt, attention_mask=mask, position_ids=p, cache=cache, use_cache=True,
                      logits_to_keep=1).logits[:, -1].float()
    return torch.cat(out, 1).tolist()


def measure(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        build_tiny_llama(d, seed=0)
        model, tok = load_model_and_tokenizer(d)
    model.eval()
    model.generation_config.min_new_tokens = NEW
    fmt = PromptFormat(tok)
    prompts = fmt.prompt_ids(list(build_task("add3", 200, 50, 0).train["prompt"][:PROMPTS]))
    kw = dict(max_new_tokens=NEW, do_sample=True, top_p=0.99, num_return_sequences=G)
    fns = {"generate": lambda: generate_ids(model, prompts, fmt, **kw),
           "hf_fast": lambda: decode_ids(model, prompts, fmt, **kw),
           "hf_fast, cache loop": lambda: decode_ids(model, prompts, fmt, use_kernel=False, **kw)}
    if cxx_compiler() is None:
        print("hf_fast compiled step: skipped (torch.compile needs a C++ compiler on CPUs)", flush=True)
    else:
        fns["hf_fast, compiled step"] = lambda: decode_ids(model, prompts, fmt, compile_step=True, **kw)
        t = time.perf_counter()
        fns["hf_fast, compiled step"]()
        print(f"hf_fast compiled step: compiled in {time.perf_counter() - t:.1f} s (once per shape)", flush=True)
        greedy = [decode_ids(model, prompts, fmt, max_new_tokens=NEW, compile_step=c) for c in (False, True)]
        same = sum(a == b for a, b in zip(*greedy))
        print(f"greedy rows identical, compiled vs eager step: {same}/{len(greedy[0])}", flush=True)
    if args.compile:
        t = time.perf_counter()
        step = torch.compile(model.forward, dynamic=False)
        static_compiled(model, prompts, fmt, step)
        print(f"static cache + torch.compile: compiled in {time.perf_counter() - t:.1f} s", flush=True)
        fns["static+compile"] = lambda: static_compiled(model, prompts, fmt, step)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tokens = PROMPTS * G * NEW
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    for k, v in rate.items():
        print(f"{k:<22} {v:9,.0f} tokens/s  ({1000 * tokens / v:6.1f} ms per rollout batch)")
    rows = [row(f"rollouts: hf_fast vs generate, tokens/s ({PROMPTS}x{G} seqs x {NEW} tokens)",
                rate["hf_fast"], rate["generate"], 2.0)]
    if "hf_fast, compiled step" in rate:
        rows.append(row("rollouts: hf_fast with its step compiled (rollout_compile) vs generate, tokens/s",
                        rate["hf_fast, compiled step"], rate["generate"], 2.0))
    rows.append(row("rollouts: hf_fast without the Llama kernel (model's own cache) vs generate, tokens/s",
                    rate["hf_fast, cache loop"], rate["generate"], None))
    if "static+compile" in rate:
        rows.append(row("rollouts: static cache + torch.compile vs generate, tokens/s", rate["static+compile"],
                        rate["generate"], None))
    return rows


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="also measure a static cache + torch.compile")
    return ap


if __name__ == "__main__":
    from benchlib import bench_main

    bench_main(parser(), measure, QUICK)
