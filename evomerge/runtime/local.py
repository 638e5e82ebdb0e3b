"""In-process evaluation: one scorer per split, one candidate at a time, in submission order (deterministic).

Candidates are evaluated when outcomes are asked for (`next_outcome` / `as_completed`). Time is measured the
way the Ray runtime measures it (`stats()`), so a report reads the same whichever runtime ran the search.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from evomerge.runtime.base import Items, Outcome, OutcomeStream, Scorer, ScorerFactory, close_scorer, run_one
from evomerge.runtime.stats import Activity, RuntimeStats, WorkerActivity, phase

if TYPE_CHECKING:
    from evomerge.merge.api import AnyRecipe


class LocalRuntime(OutcomeStream):
    """Scorers built by `scorer` (one per split, on first use; the objectives' own split at once), with torch
    limited to `threads` threads."""

    def __init__(self, scorer: ScorerFactory, threads: int = 1, worker: str = "local"):
        import torch

        torch.set_num_threads(threads)
        self.worker = worker
        self._factory = scorer
        self._scorers: dict[str | None, Scorer] = {None: scorer(None)}
        self.objectives = self._scorers[None].objectives
        self._queue: list[tuple[int, AnyRecipe, str | None, Items | None]] = []
        self._stats = RuntimeStats(1)
        self._first: float | None = None  # when the first candidate started (the measured window)
        self._current: tuple[int, float] | None = None  # (cid, start) while a candidate is evaluated
        self._materialise: float | None = None  # the last candidate's measured materialise time

    def scorer(self, split: str | None) -> Scorer:
        if split not in self._scorers:
            self._scorers[split] = self._factory(split)
        return self._scorers[split]

    def submit(self, cid: int, recipe: AnyRecipe, split: str | None = None, items: Items | None = None) -> None:
        self._queue.append((cid, recipe, split, items))

    def next_outcome(self, timeout: float | None = None) -> Outcome | None:
        """Evaluate the oldest queued candidate now; None when nothing is queued (`timeout` is for Ray's sake)."""
        if not self._queue:
            return None
        cid, recipe, split, items = self._queue.pop(0)
        scorer = self.scorer(split)
        start = time.perf_counter()
        self._first = start if self._first is None else self._first
        self._current = (cid, start)
        try:
            out = run_one(scorer, cid, recipe, split, self.worker, items)
        finally:
            self._current = None
        if out.ok:
            self._materialise = out.materialise_seconds
        s = self._stats
        s.candidates, s.failed = s.candidates + 1, s.failed + (0 if out.ok else 1)
        s.busy += out.seconds
        # in-process: nothing between the loop and the scorer to count as overhead
        s.materialise += out.materialise_seconds
        s.score += out.score_seconds
        s.span += time.perf_counter() - start
        s.wall = time.perf_counter() - self._first
        return out

    def stats(self) -> RuntimeStats:
        """Utilisation here is evaluation time / wall time: what the loop's own work (driver, store) leaves."""
        return self._stats

    def activity(self) -> Activity:
        """The one in-process worker and the queue (read by the live display's thread while a candidate runs)."""
        current, now = self._current, time.perf_counter()
        if current is None:
            me = WorkerActivity(self.worker, "idle", candidates=self._stats.candidates)
        else:
            me = WorkerActivity(self.worker, phase(now - current[1], self._materialise), current[0], now - current[1],
                                self._stats.candidates)
        return Activity([me], len(self._queue))

    def close(self) -> None:
        for s in self._scorers.values():
            close_scorer(s)
        self._scorers.clear()
