"""One worker: a Ray actor that builds its scorer once (models resident, tasks loaded) and then scores candidates.

Placed on one GPU (`num_gpus`) or on `threads` CPU slots. It reads the job's model folders from its own node's
filesystem (local disk or shared storage). Every failure of a candidate comes back as an `Outcome` reason (via
`run_one`), so an exception that reaches Ray means the worker itself is broken. Timings come back with each
outcome so the driver can tell evaluation time from orchestration time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.compat import quiet
from evomerge.search.runtime import Outcome, Scorer, run_one, scorer_factory

if TYPE_CHECKING:
    from evomerge.search.spec import JobSpec


@dataclass
class Report:
    """An outcome with where the worker's time went: `busy` is the whole method call; `materialise` writing the
    merge into the model (the backend's load time) and `score` the rest of the scorer's call."""

    outcome: Outcome
    busy: float
    materialise: float
    score: float


class _Timed:
    """Wraps a scorer to keep the last call's load/total split (FitnessResult's fields; others: all scoring)."""

    def __init__(self, scorer: Scorer):
        self.scorer, self.objectives = scorer, scorer.objectives
        self.materialise = self.score = 0.0

    def evaluate(self, recipe: Any, items: dict[str, list[str]] | None = None) -> Any:
        self.materialise = self.score = 0.0
        start = time.perf_counter()
        try:
            result = self.scorer.evaluate(recipe, items) if items is not None else self.scorer.evaluate(recipe)
        except BaseException:
            self.score = time.perf_counter() - start  # a failed candidate's time is still evaluation time
            raise
        total = time.perf_counter() - start
        load = float(getattr(result, "load_seconds", 0.0) or 0.0)
        self.materialise, self.score = load, max(total - load, 0.0)
        return result


class Worker:
    """The actor's class (made remote by `actor_class()`). Never raises from `__init__`: a scorer that cannot be
    built is kept as `error` and re-raised by the driver, with its own type, before any candidate is sent."""

    def __init__(self, spec: "JobSpec", name: str):
        self._unquiet = quiet.install()  # a worker process: lm-eval's bars and logs would flood the driver's log
        import torch

        torch.set_num_threads(spec.runtime.threads)
        self.spec, self.name = spec, name
        self.error: BaseException | None = None
        self.scorers: dict[str | None, _Timed] = {}
        self.busy = 0.0
        self.candidates = 0
        try:
            self._factory = scorer_factory(spec)
            self.scorers[None] = _Timed(self._factory(spec, None))
        except Exception as e:  # noqa: BLE001 - reported through ready()
            self.error = e

    def ready(self) -> dict[str, Any]:
        """Who and where this worker is, with the objectives (directions resolved), or the construction error."""
        import socket

        info: dict[str, Any] = {"name": self.name, "pid": os.getpid(), "host": socket.gethostname()}
        if self.error is not None:
            try:
                import pickle

                pickle.dumps(self.error)
                info["error"] = self.error
            except Exception:  # noqa: BLE001 - an unpicklable exception still reports its text
                info["error"] = RuntimeError(f"{type(self.error).__name__}: {self.error}")
            return info
        info["objectives"] = self.scorers[None].objectives
        return info

    def evaluate(self, cid: int, recipe: Any, split: str | None = None,
                 items: dict[str, list[str]] | None = None) -> Report:
        start = time.perf_counter()
        scorer: _Timed | None = self.scorers.get(split)
        if scorer is None:
            try:
                scorer = self.scorers[split] = _Timed(self._factory(self.spec, split))
            except Exception as e:  # noqa: BLE001 - a split that cannot be scored fails its candidates
                out = Outcome(cid, split, reason=f"cannot build the scorer for split {split!r}: {type(e).__name__}: {e}",
                              worker=self.name)
                return self._done(out, start, 0.0, 0.0)
        out = run_one(scorer, cid, recipe, split, self.name, items)
        return self._done(out, start, scorer.materialise, scorer.score)

    def _done(self, out: Outcome, start: float, materialise: float, score: float) -> Report:
        busy = time.perf_counter() - start
        self.busy += busy
        self.candidates += 1
        return Report(out, busy, materialise, score)

    def close(self) -> None:
        for s in self.scorers.values():
            close = getattr(s.scorer, "close", None)
            if close:
                close()
        self.scorers.clear()


_ACTOR: Any = None


def actor_class() -> Any:
    """`Worker` as a Ray actor class, made once (Ray is imported only here, when a Ray runtime is built)."""
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(max_restarts=0, max_concurrency=1)(Worker)
    return _ACTOR
