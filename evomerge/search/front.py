"""The Pareto front and its hypervolume, on losses (every objective minimised)."""

from __future__ import annotations

import numpy as np


def pareto_mask(F: np.ndarray) -> np.ndarray:
    """True for rows no other row dominates (<= everywhere, < somewhere). Equal rows are all kept."""
    F = np.asarray(F, dtype=float)
    n = len(F)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        if not keep[i]:
            continue
        dominated = np.all(F <= F[i], axis=1) & np.any(F < F[i], axis=1)
        if dominated.any():
            keep[i] = False
    return keep


def add_to_front(front: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """The non-dominated rows of front + [loss], given a front that is non-dominated already: the new point is
    dropped if a row dominates it, else it joins and drops the rows it dominates (equal rows all stay, as
    `pareto_mask` keeps them). One vectorised pass instead of re-filtering the whole set per point."""
    if len(front):
        if bool(np.any(np.all(front <= loss, axis=1) & np.any(front < loss, axis=1))):
            return front
        front = front[~(np.all(loss <= front, axis=1) & np.any(loss < front, axis=1))]
    return np.vstack([front, loss])


def hypervolume(F: np.ndarray, ref: np.ndarray) -> float:
    """Volume dominated by the points of F and bounded by `ref` (points not better than ref count for nothing)."""
    F = np.asarray(F, dtype=float).reshape(-1, len(ref))
    F = F[np.all(F < ref, axis=1)]
    if not len(F):
        return 0.0
    if F.shape[1] == 1:
        return float(ref[0] - F[:, 0].min())
    if F.shape[1] == 2:  # exact sweep, no dependency: sorted by (x, y), a dominated point adds nothing
        F = F[np.lexsort((F[:, 1], F[:, 0]))]
        volume, prev_y = 0.0, float(ref[1])
        for x, y in F:
            if y < prev_y:
                volume += (ref[0] - x) * (prev_y - y)
                prev_y = y
        return float(volume)
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=np.asarray(ref, dtype=float))(F))


def contributions(F: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Each row's exclusive hypervolume: what the front's volume loses without it (0 for a dominated row, and for
    one of two equal rows). The row a front leans on most is the one whose error would cost most if it were wrong."""
    F = np.asarray(F, dtype=float).reshape(-1, len(ref))
    total = hypervolume(F, ref)
    return np.array([total - hypervolume(np.delete(F, i, axis=0), ref) for i in range(len(F))], dtype=float)


def knee_index(F: np.ndarray) -> int:
    """The front's knee: the row closest (Euclidean) to the ideal point once every objective is scaled to [0, 1]
    over these rows (losses: 0 is the best value seen, 1 the worst). Scaling makes objectives in different units
    count alike; an objective constant over the rows counts for nothing. Ties go to the first row. With one
    objective the knee is the best row."""
    F = np.asarray(F, dtype=float)
    if F.ndim != 2 or not len(F):
        raise ValueError("knee_index needs a non-empty 2-D array of losses")
    lo, span = F.min(axis=0), np.ptp(F, axis=0)
    scaled = (F - lo) / np.where(span > 0, span, 1.0)
    return int(np.argmin(np.sqrt((scaled**2).sum(axis=1))))
