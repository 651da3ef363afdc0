"""Continual-learning metrics as pure functions (formulas: docs/methods.md section 1, Metrics).

Notation: ``R[i][j]`` accuracy on stream task j after finishing task i (T x T); ``b[j]`` accuracy of
the starting model on task j; ``G[i][g]`` accuracy on general task g after task i; ``g0[g]`` its
starting value. All functions take plain sequences (or numpy arrays) and return floats or lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _accuracies(values, what: str) -> np.ndarray:
    """``values`` as floats, refused unless every one is an accuracy: finite and in [0, 1]."""
    A = np.asarray(values, dtype=float)
    bad = ~np.isfinite(A) | (A < 0.0) | (A > 1.0)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what}: entry {at if len(at) > 1 else at[0]} is {A[at]!r}; accuracies must be finite "
                         "numbers in [0, 1]")
    return A


def _matrix(R: Sequence[Sequence[float]]) -> np.ndarray:
    M = np.asarray(R, dtype=float)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {M.shape}")
    return _accuracies(M, "accuracy matrix")


def avg_acc(R) -> float:
    """Mean accuracy over all tasks after the last task: ``mean_j R[T][j]``."""
    return float(_matrix(R)[-1].mean())


def new_acc(R) -> float:
    """Plasticity: mean accuracy on each task right after learning it, ``mean_j R[j][j]``."""
    return float(np.diag(_matrix(R)).mean())


def bwt(R) -> float:
    """Backward transfer ``mean_{j<T} (R[T][j] - R[j][j])``; negative means forgetting. 0 for T=1."""
    M = _matrix(R)
    T = M.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([M[-1, j] - M[j, j] for j in range(T - 1)]))


def fwt(R, b) -> float:
    """Forward transfer ``mean_{j>=2} (R[j-1][j] - b[j])``. 0 for T=1."""
    M, base = _matrix(R), _accuracies(b, "base accuracies")
    T = M.shape[0]
    if base.shape != (T,):
        raise ValueError(f"base accuracies must have length {T}, got {base.shape}")
    if T < 2:
        return 0.0
    return float(np.mean([M[j - 1, j] - base[j] for j in range(1, T)]))


def forgetting_per_task(R, after: int | None = None) -> list[float]:
    """``f_j = max_{j <= l < k} R[l][j] - R[k][j]`` for tasks ``j < k``: the best accuracy on task j reached
    once it was trained (rows l >= j) minus its accuracy after task k.

    Chaudhry et al. (2018, "Riemannian Walk") take the maximum over all earlier rows ``l < k``, which
    includes the rows before task j was trained. This suite starts from a base that partly knows the
    stream tasks, so those rows hold accuracy that training on j did not produce; it counts only what
    was reached from task j's own training on. With ``R[l][j] <= R[j][j]`` for ``l < j`` (no transfer) the
    two are equal.

    Args:
        R: accuracy matrix.
        after: index k of the task after which forgetting is measured (default: the last).
    """
    M = _matrix(R)
    k = M.shape[0] - 1 if after is None else after
    return [float(M[j:k, j].max() - M[k, j]) for j in range(k)]


def forgetting(R) -> float:
    """Mean forgetting over tasks ``j < T`` after the last task; 0 for T=1."""
    f = forgetting_per_task(R)
    return float(np.mean(f)) if f else 0.0


def forgetting_curve(R) -> list[float]:
    """``F_k``: mean forgetting after each task k (0 after the first)."""
    M = _matrix(R)
    return [float(np.mean(forgetting_per_task(M, k))) if k else 0.0 for k in range(M.shape[0])]


def general_retention_per_task(G, g0) -> list[float]:
    """Accuracy after the last task minus the starting accuracy, per general task."""
    Gm, base = np.asarray(G, dtype=float), np.asarray(g0, dtype=float)
    if Gm.size == 0:
        return []
    Gm, base = _accuracies(Gm, "general accuracy matrix"), _accuracies(base, "general base accuracies")
    return [float(x) for x in Gm[-1] - base]


def general_retention(G, g0) -> float:
    """Mean over general tasks of (accuracy after the last task - starting accuracy)."""
    r = general_retention_per_task(G, g0)
    return float(np.mean(r)) if r else 0.0


def matrix_metrics(R, b, G=None, g0=None) -> dict:
    """All end-of-task metrics of one run, as stored in ``results.json["metrics"]``."""
    out = {
        "avg_acc": avg_acc(R),
        "new_acc": new_acc(R),
        "bwt": bwt(R),
        "fwt": fwt(R, b),
        "forgetting": forgetting(R),
        "forgetting_per_task": forgetting_per_task(R),
        "forgetting_curve": forgetting_curve(R),
    }
    if G is not None and g0 is not None and len(g0):
        out["general_retention"] = general_retention(G, g0)
        out["general_retention_per_task"] = general_retention_per_task(G, g0)
    else:
        out["general_retention"] = 0.0
        out["general_retention_per_task"] = []
    return out
