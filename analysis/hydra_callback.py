"""A Hydra callback that ends every multirun with its table and the list of jobs that failed.

Registered in ``conf/config.yaml`` (``hydra.callbacks.sweep_summary``). Jobs are grouped by their
overrides without ``seed``; each group is one row of mean ± 95% CI over its seeds (``analysis.aggregate``).
The same table is written to ``SWEEP_DIR/summary.md`` and ``summary.tex``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from analysis.aggregate import latex_table, markdown_table, summarise

METRICS = ("avg_acc", "forgetting", "new_acc", "general_retention", "stability_gap")
NOT_A_POINT = ("seed", "resume", "logger", "checkpoint.every_n_steps", "hydra.")


class SweepSummary(Callback):
    def __init__(self, metrics=METRICS):
        self.metrics = list(metrics)
        self.job_dirs: list[Path] = []
        self.start = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start, self.job_dirs, self.refused = time.time(), [], {}

    def on_job_end(self, config: DictConfig, job_return, **kwargs: Any) -> None:
        try:
            job_dir = Path(config.hydra.runtime.output_dir)
        except Exception:  # a launcher that runs jobs elsewhere: on_multirun_end scans the sweep directory
            return
        # a failed job's return_value re-raises its exception: read the stored value of completed jobs only
        value = getattr(job_return, "_return_value", None) if job_return.status == JobStatus.COMPLETED else None
        if isinstance(value, str) and value.startswith("refused: "):  # its directory holds another run's results
            self.refused[job_dir] = value[len("refused: "):]
        else:
            self.job_dirs.append(job_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        dirs = self.job_dirs or [p.parent for p in sweep_dir.rglob("results.json") if p.stat().st_mtime >= self.start]
        text, n_failed = summary(dirs, self.metrics, sweep_dir, getattr(self, "refused", {}))
        print(text, flush=True)
        if n_failed:
            import sys

            print(f"error: {n_failed} job(s) of the sweep failed (listed above); their results.json say why",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)


def _point(job_dir: Path) -> str:
    overrides = []
    hydra_file = job_dir / ".hydra" / "overrides.yaml"
    if hydra_file.is_file():
        from omegaconf import OmegaConf

        overrides = [str(o) for o in OmegaConf.load(hydra_file)]
    keep = [o for o in overrides if not o.split("=")[0].lstrip("+~").startswith(NOT_A_POINT)]
    return " ".join(keep) or "(defaults)"


def summary(job_dirs: list[Path], metrics: list[str], sweep_dir: Path | None = None,
            refused: dict[Path, str] | None = None) -> tuple[str, int]:
    """The sweep's table (rows: points, mean ± 95% CI over seeds) and its failed jobs, as text; and the
    number of jobs that failed, left no results or were refused (their directory holds a run made from
    other inputs; its results are not this sweep's)."""
    refused = refused or {}
    groups: dict[str, list[dict]] = {}
    failed, missing = [], []
    for d in job_dirs:
        try:
            res = json.loads((d / "results.json").read_text())
        except (OSError, ValueError):
            missing.append(d)
            continue
        if res.get("status") == "completed":
            flat = dict(res.get("metrics", {}))
            groups.setdefault(_point(d), []).append({"metrics": flat})
        else:
            failed.append((d, res.get("status", "unknown")))
    lines = [f"\n== sweep summary: {sum(map(len, groups.values()))} completed, {len(failed)} failed"
             + (f", {len(missing)} without results" if missing else "")
             + (f", {len(refused)} refused" if refused else "") + " ==="]
    if groups:
        rows = {label: summarise(runs, metrics) for label, runs in sorted(groups.items())}
        table = markdown_table(rows, metrics)
        lines.append(table)
        if sweep_dir is not None:
            try:
                (Path(sweep_dir) / "summary.md").write_text(table + "\n")
                (Path(sweep_dir) / "summary.tex").write_text(latex_table(table.frame, "sweep summary"))
            except OSError:
                pass
    for d, status in failed:
        lines.append(f"FAILED {d}: {status}")
    for d in missing:
        lines.append(f"NO RESULTS {d} (killed before it wrote results.json; rerun the sweep to resume it)")
    for d, why in refused.items():
        lines.append(f"REFUSED {d}: {why}")
    return "\n".join(lines), len(failed) + len(missing) + len(refused)
