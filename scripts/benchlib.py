"""Shared by the benchmark scripts: steady-state steps/s of one suite training run."""

from __future__ import annotations

import time

import pytorch_lightning as pl

from cl.trainer import make_trainer


class StepClock(pl.Callback):
    """Wall time from the end of optimizer step ``warmup`` to the end of the last step; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before those two readings so queued GPU work is counted (not after
    every step, which would stop the host from queuing the next step while the GPU works)."""

    def __init__(self, warmup: int, sync=None):
        self.warmup, self.sync, self.t0, self.t1 = warmup, sync, 0.0, 0.0

    def on_train_batch_end(self, trainer, *_):
        step = trainer.global_step
        if self.sync is not None and step in (self.warmup, trainer.max_steps):
            self.sync()
        if step == self.warmup:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()


def suite_steps_per_second(module, loader, steps: int, warmup: int, sync=None, **trainer_kwargs) -> float:
    """Train ``module`` for ``steps`` steps with the suite's Trainer (one CPU unless ``trainer_kwargs`` say
    otherwise); steps/s after ``warmup``."""
    clock = StepClock(warmup, sync)
    kwargs = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "log_every_n_steps": 10, **trainer_kwargs}
    make_trainer(steps, kwargs, "bench", callbacks=[clock], progress_every=10**9).fit(module, loader)
    return (steps - warmup) / (clock.t1 - clock.t0)


def row(benchmark: str, ours: float, reference: float, target: float | None, lower_is_better: bool = False,
        ratio: float | None = None) -> dict:
    """One line of the benchmark table: ``ratio`` = ours / reference unless given (e.g. a share compared
    with a bound); ``met`` compares the ratio with ``target`` (>= target, or <= when lower is better)."""
    ratio = ours / reference if ratio is None else ratio
    met = None if target is None else (ratio <= target if lower_is_better else ratio >= target)
    return {"benchmark": benchmark, "ours": ours, "reference": reference, "ratio": ratio,
            "target": None if target is None else f"{'<=' if lower_is_better else '>='} {target:g}",
            "met": {None: "-", True: "met", False: "NOT met"}[met]}


def rows_markdown(rows: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(rows, columns=["benchmark", "ours", "reference", "ratio", "target", "met"])
    fmt = lambda v: "-" if v is None or v != v else (f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}")  # noqa: E731
    for col in ("ours", "reference"):
        df[col] = df[col].map(fmt)
    df["ratio"] = df["ratio"].map(lambda v: f"{v:.2f}")
    df["target"] = df["target"].fillna("-")
    return df.to_markdown(index=False, disable_numparse=True)


def print_rows(rows: list[dict]) -> None:
    print()
    print(rows_markdown(rows))


def bench_main(parser, measure, quick: list[str]) -> None:
    """Entry point of every benchmark script: ``--quick`` (the script's small sizes, the flags in ``quick``,
    given flags override them) and ``--rows FILE`` (also write the table rows as JSON, for ``bench.py``)."""
    import json
    import sys

    parser.add_argument("--quick", action="store_true", help=f"small sizes: {' '.join(quick) or 'the defaults'}")
    parser.add_argument("--rows", help="also write the table rows to this JSON file")
    argv = sys.argv[1:]
    if "--quick" in argv:
        argv = [*quick, *argv]
    args = parser.parse_args(argv)
    rows = measure(args)
    print_rows(rows)
    if args.rows:
        with open(args.rows, "w") as f:
            json.dump(rows, f, indent=2)
