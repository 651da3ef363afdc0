"""Importable helpers for tests that name functions by import path (user verifiers)."""


def nan_verifier(completions: list[str], answer: list[str], **_) -> list[float]:
    """A broken user verifier: every score is NaN."""
    return [float("nan")] * len(completions)


def short_verifier(completions: list[str], answer: list[str], **_) -> list[float]:
    """A broken user verifier: one score for the whole batch."""
    return [1.0]


def big_verifier(completions: list[str], answer: list[str], **_) -> list[float]:
    """A broken user verifier: scores outside [0, 1]."""
    return [5.0] * len(completions)


def raising_verifier(completions: list[str], answer: list[str], **_) -> list[float]:
    """A broken user verifier: it raises."""
    raise KeyError("no such column: 'label'")
