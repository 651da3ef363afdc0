"""Named tasks: the names a stream or the general suite may list.

Ten families, each with a default size, and worked-steps variants (suffix ``w``) of add3, sub2 and
mul21 for the reasoning ablation, and six visual families (``v*``, ``tasks/visual.py``) for vision-language
models. A stream entry is either one of these names or a mapping
describing user data (see ``tasks/user_data.py``).
"""

from __future__ import annotations

from tasks.base import Task
from tasks.synthetic import (SyntheticFamily, add, add_steps, count, mod, mul, mul_steps, rotate, string_map, sub,
                             sub_steps)
from tasks.visual import VISUAL_FAMILIES

_FAMILIES: dict[str, SyntheticFamily] = {
    "add2": SyntheticFamily("add", "A2", add(2)),
    "add3": SyntheticFamily("add", "A3", add(3)),
    "sub2": SyntheticFamily("sub", "S2", sub(2)),
    "sub3": SyntheticFamily("sub", "S3", sub(3)),
    "mul21": SyntheticFamily("mul", "M", mul(2)),
    "mod3": SyntheticFamily("mod", "Q", mod(3)),
    "copy6": SyntheticFamily("copy", "C", string_map(6, lambda w: w)),
    "reverse6": SyntheticFamily("reverse", "R", string_map(6, lambda w: w[::-1])),
    "sort6": SyntheticFamily("sort", "O", string_map(6, lambda w: "".join(sorted(w)))),
    "double4": SyntheticFamily("double", "D", string_map(4, lambda w: "".join(c + c for c in w))),
    "rotate6": SyntheticFamily("rotate", "T", rotate(6)),
    "count8": SyntheticFamily("count", "N", count(8)),
    # worked-steps (scratchpad) variants: same problems as the plain task, answer after the working
    "add3w": SyntheticFamily("add", "A3w", add(3), worked=add_steps, draws_as="add3"),
    "sub2w": SyntheticFamily("sub", "S2w", sub(2), worked=sub_steps, draws_as="sub2"),
    "mul21w": SyntheticFamily("mul", "Mw", mul(2), worked=mul_steps, draws_as="mul21"),
    **VISUAL_FAMILIES,
}

TASK_NAMES: tuple[str, ...] = tuple(_FAMILIES)


def build_task(name: str, n_train: int, n_eval: int, seed: int) -> Task:
    """Build the named synthetic task with deterministic, disjoint splits."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown task '{name}'; allowed: {', '.join(TASK_NAMES)}")
    return _FAMILIES[name].build(name, n_train=n_train, n_eval=n_eval, seed=seed)
