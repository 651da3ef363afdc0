"""Reproduce the RFT-CPT comparison (Lai et al. 2025) at toy scale: does RL fine-tuning forget less than
SFT, once both have learned as much?

Every arm is a Hydra multirun over seeds on the default stream (3 tasks), resumable (complete jobs are
skipped when the script runs again). Parts (``--parts``):

- ``front`` (``lr_front`` + ``matched_gain``): SFT and GRPO at >= 5 learning rates each (``--sft-lrs``,
  ``--grpo-lrs``); each paradigm's front of forgetting and of general retention against new-task gain, and
  the **matched-gain table**: both paradigms read off their fronts at >= 3 equal gains (inside the range
  both fronts cover), with their paired difference, bootstrap intervals over seeds and a verdict no
  stronger than the multiplicity-adjusted interval (``analysis.fronts``). Each front's best learning rate
  (mean avg_acc) is reported with whether it is interior to its grid.
- ``ratio`` (``paper_lr_ratio``): the paper's SFT:GRPO learning-rate ratio, 10:1 (its SFT configs train at
  1e-5 and its GRPO config at 1e-6), and schedule shape (cosine to 0, 10% warm-up), scaled to this world:
  SFT takes the largest learning rate of its front that keeps general skills (mean general retention >=
  -0.05: it learns the stream without collapsing them), GRPO a tenth of it.
- ``shared`` (``shared_lr``): one learning rate for every arm (``optimizer.lr``, 1e-4): SFT, GRPO, GRPO
  without KL, RIF-GRPO.
- ``compute`` (``compute_matched``): GRPO given SFT's wall-clock: its steps per task scaled by the ratio of
  the two paradigms' measured training seconds at their best front learning rates (wall-clock on this
  machine, not FLOPs), against SFT at its best learning rate.
- ``joint``: multi-task joint SFT and joint GRPO (upper bounds) at the best front learning rates, with the
  budget multiplied (x1, x3, x10) until new-task accuracy is clearly above the base model's (the lower end
  of the 95% interval of the gain above 0.02); the table says which budget that took.
- ``reasoning``: GRPO with worked-steps prompts vs answer-only prompts from ``base=tiny_reasoning``.

Seeds vary everything random by default (``--vary all``): seed s trains from base model s
(``base.init_seed``, built once and cached), draws task data s (``data.seed``) and evaluation subset s
(``eval.subset_seed``), and orders and samples training with s; paired comparisons pair runs by seed.
``--vary training`` keeps one base, data and evaluation subset (only order and sampling vary: intervals are
then conditional on that base); ``--quick`` uses it so no new base is built.

    python scripts/reproduce_rft_cpt.py --quick          # fronts + matched-gain table, toy budget, ~14 min
    python scripts/reproduce_rft_cpt.py --quick --parts front,ratio,compute   # + 10:1 ratio, compute-matched
    python scripts/reproduce_rft_cpt.py                  # everything, 5 seeds, bases varied (hours on 2 cores)
    python scripts/reproduce_rft_cpt.py --real           # the papers' hyperparameters on a real model (GPU)
    python scripts/reproduce_rft_cpt.py --quick --modality vision   # the same protocol in the visual toy world
    python scripts/reproduce_rft_cpt.py --real --modality vision stream.data_dir=DIR   # Qwen2.5-VL-7B (GPUs)

``--modality vision`` runs every arm in ``experiment=vlm_default``'s world: the embedded vision-language model
(``model=tiny_vlm``) after its calibrated base stage (``base=vlm_tiny``), the visual stream read a digit ->
where a disc is -> which disc is bigger, colour naming and counting as general skills; its results go to
their own directory. With ``--real`` it runs the paper's own setting: Qwen2.5-VL-7B-Instruct on
``stream=rft_cpt`` (ScienceQA-IMG -> TextVQA -> VizWiz -> GQA -> Geometry3K -> PathVQA -> CLEVR; pass
``stream.data_dir=DIR`` with the local copies, see ``conf/stream/rft_cpt.yaml``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from analysis.aggregate import (  # noqa: E402
    as_table, completed_results, mark_failed, markdown_table, mean_ci, summarise, write_report,
)
from analysis.fronts import (  # noqa: E402
    common_seeds, gain_levels, interior_best, matched_gain, matched_within_seed, plot_fronts, plot_fronts_by_seed, task_gain,
    verdict,
)
from analysis.tables import (  # noqa: E402
    REAL as TABLES_REAL, Point, paired_section, real_overrides, tidy,
)
from analysis.sweep import QUICK as SWEEP_QUICK, QUICK_RL, parallel_overrides, run_sweep  # noqa: E402

ARMS = {"SFT": "rft_cpt_sft", "GRPO": "rft_cpt_grpo", "GRPO no KL": "rft_cpt_grpo_nokl",
        "RIF-GRPO": "rft_cpt_rif_grpo"}
JOINT_ARMS = {"joint SFT (MTL)": "rft_cpt_joint_sft", "joint GRPO (MTL)": "rft_cpt_joint"}
REASONING_ARMS = {"GRPO with reasoning": "rft_cpt_grpo_reasoning", "GRPO without reasoning": "rft_cpt_grpo_noreasoning"}
RL_ARMS = {"rft_cpt_grpo", "rft_cpt_grpo_nokl", "rft_cpt_rif_grpo", "rft_cpt_joint", *REASONING_ARMS.values()}
PARADIGMS = {"SFT": "rft_cpt_sft", "GRPO": "rft_cpt_grpo"}
METRICS = ["avg_acc", "forgetting", "bwt", "new_acc", "general_retention", "forward_kl_sampled_mean",
           "kl_base_general_final"]
FRONT_METRICS = {"forgetting": True, "general_retention": False}  # metric -> lower is better
# the parts' claims as paired comparisons (a - b): RL against SFT at one lr, and whether the KL term (or RIF's
# token filter) is what keeps GRPO's forgetting low; reasoning traces against answer-only prompts
SHARED_PAIRS = [("rft_cpt_grpo", "rft_cpt_sft"), ("rft_cpt_grpo_nokl", "rft_cpt_grpo"), ("rft_cpt_rif_grpo", "rft_cpt_grpo")]
REASONING_PAIRS = [("rft_cpt_grpo_reasoning", "rft_cpt_grpo_noreasoning")]
PAIRED_METRICS = ["forgetting", "general_retention", "new_acc"]
PARTS = ("front", "ratio", "shared", "compute", "joint", "reasoning")
SFT_LRS = "1e-6,3e-6,1e-5,3e-5,1e-4,3e-4,1e-3"  # low enough to reach GRPO's (smaller) gains
GRPO_LRS = "3e-6,1e-5,3e-5,1e-4,3e-4,1e-3"
QUICK_SFT_LRS = "1e-6,3e-6,1e-5,3e-5,1e-4,3e-4"
QUICK_GRPO_LRS = "1e-5,3e-5,1e-4,3e-4,1e-3"
QUICK = list(SWEEP_QUICK)
# --quick (too short for GRPO to learn much) also screens fewer instances for RIF (its arm only: the others
# have no rif.filter node to set)
QUICK_RIF = ["rif.filter.max_instances=256"]
# --modality vision: experiment=vlm_default's world (the tiny LLaVA after its calibrated base stage; read a digit ->
# where a disc is -> which disc is bigger; colour naming and counting as general skills) under every arm
VISION = ["model=tiny_vlm", "base=vlm_tiny", "stream=vision", "model.arch.hidden_size=64",
          "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4", "model.arch.intermediate_size=256",
          "data.n_train=3000", "data.n_eval=300", "stream.tasks=[vread,vwhere,vbigger]",
          "stream.general=[vcolor,vcount]", "eval.n_per_task=300"]
VARY_ALL = ["base.init_seed=${seed}", "data.seed=${seed}", "eval.subset_seed=${seed}"]
VARY_ALL_REAL = VARY_ALL[1:]  # a real model has no base stage to re-initialise
# --real: a real instruct model, no base stage, and the papers' hyperparameters per paradigm (SFT: LLaMA-
# Factory lr 1e-5, cosine, 10% warm-up; GRPO: EasyR1 lr 1e-6, G = 8, rollouts long enough for the task)
REAL = [*TABLES_REAL, "train.decay=cosine", "train.min_lr_ratio=0.0"]
# --real --modality vision: the paper's own setting, Qwen2.5-VL-7B-Instruct on its seven-dataset stream
# (stream.data_dir=DIR holds the local copies; VizWiz, GQA and CLEVR are read from DIR only)
REAL_VISION = [*(o for o in REAL if not o.startswith("model=")), "model=qwen2_5_vl_7b_instruct", "stream=rft_cpt"]


def paradigm_of(exp: str) -> str:
    return "grpo" if exp in RL_ARMS else "sft"


def real_arm(exp: str, steps: int) -> list[str]:
    """--real's per-arm settings: the paradigm's lr and rollouts, warm-up 10% of the steps per task."""
    return [*real_overrides(True, paradigm_of(exp), schedule=False), f"train.warmup_steps={max(1, round(0.1 * steps))}"]


def arm_overrides(exp: str, quick: bool) -> list[str]:
    """Overrides one arm adds in --quick mode."""
    return QUICK_RIF if quick and exp == "rft_cpt_rif_grpo" else []


def ratio_overrides(sft_lr: float, steps: int) -> dict[str, list[str]]:
    """``paper_lr_ratio``: SFT at ``sft_lr``, GRPO at a tenth of it, both cosine to 0 with 10% warm-up."""
    sched = ["train.decay=cosine", "train.min_lr_ratio=0.0", f"train.warmup_steps={max(1, round(0.1 * steps))}"]
    return {"rft_cpt_sft": [f"optimizer.lr={sft_lr:g}", *sched], "rft_cpt_grpo": [f"optimizer.lr={sft_lr / 10:g}", *sched]}


def compute_overrides(grpo_lr: float, steps: int, seconds_ratio: float) -> list[str]:
    """``compute_matched``: GRPO's steps per task scaled by SFT seconds / GRPO seconds (>= 1 step)."""
    return [f"optimizer.lr={grpo_lr:g}", f"stream.steps_per_task={max(1, round(steps * seconds_ratio))}"]


def joint_overrides(lr: float, steps: int, mult: int) -> list[str]:
    return [f"optimizer.lr={lr:g}", f"stream.steps_per_task={steps * mult}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="toy budget: 40 steps per task, G=4, boundary-only eval, one base (--vary training), "
                         "3 seeds, the fronts and the matched-gain table only (~14 minutes on 2 cores)")
    ap.add_argument("--real", action="store_true",
                    help="the papers' hyperparameters per paradigm on model=qwen2_5_1_5b_instruct (needs a GPU "
                         "and the model; add model=... to choose another)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per point (default 5; --quick: 3)")
    ap.add_argument("--vary", choices=["all", "training"], default=None,
                    help="what a seed changes (default all; --quick: training; --real: all but the base, which "
                         "a real model does not have)")
    ap.add_argument("--jobs", type=int, default=1, help="sweep jobs at once (hydra/launcher=cl_parallel)")
    ap.add_argument("--sft-lrs", default=None, help=f"SFT learning rates of the front (default {SFT_LRS}; "
                                                    f"--quick: {QUICK_SFT_LRS})")
    ap.add_argument("--grpo-lrs", default=None, help=f"GRPO learning rates of the front (default {GRPO_LRS}; "
                                                     f"--quick: {QUICK_GRPO_LRS})")
    ap.add_argument("--levels", type=int, default=3, help="gain levels of the matched-gain table")
    ap.add_argument("--out", default=None, help="output root (default: results/rft_cpt[_quick|_real])")
    ap.add_argument("--parts", default=None, help=f"comma-separated subset of {', '.join(PARTS)} "
                                                  "(default: all; --quick: front)")
    ap.add_argument("--modality", choices=["text", "vision"], default="text",
                    help="vision: the same protocol on experiment=vlm_default's visual world (with --real: "
                         "Qwen2.5-VL-7B-Instruct on stream=rft_cpt; give stream.data_dir=DIR)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = ap.parse_args()
    seeds = list(range(args.seeds or (3 if args.quick else 5)))
    vary = args.vary or ("training" if args.quick else "all")
    default_vary = "training" if args.quick else "all"
    mode = ("_vision" if args.modality == "vision" else "") + ("_real" if args.real else "") + (
        "_quick" if args.quick else "") + (
        f"_vary-{vary}" if vary != default_vary else "")  # a different protocol never reuses another's runs
    root = Path(args.out or f"results/rft_cpt{mode}").resolve()
    vary_ov = (VARY_ALL_REAL if args.real else VARY_ALL) if vary == "all" else []
    real = REAL_VISION if args.modality == "vision" else REAL
    extra = ((VISION if args.modality == "vision" and not args.real else []) + (QUICK if args.quick else [])
             + (real if args.real else [])
             + vary_ov + parallel_overrides(args.jobs))
    from cl.run import compose_config

    steps = int(compose_config(*[o for o in extra if not o.startswith("hydra")], *args.overrides).stream.steps_per_task)
    parts = [p.strip() for p in (args.parts or ("front" if args.quick else ",".join(PARTS))).split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"error: --parts: unknown {', '.join(bad)}; allowed: {', '.join(PARTS)}")
    ctx = Ctx(root, seeds, extra, QUICK_RL if args.quick else [], steps, args.quick, args.real, args.overrides)
    t0 = time.perf_counter()
    title = ("# RFT-CPT on a real model" + (" (Qwen2.5-VL, the paper's multimodal stream)" if args.modality == "vision"
                                            else "")) if args.real else "# RFT-CPT at toy scale" + (
        " (vision-language: tiny LLaVA after base=vlm_tiny, visual stream)" if args.modality == "vision" else "")
    lines = [title, "",
             f"Seeds per point: {len(seeds)}; a seed varies {'the base model, the task data, the evaluation subset and ' if vary == 'all' else ''}"
             f"the training order and sampling{'' if vary == 'all' else ' (one base model, data draw and evaluation subset: intervals are conditional on them)'}. "
             f"{steps} optimizer steps per task unless a table says otherwise.", ""]
    front = None
    if "front" in parts or any(p in parts for p in ("ratio", "compute", "joint")):
        front = part_front(ctx, parse_lrs(args.sft_lrs or (QUICK_SFT_LRS if args.quick else SFT_LRS)),
                           parse_lrs(args.grpo_lrs or (QUICK_GRPO_LRS if args.quick else GRPO_LRS)), args.levels)
        if "front" in parts:
            lines += front["lines"]
    if "ratio" in parts:
        lines += part_ratio(ctx, front)
    if "shared" in parts:
        lines += part_shared(ctx)
    if "compute" in parts:
        lines += part_compute(ctx, front)
    if "joint" in parts:
        lines += part_joint(ctx, front)
    if "reasoning" in parts:
        lines += part_reasoning(ctx)
    if ctx.failed:
        lines += ["", f"Points with no completed job: {', '.join(ctx.failed)}."]
    write_report(root, lines)
    print("\n" + "\n".join(lines))
    print(f"\nwritten: {root / 'table.md'} ({time.perf_counter() - t0:.0f} s)")


class Ctx:
    def __init__(self, root, seeds, extra, rl_extra, steps, quick, real, user):
        self.root, self.seeds, self.extra, self.rl_extra = root, seeds, extra, rl_extra
        self.steps, self.quick, self.real, self.user = steps, quick, real, list(user)
        self.failed: list[str] = []

    def sweep(self, out: Path, exp: str, overrides: list[str], seeds: list[int] | None = None) -> list[dict]:
        """Run the point (the user's overrides last: they win); its completed runs (none: noted, not fatal)."""
        run_sweep(out, exp, seeds or self.seeds,
                  [*self.extra, *(self.rl_extra if exp in RL_ARMS else []), *arm_overrides(exp, self.quick),
                   *(real_arm(exp, self.steps) if self.real else []), *overrides, *self.user])
        runs = completed_results(out)
        if not runs:
            print(f"    warning: no job of {out.name} completed (see {out}/jobs/*/run.log)", flush=True)
            self.failed.append(out.name)
        return runs


def parse_lrs(text: str) -> list[float]:
    lrs = sorted({float(x) for x in text.split(",") if x.strip()})
    if len(lrs) < 2:
        raise SystemExit("error: a front needs at least 2 learning rates")
    return lrs


def _by_seed(runs: list[dict]) -> dict[int, dict]:
    return {r["config"]["seed"]: r for r in runs}


def part_front(ctx: Ctx, sft_lrs: list[float], grpo_lrs: list[float], n_levels: int) -> dict:
    print("Front: SFT and GRPO over learning rates", flush=True)
    runs: dict[str, dict[float, dict[int, dict]]] = {}
    failed = []
    for paradigm, exp in PARADIGMS.items():
        runs[paradigm] = {}
        for lr in (sft_lrs if paradigm == "SFT" else grpo_lrs):
            out = ctx.root / "lr_front" / f"{exp}_lr{lr:g}"
            got = _by_seed(ctx.sweep(out, exp, [f"optimizer.lr={lr:g}"]))
            if got:
                runs[paradigm][lr] = got
            else:
                failed.append(f"{paradigm} lr {lr:g}")
        if len(runs[paradigm]) < 2:
            raise SystemExit(f"error: fewer than 2 learning rates of {paradigm} completed: no front")
    base = [r["base_acc"] for by_lr in runs.values() for by_seed in by_lr.values() for r in by_seed.values()]
    lines = ["## lr_front: each paradigm over learning rates", ""]
    rows = {}
    for paradigm, by_lr in runs.items():
        for lr, by_seed in by_lr.items():
            rs = list(by_seed.values())
            for r in rs:
                r["metrics"]["gain"] = task_gain(r)
            rows[mark_failed(f"{paradigm} lr={lr:g}", ctx.root / "lr_front" / f"{PARADIGMS[paradigm]}_lr{lr:g}")] = \
                summarise(rs, ["gain", "new_acc", "forgetting", "general_retention", "avg_acc"])
    lines += [markdown_table(rows, ["gain", "new_acc", "forgetting", "general_retention", "avg_acc"]), ""]
    best = {}
    for paradigm, by_lr in runs.items():
        lr, interior = interior_best(by_lr)
        best[paradigm] = lr
        lines.append(f"- {paradigm}: best mean avg_acc at lr {lr:g}, "
                     + ("interior to the grid." if interior else "**at an end of the grid**: extend the grid to "
                        "see the front's turn."))
    lines += [f"- The base model's accuracy on the stream's tasks: {np.mean(base, axis=0).round(3).tolist()} "
              "(gain is measured from it; mean over the bases of the seeds)."]
    if failed:
        lines.append(f"- No run completed at: {', '.join(failed)} (left out of the fronts).")
    lines.append("")
    levels = gain_levels(runs, n_levels)
    for metric in FRONT_METRICS:
        p = plot_fronts(runs, metric, levels, ctx.root / f"front_{metric}.png")
        lines.append(f"![{metric} against gain]({p.name})")
    lines.append("")
    lines += ["## matched_gain: forgetting and general retention at equal new-task gain", ""]
    if not levels:
        ranges = {p: (min(task_gain(r) for s in by_lr.values() for r in s.values()),
                      max(task_gain(r) for s in by_lr.values() for r in s.values())) for p, by_lr in runs.items()}
        lines += ["The fronts' gain ranges do not overlap, so no gain is reached by both: "
                  + ", ".join(f"{p} {lo:+.3f} to {hi:+.3f}" for p, (lo, hi) in ranges.items())
                  + ". No matched comparison is possible on these grids.", ""]
    else:
        table_rows = matched_gain(runs, list(FRONT_METRICS), levels)
        n = table_rows[0]["n_seeds"]
        lines += [matched_table(table_rows), "",
                  f"Estimates read off each front (per-lr means over the {n} seeds complete at every learning rate, "
                  "linear between learning rates); [95% interval] from 2000 paired bootstrap draws over seeds "
                  "(coverage: share of draws in which the gain lay inside both fronts). The verdict is a paired "
                  "t-test on each seed's own difference at that gain (n: seeds whose fronts reach it), Bonferroni-"
                  f"adjusted over the {table_rows[0]['tests']} differences read at once (p adj.); p exact adj.: "
                  "the distribution-free sign-flip test, which cannot go below 2^(1-n) before adjustment.", ""]
        (ctx.root / "matched_gain.json").write_text(json.dumps(table_rows, indent=1))
    if common_seeds(runs):
        lines += within_seed_lines(runs, ctx.root)
    points = [{"paradigm": p, "lr": lr, "seed": s, "gain": task_gain(r),
               **{m: r["metrics"].get(m) for m in ("new_acc", "forgetting", "general_retention", "avg_acc",
                                                   "train_seconds")}}
              for p, by_lr in runs.items() for lr, by_seed in by_lr.items() for s, r in by_seed.items()]
    (ctx.root / "points.json").write_text(json.dumps(points, indent=1))
    return {"runs": runs, "best": best, "lines": lines}


def within_seed_lines(runs: dict, root: Path) -> list[str]:
    """The ``matched_within_seed`` table: each seed read at gains both of its own fronts reach."""
    rows = matched_within_seed(runs, list(FRONT_METRICS))
    (root / "matched_within_seed.json").write_text(json.dumps(rows, indent=1, default=float))
    mid = next((r for r in rows if r["metric"] == "forgetting" and r["fraction"] == 0.5), None)
    plot = plot_fronts_by_seed(runs, "forgetting", root / "front_forgetting_by_seed.png", mid and mid["levels"])
    recs = []
    for r in rows:
        ok = r["n_valid"] > 0
        a, b = r["who"].split(" - ")
        recs.append({"metric": r["metric"], "fraction": f"{r['fraction']:.2f}",
                     "gain (seeds' range)": f"{r['gain']:+.3f} ({r['gain_min']:+.3f} to {r['gain_max']:+.3f})"
                     if ok else "-",
                     a: f"{r['a_mean']:+.3f}" if ok else "-", b: f"{r['b_mean']:+.3f}" if ok else "-",
                     r["who"]: "-" if math.isnan(r["lo"]) else f"{r['estimate']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]",
                     "n": r["n_valid"], "p adj.": f"{r['p_adj']:.3f}", "p exact adj.": f"{r['p_exact_adj']:.3f}",
                     "verdict": verdict(r, FRONT_METRICS[r["metric"]])})
    import pandas as pd

    return ["## matched_within_seed: each seed at gains both of its own fronts reach", "",
            "A seed's level is a fraction of the gain range that both paradigms' fronts (rising branches of that "
            "seed's own runs) cover; both are read there, so each seed's difference is matched on its own base "
            "and data, while the levels differ between seeds (their mean and range are shown). This is the "
            "reading that stays defined when the seeds vary the base model and the bases learn by different "
            "amounts. [95% t interval] of the mean per-seed difference; the verdict as in matched_gain, "
            f"Bonferroni-adjusted over the {rows[0]['tests']} differences of this table.", "",
            as_table(pd.DataFrame(recs)), "", f"![each seed's fronts, its middle level dashed]({plot.name})", ""]


def matched_table(rows: list[dict]):
    import pandas as pd

    recs = []
    for metric, lower in FRONT_METRICS.items():
        levels = sorted({r["gain"] for r in rows if r["metric"] == metric})
        for level in levels:
            at = {r["who"]: r for r in rows if r["metric"] == metric and r["gain"] == level}
            cell = lambda r: "-" if math.isnan(r["estimate"]) else (  # noqa: E731
                f"{r['estimate']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]")
            diff = next(r for w, r in at.items() if " - " in w)
            recs.append({"metric": metric, "gain": f"{level:+.3f}",
                         **{w: cell(r) for w, r in at.items() if " - " not in w},
                         f"{diff['who']}": cell(diff), "coverage": f"{diff['coverage']:.0%}", "n": diff["n_valid"],
                         "p adj.": f"{diff['p_adj']:.3f}", "p exact adj.": f"{diff['p_exact_adj']:.3f}",
                         "verdict": verdict(diff, lower)})
    return as_table(pd.DataFrame(recs))


def _pick_sft_lr(front: dict | None) -> float:
    """The largest SFT learning rate on the front whose mean general retention is >= -0.05 (the smallest
    front learning rate if none is; 1e-4 without a front)."""
    if not front:
        return 1e-4
    ok = [lr for lr, by_seed in front["runs"]["SFT"].items()
          if mean_ci([r["metrics"]["general_retention"] for r in by_seed.values()])[0] >= -0.05]
    return max(ok) if ok else min(front["runs"]["SFT"])


def part_ratio(ctx: Ctx, front: dict | None) -> list[str]:
    sft_lr = 1e-5 if ctx.real else _pick_sft_lr(front)
    print(f"\npaper_lr_ratio: SFT lr {sft_lr:g}, GRPO lr {sft_lr / 10:g}, cosine, 10% warm-up", flush=True)
    rows, dirs = {}, {}
    for (paradigm, exp), ov in zip(PARADIGMS.items(), ratio_overrides(sft_lr, ctx.steps).values()):
        dirs[paradigm] = f"{exp}_lr{ov[0].split('=')[1]}"
        out = ctx.root / "paper_lr_ratio" / dirs[paradigm]
        rs = ctx.sweep(out, exp, ov)
        for r in rs:
            r["metrics"]["gain"] = task_gain(r)
        rows[mark_failed(f"{paradigm} lr={ov[0].split('=')[1]}", out)] = summarise(rs, ["gain", *METRICS])
    return [f"## paper_lr_ratio: SFT lr {sft_lr:g} : GRPO lr {sft_lr / 10:g} (the paper's 10:1), cosine to 0, "
            "10% warm-up", "",
            f"SFT's learning rate: {'the papers' if ctx.real else 'the largest on its front that keeps general skills (mean general retention >= -0.05)'}.",
            "", markdown_table(rows, ["gain", *METRICS]), "", *_compute_rows(ctx.root / "paper_lr_ratio", dirs), ""]


def part_shared(ctx: Ctx) -> list[str]:
    lr = 1e-5 if ctx.real else 1e-4
    print(f"\nshared_lr: every arm at lr {lr:g}", flush=True)
    rows = {}
    for label, exp in ARMS.items():
        out = ctx.root / "shared_lr" / exp
        rs = ctx.sweep(out, exp, [f"optimizer.lr={lr:g}"])
        for r in rs:
            r["metrics"]["gain"] = task_gain(r)
        rows[mark_failed(label, out)] = summarise(rs, ["gain", *METRICS])
    return [f"## shared_lr: one learning rate ({lr:g}) for every arm", "", markdown_table(rows, ["gain", *METRICS]), "",
            *_compute_rows(ctx.root / "shared_lr", ARMS), "",
            *paired_lines(ctx.root / "shared_lr", ARMS, SHARED_PAIRS, PAIRED_METRICS)]


def _seconds(by_seed: dict[int, dict]) -> float:
    return float(np.mean([r["metrics"]["train_seconds"] for r in by_seed.values()]))


def part_compute(ctx: Ctx, front: dict) -> list[str]:
    sft_lr, grpo_lr = front["best"]["SFT"], front["best"]["GRPO"]
    s_sft, s_grpo = _seconds(front["runs"]["SFT"][sft_lr]), _seconds(front["runs"]["GRPO"][grpo_lr])
    ratio = s_sft / s_grpo
    ov = compute_overrides(grpo_lr, ctx.steps, ratio)
    print(f"\ncompute_matched: GRPO at lr {grpo_lr:g} with {ov[1]} (SFT {s_sft:.1f} s vs GRPO {s_grpo:.1f} s)", flush=True)
    out = ctx.root / "compute_matched" / f"rft_cpt_grpo_lr{grpo_lr:g}_{ov[1].split('=')[1]}steps"
    rs = ctx.sweep(out, "rft_cpt_grpo", ov)
    sft = list(front["runs"]["SFT"][sft_lr].values())
    for r in [*rs, *sft]:
        r["metrics"]["gain"] = task_gain(r)
    ms = ["gain", "new_acc", "forgetting", "general_retention", "avg_acc", "train_seconds"]
    rows = {f"SFT lr={sft_lr:g}, {ctx.steps} steps/task": summarise(sft, ms),
            mark_failed(f"GRPO lr={grpo_lr:g}, {ov[1].split('=')[1]} steps/task", out): summarise(rs, ms)}
    return ["## compute_matched: GRPO given SFT's wall-clock", "",
            f"Wall-clock on this machine (not FLOPs): SFT trained {s_sft:.1f} s and GRPO {s_grpo:.1f} s per run at "
            f"{ctx.steps} steps per task at their best front learning rates, so GRPO gets {ratio:.2f}x the steps.",
            "", markdown_table(rows, ms), ""]


def part_joint(ctx: Ctx, front: dict) -> list[str]:
    print("\njoint upper bounds (budget raised until they learn)", flush=True)
    rows, notes = {}, []
    for (label, exp), paradigm in zip(JOINT_ARMS.items(), PARADIGMS):
        lr = front["best"][paradigm]
        for mult in (1, 3, 10):
            out = ctx.root / "joint" / f"{exp}_lr{lr:g}_x{mult}"
            rs = ctx.sweep(out, exp, joint_overrides(lr, ctx.steps, mult))
            gains = [task_gain(r) for r in rs]
            if not gains:
                continue
            mean, _, ci = mean_ci(gains)
            for r in rs:
                r["metrics"]["gain"] = task_gain(r)
            rows[mark_failed(f"{label} lr={lr:g} x{mult} budget", out)] = summarise(rs, ["gain", *METRICS])
            if not math.isnan(ci) and mean - ci > 0.02:
                notes.append(f"- {label} learns (gain {mean:+.3f} ± {ci:.3f}) at x{mult} the sequential budget.")
                break
        else:
            notes.append(f"- {label} did not learn clearly even at x10 the sequential budget.")
    return ["## Joint multi-task upper bounds", "", markdown_table(rows, ["gain", *METRICS]), "", *notes, ""]


def _compute_rows(root: Path, arms: dict[str, str]) -> list[str]:
    import pandas as pd

    rows = []
    for label, exp in arms.items():
        runs = completed_results(root / exp)
        if runs:
            c = runs[0]["metrics"].get("compute", {})
            secs = sum(r["metrics"]["train_seconds"] for r in runs) / len(runs)
            rows.append({"method": label, "task examples seen": c.get("examples_seen"),
                         "tokens generated": c.get("tokens_generated"), "train seconds (mean)": f"{secs:.1f}"})
    cols = ["method", "task examples seen", "tokens generated", "train seconds (mean)"]
    return [as_table(pd.DataFrame(rows, columns=cols).astype(str))]


def part_reasoning(ctx: Ctx) -> list[str]:
    print("\nreasoning ablation (worked-steps vs answer-only prompts, base=tiny_reasoning)", flush=True)
    rows = {}
    for label, exp in REASONING_ARMS.items():
        out = ctx.root / "reasoning" / exp
        runs = ctx.sweep(out, exp, [])
        for r in runs:  # the two formats start from different base accuracies on the same problems
            r["metrics"]["base_avg"] = sum(r["base_acc"]) / len(r["base_acc"])
        rows[mark_failed(label, out)] = summarise(runs, METRICS + ["base_avg"])
    return ["## Reasoning ablation (GRPO, base=tiny_reasoning)", "", markdown_table(rows, METRICS + ["base_avg"]),
            "", *_compute_rows(ctx.root / "reasoning", REASONING_ARMS), "",
            *paired_lines(ctx.root / "reasoning", REASONING_ARMS, REASONING_PAIRS, PAIRED_METRICS)]


def paired_lines(root: Path, arms: dict[str, str], pairs: list[tuple[str, str]], metrics: list[str]) -> list[str]:
    """Arms compared as per-seed differences (``analysis.tables.paired_differences``: a seed fixes what it
    varies for every arm, so runs pair by seed), Bonferroni over the part's rows; written to
    ``<root>/paired.csv``."""
    labels = {exp: label for label, exp in arms.items()}
    return paired_section(tidy(root, {exp: Point(label) for label, exp in arms.items()}), pairs, metrics, labels,
                          root / "paired.csv")[1]


if __name__ == "__main__":
    main()
