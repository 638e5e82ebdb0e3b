"""The search loop: ask the driver for genomes, decode them to recipes, evaluate them on the runtime, tell the
driver, and checkpoint, one generation at a time. Follow one generation in `Search.step`.

Why a resumed job ends with the same archive as an uninterrupted one:
- candidates are numbered in the order the driver asks for them, so a generation re-asked after a crash gets
  the same numbers, genomes and recipes; rows already finished are reused, the rest are evaluated again;
- after every generation the driver is pickled into the store with the loop's counters, in the transaction that
  also writes the front, and the loop itself continues from that pickle (not from the live object), so both
  runs follow exactly the same code path;
- the driver's randomness is its own (seeded generators, pycma's global numpy state swapped in and out).
Time budgets are the exception: a search cut by a clock is not repeatable.

Nor may completion order matter (Ray workers finish in any order): outcomes are recorded as they come, but the
failure counter (`failures_in_a_row`) walks each generation's candidates in id order, so the checkpointed state
is the same however the candidates finished. `driver.mode: steady` (no generation barrier) is in `steady.py`.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from evomerge.search.drivers import CMAES, Driver, PymooDriver, make_driver
from evomerge.search.front import hypervolume, pareto_mask
from evomerge.search.irt_policy import IRTPolicy
from evomerge.runtime.base import Outcome, Runtime
from evomerge.search.spec import JobSpec, SearchStopped
from evomerge.spaces.presets import Space, build_space
from evomerge.store import CandidateRow, Store, StoreError

FAIL_LOSS = 1e9  # what a driver sees for a failed candidate: worse than anything real, still finite


def recipe_text(recipe: Any) -> str:
    return recipe.to_yaml()


def recipe_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class LoopState:
    """Everything besides the store that a resumed search needs; pickled after every generation."""

    driver: bytes
    generation: int = 0  # generations completed
    next_id: int = 0
    evaluations: int = 0  # candidates asked for so far
    failures_in_a_row: int = 0
    elapsed: float = 0.0  # seconds spent in generations (time budgets survive a resume)
    ref_point: list[float] | None = None  # hypervolume reference (losses): the worst of generation 0
    recent: list[str] = field(default_factory=list)  # the last failure reasons, for the diagnosis
    # steady mode: batches asked but not told when this state was saved, oldest first: (generation, X asked).
    # A class-level default, so that states pickled before it existed still load.
    ahead: tuple[tuple[int, np.ndarray], ...] = ()


@dataclass
class FailureCount:
    """The failure counter on its own (steady mode keeps it apart from the checkpointed state)."""

    failures_in_a_row: int = 0
    recent: list[str] = field(default_factory=list)


@dataclass
class Batch:
    """One ask's candidates (a generation) while they are evaluated. Outcomes land in any order; `verdicts`
    are walked in id order (`Search.tally`), so the failure counter never depends on which finished first."""

    generation: int
    X: np.ndarray
    rows: list[CandidateRow]
    results: dict[int, dict[str, float] | None] = field(default_factory=dict)  # None: failed
    verdicts: dict[int, tuple[bool, str | None] | None] = field(default_factory=dict)  # (ok, reason); None: cached
    counted: int = 0  # how many rows (from the first) the failure counter has walked
    counter: tuple[int, list[str]] | None = None  # the counter just after this batch's last row

    @property
    def complete(self) -> bool:
        return len(self.results) == len(self.rows)


class Progress:
    """A live line per candidate on a terminal, and a permanent line per generation."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live

    def candidate(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    def line(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
        self.stream.flush()


class Search:
    def __init__(self, spec: JobSpec, store: Store, runtime: Runtime, progress: Progress | None = None):
        self.spec, self.store, self.runtime = spec, store, runtime
        self.job = spec.name
        self.progress = progress or Progress()
        self.space: Space = build_space(spec.search_space, spec.models, spec.base)
        self.objectives = runtime.objectives
        self.lower, self.upper = (np.asarray(b, dtype=float) for b in self.space.bounds)
        self.width = self.upper - self.lower
        self.seeds = self.space.seeds()
        self.retry_failed = False  # a resumed `stopped` job re-evaluates the failures of its unfinished generation
        self.irt = IRTPolicy.for_search(self)  # IRT-reduced fitness: None unless an objective says `estimator: irt`

    # ------------------------------------------------------------ genomes

    def to_unit(self, genome: np.ndarray) -> np.ndarray:
        w = np.where(self.width > 0, self.width, 1.0)
        return np.where(self.width > 0, (np.asarray(genome) - self.lower) / w, 0.5)

    def to_genome(self, x: np.ndarray) -> np.ndarray:
        return self.lower + np.clip(x, 0.0, 1.0) * self.width

    def losses(self, values: dict[str, float] | None) -> list[float]:
        if values is None:
            return [FAIL_LOSS] * len(self.objectives.objectives)
        return [float(o.loss(values[o.name])) for o in self.objectives.objectives]

    # ------------------------------------------------------------ state

    def initial_state(self) -> LoopState:
        d = self.spec.driver
        seeds = np.array([self.to_unit(g) for _, g in self.seeds]) if self.seeds else None
        if seeds is not None and len(seeds) > d.population:
            self.progress.line(f"note: {len(seeds)} seeds but a population of {d.population}: only the first "
                               f"{d.population} are used")
        driver = make_driver(d.algorithm, self.space.num_genes, len(self.objectives.objectives), d.population, d.seed,
                             seeds, **d.options)
        return LoopState(driver=driver.state())

    def load_state(self) -> LoopState:
        last = self.store.last_checkpoint(self.job)
        if last is None:
            return self.initial_state()
        state = pickle.loads(last[1])
        if not isinstance(state, LoopState):
            raise StoreError(f"{self.store.path}: job '{self.job}': the checkpoint of generation {last[0]} is not one "
                             "this evomerge wrote; start the job again under another name")
        return state

    def finished(self, state: LoopState) -> bool:
        d = self.spec.driver
        if d.max_evaluations is not None and state.evaluations >= d.max_evaluations:
            return True
        return d.max_seconds is not None and state.elapsed >= d.max_seconds

    # ------------------------------------------------------------ the loop

    def run(self) -> LoopState:
        """Run (or continue) until the budget is spent. Raises SearchStopped, KeyboardInterrupt."""
        state = self.load_state()
        job = self.store.job(self.job)
        if job and job["status"] == "stopped":  # the user resumed after fixing the cause: a fresh chance
            state.failures_in_a_row, state.recent, self.retry_failed = 0, [], True
        self.store.set_status(self.job, "running")
        steady = None
        try:
            if self.spec.driver.mode == "steady":
                from evomerge.search.steady import SteadyLoop

                steady = SteadyLoop(self, state)
                state = steady.run()
            else:
                while not self.finished(state):
                    state = self.step(state)
        except KeyboardInterrupt:
            told = steady.state.generation if steady else state.generation  # the last checkpoint
            self.store.set_status(self.job, "interrupted", "interrupted (Ctrl-C); `evomerge resume` continues from "
                                  f"generation {told}")
            raise
        except SearchStopped as e:
            self.store.set_status(self.job, "stopped", str(e))
            raise
        except Exception as e:  # the runtime or the store broke (not a candidate): the job says why, resumable
            told = steady.state.generation if steady else state.generation
            self.store.set_status(self.job, "interrupted", f"{type(e).__name__}: {e}; `evomerge resume` continues "
                                  f"from generation {told}")
            raise
        return state

    def step(self, state: LoopState) -> LoopState:
        """One generation: ask, decode, evaluate (cache first), tell, checkpoint."""
        started = time.monotonic()
        g = state.generation
        driver = Driver.restore(state.driver)
        X, rows, recipes = self.ask(driver, g, state.next_id)
        if self.irt:  # IRT: fit or load the calibration, choose who is scored on anchors only
            self.irt.plan(g, rows)
        results = self._evaluate(state, Batch(g, X, rows), recipes)
        F = np.array([self.losses(results[r.id]) for r in rows])
        driver.tell(X, F)

        if state.ref_point is None and g == 0:
            ok = [self.losses(results[r.id]) for r in rows if results[r.id] is not None]
            state.ref_point = [float(v) for v in np.max(ok, axis=0)] if ok else None
        new = LoopState(driver=driver.state(), generation=g + 1, next_id=state.next_id + len(rows),
                        evaluations=state.evaluations + len(rows), failures_in_a_row=state.failures_in_a_row,
                        elapsed=state.elapsed + (time.monotonic() - started), ref_point=state.ref_point,
                        recent=state.recent)
        self.retry_failed = False
        front = self.front_ids()
        self.store.save_checkpoint(self.job, g + 1, pickle.dumps(new), front)
        self.progress.line(self.summary(new, front))
        return new

    def ask(self, driver: Driver, g: int, next_id: int) -> tuple[np.ndarray, list[CandidateRow], dict[int, Any]]:
        """Ask the driver for generation `g`, number its candidates from `next_id`, decode and store them."""
        pool = self._pool_ids(driver, g)
        X = driver.ask()
        rows, recipes = [], {}
        seed_units = [(label, self.to_unit(genome)) for label, genome in self.seeds] if g == 0 else []
        for i, x in enumerate(X):
            genome = self.to_genome(x)
            recipe = self.space.decode(genome)
            text = recipe_text(recipe)
            origin = next((label for label, u in seed_units if np.allclose(u, x, atol=1e-9)), "driver")
            cid = next_id + i
            rows.append(CandidateRow(id=cid, generation=g, idx=i, genome=[float(v) for v in genome], recipe=text,
                                     recipe_hash=recipe_hash(text), origin=origin, status="pending", parents=pool))
            recipes[cid] = recipe
        self.store.add_candidates(self.job, rows)
        return X, rows, recipes

    def _pool_ids(self, driver: Driver, g: int) -> list[int]:
        """Parent lineage: the candidates the next generation is bred from (pymoo: the surviving population;
        CMA-ES: the previous generation, whose ranking moved the distribution; random search: none)."""
        if g == 0 or driver.name == "random":
            return []
        if isinstance(driver, PymooDriver) and driver.algo.pop is not None:
            by_genome = {tuple(r.genome): r.id for r in self.store.candidates(self.job)}
            genomes = [tuple(float(v) for v in self.to_genome(x)) for x in driver.algo.pop.get("X")]
            return sorted({by_genome[k] for k in genomes if k in by_genome})
        if isinstance(driver, CMAES):
            return [r.id for r in self.store.candidates(self.job, generation=g - 1)]
        return []

    def _evaluate(self, state: LoopState, batch: Batch, recipes: dict[int, Any]) -> dict[int, dict | None]:
        """Values per candidate (None: failed). Finished rows of a resumed generation are reused; a recipe seen
        before is not evaluated again (status `cached`, values copied, `cached_from` set)."""
        first_of: dict[str, int] = {}  # recipe hash -> the candidate of this generation that evaluates it
        duplicates: dict[int, list[tuple[int, Batch]]] = {}
        self.start(batch, recipes, first_of, duplicates)
        self.tally(state, batch)
        for out in self.runtime.as_completed():
            self.settle(out, batch, duplicates)
            self.tally(state, batch)
        return batch.results

    def start(self, batch: Batch, recipes: dict[int, Any], first_of: dict[str, int],
              duplicates: dict[int, list[tuple[int, Batch]]]) -> None:
        """Reuse finished rows, answer repeated recipes from the cache, submit the rest (in id order).
        `first_of` maps a recipe hash to the candidate in flight that evaluates it; a later candidate with the same
        recipe waits in `duplicates` for it."""
        for r in batch.rows:
            existing = self.store.candidate(self.job, r.id)
            reuse = ("done", "cached") if self.retry_failed else ("done", "failed", "cached")
            if existing is not None and existing.status in reuse:
                batch.results[r.id] = existing.values
                batch.verdicts[r.id] = None if existing.status == "cached" else (existing.status == "done",
                                                                                  existing.reason)
                continue
            hit = self.store.by_hash(self.job, r.recipe_hash)
            if hit is not None and hit.id < r.id:
                self._cached(r.id, hit, batch.results)
                batch.verdicts[r.id] = None
                continue
            if r.recipe_hash in first_of:
                duplicates.setdefault(first_of[r.recipe_hash], []).append((r.id, batch))
                batch.verdicts[r.id] = None
                continue
            first_of[r.recipe_hash] = r.id
            self.runtime.submit(r.id, recipes[r.id], items=self.irt.items_for(r.id) if self.irt else None)  # IRT
            self.store.mark_running(self.job, r.id)

    def settle(self, out: Outcome, batch: Batch, duplicates: dict[int, list[tuple[int, Batch]]]) -> None:
        """Record one outcome (and the candidates that repeat its recipe) in the store and in its batch."""
        if self.irt:  # IRT: anchor-only scores become estimates (what the driver sees)
            out = self.irt.finish(out)
        self._record(out)
        batch.results[out.cid] = out.values if out.ok else None
        batch.verdicts[out.cid] = (out.ok, out.reason)
        waiting = duplicates.pop(out.cid, [])
        if waiting:
            first = self.store.candidate(self.job, out.cid)
            for cid, b in waiting:
                self._cached(cid, first, b.results)

    def _cached(self, cid: int, hit: CandidateRow | None, results: dict[int, dict | None]) -> None:
        assert hit is not None
        self.store.finish(self.job, cid, "cached", values=hit.values, losses=hit.losses, reason=hit.reason,
                          cached_from=hit.id, estimated=hit.estimated, eval_seconds=0.0)
        results[cid] = hit.values

    def _record(self, out: Outcome) -> None:
        if out.ok:
            self.store.finish(self.job, out.cid, "done", values=out.values, losses=self.losses(out.values),
                              items=out.items, worker=out.worker, eval_seconds=out.seconds, estimated=out.estimated)
        else:
            self.store.finish(self.job, out.cid, "failed", losses=self.losses(None), reason=out.reason,
                              worker=out.worker, eval_seconds=out.seconds)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in (out.values or {}).items()) or f"FAILED: {out.reason}"
        self.progress.candidate(f"candidate {out.cid}: {shown[:120]}")

    def tally(self, counter: LoopState | FailureCount, batch: Batch) -> bool:
        """Walk the failure counter over the batch's rows in id order, as far as their outcomes are in (cached
        rows count neither way); True once the whole batch is counted. Raises SearchStopped at the limit."""
        while batch.counted < len(batch.rows):
            cid = batch.rows[batch.counted].id
            if cid not in batch.verdicts:
                return False
            verdict = batch.verdicts[cid]
            batch.counted += 1
            if verdict is not None:
                self._count(counter, *verdict)
        if batch.counter is None:
            batch.counter = (counter.failures_in_a_row, list(counter.recent))
        return True

    def _count(self, state: LoopState | FailureCount, ok: bool, reason: str | None) -> None:
        if ok:
            state.failures_in_a_row, state.recent = 0, []
            return
        state.failures_in_a_row += 1
        state.recent = (state.recent + [reason or "?"])[-20:]
        limit = self.spec.driver.max_failures_in_a_row
        if state.failures_in_a_row >= limit:
            common, n = Counter(state.recent).most_common(1)[0]
            raise SearchStopped(
                f"job '{self.job}' stopped: {state.failures_in_a_row} candidates failed in a row (limit "
                f"driver.max_failures_in_a_row = {limit}). Most common reason ({n} of the last {len(state.recent)}): "
                f"{common}. Look at the failed candidates in {self.store.path}, fix the cause outside the spec (model "
                "files, task data, devices, memory: `evomerge resume` runs the spec stored with the job), then "
                "`evomerge resume` continues; a cause in the spec itself needs a new job.")

    # ------------------------------------------------------------ front and summary

    def front_ids(self, generations: int | None = None) -> list[int]:
        """The Pareto front of the evaluated candidates (of the first `generations` generations only: steady mode
        checkpoints the front of the batches told, not of whatever else has finished meanwhile)."""
        done = self.store.candidates(self.job, status="done")
        if generations is not None:
            done = [r for r in done if r.generation < generations]
        if not done:
            return []
        F = np.array([r.losses for r in done])
        return [r.id for r, keep in zip(done, pareto_mask(F)) if keep]

    def summary(self, state: LoopState, front: list[int]) -> str:
        counts = self.store.counts(self.job)
        done = self.store.candidates(self.job, status="done")
        best = []
        for k, o in enumerate(self.objectives.objectives):
            if done:
                v = min(done, key=lambda r: r.losses[k]).values[o.name]
                best.append(f"{o.name} {v:.4g}")
        hv = ""
        if state.ref_point is not None and front:
            F = np.array([r.losses for r in done if r.id in set(front)])
            hv = f" | hypervolume {hypervolume(F, np.array(state.ref_point)):.4g}"
        budget = self.spec.driver.max_evaluations
        return (f"generation {state.generation}: {state.evaluations}{f'/{budget}' if budget else ''} candidates, "
                f"{counts.get('done', 0)} evaluated, {counts.get('cached', 0)} cached, {counts.get('failed', 0)} failed"
                f" | best: {', '.join(best) or '-'} | front {len(front)}{hv}")
