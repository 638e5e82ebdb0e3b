"""The evaluation interface: what a runtime is given, what it does with one candidate, what comes back.

A runtime is built from a `ScorerFactory` (picklable: `functools.partial(factory, spec)` over the default scorer,
`evomerge.scoring.default_scorer`, or the plug-in named by `runtime.scorer: "module:factory"`; the search
builds it, `evomerge.search.jobs.make_runtime`). Each worker calls the factory once per split and keeps the
`Scorer` it returns (models resident, tasks loaded). The loop only calls `submit(cid, recipe, split, items)` and
iterates `as_completed()` (the steady loop takes one outcome at a time with `next_outcome()`); `run_one` scores
one candidate on a scorer and turns the `FitnessResult`, or the failure, into an `Outcome`. Implementations:
`evomerge.runtime.local.LocalRuntime` (in process) and `evomerge.runtime.scheduler.RayRuntime` (actors).

Nothing here imports torch, Ray or the search: a runtime knows scorers and outcomes, not jobs.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from evomerge.errors import CandidateError, UserError
from evomerge.fitness.objectives import CandidateFailed, ObjectiveSet
from evomerge.fitness.result import FitnessResult, Items

if TYPE_CHECKING:
    from evomerge.merge.api import AnyRecipe  # what a runtime carries to its scorers; it never looks inside


@dataclass
class Outcome:
    """What came back for one submitted candidate: values (as measured) or a failure reason, and its time."""

    cid: int
    split: str | None
    values: dict[str, float] | None = None
    items: dict[str, dict[str, float]] = field(default_factory=dict)
    reason: str | None = None
    worker: str = "local"
    seconds: float = 0.0  # the scorer's evaluate call (failed candidates too)
    estimated: bool = False  # set by the search's IRT policy, never by a scorer
    materialise_seconds: float = 0.0  # of `seconds`: writing the candidate's weights into the model
    internal: str | None = None  # a bug, not the candidate: the failing frames (the search stops on it)

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def score_seconds(self) -> float:
        """The scorer's time once the weights were in place (the forward passes and their bookkeeping)."""
        return max(self.seconds - self.materialise_seconds, 0.0)


class Scorer(Protocol):
    """Per-worker state: scores one recipe (parameter-space or data-flow) on its split.

    `items` scores only those items (None: the whole split). A scorer that only scores whole splits may leave
    the parameter out: `run_one` passes it only when it is given."""

    objectives: ObjectiveSet  # with directions resolved

    def evaluate(self, recipe: "AnyRecipe", items: Items | None = None) -> FitnessResult: ...


ScorerFactory = Callable[[str | None], Scorer]  # split (None: the objectives' own) -> a Scorer; picklable


class Runtime(Protocol):
    objectives: ObjectiveSet  # with directions resolved

    def submit(self, cid: int, recipe: "AnyRecipe", split: str | None = None, items: Items | None = None) -> None: ...
    def as_completed(self) -> Iterator[Outcome]: ...
    def next_outcome(self, timeout: float | None = None) -> Outcome | None: ...
    def close(self) -> None: ...


# What a candidate can fail with: its own errors, bad input it carries (a recipe the planner refuses), and what
# torch and the scoring libraries raise on its weights (NaN, out of memory, shape errors). Anything else
# (AttributeError, TypeError, KeyError, ...) is a bug in evomerge or in a scorer plug-in: the outcome says so, and
# the search stops on it instead of failing candidate after candidate for the same reason.
CANDIDATE_FAILURES = (CandidateError, UserError, RuntimeError, ValueError, ArithmeticError, MemoryError, OSError)


def _where(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"


def run_one(scorer: Scorer, cid: int, recipe: "AnyRecipe", split: str | None, worker: str,
            items: Items | None = None) -> Outcome:
    """Evaluate one candidate. A candidate's failure becomes its recorded reason (the search goes on); a bug becomes
    an `internal` outcome with its frames (the search records the candidate, then stops)."""
    start = time.perf_counter()
    try:
        result = scorer.evaluate(recipe, items) if items is not None else scorer.evaluate(recipe)
    except CandidateFailed as e:
        return Outcome(cid, split, reason=e.reason, worker=worker, seconds=time.perf_counter() - start)
    except KeyboardInterrupt:
        raise
    except CANDIDATE_FAILURES as e:
        reason = f"{type(e).__name__}: {e} (at {_where(e)})"
        return Outcome(cid, split, reason=reason, worker=worker, seconds=time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - a bug: reported with its frames, never swallowed as a failed candidate
        frames = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-6))
        return Outcome(cid, split, reason=f"internal error {type(e).__name__}: {e} (at {_where(e)})", worker=worker,
                       seconds=time.perf_counter() - start, internal=frames)
    seconds = time.perf_counter() - start
    try:  # what the scorer returned must be numbers for its objectives: anything else is a bug in the scorer
        values = {k: float(v) for k, v in result.values.items()}
        per_item = {k: {i: float(x) for i, x in d.items()} for k, d in result.items.items()}
        load = float(result.load_seconds)
        missing = [n for n in getattr(getattr(scorer, "objectives", None), "names", []) if n not in values]
        if missing:
            raise KeyError(f"no value for objective(s) {', '.join(missing)}")
    except Exception as e:  # noqa: BLE001
        return Outcome(cid, split, reason=f"internal error: the scorer returned a result evomerge cannot read "
                       f"({type(e).__name__}: {e})", worker=worker, seconds=seconds,
                       internal="".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-3)))
    bad = [f"{k} is {v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:  # a NaN would rank anywhere: on the front, picked by --knee
        return Outcome(cid, split, reason=f"objective {', '.join(bad)} (not a finite number)", worker=worker,
                       seconds=seconds)
    return Outcome(cid, split, values=values, items=per_item, worker=worker, seconds=seconds,
                   materialise_seconds=min(load, seconds))


def close_scorer(scorer: Any) -> None:
    """Let a scorer release its engine and devices (`close` is optional for plug-ins)."""
    close = getattr(scorer, "close", None)
    if close:
        close()


class OutcomeStream:
    """For runtimes that hand out finished outcomes one at a time (`next_outcome`): `as_completed` drains them."""

    def next_outcome(self, timeout: float | None = None) -> Outcome | None:
        raise NotImplementedError

    def as_completed(self) -> Iterator[Outcome]:
        """Outcomes in the order they finish, until every submitted candidate has one."""
        while (out := self.next_outcome()) is not None:
            yield out
