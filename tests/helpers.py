"""Importable helpers for tests that name functions by import path (user verifiers)."""


def nan_verifier(completions: list[str], answer: list[str], **_) -> list[float]:
    """A broken user verifier: every score is NaN."""
    return [float("nan")] * len(completions)
