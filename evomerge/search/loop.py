"""A search job from its spec to the end of its budget: `Search` builds the parts and runs the loop the spec
chooses. Follow one generation in `generational.GenerationalLoop.step`.

The parts: `problem.Problem` (genome <-> unit cube, losses), `recorder.Recorder` (ask -> stored rows, cache,
outcomes, failure counter, front), `state` (the JSON checkpoint, the budget), `resume` (the driver rebuilt by
replaying the archive), and the two loops as peers: `generational.py` and `steady.py` (`driver.mode: steady`).
"""

from __future__ import annotations

import sqlite3

from evomerge.errors import InternalError, Terminated
from evomerge.store import StoreError
from evomerge.search.context import Progress, SearchContext
from evomerge.search.generational import GenerationalLoop
from evomerge.search.irt_policy import IRTPolicy
from evomerge.search.problem import FAIL_LOSS, Problem, recipe_hash, recipe_text
from evomerge.search.recorder import Recorder
from evomerge.search.resume import load_state, replay
from evomerge.runtime.base import Runtime
from evomerge.search.spec import JobSpec, SearchStopped
from evomerge.search.state import Budget, LoopState
from evomerge.search.steady import SteadyLoop
from evomerge.spaces.presets import build_space
from evomerge.store import Store


class Search:
    def __init__(self, spec: JobSpec, store: Store, runtime: Runtime, progress: Progress | None = None):
        self.spec, self.store, self.runtime, self.job = spec, store, runtime, spec.name
        self.ctx = SearchContext(spec, store, runtime, build_space(spec.search_space, spec.models, spec.base),
                                 progress or Progress())
        self.space = self.ctx.space
        self.problem = Problem(self.space, runtime.objectives)
        self.irt = IRTPolicy.for_context(self.ctx)  # None unless an objective says `estimator: irt`
        self.recorder = Recorder(self.ctx, self.problem, self.irt)
        self.budget = Budget(spec.driver.max_evaluations, spec.driver.max_seconds)
        self.ctx.progress.watch(runtime)  # the live display shows its workers

    def run(self) -> LoopState:
        """Run (or continue) until the budget is spent. Raises SearchStopped (too many candidates failed in a row),
        InternalError (a bug stopped the job), KeyboardInterrupt."""
        with self.ctx.progress.active():  # the live display, on a terminal (nested in the job's own, if any)
            return self._run()

    def _run(self) -> LoopState:
        state = load_state(self.ctx)
        self.recorder.hv_ref, self.recorder.elapsed_before = state.ref_point, state.elapsed
        self.recorder.generation = state.generation
        job = self.store.job(self.job)
        if job and job["status"] == "stopped":  # the user resumed after fixing the cause: a fresh chance
            state.failures.failures_in_a_row, state.failures.recent, self.recorder.retry_failed = 0, [], True
        spent = self.budget.spent(state.evaluations, state.elapsed) and not state.ahead  # nothing to ask or tell
        driver, ahead = (None, []) if spent else replay(self.ctx, self.problem, state)  # refuses a foreign archive
        self.store.set_status(self.job, "running")
        if driver is None:
            return state
        loop: GenerationalLoop | SteadyLoop = (
            SteadyLoop(self.recorder, self.budget, state, driver, ahead) if self.spec.driver.mode == "steady"
            else GenerationalLoop(self.recorder, self.budget, state, driver))
        try:
            state = loop.run()
        except KeyboardInterrupt as e:
            told = loop.state.generation  # the last checkpoint
            how = e.signal_name if isinstance(e, Terminated) else "Ctrl-C"
            self._mark("interrupted", f"interrupted ({how}); `evomerge resume` continues from generation {told}")
            raise
        except (SearchStopped, InternalError) as e:
            self._mark("stopped", str(e))
            raise
        except Exception as e:  # the runtime or the store broke (not a candidate): the job says why, resumable
            told = loop.state.generation
            said = f"{type(e).__name__}: {e}"
            self._mark("interrupted", f"{said} (from generation {told})" if "evomerge resume" in said
                       else f"{said}; `evomerge resume` continues from generation {told}")
            raise
        return state

    def _mark(self, status: str, reason: str) -> None:
        """Record why the search ended, if the store still takes a write (a full disk may not): the error that
        ended it is what the user must see, never one raised while recording it."""
        try:
            self.store.set_status(self.job, status, reason)
        except (StoreError, sqlite3.Error):
            pass


__all__ = ["FAIL_LOSS", "LoopState", "Progress", "Search", "recipe_hash", "recipe_text"]
