"""Steady-state search (`driver.mode: steady`): no generation barrier, every worker kept busy.

The generational loop (`Search.step`) asks a generation, waits for all of it, tells it, asks the next: while its
slowest candidate runs, the other workers wait. Here:
- the driver is asked for batches of `population` candidates (a batch is a generation in the store), up to
  `driver.lag` batches ahead of the oldest batch not told yet, where the driver can ask ahead
  (`Driver.can_ask_ahead`). A batch is submitted whole when asked and the runtime hands its candidates to
  workers as they free up, so while the last candidates of batch k run, the others already evaluate batch k+1;
- batches are told in ask order, each with its rows in id order, as soon as all of it is back (an outcome
  that arrives early is recorded at once and waits in its batch); after each tell the loop asks as far as it may,
  then tells the next complete batch. So the ask/tell sequence is a function of the seed, the population and the
  lag only, never of completion order: on 1 worker or 20, interrupted or not, the archive is the same;
- after every tell, a checkpoint holds the driver (with the asks it still owes tells for), the counters and the
  genomes of the batches asked ahead; a resume re-submits their unfinished rows, reuses the finished ones and
  asks exactly where the interrupted run did. The failure counter walks candidates in id order across batches;
  the checkpoint holds its value at the told batch's last row.

What each driver does (see `drivers.py`): `random` always asks `lag` batches ahead; `nsga2`, `nsga3` and
`smsemoa` from the second batch on (the first is the initial population; every later batch is bred from the
population as last told, so with lag 1 batch k+1 comes from the population after batch k-1); `cmaes` never asks
ahead (pycma updates from points of its current distribution only): its batches run back to back with the
barrier in between, as in generational mode. With IRT-reduced fitness the lag is 0 too, because each batch's
anchors and calibration are planned from all earlier batches scored.
"""

from __future__ import annotations

import pickle
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.search.drivers import Driver
from evomerge.search.loop import Batch, FailureCount, LoopState

if TYPE_CHECKING:
    from evomerge.search.loop import Search


class SteadyLoop:
    """One run (or continuation) of a steady search, from a checkpointed `LoopState` to the end of the budget."""

    def __init__(self, search: "Search", state: LoopState):
        self.search, self.state = search, state
        self.lag = search.spec.driver.lag if search.irt is None else 0
        self.driver = Driver.restore(state.driver)
        self.batches: deque[Batch] = deque()  # asked, not told; oldest first
        self.owner: dict[int, tuple[Batch, str]] = {}  # submitted candidate -> its batch and recipe hash
        self.first_of: dict[str, int] = {}  # recipe hash -> the candidate in flight that evaluates it
        self.duplicates: dict[int, list[tuple[int, Batch]]] = {}  # that candidate -> later ones with its recipe
        self.counter = FailureCount(state.failures_in_a_row, list(state.recent))
        self.next_id, self.asked = state.next_id, state.evaluations
        self.next_generation = state.generation + len(state.ahead)
        self.clock = time.monotonic()  # elapsed time is added up from here at every checkpoint

    def run(self) -> LoopState:
        s = self.search
        for g, X in self.state.ahead:  # a resume: the batches the checkpoint was ahead by, as they were asked
            rows = s.store.candidates(s.job, generation=g)
            self._start(Batch(g, X, rows), {r.id: s.space.decode(np.asarray(r.genome, dtype=float)) for r in rows})
        self._fill()
        while self.batches:
            if self.batches[0].complete:
                self._tell(self.batches.popleft())
                self._fill()
                continue
            out = s.runtime.next_outcome()
            if out is None:
                raise RuntimeError(f"steady loop: batch {self.batches[0].generation} waits for candidates that the "
                                   "runtime does not hold (a bug: please report it)")
            batch, digest = self.owner.pop(out.cid)
            if self.first_of.get(digest) == out.cid:
                del self.first_of[digest]  # finished: later repeats find it in the store
            s.settle(out, batch, self.duplicates)
            self._walk()
        return self.state

    # ------------------------------------------------------------ asking

    def _may_ask(self) -> bool:
        d = self.search.spec.driver
        if d.max_evaluations is not None and self.asked >= d.max_evaluations:
            return False
        if d.max_seconds is not None and self.state.elapsed + (time.monotonic() - self.clock) >= d.max_seconds:
            return False
        return not self.batches or (len(self.batches) <= self.lag and self.driver.can_ask_ahead())

    def _fill(self) -> None:
        while self._may_ask():
            g = self.next_generation
            X, rows, recipes = self.search.ask(self.driver, g, self.next_id)
            if self.search.irt:  # IRT (lag 0: every earlier batch is told)
                self.search.irt.plan(g, rows)
            self.next_id, self.asked, self.next_generation = self.next_id + len(rows), self.asked + len(rows), g + 1
            self._start(Batch(g, X, rows), recipes)

    def _start(self, batch: Batch, recipes: dict[int, Any]) -> None:
        self.batches.append(batch)
        self.search.start(batch, recipes, self.first_of, self.duplicates)
        for r in batch.rows:
            if r.id not in batch.verdicts:  # submitted
                self.owner[r.id] = (batch, r.recipe_hash)
        self._walk()

    def _walk(self) -> None:
        """Move the failure counter over every outcome now in, in id order across batches."""
        for b in self.batches:
            if not self.search.tally(self.counter, b):
                return

    # ------------------------------------------------------------ telling

    def _tell(self, batch: Batch) -> None:
        s, state = self.search, self.state
        F = np.array([s.losses(batch.results[r.id]) for r in batch.rows])
        self.driver.tell(batch.X, F)
        ref_point = state.ref_point
        if ref_point is None and batch.generation == 0:
            ok = [s.losses(batch.results[r.id]) for r in batch.rows if batch.results[r.id] is not None]
            ref_point = [float(v) for v in np.max(ok, axis=0)] if ok else None
        assert batch.counter is not None  # a complete oldest batch has been walked
        now = time.monotonic()
        new = LoopState(driver=self.driver.state(), generation=batch.generation + 1, next_id=self.next_id,
                        evaluations=self.asked, failures_in_a_row=batch.counter[0], recent=list(batch.counter[1]),
                        elapsed=state.elapsed + (now - self.clock), ref_point=ref_point,
                        ahead=tuple((b.generation, b.X) for b in self.batches))
        self.clock = now
        s.retry_failed = False
        front = s.front_ids(batch.generation + 1)
        s.store.save_checkpoint(s.job, batch.generation + 1, pickle.dumps(new), front)
        s.progress.line(s.summary(new, front))
        self.state = new
        self.driver = Driver.restore(new.driver)  # continue from the checkpoint, exactly as a resumed run does
