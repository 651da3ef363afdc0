"""The results contract: ``results.json`` (see ../shared/DESIGN.md) and the printed summary."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "pytorch-lightning", "transformers", "peft", "hydra-core", "wandb", "datasets", "numpy")


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON via a temporary file and ``os.replace`` so readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def provenance(seed: int, start: float, end: float | None) -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "git": git_state(),
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "seed": seed,
        "start_time": start,
        "end_time": end,
        "wall_seconds": None if end is None else end - start,
        "argv": sys.argv,
    }


def format_matrix(tasks: list[str], R: list[list[float]], base: list[float], general_tasks: list[str],
                  G: list[list[float]], g0: list[float]) -> str:
    """The accuracy matrix (rows: after task i) with the general tasks to the right."""
    cols = list(tasks) + ([f"| {g}" for g in general_tasks] if general_tasks else [])
    width = max([10] + [len(c) + 1 for c in cols])
    head = f"{'after':<12}" + "".join(f"{c:>{width}}" for c in cols)
    lines = [head, "-" * len(head)]

    def row(label, accs, gen):
        cells = "".join(f"{a:>{width}.3f}" for a in accs) + "".join(f"{a:>{width}.3f}" for a in gen)
        return f"{label:<12}" + cells

    lines.append(row("base", base, g0))
    for i, name in enumerate(tasks):
        lines.append(row(f"{i + 1}:{name}"[:12], R[i], G[i] if G else []))
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    keys = ["avg_acc", "new_acc", "bwt", "fwt", "forgetting", "general_retention", "min_acc", "wc_acc",
            "stability_gap", "eval_time_fraction"]
    return "  ".join(f"{k} {metrics[k]:+.3f}" for k in keys if isinstance(metrics.get(k), (int, float)))
