"""The table layer: tidy frame, mean/std/CI per point, Markdown + LaTeX + CSV, failed points marked; the
sweep-end summary; the table report (local, and the W&B report object)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from analysis.aggregate import mean_ci
from analysis.hydra_callback import summary
from analysis.tables import Point, latex, summary as summarise_frame, tidy, write_table


def _job(root: Path, point: str, seed: int, status: str = "completed", avg: float = 0.0, fgt: float = 0.0) -> Path:
    d = root / point / "jobs" / f"seed={seed}-x"
    d.mkdir(parents=True)
    res = {"status": status, "config": {"seed": seed}, "tasks": ["a", "b"], "acc_matrix": [[avg, 0.1], [0.2, avg]],
           "general_tasks": ["g"], "general_matrix": [[0.5], [0.4]], "task_end_iters": [10, 20],
           "metrics": {"avg_acc": avg, "forgetting": fgt, "compute": {"tokens_generated": 7}}}
    (d / "results.json").write_text(json.dumps(res))
    (d / "curves.jsonl").write_text("".join(json.dumps({"global_iter": it, "task_idx": 0 if it <= 10 else 1,
                                                         "train_task": "a", "eval_task": t, "kind": "stream",
                                                         "acc": avg, "boundary": it in (0, 10, 20), "n": 5}) + "\n"
                                            for it in (0, 10, 20) for t in ("a", "b")))
    return d


@pytest.fixture()
def table_root(tmp_path):
    for s, (a, f) in enumerate([(0.2, 0.5), (0.3, 0.4), (0.4, 0.6)]):
        _job(tmp_path, "sft_seq", s, avg=a, fgt=f)
    _job(tmp_path, "grpo_seq", 0, avg=0.5, fgt=0.1)
    _job(tmp_path, "grpo_seq", 1, avg=0.7, fgt=0.3)
    _job(tmp_path, "grpo_seq", 2, status="failed: ConfigError: optimizer.lr: must be > 0.0")
    pts = {"sft_seq": Point("SFT seq", None, [], {"paradigm": "sft"}),
           "grpo_seq": Point("GRPO seq", None, [], {"paradigm": "grpo"})}
    return tmp_path, pts


def test_tidy_frame_and_summary_give_mean_std_and_ci_per_point(table_root):
    root, pts = table_root
    df = tidy(root, pts)
    assert len(df) == 6 and set(df["status"]) == {"completed", "failed: ConfigError: optimizer.lr: must be > 0.0"}
    assert set(df.columns) >= {"point", "label", "paradigm", "seed", "avg_acc", "forgetting", "tokens_generated"}
    s = summarise_frame(df, ["avg_acc", "forgetting"]).set_index("point")
    mean, sd, ci = mean_ci([0.2, 0.3, 0.4])
    assert s.loc["sft_seq", "n"] == 3 and math.isclose(s.loc["sft_seq", "avg_acc_mean"], mean)
    assert math.isclose(s.loc["sft_seq", "avg_acc_std"], sd) and math.isclose(s.loc["sft_seq", "avg_acc_ci95"], ci)
    assert s.loc["grpo_seq", "n"] == 2  # the failed job is not averaged in


def test_written_tables_mark_the_failed_point_and_carry_the_ci(table_root):
    root, pts = table_root
    md, _ = write_table(root, "Methods x paradigms", pts, ["avg_acc", "forgetting"], ["a note"])
    mean, _, ci = mean_ci([0.2, 0.3, 0.4])
    assert f"| SFT seq | 3 | {mean:+.3f} ± {ci:.3f} |" in _flat(md)
    assert "GRPO seq [FAILED 1 job(s): ConfigError: optimizer.lr" in md and md.rstrip().endswith("a note")
    tex = (root / "table.tex").read_text()
    assert "\\toprule" in tex and f"${mean:+.3f} \\pm {ci:.3f}$" in tex and "avg\\_acc" in tex
    assert (root / "runs.csv").read_text().count("\n") == 7 and (root / "summary.csv").exists()


def test_latex_escapes_labels(table_root):
    root, pts = table_root
    pts["sft_seq"].label = "SFT 25% & more_x"
    df = tidy(root, pts)
    tex = latex(root, pts, summarise_frame(df, ["avg_acc"]), ["avg_acc"], "cap_tion")
    assert "SFT 25\\% \\& more\\_x" in tex and "\\caption{cap\\_tion}" in tex


def test_sweep_summary_lists_failed_jobs_and_counts_them(table_root):
    root, _ = table_root
    dirs = sorted(p.parent for p in root.rglob("results.json"))
    text, n_failed = summary(dirs + [root / "missing"], ["avg_acc"], root)
    assert n_failed == 2 and "5 completed, 1 failed, 1 without results" in text
    assert "FAILED" in text and "NO RESULTS" in text and (root / "summary.md").exists()
    assert "\\toprule" in (root / "summary.tex").read_text()


def test_local_table_report_has_curves_and_matrices_per_point(table_root):
    from analysis.wandb_report import local_report, mean_curves
    from analysis.aggregate import completed_results

    root, pts = table_root
    write_table(root, "t", pts, ["avg_acc"])
    path = local_report(root)
    text = _flat(path.read_text())
    assert "| SFT seq | 3 |" in text and "## sft_seq (3 seeds)" in text
    assert (path.parent / "sft_seq_curves.png").stat().st_size > 0 and (path.parent / "grpo_seq_matrix.png").exists()
    mc = mean_curves(completed_results(root / "sft_seq"))
    assert math.isclose(next(c["acc"] for c in mc if c["global_iter"] == 10 and c["eval_task"] == "a"), 0.3)


def test_wandb_report_object_groups_the_table_by_point(table_root):
    pytest.importorskip("wandb_workspaces")
    from analysis.wandb_report import build_wandb_report

    root, pts = table_root
    write_table(root, "t", pts, ["avg_acc"])
    report = build_wandb_report("ctbench", root, "cl-suite", "me")
    kinds = [type(b).__name__ for b in report.blocks]
    assert kinds.count("PanelGrid") == 2 and "MarkdownBlock" in kinds
    grid = report.blocks[kinds.index("PanelGrid")]
    assert grid.runsets[0].filters == "Group == 'ctbench'" and grid.runsets[0].groupby == ["JobType"]
    assert [p.y for p in grid.panels][:2] == [["eval/stream/a"], ["eval/stream/b"]]
    assert all(p.x == "cl/global_iter" for p in grid.panels)


def _flat(md: str) -> str:
    """Markdown with the column padding collapsed."""
    return re.sub(r" {2,}", " ", md)


def test_report_tables_are_one_frame_written_as_markdown_latex_and_csv(tmp_path):
    from analysis.aggregate import markdown_table, write_report

    table = markdown_table({"ER 25%": {"avg_acc": (0.3, 0.1, 0.05, 3), "forgetting": (float("nan"),) * 3 + (3,)}},
                           ["avg_acc", "forgetting"])
    assert list(table.frame.columns) == ["method", "n", "avg_acc", "forgetting"]
    assert "| ER 25% | 3 | +0.300 ± 0.050 | - |" in _flat(table)
    write_report(tmp_path, ["# Title", "", "## SFT_part", "", table, "", "text after"])
    tex = (tmp_path / "table.tex").read_text()
    assert tex.count("\\begin{tabular}") == 1 and "\\caption{SFT\\_part}" in tex and "\\toprule" in tex
    assert "ER 25\\% & 3 & $+0.300 \\pm 0.050$ & - \\\\" in tex
    md = (tmp_path / "table.md").read_text()
    assert md.startswith("# Title") and md.endswith("text after") and str(table) in md


def _script(name: str):
    import importlib.util
    import sys

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script, n_points", [("reproduce_ctbench", 10), ("reproduce_rl_razor", 6),
                                              ("reproduce_stability_gap", 4)])
def test_every_table_point_is_a_valid_config(script, n_points):
    from omegaconf import OmegaConf

    from analysis.sweep import QUICK, QUICK_RL
    from analysis.tables import REAL, real_overrides, wandb_overrides
    from cl.validate import validate_config
    from tests.conftest import compose_cfg

    mod = _script(script)
    pts = mod.points(["sft", "grpo"], 5) if script.endswith("gap") else mod.points(["sft", "grpo"])
    assert len(pts) == n_points
    for name, p in pts.items():
        for extra in ([], QUICK + (QUICK_RL if p.paradigm == "grpo" else []), REAL + real_overrides(True, p.paradigm)):
            ov = [*([f"experiment={p.experiment}"] if p.experiment else []), *extra, *p.overrides,
                  *wandb_overrides(script, name)]
            cfg = OmegaConf.to_container(compose_cfg(*ov), resolve=True)
            validate_config(cfg)
            assert cfg["logger"]["group"] == script and cfg["logger"]["job_type"] == name


def test_old_task_curve_starts_each_dip_from_the_boundary_level():
    from analysis.plots import old_task_curve

    def line(it, t, task, acc, boundary=False):
        return {"global_iter": it, "task_idx": t, "eval_task": task, "kind": "stream", "acc": acc, "boundary": boundary}

    curves = [line(0, -1, "a", .1, True), line(10, 0, "a", .9, True),  # end of task a: the level before the dip
              line(15, 1, "a", .2), line(15, 1, "b", .5), line(20, 1, "a", .4, True), line(20, 1, "b", .8, True)]
    got = old_task_curve(curves, ["a", "b"])
    assert [i for i, _ in got] == [10, 15, 20] and [a for _, a in got] == pytest.approx([.9, .2, .6])


def test_fit_line_recovers_slope_and_correlation():
    from analysis.plots import fit_line

    slope, icpt, r = fit_line([0, 1, 2, 3], [1, 3, 5, 7])
    assert math.isclose(slope, 2) and math.isclose(icpt, 1) and math.isclose(r, 1)
    assert all(math.isnan(v) for v in fit_line([1, 1], [0, 1]))


def test_sweep_summary_names_refused_jobs_and_leaves_their_old_results_out(table_root):
    root, _ = table_root
    dirs = sorted(p.parent for p in root.rglob("results.json"))
    text, n_failed = summary(dirs[1:], ["avg_acc"], root, refused={dirs[0]: "holds a completed run made from other inputs"})
    assert n_failed == 2 and ", 1 refused ===" in text
    assert f"REFUSED {dirs[0]}: holds a completed run" in text


def test_every_rft_cpt_arm_composes_quick_full_varied_and_real():
    """The front, ratio, compute-matched and joint arms with the overrides the script builds for them, under
    --quick, the full default (seeds vary base, data and evaluation subset) and --real."""
    from omegaconf import OmegaConf

    from analysis.sweep import QUICK_RL
    from cl.validate import validate_config
    from tests.conftest import compose_cfg

    rft = _script("reproduce_rft_cpt")
    arms = []
    for exp in rft.PARADIGMS.values():
        arms += [(exp, [f"optimizer.lr={lr:g}"]) for lr in rft.parse_lrs(rft.SFT_LRS if exp == "rft_cpt_sft" else rft.GRPO_LRS)]
    arms += list(rft.ratio_overrides(3e-4, 40).items())
    arms.append(("rft_cpt_grpo", rft.compute_overrides(1e-4, 40, 0.3)))
    arms += [(exp, rft.joint_overrides(1e-4, 40, 3)) for exp in rft.JOINT_ARMS.values()]
    arms += [(exp, ["optimizer.lr=1e-4"]) for exp in rft.ARMS.values()]  # shared_lr
    assert rft.paradigm_of("rft_cpt_rif_grpo") == "grpo" and "objective.group_size=8" in rft.real_arm("rft_cpt_joint", 150)
    for grid in (rft.SFT_LRS, rft.GRPO_LRS, rft.QUICK_SFT_LRS, rft.QUICK_GRPO_LRS):
        assert len(rft.parse_lrs(grid)) >= 5
    for exp, ov in arms:
        rl = QUICK_RL if exp in rft.RL_ARMS else []
        for mode in ([*rft.QUICK, *rl], rft.VARY_ALL, [*rft.REAL, *rft.VARY_ALL_REAL, *rft.real_arm(exp, 150)]):
            cfg = OmegaConf.to_container(compose_cfg(f"experiment={exp}", "seed=3", *mode, *ov), resolve=True)
            validate_config(cfg)
            if mode is rft.VARY_ALL:  # one seed moves the base model, the data and the evaluation subset
                assert cfg["base"]["init_seed"] == cfg["data"]["seed"] == cfg["eval"]["subset_seed"] == 3
    assert rft.ratio_overrides(3e-4, 40)["rft_cpt_grpo"][0] == "optimizer.lr=3e-05"  # 10:1
    assert rft.compute_overrides(1e-4, 40, 0.3)[1] == "stream.steps_per_task=12"


def test_rft_cpt_real_arm_starts_on_a_tiny_random_qwen2(tiny_qwen, tmp_path):
    """--real's overrides on a tiny random model of the real model's architecture (CPU, one step per task)."""
    from cl.run import run
    from tests.conftest import compose_cfg

    rft = _script("reproduce_rft_cpt")
    for exp in rft.PARADIGMS.values():
        cfg = compose_cfg(f"experiment={exp}", *rft.REAL, *rft.real_arm(exp, 1), f"model.name_or_path={tiny_qwen}",
                          "trainer=cpu", "stream.steps_per_task=1", "stream.batch_size=2", "objective.max_new_tokens=4"
                          if exp == "rft_cpt_grpo" else "stream.batch_size=2", "eval.every_n_steps=null",
                          "eval.n_per_task=4", "logger=none", "shift=none", "train.warmup_steps=0")
        res = run(cfg, tmp_path / exp)
        assert res["status"] == "completed", res.get("error")
        assert res["config"]["optimizer"]["lr"] == (1e-5 if exp == "rft_cpt_sft" else 1e-6)


def test_every_point_of_the_other_table_scripts_composes_and_validates_quick_and_full():
    from omegaconf import OmegaConf

    from analysis.sweep import QUICK, QUICK_RL
    from cl.validate import validate_config
    from tests.conftest import compose_cfg

    configs = []
    rft = _script("reproduce_rft_cpt")
    for exp in {**rft.ARMS, **rft.JOINT_ARMS, **rft.REASONING_ARMS}.values():
        rl = QUICK_RL if exp in rft.RL_ARMS else []
        configs += [[f"experiment={exp}"], [f"experiment={exp}", *rft.QUICK, *rl, *rft.arm_overrides(exp, True)]]
    runs, _ = _script("reproduce_replay").points({"gere", "fraction", "schedule", "regularizers"})
    configs += [[*([f"experiment={exp}"] if exp else []), *QUICK, *ov] for exp, ov in runs.values()]
    ada = _script("reproduce_adapters")
    configs += [[*QUICK, f"objective={p}", *ov] for p, arms in (("sft", ada.SFT_ARMS), ("grpo", ada.GRPO_ARMS))
                for ov in arms.values()]
    for p, _, exp, ov in _script("reproduce_averaging").points(["sft", "grpo"]).values():
        configs.append([*([f"experiment={exp}"] if exp else []), *QUICK, *ov])
    assert len(configs) > 40
    from analysis.sweep import QUICK as Q
    from analysis.tables import REAL, real_overrides

    for overrides in configs:
        validate_config(OmegaConf.to_container(compose_cfg(*overrides), resolve=True))
        if overrides[:1] != ["experiment=rft_cpt_grpo_reasoning"]:  # --real: the full (non-quick) point on the real model
            full = [o for o in overrides if o not in Q and o not in QUICK_RL]
            paradigm = "grpo" if any("grpo" in o for o in full) else "sft"
            validate_config(OmegaConf.to_container(compose_cfg(*REAL, *real_overrides(True, paradigm), *full),
                                                   resolve=True))


def test_every_reproduction_script_offers_quick_and_real():
    import subprocess
    import sys

    from tests.conftest import ROOT

    scripts = sorted((ROOT / "scripts").glob("reproduce_*.py"))
    assert len(scripts) >= 8
    for script in scripts:
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (script.name, proc.stderr[-500:])
        assert "--quick" in proc.stdout and "--real" in proc.stdout, script.name


def test_rft_cpt_vision_arms_run_in_vlm_defaults_world():
    """--modality vision: every arm composes and validates in experiment=vlm_default's world (same model,
    base stage and stream), quick and full."""
    from omegaconf import OmegaConf

    from analysis.sweep import QUICK_RL
    from cl.validate import validate_config
    from tests.conftest import compose_cfg

    rft = _script("reproduce_rft_cpt")
    ref = OmegaConf.to_container(compose_cfg("experiment=vlm_default"), resolve=True)
    for exp in {**rft.PARADIGMS, **rft.ARMS}.values():
        for mode in ([*rft.QUICK, *(QUICK_RL if exp in rft.RL_ARMS else [])], rft.VARY_ALL):
            cfg = OmegaConf.to_container(compose_cfg(f"experiment={exp}", "seed=1", *rft.VISION, *mode), resolve=True)
            validate_config(cfg)
            assert cfg["model"]["arch"] == ref["model"]["arch"]
            assert {k: v for k, v in cfg["base"].items() if k != "init_seed"} == \
                {k: v for k, v in ref["base"].items() if k != "init_seed"}
            for key in ("tasks", "general"):
                assert cfg["stream"][key] == ref["stream"][key], (exp, key)
            assert cfg["data"]["n_train"] == ref["data"]["n_train"]


def test_rft_cpt_real_vision_arms_start_on_a_tiny_random_qwen2_5_vl(tmp_path):
    """--real --modality vision: Qwen2.5-VL's preset and the paper's stream with the papers' per-paradigm
    hyperparameters, started on a tiny random Qwen2.5-VL over local copies of the seven datasets (CPU, one
    step per task; the tiny tokenizer has no chat template, so prompts go without it)."""
    from cl.run import run
    from cl.vision import build_tiny_qwen_vl
    from tests.conftest import compose_cfg
    from tests.mm_fixtures import write_rft_cpt

    rft = _script("reproduce_rft_cpt")
    data = write_rft_cpt(tmp_path / "data")
    model = build_tiny_qwen_vl(tmp_path / "qwen25vl", "qwen2_5_vl", hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                               image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2,
                               tokenizer="byte", seed=0)
    for exp in rft.PARADIGMS.values():
        cfg = compose_cfg(f"experiment={exp}", *rft.REAL_VISION, *rft.real_arm(exp, 1), f"model.name_or_path={model}",
                          "model.use_chat_template=false", f"stream.data_dir={data}", "trainer=cpu",
                          "stream.steps_per_task=1", "stream.batch_size=2", "eval.every_n_steps=null",
                          "eval.n_per_task=2", "logger=none", "shift=none", "train.warmup_steps=0",
                          *(["objective.group_size=2", "objective.max_new_tokens=4"] if exp == "rft_cpt_grpo" else []))
        res = run(cfg, tmp_path / exp)
        assert res["status"] == "completed", res.get("error")
        assert res["config"]["model"]["name"] == "qwen2_5_vl_7b_instruct" and len(res["tasks"]) == 7
        assert res["config"]["optimizer"]["lr"] == (1e-5 if exp == "rft_cpt_sft" else 1e-6)


def test_paired_differences_match_scipys_paired_t_and_pair_by_seed(tmp_path):
    import pandas as pd
    from scipy import stats

    from analysis.tables import paired_differences, paired_markdown

    a = [(0.2, 0.50), (0.3, 0.40), (0.4, 0.60), (0.1, 0.55)]
    b = {0: (0.1, 0.20), 2: (0.2, 0.10), 3: (0.9, 0.25)}  # b has no seed 1: pairs are seeds 0, 2, 3 (not by position)
    for s, (avg, fgt) in enumerate(a):
        _job(tmp_path, "p_a", s, avg=avg, fgt=fgt)
    for s, (avg, fgt) in b.items():
        _job(tmp_path, "p_b", s, avg=avg, fgt=fgt)
    pts = {"p_a": Point("A"), "p_b": Point("B")}
    d = paired_differences(tidy(tmp_path, pts), [("p_a", "p_b")], ["forgetting", "avg_acc"])
    f = d[d["metric"] == "forgetting"].iloc[0]
    diffs = [a[s][1] - b[s][1] for s in (0, 2, 3)]  # .30, .50, .30
    ref = stats.ttest_rel([a[s][1] for s in (0, 2, 3)], [b[s][1] for s in (0, 2, 3)])
    assert f["n"] == 3 and f["tests"] == 2
    assert f["diff_mean"] == pytest.approx(sum(diffs) / 3)
    assert f["p"] == pytest.approx(ref.pvalue) and f["p_adj"] == pytest.approx(min(1.0, 2 * ref.pvalue))
    assert f["diff_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * stats.sem(diffs), rel=1e-4)  # t95 table: 4.303
    assert f["p_exact"] == pytest.approx(0.25)  # all three differences positive: 2 of 8 sign patterns as extreme
    md = paired_markdown(d, {"p_a": "A", "p_b": "B"})
    fline = next(x for x in md.splitlines() if "| forgetting |" in x)
    assert fline.startswith("| A - B | forgetting | 3 | +0.367 ± ") and fline.endswith("| not resolved |")

    # a metric missing on one seed drops that seed for that metric only; duplicated seeds use the first run;
    # the same difference on every seed is not a resolved t-test; an empty frame gives n = 0
    rows = [{"point": "x", "seed": s, "status": "completed", "dir": f"x{s}", "m1": 1.0 + 0.1 * s, "m2": 0.5}
            for s in range(3)]
    rows += [{"point": "y", "seed": s, "status": "completed", "dir": f"y{s}", "m1": 0.1 * s,
              "m2": float("nan") if s == 1 else 0.25} for s in range(3)]
    rows.append({"point": "y", "seed": 2, "status": "completed", "dir": "y9", "m1": 99.0, "m2": 99.0})
    with pytest.warns(UserWarning, match="several completed runs of seed"):
        d2 = paired_differences(pd.DataFrame(rows), [("x", "y")], ["m1", "m2", "absent"])
    r = {x["metric"]: x for x in d2.to_dict("records")}
    assert r["m1"]["n"] == 3 and r["m1"]["diff_mean"] == pytest.approx(1.0) and r["m1"]["constant"]
    assert math.isnan(r["m1"]["p"]) and "t-test undefined" in paired_markdown(d2, {})
    assert r["m2"]["n"] == 2 and r["m2"]["diff_mean"] == pytest.approx(0.25)
    assert r["absent"]["n"] == 0
    empty = paired_differences(pd.DataFrame(), [("x", "y")], ["m1"])
    assert list(empty["n"]) == [0] and "too few seeds" in paired_markdown(empty, {})


def _fake_point(root: Path, point: str, seeds: int, shift: float) -> None:
    """``seeds`` completed jobs under ``root/point`` with every metric the table scripts read; ``shift`` moves
    forgetting so that paired differences are known."""
    for s in range(seeds):
        d = root / point / "jobs" / f"seed={s}"
        d.mkdir(parents=True)
        f = 0.2 + 0.02 * s + shift * (1 + 0.05 * s)  # shifted rows forget 0.1, 0.105, 0.11 less
        m = {"avg_acc": 0.3 + 0.01 * s, "forgetting": f, "bwt": -f,
             "new_acc": 0.5, "general_retention": -0.1 - 0.01 * s, "general_retention_unreplayed": -0.1,
             "compute": {"trainable_parameters_per_task": [1000], "train_steps_per_second": 10.0}}
        (d / "results.json").write_text(json.dumps({"status": "completed", "config": {"seed": s}, "metrics": m}))


@pytest.mark.parametrize("script, args, points", [
    ("reproduce_ctbench", [], lambda mod: list(mod.points(["sft", "grpo"]))),
    ("reproduce_averaging", [], lambda mod: list(mod.points(["sft", "grpo"]))),
    ("reproduce_replay", ["--parts", "fraction,regularizers"],
     lambda mod: list(mod.points({"fraction", "regularizers"})[0])),
    ("reproduce_adapters", [], lambda mod: [mod.point_name(p, label) for p, arms in (("sft", mod.SFT_ARMS),
                                                                                     ("grpo", mod.GRPO_ARMS))
                                            for label in arms]),
])
def test_table_scripts_write_their_claims_as_paired_differences(script, args, points, tmp_path):
    """With every job already complete the scripts only read and write: each claim's paired table appears
    with the differences the fake runs were built with (GRPO/replay/AMA rows forget 0.100, 0.105 and 0.110
    less on seeds 0-2: t-test resolved after Bonferroni, sign-flip cannot be at 3 seeds)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    mod = _script(script)
    for name in points(mod):
        lower = any(k in name for k in ("grpo_", "_ama", "replay", "frac0.", "_ewc", "sft_lora"))
        _fake_point(tmp_path, name, 3, -0.1 if lower else 0.0)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--out", str(tmp_path), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    md = (tmp_path / "table.md").read_text()
    assert "mean difference ± 95% CI" in md
    row = {"reproduce_ctbench": "| GRPO sequential FT - SFT sequential FT | forgetting | 3 | -0.105 ± 0.012 |",
           "reproduce_averaging": "| SFT AMA - SFT wise 0.2 | forgetting | 3 | -0.105 ± 0.012 |",
           "reproduce_replay": "| SFT replay 0.25 - no replay | forgetting | 3 | -0.105 ± 0.012 |",
           "reproduce_adapters": "| LoRA - full | forgetting | 3 | -0.105 ± 0.012 |"}[script]
    assert row in md
    line = next(x for x in md.splitlines() if x.startswith(row))
    assert line.endswith("| a lower (resolved; t-test only) |")
    same = next(x for x in md.splitlines() if "| new_acc |" in x or "| general_retention |" in x)
    assert same.endswith("| not resolved |")  # equal on every seed


def test_rft_cpt_shared_and_reasoning_parts_read_their_claims_as_paired_differences(tmp_path):
    """The no-KL and reasoning ablations compare arms by seed: GRPO without KL built to forget 0.100-0.110
    less than GRPO on seeds 0-2 reads as resolved (t-test only at 3 seeds); RIF-GRPO, equal to GRPO on every
    seed, does not; ``paired.csv`` holds the same rows."""
    import pandas as pd

    rft = _script("reproduce_rft_cpt")
    root = tmp_path / "shared_lr"
    for exp in rft.ARMS.values():
        _fake_point(root, exp, 3, -0.1 if exp == "rft_cpt_grpo_nokl" else 0.0)
    md = "\n".join(rft.paired_lines(root, rft.ARMS, rft.SHARED_PAIRS, rft.PAIRED_METRICS))
    assert f"Bonferroni over the {len(rft.SHARED_PAIRS) * len(rft.PAIRED_METRICS)} rows" in md
    nokl = next(x for x in md.splitlines() if x.startswith("| GRPO no KL - GRPO | forgetting | 3 | -0.105 ± 0.012 |"))
    assert nokl.endswith("| a lower (resolved; t-test only) |")
    rif = next(x for x in md.splitlines() if x.startswith("| RIF-GRPO - GRPO | forgetting | 3 |"))
    assert rif.endswith("| not resolved |")
    csv = pd.read_csv(root / "paired.csv")
    assert len(csv) == len(rft.SHARED_PAIRS) * len(rft.PAIRED_METRICS) and set(csv["n"]) == {3}
    for exp in rft.REASONING_ARMS.values():  # with reasoning built to forget 0.100-0.110 less
        _fake_point(tmp_path / "reasoning", exp, 3, -0.1 if exp == "rft_cpt_grpo_reasoning" else 0.0)
    md = "\n".join(rft.paired_lines(tmp_path / "reasoning", rft.REASONING_ARMS, rft.REASONING_PAIRS, rft.PAIRED_METRICS))
    row = next(x for x in md.splitlines()
               if x.startswith("| GRPO with reasoning - GRPO without reasoning | forgetting | 3 | -0.105 ± 0.012 |"))
    assert row.endswith("| a lower (resolved; t-test only) |")
