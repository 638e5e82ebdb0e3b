"""Where candidates are evaluated: a small interface the loop talks to, and its in-process implementation.

The loop only calls `submit(cid, recipe, split, items)` and iterates `as_completed()` (the steady loop takes one
outcome at a time with `next_outcome()`); the Ray runtime implements the same methods with actors (one `Scorer`
each). `LocalRuntime` evaluates in this process, one candidate at a time, in submission order (deterministic), when
outcomes are asked for. Both measure where the time went (`stats()`: utilisation, overhead, candidates per minute).

A worker's scorer is built once (models resident, tasks loaded) by a factory `make_scorer(spec, split)`:
`evomerge.search.evaluate.default_scorer` (the fitness Evaluator), or `runtime.evaluator: "module:factory"`.
"""

from __future__ import annotations

import importlib
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from evomerge.fitness.objectives import ObjectiveSet
    from evomerge.runtime.stats import RuntimeStats
    from evomerge.search.spec import JobSpec


@dataclass
class Outcome:
    """What came back for one submitted candidate: values (as measured) or a failure reason."""

    cid: int
    split: str | None
    values: dict[str, float] | None = None
    items: dict[str, dict[str, float]] = field(default_factory=dict)
    reason: str | None = None
    worker: str = "local"
    seconds: float = 0.0
    estimated: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None


class Scorer(Protocol):
    """Per-worker state: scores one recipe (parameter-space or data-flow) on its split."""

    objectives: "ObjectiveSet"

    # returns an object with .values and .items (a FitnessResult); `items`: {objective: [item ids]} scores only
    # those items (IRT anchors), None scores the whole split
    def evaluate(self, recipe: Any, items: dict[str, list[str]] | None = None) -> Any: ...


class Runtime(Protocol):
    objectives: "ObjectiveSet"  # with directions resolved

    def submit(self, cid: int, recipe: Any, split: str | None = None,
               items: dict[str, list[str]] | None = None) -> None: ...
    def as_completed(self) -> Iterator[Outcome]: ...
    def next_outcome(self, timeout: float | None = None) -> Outcome | None: ...
    def close(self) -> None: ...


def load_factory(ref: str) -> Callable[..., Scorer]:
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"runtime.evaluator: cannot import '{ref}' ({e}); give module:function of an importable scorer factory") from None


def scorer_factory(spec: "JobSpec") -> Callable[["JobSpec", str | None], Scorer]:
    if spec.runtime.evaluator:
        return load_factory(spec.runtime.evaluator)
    from evomerge.search.evaluate import default_scorer

    return default_scorer


def run_one(scorer: Scorer, cid: int, recipe: Any, split: str | None, worker: str,
            items: dict[str, list[str]] | None = None) -> Outcome:
    """Evaluate one candidate, turning every failure into a recorded reason (the search goes on)."""
    from evomerge.fitness.objectives import CandidateFailed

    start = time.perf_counter()
    try:
        result = scorer.evaluate(recipe, items) if items is not None else scorer.evaluate(recipe)
    except CandidateFailed as e:
        return Outcome(cid, split, reason=e.reason, worker=worker, seconds=time.perf_counter() - start)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a broken candidate must not stop the search
        where = traceback.extract_tb(e.__traceback__)[-1]
        reason = f"{type(e).__name__}: {e} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
        return Outcome(cid, split, reason=reason, worker=worker, seconds=time.perf_counter() - start)
    values = {k: float(v) for k, v in result.values.items()}
    items = {k: {i: float(x) for i, x in d.items()} for k, d in (getattr(result, "items", None) or {}).items()}
    return Outcome(cid, split, values=values, items=items, worker=worker, seconds=time.perf_counter() - start,
                   estimated=bool(getattr(result, "estimated", False)))


class OutcomeStream:
    """For runtimes that hand out finished outcomes one at a time (`next_outcome`): `as_completed` drains them."""

    def next_outcome(self, timeout: float | None = None) -> Outcome | None:
        raise NotImplementedError

    def as_completed(self) -> Iterator[Outcome]:
        """Outcomes in the order they finish, until every submitted candidate has one."""
        while (out := self.next_outcome()) is not None:
            yield out


class LocalRuntime(OutcomeStream):
    """In-process evaluation: one scorer per split, built on first use (the fitness one at once)."""

    def __init__(self, spec: "JobSpec", worker: str = "local"):
        import torch

        torch.set_num_threads(spec.runtime.threads)
        self.spec = spec
        self.worker = worker
        self._factory = scorer_factory(spec)
        self._scorers: dict[str | None, Scorer] = {None: self._factory(spec, None)}
        self.objectives = self._scorers[None].objectives
        self._queue: list[tuple[int, Any, str | None, dict[str, list[str]] | None]] = []
        from evomerge.runtime.stats import RuntimeStats

        self._stats = RuntimeStats(1)
        self._first: float | None = None  # when the first candidate started (the measured window)

    def scorer(self, split: str | None) -> Scorer:
        if split not in self._scorers:
            self._scorers[split] = self._factory(self.spec, split)
        return self._scorers[split]

    def submit(self, cid: int, recipe: Any, split: str | None = None,
               items: dict[str, list[str]] | None = None) -> None:
        self._queue.append((cid, recipe, split, items))

    def next_outcome(self, timeout: float | None = None) -> Outcome | None:
        """Evaluate the oldest queued candidate now; None when nothing is queued (`timeout` is for Ray's sake)."""
        if not self._queue:
            return None
        cid, recipe, split, items = self._queue.pop(0)
        scorer = self.scorer(split)
        start = time.perf_counter()
        self._first = start if self._first is None else self._first
        out = run_one(scorer, cid, recipe, split, self.worker, items)
        s = self._stats
        s.candidates, s.failed = s.candidates + 1, s.failed + (0 if out.ok else 1)
        s.busy += out.seconds
        s.score += out.seconds  # in-process: nothing between the loop and the scorer to count as overhead
        s.span += time.perf_counter() - start
        s.wall = time.perf_counter() - self._first
        return out

    def stats(self) -> "RuntimeStats":
        """Utilisation here is evaluation time / wall time: what the loop's own work (driver, store) leaves."""
        return self._stats

    def close(self) -> None:
        for s in self._scorers.values():
            close = getattr(s, "close", None)
            if close:
                close()
        self._scorers.clear()
