"""The generational loop (`driver.mode: generational`, the default): ask a generation, evaluate all of it, tell
it, checkpoint, ask the next. Its peer without the generation barrier is `steady.py`; both spend one `Budget`
and record through one `Recorder`.

Why a resumed job ends with the same archive as an uninterrupted one:
- candidates are numbered in the order the driver asks for them, so a generation re-asked after a crash gets
  the same numbers, genomes and recipes; rows already finished are reused, the rest are evaluated again;
- after every generation the loop's counters are stored (JSON) in the transaction that also writes the front;
  a resumed run rebuilds the driver by replaying the archive (`resume.py`) and checks that it asks what is stored;
- the driver's randomness is its own (seeded generators, pycma's global numpy state swapped in and out).
Time budgets are the exception: a search cut by a clock is not repeatable.

Nor may completion order matter (Ray workers finish in any order): outcomes are recorded as they come, but the
failure counter walks each generation's candidates in id order, so the checkpointed state is the same however
the candidates finished.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from evomerge.search.state import Budget, LoopState

if TYPE_CHECKING:
    from evomerge.search.drivers import Driver
    from evomerge.search.recorder import Recorder


def exhausted(driver: "Driver", asked: int) -> str:
    """The line a search ends with when its driver asks nothing (both loops)."""
    return (f"the {driver.name} driver bred nothing new: every recipe its operators reached in 100 tries was among "
            f"the {asked} candidates asked (driver.duplicates: skip), so the search ends before its budget")


class GenerationalLoop:
    """One run (or continuation) of a generational search, from a checkpointed state to the end of the budget."""

    def __init__(self, recorder: "Recorder", budget: Budget, state: LoopState, driver: "Driver"):
        self.recorder, self.budget, self.state, self.driver = recorder, budget, state, driver

    def run(self) -> LoopState:
        while not self.budget.spent(self.state.evaluations, self.state.elapsed):
            new = self.step(self.state)
            if new is None:
                break
            self.state = new
        return self.state

    def step(self, state: LoopState) -> LoopState | None:
        """One generation: ask, decode, evaluate (cache first), confirm and recheck (IRT), tell, checkpoint. None: the
        driver asked nothing (`driver.duplicates: skip` and every recipe its operators reach was asked): the search
        ends."""
        rec, started, g = self.recorder, time.monotonic(), state.generation
        batch, recipes = rec.ask(self.driver, g, state.next_id)
        if not batch.rows:
            rec.ctx.progress.line(exhausted(self.driver, state.evaluations))
            return None
        if rec.irt:  # IRT: fit or load the calibration, choose who is scored on anchors only
            rec.irt.plan(g, batch.rows)
        rec.start(batch, recipes)
        rec.tally(state.failures, batch)
        for out in rec.ctx.runtime.as_completed():
            rec.settle(out)
            rec.tally(state.failures, batch)
        rec.confirm_entrants(batch)  # IRT: estimates that could change the front are measured first
        rec.recheck(batch, self.driver)  # IRT: told estimates the front leans on, measured and told anew
        self.driver.tell(batch.X, rec.told_losses(batch))
        new = LoopState(generation=g + 1, next_id=state.next_id + len(batch.rows),
                        evaluations=state.evaluations + len(batch.rows), failures=state.failures.copy(),
                        elapsed=state.elapsed + (time.monotonic() - started), ref_point=rec.ref_point(state, batch),
                        asked=g + 1)
        rec.retry_failed = False
        rec.checkpoint(new)
        return new
