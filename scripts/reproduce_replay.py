"""Replay on the default stream: GeRe's replay losses, the replay fraction under SFT and GRPO, schedules.

(a) GeRe comparison under SFT: no replay, and general-sample replay with label fitting (ce), KL logit
    imitation (kl), L1 / L2 feature imitation, threshold margin (tm).
(b) Experience-replay fraction 0 / 5 / 25 / 50% of each batch, under SFT and GRPO (same batch size, so
    the new-task share shrinks as the fraction grows).
(c) Which past task to replay, at 25%: uniform over past tasks vs power-law decay over task age vs the
    exponential control (task-balanced buffer). On the 3-task default stream only the last task has
    two past tasks, so schedules can differ only there; pass ``stream.tasks=[...]`` with more tasks to
    see more of a difference.
(d) Rehearsal-free regularizers (EWC, L2 to the start, LwF-style KL), Reptile meta-replay, k-FPF and the
    per-task re-warming vs infinite LR schedules, against no replay and 25% ER.

Each point runs over seeds as a Hydra multirun; jobs whose results.json is complete are skipped on a
rerun. Prints mean +- 95% CI tables and writes ``table.md`` and ``replay_fraction.png``.

    python scripts/reproduce_replay.py --quick     # toy budget, minutes (base stage cached)
    python scripts/reproduce_replay.py             # full: 3 seeds, default budget
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
from analysis.tables import (  # noqa: E402
    REAL, Point, paired_section, real_overrides, tidy,
)
from analysis.sweep import QUICK, QUICK_RL, parallel_overrides, run_sweep  # noqa: E402

METRICS = ["avg_acc", "forgetting", "bwt", "new_acc", "general_retention"]
# GeRe replays every other general task: retention on the others is the protection it did not rehearse
GERE_METRICS = [*METRICS, "general_retention_unreplayed"]
FRACTIONS = ["0", "0.05", "0.25", "0.5"]
REGULARIZERS = ["ewc", "l2_anchor", "lwf", "er", "meta_er", "kfpf", "lr_rewarm", "lr_infinite"]


def points(parts: set[str], paradigms: tuple[str, ...] = ("sft", "grpo")) -> tuple[dict[str, tuple[str | None, list[str]]], dict[str, list[str]]]:
    """``({directory: (experiment, overrides)}, {table: [directories]})``; a point shared by two tables
    (no replay under SFT, ``replay=none`` in every part) runs once."""
    runs: dict[str, tuple[str | None, list[str]]] = {}
    tables: dict[str, list[str]] = {}
    if "gere" in parts:
        runs["sft_frac0"] = (None, ["objective=sft", "replay=none"])
        for loss in ("ce", "kl", "l1", "l2", "tm"):
            runs[f"sft_gere_{loss}"] = ("gere", [f"replay.gere.loss={loss}"])
        runs["sft_gere_tm_fixed"] = ("gere", ["replay=gere_fixed"])
        tables["gere"] = ["sft_frac0"] + [f"sft_gere_{x}" for x in ("ce", "kl", "l1", "l2", "tm", "tm_fixed")]
    if "fraction" in parts:
        for obj in paradigms:
            for f in FRACTIONS:
                runs[f"{obj}_frac{f}"] = (None, [f"objective={obj}", "replay=none"] if f == "0" else
                                          [f"objective={obj}", "replay=er", f"replay.er.fraction={f}"])
        tables["fraction"] = [f"{obj}_frac{f}" for obj in paradigms for f in FRACTIONS]
    if "regularizers" in parts:
        runs["sft_frac0"] = (None, ["objective=sft", "replay=none"])
        for exp in REGULARIZERS:
            runs[f"sft_{exp}"] = (exp, [])
        tables["regularizers"] = ["sft_frac0"] + [f"sft_{exp}" for exp in REGULARIZERS]
    if "schedule" in parts:
        for sched in ("uniform", "power_law", "exponential"):
            runs[f"sft_frac0.25_{sched}"] = ("er_powerlaw", [f"replay.er_powerlaw.schedule={sched}"])
        tables["schedule"] = [f"sft_frac0.25_{x}" for x in ("uniform", "power_law", "exponential")]
    return runs, tables


LABELS = {"sft_ewc": "EWC (online, 100)", "sft_l2_anchor": "L2 to start (0.01)", "sft_lwf": "LwF KL to task start (1.0)",
          "sft_er": "ER 25%", "sft_meta_er": "ER 25% + Reptile (eps .1, k 25)", "sft_kfpf": "k-FPF (norms + head)",
          "sft_lr_rewarm": "LR re-warm + cosine per task", "sft_lr_infinite": "infinite LR schedule",
          "sft_frac0": "no replay", "sft_gere_ce": "GeRe label fitting (ce)", "sft_gere_kl": "GeRe KL logits",
          "sft_gere_l1": "GeRe L1 features", "sft_gere_l2": "GeRe L2 features", "sft_gere_tm": "GeRe TM (dynamic w)",
          "sft_gere_tm_fixed": "GeRe TM (fixed w = 100, official code)"}


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    obj, rest = name.split("_", 1)
    return f"{obj.upper()} {rest.replace('frac', 'replay ').replace('_', ' ')}"


def plot_fraction(root: Path, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    any_data = False
    for obj, color in (("sft", "tab:blue"), ("grpo", "tab:orange")):
        for ax, metric in zip(axes, ("forgetting", "new_acc")):
            xs, ms, cis = [], [], []
            for f in FRACTIONS:
                runs = completed_results(root / f"{obj}_frac{f}")
                if runs:
                    m, _, ci = mean_ci([r["metrics"][metric] for r in runs])
                    xs.append(float(f))
                    ms.append(m)
                    cis.append(0.0 if ci != ci else ci)
            if xs:
                any_data = True
                ax.errorbar(xs, ms, yerr=cis, marker="o", capsize=3, color=color, label=obj.upper())
            ax.set_xlabel("replay fraction of each batch")
            ax.set_ylabel(metric)
    if not any_data:
        plt.close(fig)
        return None
    axes[0].set_title("forgetting (lower is better)")
    axes[1].set_title("accuracy on each task right after learning it")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SCHEDULE_EXPERIMENTS = {"lr_infinite", "lr_rewarm"}


def paired_specs(tables: dict[str, list[str]]) -> dict[str, tuple[list[tuple[str, str]], list[str]]]:
    """Each part's claim as paired comparisons against its no-mitigation row, same seed: ``{part: (pairs,
    metrics)}`` (the schedule part compares schedules with each other, against uniform)."""
    out = {}
    for part, names in tables.items():
        if part == "fraction":
            base = {n.split("_")[0]: n for n in names if n.endswith("_frac0")}
            pairs = [(n, base[n.split("_")[0]]) for n in names if n not in base.values() and n.split("_")[0] in base]
            out[part] = (pairs, ["forgetting", "general_retention", "new_acc"])
        elif part == "regularizers":
            out[part] = ([(n, "sft_frac0") for n in names if n != "sft_frac0"], ["forgetting", "general_retention", "new_acc"])
        elif part == "gere":
            out[part] = ([(n, "sft_frac0") for n in names if n != "sft_frac0"],
                         ["general_retention", "general_retention_unreplayed"])
        elif part == "schedule":
            out[part] = ([(n, names[0]) for n in names[1:]], ["forgetting", "avg_acc"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy budget: 40 steps per task, G=4, boundary-only eval")
    ap.add_argument("--real", action="store_true", help="real model and the papers' hyperparameters per paradigm "
                    "(analysis.tables.REAL, REAL_PARADIGM; needs a GPU and the model)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="sweep jobs at once (hydra/launcher=cl_parallel)")
    ap.add_argument("--parts", default="gere,fraction,schedule,regularizers",
                    help="comma-separated subset of gere,fraction,schedule,regularizers")
    ap.add_argument("--fraction-paradigms", default="sft,grpo", help="objectives of part (b)")
    ap.add_argument("--out", default=None, help="output root (default: results/replay[_quick])")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = ap.parse_args()
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    allowed = {"gere", "fraction", "schedule", "regularizers"}
    if parts - allowed:
        raise SystemExit(f"error: --parts: unknown {sorted(parts - allowed)}; allowed: {', '.join(sorted(allowed))}")
    root = Path(args.out or f"results/replay{'_real' if args.real else ''}{'_quick' if args.quick else ''}")
    extra = (QUICK if args.quick else []) + (REAL if args.real else []) + parallel_overrides(args.jobs)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    fp = tuple(p.strip() for p in args.fraction_paradigms.split(",") if p.strip())
    if set(fp) - {"sft", "grpo"}:
        raise SystemExit(f"error: --fraction-paradigms: allowed sft, grpo; got {fp}")
    todo, tables = points(parts, fp)
    for name, (exp, ov) in todo.items():
        rl = QUICK_RL if args.quick and "objective=grpo" in ov else []
        real = real_overrides(args.real, "grpo" if "objective=grpo" in ov else "sft",
                              schedule=exp not in SCHEDULE_EXPERIMENTS)  # those arms compare schedules
        run_sweep(root / name, exp, seeds, [*extra, *rl, *real, *ov, *args.overrides])
    lines = ["# Replay at toy scale (default stream)", ""]
    titles = {"gere": "(a) GeRe replay losses, SFT", "fraction": "(b) experience-replay fraction, SFT and GRPO",
              "schedule": "(c) past-task schedule at 25% replay, SFT, task-balanced buffer",
              "regularizers": "(d) rehearsal-free regularizers, meta-replay, k-FPF and LR schedules, SFT"}
    specs = paired_specs(tables)
    for part, names in tables.items():
        metrics = GERE_METRICS if part == "gere" else METRICS
        rows = {mark_failed(label(n), root / n): summarise(completed_results(root / n), metrics) for n in names}
        lines += [f"## {titles[part]}", "", markdown_table(rows, metrics), ""]
        pairs, pmetrics = specs[part]
        if pairs:
            lines += paired_section(tidy(root, {n: Point(label(n)) for n in names}), pairs, pmetrics,
                                    {n: label(n) for n in names}, root / f"paired_{part}.csv",
                                    "Paired differences over seeds (same seed, same data and order)")[1]
    if "fraction" in parts:
        pic = plot_fraction(root, root / "replay_fraction.png")
        if pic is not None:
            lines += [f"![replay fraction]({pic.name})", ""]
    write_report(root, lines)
    print("\n" + "\n".join(lines))
    print(f"\nwritten: {root / 'table.md'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
