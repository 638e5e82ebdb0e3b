"""Steady-state search (`driver.mode: steady`): no generation barrier, every worker kept busy.

The generational loop (`generational.py`, this loop's peer) asks a generation, waits for all of it, tells it,
asks the next: while its slowest candidate runs, the other workers wait. Here:
- the driver is asked for batches of `population` candidates (a batch is a generation in the store), up to
  `driver.lag` batches ahead of the oldest batch not told yet, where the driver can ask ahead
  (`Driver.can_ask_ahead`). A batch is submitted whole when asked and the runtime hands its candidates to
  workers as they free up, so while the last candidates of batch k run, the others already evaluate batch k+1;
- batches are told in ask order, each with its rows in id order, as soon as all of it is back (an outcome
  that arrives early is recorded at once and waits in its batch); after each tell the loop asks as far as it may,
  then tells the next complete batch. So the ask/tell sequence is a function of the seed, the population and the
  lag only, never of completion order: on 1 worker or 20, interrupted or not, the archive is the same;
- after every tell, a checkpoint holds the counters and how many batches were asked by then (JSON); a resume
  replays the archive's asks and tells in that interleaving into a fresh driver (`resume.py`), which gives back
  the batches asked ahead: it re-submits their unfinished rows, reuses the finished ones and asks exactly where
  the interrupted run did. The failure counter walks candidates in id order across batches;
  the checkpoint holds its value at the told batch's last row.

What each driver does (see `drivers.py`): `random` always asks `lag` batches ahead; `nsga2`, `nsga3` and
`smsemoa` from the second batch on (the first is the initial population; every later batch is bred from the
population as last told, so with lag 1 batch k+1 comes from the population after batch k-1); `cmaes` never asks
ahead (pycma updates from points of its current distribution only): its batches run back to back with the
barrier in between, as in generational mode. With IRT-reduced fitness the lag is 0 too, because each batch's
anchors and calibration are planned from all earlier batches scored, and its estimates that overlap the front are
measured before it is told (`Recorder.confirm_entrants`), with nothing else in flight.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from evomerge.search.generational import exhausted
from evomerge.search.state import Batch, Budget, LoopState

if TYPE_CHECKING:
    from evomerge.search.drivers import Driver
    from evomerge.search.recorder import Recorder


class SteadyLoop:
    """One run (or continuation) of a steady search, from a checkpointed `LoopState` to the end of the budget."""

    def __init__(self, recorder: "Recorder", budget: Budget, state: LoopState, driver: "Driver",
                 ahead: list[tuple[int, np.ndarray]]):
        self.recorder, self.budget, self.state, self.driver = recorder, budget, state, driver
        self.ahead = ahead  # a resume: the batches the checkpoint was ahead by, as they were asked
        self.lag = recorder.ctx.spec.driver.lag if recorder.irt is None else 0
        self.batches: deque[Batch] = deque()  # asked, not told; oldest first
        self.counter = state.failures.copy()
        self.next_id, self.asked = state.next_id, state.evaluations
        self.next_generation = state.generation + len(ahead)
        self.clock = time.monotonic()  # elapsed time is added up from here at every checkpoint
        self.exhausted = False  # the driver asked nothing: no more asks (the batches in flight are told)

    def run(self) -> LoopState:
        rec = self.recorder
        for g, X in self.ahead:
            rows = rec.store.candidates(rec.job, generation=g)
            self._start(Batch(g, X, rows), {r.id: rec.problem.decode(r.genome) for r in rows})
        self._fill()
        while self.batches:
            if self.batches[0].complete:
                self._tell(self.batches.popleft())
                self._fill()
                continue
            out = rec.ctx.runtime.next_outcome()
            if out is None:
                raise RuntimeError(f"steady loop: batch {self.batches[0].generation} waits for candidates that the "
                                   "runtime does not hold (a bug: please report it)")
            rec.settle(out)
            self._walk()
        return self.state

    # ------------------------------------------------------------ asking

    def _may_ask(self) -> bool:
        if self.exhausted or self.budget.spent(self.asked, self.state.elapsed + (time.monotonic() - self.clock)):
            return False
        return not self.batches or (len(self.batches) <= self.lag and self.driver.can_ask_ahead())

    def _fill(self) -> None:
        rec = self.recorder
        while self._may_ask():
            g = self.next_generation
            batch, recipes = rec.ask(self.driver, g, self.next_id)
            if not batch.rows:
                self.exhausted = True
                rec.ctx.progress.line(exhausted(self.driver, self.asked))
                return
            if rec.irt:  # IRT (lag 0: every earlier batch is told)
                rec.irt.plan(g, batch.rows)
            self.next_id, self.asked, self.next_generation = (self.next_id + len(batch.rows),
                                                              self.asked + len(batch.rows), g + 1)
            self._start(batch, recipes)

    def _start(self, batch: Batch, recipes: dict) -> None:
        self.batches.append(batch)
        self.recorder.start(batch, recipes)
        self._walk()

    def _walk(self) -> None:
        """Move the failure counter over every outcome now in, in id order across batches."""
        for b in self.batches:
            if not self.recorder.tally(self.counter, b):
                return

    # ------------------------------------------------------------ telling

    def _tell(self, batch: Batch) -> None:
        rec, state = self.recorder, self.state
        rec.confirm_entrants(batch)  # IRT (lag 0: nothing else is in flight)
        rec.recheck(batch, self.driver)
        self.driver.tell(batch.X, rec.told_losses(batch))
        assert batch.counter is not None  # a complete oldest batch has been walked
        now = time.monotonic()
        new = LoopState(generation=batch.generation + 1, next_id=self.next_id, evaluations=self.asked,
                        failures=batch.counter.copy(), elapsed=state.elapsed + (now - self.clock),
                        ref_point=rec.ref_point(state, batch), asked=self.next_generation)
        self.clock = now
        rec.retry_failed = False
        rec.checkpoint(new)
        self.state = new
