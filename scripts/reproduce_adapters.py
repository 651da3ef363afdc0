"""Full fine-tuning vs adapters on the default stream: LoRA, LoRA merged per task, per-task LoRA, MoRA,
HFT and RegLoRA under SFT, and full / LoRA / MoRA under GRPO.

Each point runs over seeds as a Hydra multirun (resumable). Prints mean +- 95% CI of avg_acc, forgetting,
new_acc and general retention, with the trainable parameters (first task) and the training throughput
(optimizer steps per second of training time, evaluation excluded), and writes ``table.md``.
Per-task LoRA's task-aware rows (each task scored with only its own adapter) are in each run's
``results.json["adapter"]["task_aware_rows"]``; the table reports the task-agnostic matrix.

    python scripts/reproduce_adapters.py --quick   # toy budget (base stage cached)
    python scripts/reproduce_adapters.py           # full: 3 seeds, default budget
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.aggregate import (  # noqa: E402
    completed_results, mark_failed, markdown_table, write_report, mean_ci, summarise,
)
import pandas as pd  # noqa: E402

from analysis.aggregate import as_table  # noqa: E402
from analysis.tables import REAL, Point, paired_section, real_overrides, tidy  # noqa: E402
from analysis.sweep import QUICK, QUICK_RL, parallel_overrides, run_sweep  # noqa: E402

METRICS = ["avg_acc", "forgetting", "new_acc", "general_retention"]
SFT_ARMS = {"full": [], "LoRA": ["adapter=lora"], "LoRA merged per task": ["adapter=lora", "adapter.merge_after_task=true"],
            "task-LoRA": ["adapter=task_lora"], "MoRA": ["adapter=mora"], "HFT": ["adapter=hft"],
            "RegLoRA": ["adapter=reglora"]}
GRPO_ARMS = {"full": [], "LoRA": ["adapter=lora"], "MoRA": ["adapter=mora"]}
PAIRED_METRICS = ["forgetting", "general_retention", "new_acc"]  # the claim: adapters forget less, learn as much


def point_name(paradigm: str, label: str) -> str:
    return f"{paradigm}_{label.replace(' ', '_').replace('-', '_').lower()}"


def paired_lines(root: Path, paradigm: str, arms: dict[str, list[str]]) -> list[str]:
    """Every adapter against full fine-tuning of the same paradigm, per seed (a seed fixes the data draw
    and the training order for every arm), Bonferroni over the paradigm's rows; ``paired_<paradigm>.csv``."""
    names = {point_name(paradigm, label): label for label in arms}
    full = point_name(paradigm, "full")
    pairs = [(n, full) for n in names if n != full]
    return paired_section(tidy(root, {n: Point(label) for n, label in names.items()}), pairs, PAIRED_METRICS, names,
                          root / f"paired_{paradigm}.csv", "Paired differences against full fine-tuning over seeds")[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy budget: 40 steps per task, G=4, boundary-only eval")
    ap.add_argument("--real", action="store_true", help="real model and the papers' hyperparameters per paradigm "
                    "(analysis.tables.REAL, REAL_PARADIGM; needs a GPU and the model)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="sweep jobs at once (hydra/launcher=cl_parallel)")
    ap.add_argument("--paradigms", default="sft,grpo")
    ap.add_argument("--out", default=None, help="output root (default: results/adapters[_quick])")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = ap.parse_args()
    root = Path(args.out or f"results/adapters{'_real' if args.real else ''}{'_quick' if args.quick else ''}")
    extra = (QUICK if args.quick else []) + (REAL if args.real else []) + parallel_overrides(args.jobs)
    seeds = list(range(args.seeds))
    paradigms = [p.strip() for p in args.paradigms.split(",") if p.strip()]
    t0 = time.perf_counter()
    lines = ["# Adapters at toy scale (default stream)", ""]
    for paradigm in paradigms:
        arms = SFT_ARMS if paradigm == "sft" else GRPO_ARMS
        rl = QUICK_RL if args.quick and paradigm == "grpo" else []
        rows, extra_cols = {}, []
        for label, ov in arms.items():
            out = root / point_name(paradigm, label)
            run_sweep(out, None, seeds, [*extra, *rl, f"objective={paradigm}", *real_overrides(args.real, paradigm), *ov,
                                         *args.overrides])
            runs = completed_results(out)
            rows[mark_failed(label, out)] = summarise(runs, METRICS)
            trainable = runs[0]["metrics"]["compute"]["trainable_parameters_per_task"][0] if runs else None
            sps = mean_ci([r["metrics"]["compute"]["train_steps_per_second"] for r in runs])[0] if runs else float("nan")
            extra_cols.append({"adapter": label, "trainable parameters (task 1)": f"{trainable:,}" if runs else "-",
                               "train steps/s": f"{sps:.2f}" if runs else "-"})
        lines += [f"## {paradigm.upper()}", "", markdown_table(rows, METRICS), "", *paired_lines(root, paradigm, arms),
                  f"## {paradigm.upper()}: trainable parameters and speed", "",
                  as_table(pd.DataFrame(extra_cols, columns=["adapter", "trainable parameters (task 1)", "train steps/s"])),
                  ""]
    write_report(root, lines)
    print("\n" + "\n".join(lines))
    print(f"\nwritten: {root / 'table.md'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
