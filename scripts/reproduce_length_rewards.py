"""Length-aware GRPO rewards on the reasoning stream: plain GRPO, GRPO-lambda and HAPO.

GRPO-lambda (Dai et al. 2025) and HAPO (Huang et al. 2025) shorten reasoning chains by adding a length term
to the correctness reward (``objective.length_reward``; formulas in docs/methods.md). Here they run on the
toy reasoning stream (worked-steps prompts, ``experiment=rft_cpt_grpo_reasoning``: base=tiny_reasoning,
reward 0.9 accuracy + 0.1 format) with the same budget as plain GRPO. Rows: the three rewards; columns:
new-task accuracy, forgetting, average accuracy and mean completion length (tokens) over each task's
rollouts, mean ± 95% CI over seeds; a plot of completion length and of new-task accuracy per task. The
claims checked, at toy scale: the length terms shorten completions, without costing accuracy (GRPO-lambda)
or at a small cost (HAPO); and what they do to forgetting.

    python scripts/reproduce_length_rewards.py --quick
    python scripts/reproduce_length_rewards.py
    python scripts/reproduce_length_rewards.py --real stream=math    # a real model on GSM8K -> MATH
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.aggregate import completed_results, mean_ci  # noqa: E402
from analysis.tables import Point, parse_args, run_points, write_table  # noqa: E402

METRICS = ["new_acc", "forgetting", "avg_acc", "completion_len"]
REWARDS = {"none": "GRPO", "grpo_lambda": "GRPO-lambda", "hapo": "HAPO"}


def points() -> dict[str, Point]:
    return {f"grpo_{k}": Point(label, "rft_cpt_grpo_reasoning", [f"objective.length_reward={k}"],
                               {"paradigm": "grpo", "length_reward": k}) for k, label in REWARDS.items()}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "results/length_rewards", paradigms="grpo")
    t0 = time.perf_counter()
    pts = points()
    run_points(args.out, "length_rewards", pts, range(args.seeds), args.quick, args.extra, real=args.real)
    per_task: dict[str, dict[str, list[list[float]]]] = {}
    tasks: list[str] = []
    for name, p in pts.items():
        for r in completed_results(args.out / name):
            by_task = r["metrics"].get("compute", {}).get("completion_len_by_task", {})
            tasks = list(r["tasks"])
            lens = [by_task.get(t) for t in tasks]
            new = [r["acc_matrix"][i][i] for i in range(len(tasks))]
            d = per_task.setdefault(p.label, {"len": [], "new": []})
            d["len"].append(lens)
            d["new"].append(new)
    plot = plot_lengths(per_task, tasks, args.out / "length_and_accuracy.png")
    notes = [f"![completion length and new-task accuracy per task]({plot.name})"] if plot else []
    md, _ = write_table(args.out, "Length-aware GRPO rewards on the reasoning stream (toy scale)", pts, METRICS,
                        notes)
    print("\n" + md + f"\n\nwritten: {args.out}/table.md, runs.csv ({time.perf_counter() - t0:.0f} s)")


def plot_lengths(per_task: dict, tasks: list[str], path: Path):
    if not per_task or not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(per_task)
    x = np.arange(len(tasks))
    for k, (label, d) in enumerate(per_task.items()):
        for ax, key, title in ((axes[0], "len", "completion length (tokens)"), (axes[1], "new", "new-task accuracy")):
            cols = list(zip(*d[key]))
            means = [mean_ci([v for v in c if v is not None])[0] for c in cols]
            cis = [mean_ci([v for v in c if v is not None])[2] for c in cols]
            ax.bar(x + k * width, means, width, yerr=cis, label=label, capsize=2)
            ax.set_title(title)
    for ax in axes:
        ax.set_xticks(x + width * (len(per_task) - 1) / 2, tasks)
    axes[1].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle("while each task is trained (mean ± 95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
