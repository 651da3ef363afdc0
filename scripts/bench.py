"""Every benchmark in one command: runs each ``scripts/bench_*.py`` (each in its own process, one after
another, so none competes for the cores) and prints one Markdown table, benchmark | ours | reference
(measured in the same run) | ratio | target | met, with the machine it ran on.

    python scripts/bench.py [--quick] [--only sft,grpo] [--write docs/benchmarks.md]

``--quick`` passes ``--quick`` to every script (small sizes: a few minutes in all on 2 cores); without it
each runs at its documented size (about an hour on 2 cores). ``gpu`` (``bench_gpu.py``: SFT MFU, CUDA-graph
rollouts and GRPO steps on a ~0.5B model) runs only where torch sees a CUDA GPU. ``--write`` also writes the table, the machine
and the command to a Markdown file. A script that fails is reported in the table and makes the command
exit 1 after the others have run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import rows_markdown  # noqa: E402

BENCHES = ("sft", "vlm_sft", "replay", "rollouts", "grpo", "eval", "scale", "sweep", "gpu")
NEEDS_GPU = ("gpu",)  # skipped (and said so) where torch sees no CUDA GPU
VARIANTS = {"vlm_sft": ("sft", ["--vision"])}  # a benchmark run by another script with extra arguments


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run_one(name: str, quick: bool, extra: list[str]) -> tuple[list[dict], float, str | None]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        script, pre = VARIANTS.get(name, (name, []))
        cmd = [sys.executable, str(HERE / f"bench_{script}.py"), *pre, *(["--quick"] if quick else []), "--rows",
               str(out), *extra]
        print(f"[bench] {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=HERE.parent, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t
        log = proc.stdout
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(log.strip().splitlines()[-15:])
            print(f"[bench] {name} FAILED (exit {proc.returncode}):\n{tail}", flush=True)
            return [], wall, (log.strip().splitlines() or ["no output"])[-1]
        # the script's own detail (everything above its table) goes to this command's output
        detail = log.split("\n| benchmark")[0].rstrip()
        print("\n".join("    " + line for line in detail.splitlines()[-12:]), flush=True)
        print(f"[bench] {name}: {wall:.0f} s", flush=True)
        return json.loads(out.read_text()), wall, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every script at its small size (a few minutes)")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    ap.add_argument("--write", type=Path, help="also write the table and the machine to this Markdown file")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in BENCHES]
    if bad:
        raise SystemExit(f"error: --only: unknown {', '.join(bad)}; allowed: {', '.join(BENCHES)}")
    rows, failed, total = [], [], time.perf_counter()
    for name in names:
        if name in NEEDS_GPU and not _has_gpu():
            print(f"[bench] {name}: skipped (torch sees no CUDA GPU; `python scripts/bench_{name}.py --device cpu "
                  "--size 1m` runs its code paths on CPUs)", flush=True)
            continue
        got, _, error = run_one(name, args.quick, [])
        if error is not None:
            failed.append(name)
            rows.append({"benchmark": f"bench_{name}.py FAILED: {error[:120]}", "ours": None, "reference": None,
                         "ratio": float("nan"), "target": None, "met": "failed"})
        rows.extend(got)
    wall = time.perf_counter() - total
    table = rows_markdown(rows)
    where = machine()
    command = "python scripts/bench.py" + (" --quick" if args.quick else "") + \
        ("" if args.only == ",".join(BENCHES) else f" --only {args.only}")
    print(f"\n{where}\n`{command}`, {wall / 60:.1f} min\n\n{table}")
    if args.write:
        args.write.write_text(
            "# Benchmarks\n\n"
            "Every line is a ratio of two measurements taken in the same run on the same machine (the reference "
            "is measured alongside ours, so a slower or busier machine moves both). Produced by\n\n"
            f"    {command}\n\n"
            f"on {where}, {datetime.date.today().isoformat()}, {wall / 60:.1f} min. Each script documents its "
            "setup and can be run alone with more repeats (`python scripts/bench_<name>.py --help`).\n\n"
            f"{table}\n")
        print(f"\nwritten to {args.write}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
