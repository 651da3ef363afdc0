"""Verifiers: ``f(completions, answer, **columns) -> list[float]``, the shape TRL reward functions use.

The verifier of a task is both its evaluation metric and its RL reward.
"""

from __future__ import annotations

import importlib
import math
import re
from functools import partial
from typing import Callable

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")

VERIFIER_KINDS = ("exact", "numeric", "regex", "function")


def exact_match(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion equals the reference answer exactly (no normalisation)."""
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


WORKED_SEP = "|"
_WORKED_FORMAT = re.compile(r"^[^|]+\|[^|]+$")


def worked_final(completion: str) -> str | None:
    """The final answer of a worked-steps completion: the text after the last ``|`` (None without one)."""
    return completion.rpartition(WORKED_SEP)[2] if WORKED_SEP in completion else None


def worked_answer_match(completions: list[str], final: list[str], **_) -> list[float]:
    """1.0 where the worked-steps completion's final answer equals the reference ``final`` exactly."""
    return [float(worked_final(c) == a) for c, a in zip(completions, final, strict=True)]


def worked_format(completions: list[str], **_) -> list[float]:
    """1.0 where the completion is ``<steps>|<answer>``: some working, one separator, an answer."""
    return [float(bool(_WORKED_FORMAT.match(c))) for c in completions]


def worked_reward(completions: list[str], final: list[str], accuracy_weight: float = 0.9, **_) -> list[float]:
    """RL reward for prompts that ask for working: ``0.9 * accuracy + 0.1 * format`` (RFT-CPT's split)."""
    acc = worked_answer_match(completions, final)
    fmt = worked_format(completions)
    return [accuracy_weight * a + (1 - accuracy_weight) * f for a, f in zip(acc, fmt)]


def numeric_match(
    completions: list[str], answer: list[str], rel_tol: float = 1e-6, abs_tol: float = 1e-9, **_
) -> list[float]:
    """1.0 where the last number in the completion equals the numeric answer within tolerance."""
    scores = []
    for c, a in zip(completions, answer, strict=True):
        found = _NUMBER.findall(c)
        try:
            ok = bool(found) and math.isclose(float(found[-1]), float(a), rel_tol=rel_tol, abs_tol=abs_tol)
        except ValueError:
            ok = False
        scores.append(float(ok))
    return scores


def regex_match(completions: list[str], answer: list[str], pattern: str, **_) -> list[float]:
    """Extract the first group of ``pattern`` (or the whole match) from the completion, compare exactly."""
    rx = re.compile(pattern)
    scores = []
    for c, a in zip(completions, answer, strict=True):
        m = rx.search(c)
        got = None if m is None else (m.group(1) if rx.groups else m.group(0))
        scores.append(float(got is not None and got.strip() == str(a).strip()))
    return scores


def import_function(path: str) -> Callable:
    """Import ``"package.module:function"`` (or ``"package.module.function"``)."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"verifier function '{path}' must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"verifier function '{path}' cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"verifier function '{path}' is not callable")
    return fn


def make_verifier(kind: str = "exact", pattern: str | None = None, function: str | None = None) -> Callable:
    """Build a verifier by name: ``exact``, ``numeric``, ``regex`` (needs ``pattern``), ``function``."""
    if kind == "exact":
        return exact_match
    if kind == "numeric":
        return numeric_match
    if kind == "regex":
        if not pattern:
            raise ValueError("verifier 'regex' needs a 'pattern'")
        re.compile(pattern)
        return partial(regex_match, pattern=pattern)
    if kind == "function":
        if not function:
            raise ValueError("verifier 'function' needs 'function: package.module:function'")
        return import_function(function)
    raise ValueError(f"unknown verifier '{kind}'; allowed: {', '.join(VERIFIER_KINDS)}")
