"""Where a search continues from: the last checkpoint's counters (JSON) and a driver rebuilt by replaying the
archive into a freshly seeded one. Nothing in a store is ever unpickled: a store is a shared artefact, and a
pickle runs whatever its writer put in it.

The replay: every checkpoint row records `asked`, how many batches had been asked when its batch was told, so the
ask/tell interleaving of either loop (the steady one asks ahead) is data. The fresh driver is asked batch after
batch; each ask must give exactly the genomes stored for that generation (bit for bit, as JSON floats round-trip),
else the job is refused: the driver would continue another trajectory than the one the archive holds (an
optimiser library of another version, say). Each told batch is told the losses stored with its candidates, which
are what the driver saw (for a candidate measured after it was told, the `retold` table's losses it was told then;
the measured ones are told, as the search told them, between the asks and the tell of the generation that
measured it). Batches asked beyond the last tell (steady mode) come back with their points, for the
loop to evaluate what is unfinished of them.

Stores written before schema 3 held a pickled checkpoint. The upgrade drops those blobs unread; such a job's
state is rebuilt from the candidates table when it can be exactly (generational mode: every generation is
asked, evaluated and told before the next), and is refused otherwise (steady mode: which batches were asked
ahead is in the dropped pickle only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from evomerge.search.drivers import Driver, make_driver
from evomerge.search.state import FailureCount, LoopState
from evomerge.store import Store, StoreError

if TYPE_CHECKING:
    from evomerge.search.context import SearchContext
    from evomerge.search.problem import Problem


def fresh_driver(ctx: "SearchContext", problem: "Problem", say: bool = True) -> Driver:
    d = ctx.spec.driver
    seeds = problem.seed_units()
    if say and seeds is not None and len(seeds) > d.population:
        ctx.progress.line(f"note: {len(seeds)} seeds but a population of {d.population}: only the first "
                          f"{d.population} are used")
    same = problem.recipe_key if d.duplicates == "skip" else None
    return make_driver(d.algorithm, problem.n_var, problem.n_obj, d.population, d.seed, seeds, same, **d.options)


def load_state(ctx: "SearchContext") -> LoopState:
    """The counters at the last checkpoint (a fresh state for a new job)."""
    states = _checkpoints(ctx)
    return states[-1] if states else LoopState()


def replay(ctx: "SearchContext", problem: "Problem", state: LoopState) -> tuple[Driver, list[tuple[int, np.ndarray]]]:
    """A driver in the state it had at `state`'s checkpoint, and the batches it had asked ahead (generation, X)."""
    driver = fresh_driver(ctx, problem, say=state.generation == 0)
    schedule = [s.asked for s in _checkpoints(ctx)]
    if len(schedule) != state.generation:
        raise StoreError(f"{ctx.store.path}: job '{ctx.job}': {len(schedule)} checkpoints for {state.generation} "
                         "generations told; the store was changed by hand: start the job again under another name")
    asked: dict[int, np.ndarray] = {}  # asked, not told yet
    retold = ctx.store.retold(ctx.job)
    first_told = ctx.store.told_before(ctx.job)  # candidate -> the losses told at its own generation
    for told, n in enumerate(schedule):
        while told + len(asked) < n:  # the asks made before batch `told` was told
            g = told + len(asked)
            asked[g] = _ask_as_stored(ctx, problem, driver, g)
        retell(ctx.store, ctx.job, problem, driver, [t for t in retold if t["generation"] == told])
        driver.tell(asked.pop(told), _stored_losses(ctx, told, first_told))
    return driver, sorted(asked.items())


def retell(store: "Store", job: str, problem: "Problem", driver: Driver, rows: list[dict]) -> int:
    """Tell `driver` the new losses of the `retold` rows (those of one generation, before its tell: the
    search's `Recorder.retell` and the replay here call it at the same place). Returns how many of them the driver
    still held."""
    losses = {tuple(store.candidate(job, t["candidate"]).genome): np.array(t["after"], dtype=float)
              for t in rows if t["after"] is not None}
    return driver.revise(losses, lambda x: tuple(problem.stored_genome(x))) if losses else 0


def _ask_as_stored(ctx: "SearchContext", problem: "Problem", driver: Driver, g: int) -> np.ndarray:
    X = driver.ask()
    rows = ctx.store.candidates(ctx.job, generation=g)
    same = len(rows) == len(X) and all(problem.stored_genome(x) == r.genome for x, r in zip(X, rows))
    if not same:
        raise StoreError(
            f"{ctx.store.path}: job '{ctx.job}': replaying the archive into a fresh '{ctx.spec.driver.algorithm}' "
            f"driver, generation {g} asked {len(X)} genomes that are not the {len(rows)} stored ones; the "
            "optimiser would continue another search than the stored one (was the store written with other "
            "versions of evomerge, pymoo or cma?). Resume with the versions that wrote it, or start the job "
            "again under another name.")
    return X


def _stored_losses(ctx: "SearchContext", g: int, first_told: dict[int, list[float] | None]) -> np.ndarray:
    """The losses generation `g` was told: its candidates', the retold ones' as they were then (`first_told`)."""
    rows = ctx.store.candidates(ctx.job, generation=g)
    losses = [first_told[r.id] if r.id in first_told else r.losses for r in rows]
    if any(v is None for v in losses):
        raise StoreError(f"{ctx.store.path}: job '{ctx.job}': generation {g} was told but some of its candidates "
                         "hold no losses; start the job again under another name")
    return np.array(losses, dtype=float)


def _checkpoints(ctx: "SearchContext") -> list[LoopState]:
    """The state after every told generation, oldest first (rebuilt from the candidates where a pre-schema-3 store
    lost them: its pickles, dropped unread, and the generations it pruned)."""
    rows = ctx.store.checkpoints(ctx.job)
    if not rows:
        return []
    if any(data is None for _, data in rows):
        rebuilt = _from_archive(ctx, max(g for g, _ in rows))
        stored = {g: data for g, data in rows if data is not None}  # written since the upgrade
        rows = [(s.generation, stored.get(s.generation, s.to_json())) for s in rebuilt]
    try:
        states = [LoopState.from_json(data) for _, data in rows]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(f"{ctx.store.path}: job '{ctx.job}': a checkpoint is not one this evomerge wrote ({e}); "
                         "start the job again under another name") from None
    if [s.generation for s in states] != [g for g, _ in rows] or [g for g, _ in rows] != list(range(1, len(rows) + 1)):
        raise StoreError(f"{ctx.store.path}: job '{ctx.job}': its checkpoints do not follow generation by "
                         "generation; start the job again under another name")
    return states


def _from_archive(ctx: "SearchContext", told: int) -> list[LoopState]:
    """The counters of a job checkpointed before schema 3, rebuilt from its candidates (generational mode only: every
    generation was asked, evaluated and told before the next). Elapsed time is not recorded there: it restarts."""
    if ctx.spec.driver.mode == "steady":
        raise StoreError(
            f"{ctx.store.path}: job '{ctx.job}' was checkpointed by an older evomerge as a pickle, which is never "
            "loaded (it could run code). A steady-mode job cannot be rebuilt from its candidates alone (which "
            "batches were asked ahead is in the pickle only): its candidates stay readable (`evomerge status`, "
            "the dashboard, `evomerge export`); to continue the search, run its spec again under another name.")
    rows = ctx.store.candidates(ctx.job)
    states, failures, next_id, ref_point = [], FailureCount(), 0, None
    limit = 10 ** 9  # the counter as it was: a stop already happened or it did not
    for g in range(told):
        mine = [r for r in rows if r.generation == g]
        for r in mine:
            if r.status in ("done", "failed"):
                failures.count(r.status == "done", r.reason, limit, ctx.job, ctx.store.path)
        if g == 0:
            ok = [r.losses for r in mine if r.values is not None]  # the losses of the values the driver saw
            ref_point = [float(v) for v in np.max(ok, axis=0)] if ok else None
        next_id += len(mine)
        states.append(LoopState(generation=g + 1, next_id=next_id, evaluations=next_id, failures=failures.copy(),
                                ref_point=ref_point, asked=g + 1))
    return states
