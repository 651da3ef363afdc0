"""GRPO steps/s through the suite (ContinualLM + GRPOObjective + Lightning) vs ``trl.GRPOTrainer``.

Same configuration on both sides, in one process: the default tiny model (same initial weights), G = 8
completions for each of 8 prompts per optimizer step (add3 prompts, all the same length), exactly 16 new
tokens per completion (``min_new_tokens = max_new_tokens = 16``, so completion lengths are equal too),
T = 1.0, top-p 0.99, the clipped loss with eps 0.2/0.3 and token-mean aggregation (TRL ``bnpo``), one
PPO epoch, AdamW at lr 1e-4, fp32. Two settings: no KL (no reference model) and k3 KL 0.01 (a frozen
reference copy, TRL with ``use_bias_correction_kl=False`` to compute the same term), no gradient checkpointing
(TRL turns it on by default; the suite does not use it). Runs alternate
(suite, TRL, suite, TRL, ...); the median steady-state steps/s (after a warm-up) of each is compared.
Target: suite >= 1.5x TRL. The suite runs with both HF rollout backends (``hf``: ``generate``; ``hf_fast``:
the minimal decode loop), and with ``hf_fast``'s step compiled (``hf_fast+compile``:
``objective.rollout_compile=true``; compiled during the warm-up steps). A profile of one suite step
(generation vs policy forward/backward vs reference forward) is printed, since generation dominates RL cost.

    pip install trl  # benchmark-only dependency
    python scripts/bench_grpo.py [--quick] [--steps 20] [--warmup 3] [--repeats 3] [--kl 0.0 0.01]
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
from cl.model import build_tiny_llama, load_model_and_tokenizer
from cl.module import ContinualLM
from cl.fastdecode import cxx_compiler
from cl.objectives.grpo import GRPOObjective
from cl.run import task_loader
from cl.schedule import LRSchedule
from tasks.registry import build_task

from benchlib import suite_steps_per_second  # scripts/benchlib.py (this directory is on sys.path)

warnings.filterwarnings("ignore")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

G, PROMPTS, NEW_TOKENS, LR = 8, 8, 16, 1e-4
STEP = "objective step (generate + rewards + forwards + loss)"


class Ctx:
    def __init__(self, module):
        self.module = module


def suite(model, fmt, task, kl: float, steps: int, warmup: int, profile: dict | None = None,
          backend: str = "hf") -> float:
    model.generation_config.min_new_tokens = NEW_TOKENS
    obj = GRPOObjective(group_size=G, temperature=1.0, top_p=0.99, max_new_tokens=NEW_TOKENS, kl_coef=kl,
                        reference="task_start", loss_agg="token_mean", rollout_backend=backend.split("+")[0],
                        rollout_compile=backend.endswith("+compile"))
    obj.bind(fmt, {task.name: task})
    module = ContinualLM(model, obj, partial(torch.optim.AdamW, lr=LR), LRSchedule())
    obj.on_task_start(Ctx(module))
    if profile is not None:
        _instrument(obj, profile)
    loader = task_loader(fmt, PROMPTS, steps, seed=0, collate_fn=obj.collate_fn(fmt.pad_id))(task, 0)
    return suite_steps_per_second(module, loader, steps, warmup)


def trl_run(model, tok, task, kl: float, steps: int, warmup: int, out: str, prompts: int = PROMPTS,
            group: int = G, new_tokens: int = NEW_TOKENS, lr: float = LR, device: str = "cpu",
            sync=lambda: None, **config) -> float:
    """TRL's ``GRPOTrainer`` on the suite's GRPO configuration (see the module docstring); steady-state steps/s
    after ``warmup`` steps. On a GPU (``device="cuda"``) it runs bf16-mixed, as the suite's GPU runs do;
    ``sync`` waits for the device before each clock reading; ``config`` overrides ``GRPOConfig`` fields."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Clock(TrainerCallback):
        t0 = t1 = 0.0

        def on_step_end(self, args, state, control, **kw):
            sync()
            if state.global_step == warmup:
                Clock.t0 = time.perf_counter()
            Clock.t1 = time.perf_counter()

    gpu = device != "cpu"
    args = GRPOConfig(**{**dict(
        output_dir=out, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.01, max_grad_norm=1e9, per_device_train_batch_size=prompts * group, num_generations=group,
        max_completion_length=new_tokens, temperature=1.0, top_p=0.99, top_k=0,
        generation_kwargs={"min_new_tokens": new_tokens}, epsilon=0.2, epsilon_high=0.3, loss_type="bnpo",
        beta=kl, use_bias_correction_kl=False, num_iterations=1, bf16=gpu, use_cpu=not gpu, report_to="none",
        logging_steps=10**6, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL's default (True) recomputes the forward in the backward; the suite does not
    ), **config})
    verifier = task.verifier

    def reward(completions, answer, **_):
        return verifier(completions, answer=answer)

    data = task.train.select_columns(["prompt", "answer"])
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    return (steps - warmup) / (Clock.t1 - Clock.t0)


def _instrument(obj: GRPOObjective, profile: dict) -> None:
    """Wrap the rollout (generation + scoring + reference forward) and time it against the whole step."""
    import cl.objectives.grpo as grpo_mod

    backend = obj.rollouts  # its ``sample`` function draws the completions (generate_ids / decode_ids)
    gen, tl = backend.sample, grpo_mod.token_logprobs

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            profile[name] = profile.get(name, 0.0) + time.perf_counter() - t
            return r
        return wrapper

    backend.sample = timed(f"generation ({gen.__name__})", gen)  # this instance only
    grpo_mod.token_logprobs = timed("logprob forwards (policy + reference)", tl)
    step = obj.step
    obj.step = timed(STEP, step)
    profile["_restore"] = lambda: (delattr(backend, "sample"), setattr(grpo_mod, "token_logprobs", tl))


QUICK = ["--steps", "5", "--warmup", "2", "--repeats", "1", "--kl", "0.01"]
# +compile: objective.rollout_compile=true (where a C++ compiler is found; torch.compile needs one on CPUs)
BACKENDS = ("hf", "hf_fast", *(("hf_fast+compile",) if cxx_compiler() else ()))


def measure(args) -> list[dict]:
    try:
        import trl
    except ImportError:
        raise SystemExit("error: this benchmark compares against TRL: pip install trl") from None
    from benchlib import row

    with tempfile.TemporaryDirectory() as d:
        build_tiny_llama(d, seed=0)
        base, tok = load_model_and_tokenizer(d)
        fmt = PromptFormat(tok)
        task = build_task("add3", 2000, 50, 0)
        results = {}
        for kl in args.kl:
            rates: dict[str, list[float]] = {**{b: [] for b in BACKENDS}, "trl": []}
            for r in range(args.repeats):
                for b in BACKENDS:
                    torch.manual_seed(0)
                    rates[b].append(suite(copy.deepcopy(base), fmt, task, kl, args.steps, args.warmup, backend=b))
                torch.manual_seed(0)
                rates["trl"].append(trl_run(copy.deepcopy(base), tok, task, kl, args.steps, args.warmup,
                                            f"{d}/trl"))
                print(f"kl {kl}: repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} steps/s" for k, v in rates.items()),
                      flush=True)
            results[kl] = {k: statistics.median(v) for k, v in rates.items()}
        profiles = {}
        for b in BACKENDS:
            profile: dict = {}
            t = time.perf_counter()
            suite(copy.deepcopy(base), fmt, task, args.kl[-1], args.steps, 0, profile, backend=b)
            total = time.perf_counter() - t
            profile.pop("_restore")()
            profile["backward + optimizer + loop (rest of wall)"] = total - profile[STEP]
            profiles[b] = (total, profile)
    print(f"\ntiny Llama {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M params, {PROMPTS} prompts x G={G}, "
          f"{NEW_TOKENS} new tokens, {args.steps} steps ({args.warmup} warm-up), median of {args.repeats}, "
          f"trl {trl.__version__}, {torch.get_num_threads()} threads")
    print(f"{'setting':<10} " + " ".join(f"{'suite ' + b:>14}" for b in BACKENDS) + f" {'TRL':>8}  (steps/s)")
    for kl, r in results.items():
        print(f"{'kl ' + str(kl):<10} " + " ".join(f"{r[b]:>14.2f}" for b in BACKENDS) + f" {r['trl']:>8.2f}")
    for b, (total, profile) in profiles.items():
        print(f"\nwhere a suite step's time goes (rollout_backend={b}, kl {args.kl[-1]}, {args.steps} steps, "
              f"{total:.1f} s wall):")
        for k, v in profile.items():
            print(f"  {k:<55} {v:6.2f} s  {100 * v / total:5.1f}%")
    return [row(f"GRPO steps/s vs TRL GRPOTrainer (rollout_backend={b}, kl {kl})", r[b], r["trl"], 1.5)
            for kl, r in results.items() for b in BACKENDS]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kl", type=float, nargs="+", default=[0.0, 0.01], help="KL coefficients to measure")
    return ap


if __name__ == "__main__":
    from benchlib import bench_main

    bench_main(parser(), measure, QUICK)
