"""Config checks with one line per problem, naming the field: used by ``cl.validate`` and by each
component's ``check_config`` for its own settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def get(cfg: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


class Checker:
    """Collects problems with the config ``cfg`` (a plain mapping) as ``"field: message"`` lines."""

    def __init__(self, cfg: Mapping):
        self.cfg, self.problems = cfg, []

    def get(self, dotted: str, default: Any = None) -> Any:
        return get(self.cfg, dotted, default)

    def add(self, field: str, msg: str) -> None:
        self.problems.append(f"{field}: {msg}")

    def integer(self, field: str, minimum: int = 1, optional: bool = False) -> None:
        v = get(self.cfg, field)
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.add(field, f"must be an integer >= {minimum}, got {v!r}")

    def number(self, field: str, lo: float | None = None, hi: float | None = None, strict_lo: bool = False) -> None:
        v = get(self.cfg, field)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.add(field, f"must be a number, got {v!r}")
            return
        if lo is not None and (v <= lo if strict_lo else v < lo):
            self.add(field, f"must be {'>' if strict_lo else '>='} {lo}, got {v!r}")
        if hi is not None and v > hi:
            self.add(field, f"must be <= {hi}, got {v!r}")

    def choice(self, field: str, allowed: Sequence[str]) -> None:
        v = get(self.cfg, field)
        if v not in allowed:
            self.add(field, f"'{v}' is not one of {', '.join(allowed)}")

