"""The results contract: ``results.json`` and the printed summary; the provenance of a run (what
produced it: the inputs' fingerprint, the machine, the versions)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "pytorch-lightning", "transformers", "peft", "hydra-core", "wandb", "datasets", "numpy")


# why a metric can be undefined (written as null): the ones a short stream leaves without data
NULL_REASONS = {
    "min_acc": "needs an evaluation of an earlier task after a later task started (a stream of >= 2 tasks)",
    "wc_acc": "needs an evaluation of an earlier task after a later task started (a stream of >= 2 tasks)",
    "stability_gap_significant": "no (task, boundary) pair with an evaluation at the boundary and inside the next task",
    "stability_gap": "no (task, boundary) pair measurable on like items: a stream of >= 2 tasks, and boundaries "
                     "scoring at least as many items as inner points (eval.max_samples_per_boundary)",
    "general_retention_unreplayed": "every general task is replayed (choose a subset, e.g. replay.gere.tasks)",
}


WINDOW_NULL = "no two evaluation points of a task within the window (eval.windows below eval.every_n_steps)"


def strict_json(obj, path: str = "", nulls: dict | None = None):
    """``obj`` with every non-finite float replaced by ``None``; ``nulls`` collects ``{dotted path: reason}``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if nulls is not None:
            key = path.rsplit(".", 1)[-1]
            nulls[path] = NULL_REASONS.get(key) or (WINDOW_NULL if key.startswith(("wf_", "wp_")) else
                                                    f"not a finite number ({obj})")
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v, f"{path}.{k}" if path else str(k), nulls) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, f"{path}[{i}]", nulls) for i, v in enumerate(obj)]
    return obj


def dumps_strict(obj, **kwargs) -> str:
    """Strict JSON (RFC 8259: no NaN/Infinity literals): non-finite floats become null."""
    return json.dumps(strict_json(obj), allow_nan=False, default=str, **kwargs)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write strict JSON via a temporary file and ``os.replace`` so readers never see a partial file.
    Non-finite floats are written as null; for a mapping, ``null_values`` lists where and why."""
    path = Path(path)
    nulls: dict = {}
    clean = strict_json(obj, nulls=nulls)
    if isinstance(clean, dict):
        clean.pop("null_values", None)
        if nulls:
            clean["null_values"] = nulls
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(clean, indent=2, default=str, allow_nan=False))
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


# config keys (dotted) that do not change a run's results: where it logs, checkpoints and caches, how it
# resumes (a run stopped by a NaN may resume with train.nonfinite=skip), how a base model is judged
NOT_RESULT_KEYS = ("logger", "checkpoint", "resume", "cache_dir", "hydra", "train.nonfinite", "save_final_model",
                   "base.expected", "base.general_health", "base.health_band")
CODE_PACKAGES = ("cl", "tasks", "replay", "analysis")
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "sve")


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_hash() -> str:
    """sha256 over the project's Python sources (``cl``, ``tasks``, ``replay``, ``analysis``): the code version
    whether or not the project is a git checkout, and whatever its uncommitted edits."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).parts
            if any(p.startswith(".") or p == "__pycache__" for p in parts) or not f.is_file():
                continue  # editor lock files, notebook checkpoints, caches
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _data_files(resolved: dict) -> dict[str, str]:
    """Content hashes of the local user data files named in the stream (``stream.tasks``/``stream.general``
    entries with ``train``/``eval`` paths); hub datasets are named, not hashed."""
    out = {}
    stream = resolved.get("stream") or {}
    for spec in list(stream.get("tasks") or []) + list(stream.get("general") or []):
        if not isinstance(spec, dict):
            continue
        for key in ("train", "eval", "function"):
            src = spec.get(key)
            if not isinstance(src, str) or src.startswith("hub:"):
                continue
            path = Path(src.split(":")[0] if key == "function" else src).expanduser()
            if path.is_file():
                out[src] = _sha256_file(path)[:16]
            elif key != "function":
                out[src] = "missing"
    return out


def _result_config(resolved: dict) -> dict:
    """``resolved`` without the keys in ``NOT_RESULT_KEYS``, and without the rank count under a distributed
    strategy (every rank count trains on the same global batches, ``cl.dist``; an interrupted job may resume
    on another number of ranks, ``cl.checkpoint.latest_common``)."""
    import copy

    from cl.dist import DDP_STRATEGIES

    out = copy.deepcopy(resolved)
    trainer = out.get("trainer")
    if isinstance(trainer, dict) and str(trainer.get("strategy", "auto")).startswith(DDP_STRATEGIES):
        trainer.pop("devices", None)
        trainer.pop("num_nodes", None)
    for key in NOT_RESULT_KEYS:
        *parents, last = key.split(".")
        d = out
        for p in parents:
            d = d.get(p) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(last, None)
    return out


def input_fingerprint(resolved: dict, base: str | None) -> dict:
    """What determines a run's results: the resolved config (less the keys in ``NOT_RESULT_KEYS``), the
    content of its user data files, the base model (``base``: the base stage's cache key, or the model path
    or hub id) and the code. Two runs with equal fingerprints on the same machine give the same results."""
    blob = json.dumps(_result_config(resolved), sort_keys=True, default=str)
    return {"config_sha256": hashlib.sha256(blob.encode()).hexdigest()[:16], "data_files": _data_files(resolved),
            "base_model": base, "code": code_hash()}


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def fingerprint_diff(old: dict, old_config: dict, new: dict, new_config: dict) -> list[str]:
    """What differs between two runs' inputs, one short phrase per difference (empty when they match)."""
    out = []
    if old.get("config_sha256") != new.get("config_sha256"):
        a, b = _flat(_result_config(old_config)), _flat(_result_config(new_config))
        keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
        shown = ", ".join(f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in keys[:3])
        out.append(f"config ({shown}{', ...' if len(keys) > 3 else ''})" if keys else "config")
    od, nd = old.get("data_files", {}), new.get("data_files", {})
    for src in sorted(set(od) | set(nd)):
        if od.get(src) != nd.get(src):
            out.append(f"data file {src} " + ("changed" if src in od and src in nd else "added" if src in nd
                                                 else "removed"))
    if old.get("base_model") != new.get("base_model"):
        out.append(f"base model ({old.get('base_model')} -> {new.get('base_model')})")
    if old.get("code") != new.get("code"):
        out.append(f"code ({old.get('code')} -> {new.get('code')})")
    return out


def machine() -> dict:
    """The CPU model, its floating-point instruction sets, torch's threads and CPU kernel level: what makes
    two machines' floating point (and so a seeded run) differ."""
    import torch

    model, flags = platform.processor() or None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_cpu_capability": capability}


def provenance(seed: int, start: float, end: float | None, fingerprint: dict | None = None) -> dict:
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
        "machine": machine(),
        "fingerprint": fingerprint,
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
