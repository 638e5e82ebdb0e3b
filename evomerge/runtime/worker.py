"""One worker: a Ray actor that builds its scorer once (models resident, tasks loaded) and then scores candidates.

Placed on one GPU (`num_gpus`) or on `threads` CPU slots. It reads the job's model folders from its own node's
filesystem (local disk or shared storage). Every failure of a candidate comes back as an `Outcome` reason (via
`run_one`), so an exception that reaches Ray means the worker itself is broken. Each outcome carries its own
timings (`seconds`, `materialise_seconds`), so the driver can tell evaluation time from orchestration time.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from evomerge.runtime.base import Items, Outcome, Scorer, ScorerFactory, close_scorer, run_one
from evomerge.compat import quiet

if TYPE_CHECKING:
    from evomerge.merge.api import AnyRecipe


class Worker:
    """The actor's class (made remote by `actor_class()`). `scorer` builds one scorer per split; torch gets
    `threads` threads. Never raises from `__init__`: a scorer that cannot be built is kept as `error` and
    re-raised by the driver, with its own type, before any candidate is sent."""

    def __init__(self, scorer: ScorerFactory, threads: int, name: str):
        self._unquiet = quiet.install()  # a worker process: lm-eval's bars and logs would flood the driver's log
        import torch

        torch.set_num_threads(threads)
        self.name = f"{name}@{_node()}"  # where it ran, in every outcome: the store's and dashboard's `worker`
        self._factory = scorer
        self.error: BaseException | None = None
        self.scorers: dict[str | None, Scorer] = {}
        try:
            self.scorers[None] = scorer(None)
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

    def evaluate(self, cid: int, recipe: "AnyRecipe", split: str | None = None, items: Items | None = None) -> Outcome:
        scorer = self.scorers.get(split)
        if scorer is None:
            start = time.perf_counter()
            try:
                scorer = self.scorers[split] = self._factory(split)
            except Exception as e:  # noqa: BLE001 - a split that cannot be scored fails its candidates
                return Outcome(cid, split, reason=f"cannot build the scorer for split {split!r}: {type(e).__name__}: {e}",
                               worker=self.name, seconds=time.perf_counter() - start)
        return run_one(scorer, cid, recipe, split, self.name, items)

    def close(self) -> None:
        for s in self.scorers.values():
            close_scorer(s)
        self.scorers.clear()


def _node() -> str:
    """This actor's Ray node, short (the first 8 hex digits of its id: unique in a cluster, and what `ray status`
    and Ray's dashboard show first)."""
    import ray

    return ray.get_runtime_context().get_node_id()[:8]


_ACTOR: Any = None


def actor_class() -> Any:
    """`Worker` as a Ray actor class, made once (Ray is imported only here, when a Ray runtime is built)."""
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(max_restarts=0, max_concurrency=1)(Worker)
    return _ACTOR
