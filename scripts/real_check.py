"""Real-scale check without a hub: experiment=real_math_grpo (or _sft) on a random model of a real shape.

Builds a random Qwen2 of Qwen2.5-0.5B's shape (``--size 0.5b``: 24 layers, hidden 896, 14 heads, 2 KV heads,
intermediate 4864; with a byte-level tokenizer, so the embedding is 259 rows instead of 151,936: about
360M parameters instead of 494M) or a tiny one (``--size tiny``, for CPUs and tests), and runs a 2-task math
stream (GSM8K -> MATH rows from tests/fixtures/math, or ``--data DIR``) with the preset's settings, the
harness probe on the fixture task, and the chosen rollout/evaluation backends. Prints what users wait on:
train and evaluation seconds, the evaluation share, generated tokens per second of training, and the
accuracy and general matrices. A random model answers nothing right: this measures speed and plumbing,
not learning.

    python scripts/real_check.py --size 0.5b --device cuda --rollouts vllm --eval-backend vllm
    python scripts/real_check.py --size tiny --device cpu --steps 1       # minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
}


def build_model(size: str, out: Path) -> Path:
    """A random Qwen2 of ``size``'s shape with the byte-level tokenizer, written with save_pretrained."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cl.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **SHAPES[size])
    torch.manual_seed(0)
    d = out / f"random-qwen2-{size}"
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--paradigm", choices=["grpo", "sft"], default="grpo")
    ap.add_argument("--rollouts", choices=["hf", "hf_fast", "vllm"], default="hf")
    ap.add_argument("--eval-backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per task")
    ap.add_argument("--new-tokens", type=int, default=None, help="rollout and evaluation budget (default: the "
                    "preset's 512 on a GPU, 8 on CPUs)")
    ap.add_argument("--data", type=Path, default=ROOT / "tests" / "fixtures" / "math")
    ap.add_argument("--out", type=Path, default=Path("real_check_out"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args(argv)

    from cl.run import compose_config, run

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.size, args.out)
    new = args.new_tokens or (512 if args.device == "cuda" else 8)
    rl = [f"objective.rollout_backend={args.rollouts}", f"objective.max_new_tokens={new}", "objective.group_size=4"] \
        if args.paradigm == "grpo" else []
    cfg = compose_config(
        f"experiment=real_math_{args.paradigm}", f"model.name_or_path={model_dir}", f"stream.data_dir={args.data.resolve()}",
        "trainer=gpu" if args.device == "cuda" else "trainer=cpu", "logger=none", "shift=none",
        f"stream.steps_per_task={args.steps}", "stream.batch_size=4", "train.warmup_steps=0", "eval.n_per_task=8",
        "eval.every_n_steps=null", f"eval.max_new_tokens={new}", f"eval.backend={args.eval_backend}",
        "general_eval.tasks=[toy_choice]", f"general_eval.include_path={ROOT / 'tests' / 'fixtures' / 'lm_eval'}",
        "general_eval.limit=12", *rl, *args.overrides)
    t0 = time.perf_counter()
    res = run(cfg, args.out / "run")
    wall = time.perf_counter() - t0
    if res.get("status") != "completed":
        print(f"error: the run ended {res.get('status')}")
        return 1
    m = res["metrics"]
    train_s = float(m.get("train_seconds") or 0.0)
    tokens = int(m.get("compute", {}).get("tokens_generated", 0))
    summary = {"size": args.size, "device": args.device, "paradigm": args.paradigm, "rollouts": args.rollouts,
               "eval_backend": args.eval_backend, "steps_per_task": args.steps, "new_tokens": new,
               "wall_seconds": round(wall, 1), "train_seconds": round(train_s, 1),
               "eval_time_fraction": m.get("eval_time_fraction"), "tokens_generated": tokens,
               "train_tokens_per_s": round(tokens / train_s, 1) if train_s and tokens else None,
               "acc_matrix": res["acc_matrix"], "general_tasks": res["general_tasks"],
               "general_matrix": res["general_matrix"]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for k, v in summary.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
