"""Between the driver and the store: an ask becomes stored candidate rows, rows go to the runtime (or are answered
from the archive), outcomes are recorded, and the failure counter walks them in id order. Both loops and the
front's confirmation record through here, so a candidate is stored one way whoever asked for it.

The cache: a recipe seen before is not evaluated again (status `cached`, values copied, `cached_from` set); a
repeat of a recipe still in flight waits for it. Rows already finished (a resumed generation) are reused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.errors import InternalError
from evomerge.search.front import add_to_front, hypervolume, pareto_mask
from evomerge.search.irt_policy import moves
from evomerge.search.problem import recipe_hash, recipe_text
from evomerge.search.progress import Best, Status
from evomerge.search.resume import retell
from evomerge.search.state import Batch, FailureCount, LoopState, Verdict
from evomerge.store import CandidateRow

if TYPE_CHECKING:
    from evomerge.search.context import SearchContext
    from evomerge.search.drivers import Driver
    from evomerge.search.irt_policy import IRTPolicy
    from evomerge.search.problem import Problem
    from evomerge.runtime.base import Outcome


def internal_error(job: str, out: "Outcome", what: str) -> InternalError:
    """The error that stops a job when a scorer hit a bug (`Outcome.internal`), with the failing frames."""
    return InternalError(f"job '{job}' stopped by an internal error while scoring {what} on worker {out.worker}: "
                         f"{out.reason}. This is a bug in evomerge or in the scorer plug-in, not in the candidate; "
                         f"`evomerge resume` retries it once fixed.\n{out.internal}")


class Recorder:
    def __init__(self, ctx: "SearchContext", problem: "Problem", irt: "IRTPolicy | None" = None):
        self.ctx, self.problem, self.irt = ctx, problem, irt
        self.store, self.job = ctx.store, ctx.job
        self.retry_failed = False  # a resumed `stopped` job re-evaluates the failures of its unfinished batches
        self.owner: dict[int, Batch] = {}  # submitted candidate -> its batch
        self.first_of: dict[str, int] = {}  # recipe hash -> the candidate in flight that evaluates it
        self.duplicates: dict[int, list[tuple[int, Batch]]] = {}  # that candidate -> later ones with its recipe
        # what the progress display is told (`status`): kept as outcomes land, not re-read from the store each time
        self.generation = 0  # asked last
        self.hv_ref: list[float] | None = None  # the hypervolume reference, once generation 0 is told
        self.elapsed_before = 0.0  # seconds searched by earlier runs (a resume)
        self._front: np.ndarray | None = None  # losses of the running front of done candidates; None: to be read
        self._best: list[tuple[float, Best] | None] = []  # per objective: (loss, what the display shows)
        self._hv: tuple[list[float], float] | None = None  # (reference, hypervolume) of the running front

    # ------------------------------------------------------------ asking

    def ask(self, driver: "Driver", g: int, next_id: int) -> tuple[Batch, dict[int, Any]]:
        """Ask the driver for generation `g`, number its candidates from `next_id`, decode and store them."""
        pool = self._pool_ids(driver, g)
        X = driver.ask()
        rows, recipes = [], {}
        seed_units = [(label, self.problem.to_unit(genome)) for label, genome in self.problem.seeds] if g == 0 else []
        for i, x in enumerate(X):
            genome = self.problem.stored_genome(x)  # what the store keeps, a resume decodes and the replay compares
            recipe = self.problem.decode(genome)
            text = recipe_text(recipe)
            origin = next((label for label, u in seed_units if np.allclose(u, x, atol=1e-9)), "driver")
            cid = next_id + i
            rows.append(CandidateRow(id=cid, generation=g, idx=i, genome=genome, recipe=text,
                                     recipe_hash=recipe_hash(text), origin=origin, status="pending", parents=pool))
            recipes[cid] = recipe
        self.store.add_candidates(self.job, rows)
        self.generation = g
        return Batch(g, X, rows), recipes

    def _pool_ids(self, driver: "Driver", g: int) -> list[int]:
        """Parent lineage: the candidates the next generation is bred from (see `Driver.parents`)."""
        if g == 0:
            return []
        lineage = driver.parents()
        if lineage.previous_generation:
            return [r.id for r in self.store.candidates(self.job, generation=g - 1)]
        if lineage.points is None:
            return []
        by_genome = {tuple(r.genome): r.id for r in self.store.candidates(self.job)}
        genomes = [tuple(self.problem.stored_genome(x)) for x in lineage.points]
        return sorted({by_genome[k] for k in genomes if k in by_genome})

    # ------------------------------------------------------------ evaluating

    def start(self, batch: Batch, recipes: dict[int, Any]) -> None:
        """Reuse finished rows, answer repeated recipes from the cache, submit the rest (in id order)."""
        for r in batch.rows:
            existing = self.store.candidate(self.job, r.id)
            reuse = ("done", "cached") if self.retry_failed else ("done", "failed", "cached")
            if existing is not None and existing.status in reuse:
                batch.results[r.id] = existing.values
                batch.verdicts[r.id] = None if existing.status == "cached" else Verdict(existing.status == "done",
                                                                                         existing.reason)
                continue
            hit = self.store.by_hash(self.job, r.recipe_hash)
            if hit is not None and hit.id < r.id:
                self.cached(r.id, hit, batch.results)
                batch.verdicts[r.id] = None
                continue
            if r.recipe_hash in self.first_of:
                self.duplicates.setdefault(self.first_of[r.recipe_hash], []).append((r.id, batch))
                batch.verdicts[r.id] = None
                continue
            self.first_of[r.recipe_hash] = r.id
            self.owner[r.id] = batch
            self.ctx.runtime.submit(r.id, recipes[r.id], items=self.irt.items_for(r.id) if self.irt else None)  # IRT
            self.store.mark_running(self.job, r.id)
        self.ctx.progress.status(self.status())

    def settle(self, out: "Outcome") -> Batch:
        """Record one outcome (and the candidates that repeat its recipe) in the store and in its batch."""
        batch = self.owner.pop(out.cid)
        digest = next(r.recipe_hash for r in batch.rows if r.id == out.cid)
        if self.first_of.get(digest) == out.cid:
            del self.first_of[digest]  # finished: later repeats find it in the store
        if self.irt:  # IRT: anchor-only scores become estimates (what the driver sees)
            out = self.irt.finish(out)
        self.record(out)
        batch.results[out.cid] = out.values if out.ok else None
        batch.verdicts[out.cid] = Verdict(out.ok, out.reason)
        waiting = self.duplicates.pop(out.cid, [])
        if waiting:
            first = self.store.candidate(self.job, out.cid)
            for cid, b in waiting:
                self.cached(cid, first, b.results)
            self.ctx.progress.status(self.status())  # the repeats are finished too
        return batch

    def cached(self, cid: int, hit: CandidateRow | None, results: dict[int, dict | None] | None = None,
               retold: tuple[int, list[str]] | None = None) -> None:
        """Answer candidate `cid` from the evaluated candidate `hit` (same recipe); `retold`: as `Store.finish`'s."""
        assert hit is not None
        self.store.finish(self.job, cid, "cached", values=hit.values, losses=hit.losses, reason=hit.reason,
                          cached_from=hit.id, estimated=hit.estimated, eval_seconds=0.0, retold=retold)
        if results is not None:
            results[cid] = hit.values

    def record(self, out: "Outcome", estimated: bool | None = None,
               retold: tuple[int, list[str]] | None = None, failed_losses: list[float] | None = None) -> None:
        """Store an outcome: values and losses, or the failure reason; an internal error, once recorded as a
        failure (a resume retries it), stops the job. `retold`: as `Store.finish`'s (a told candidate measured);
        `failed_losses`: what the driver is told for it if it failed (else decided when its batch is told)."""
        if out.ok:
            self.store.finish(self.job, out.cid, "done", values=out.values, losses=self.problem.losses(out.values),
                              items=out.items, worker=out.worker, eval_seconds=out.seconds,
                              estimated=out.estimated if estimated is None else estimated, retold=retold)
        else:
            self.store.finish(self.job, out.cid, "failed", reason=out.reason, losses=failed_losses,
                              worker=out.worker, eval_seconds=out.seconds, retold=retold)
        if out.ok:
            self._landed(out.values, out.estimated if estimated is None else estimated, again=estimated is not None)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in (out.values or {}).items()) or f"FAILED: {out.reason}"
        self.ctx.progress.candidate(f"candidate {out.cid}: {shown[:120]}")
        self.ctx.progress.status(self.status())
        if out.internal:
            raise internal_error(self.job, out, f"candidate {out.cid}")

    def confirm_entrants(self, batch: Batch) -> list[int]:
        """IRT, before a complete batch is told: score in full the estimates the policy picks because their interval
        overlaps the front (`IRTPolicy.entrants`), and put the measured values in the batch (what the driver is
        told), the store and the repeats of their recipes. Returns the ids scored."""
        if self.irt is None or not self.irt.confirming():
            return []
        names = [o.name for o in self.ctx.objectives.objectives]
        mine = self.store.candidates(self.job, generation=batch.generation)
        # earlier candidates as they stood before this generation re-estimated or measured any (a resume after a
        # crash in its rechecks chooses what the uninterrupted search did)
        earlier = self._as_told(batch.generation, since=batch.generation)
        measured = [r.losses for r in mine if r.status == "done" and r.id not in self.irt.anchored]
        F = np.array(earlier + measured, dtype=float).reshape(-1, len(names))
        chosen = self.irt.entrants([r for r in mine if r.status == "done"], F[pareto_mask(F)] if len(F) else F,
                                   self.problem.losses, names)
        todo = {cid: objs for cid, objs in chosen.items() if objs}
        if not todo:
            return []
        self.ctx.progress.line(f"generation {batch.generation}: " + ", ".join(
            f"#{cid} {'/'.join(objs)}" for cid, objs in todo.items()) + " scored on every item before the driver "
            "is told (the estimate's interval overlaps the front)")
        return self.measure(todo, batch.generation, batch.results)

    def recheck(self, batch: Batch, driver: "Driver") -> list[int]:
        """IRT, before a complete batch is told (after `confirm_entrants`): estimate the told estimates again with
        what has been measured since (`reestimate`), score in full the ones the front leans on most
        (`IRTPolicy.rechecks`), then tell the driver the new losses of every candidate re-estimated or measured
        since it was told (`retell`). Returns the ids scored."""
        scored: list[int] = []
        g = batch.generation
        reestimated = self.reestimate(g, batch.results) if self.irt is not None else {}
        if self.irt is not None and self.irt.rechecking(g) and self.hv_ref is not None:
            names = [o.name for o in self.ctx.objectives.objectives]
            at_g = {t["candidate"] for t in self.store.retold(self.job) if t["generation"] == g and t["objectives"]}
            rows = [r for r in self.store.candidates(self.job)
                    if r.generation <= g and (r.status == "done" or r.id in at_g)]
            todo = self.irt.rechecks(g, rows, names, np.array(self.hv_ref, dtype=float), reestimated,
                                     self.problem.losses)
            if todo:
                self.ctx.progress.line(f"generation {batch.generation}: " + ", ".join(
                    f"#{cid} {'/'.join(objs)}" for cid, objs in todo.items()) + " (told on estimates, the front "
                    "leaning on them most) scored on every item; the driver is told the measured values")
                scored = self.measure(todo, g, batch.results)  # this generation's repeats: told the measured
        self.retell(driver, g)
        return scored

    def reestimate(self, generation: int, results: dict[int, dict | None] | None = None) -> dict[int, dict[str, float]]:
        """Before `generation` is told: the told estimates made again (`IRTPolicy.reestimates`); those still
        estimated whose values moved are stored so, with a `retold` row each, which `retell` tells the driver, and
        so are their cached repeats (this generation's in `results` too: told the new values with the batch).
        Returns the re-estimated values (moved or not, measured since or not: what `rechecks` chooses on)."""
        values = self.irt.reestimates(generation)
        if not values:
            return values
        still = self.store.open_estimates(self.job)
        rows = {r.id: r for r in self.store.candidates(self.job) if r.id in values or r.cached_from in values}
        moved: list[tuple[int, str, float, float]] = []
        for cid, new in values.items():
            row = rows.get(cid)
            new = {n: v for n, v in new.items() if n in still.get(cid, [])}
            if row is None or row.values is None or not new:
                continue
            vals = {**row.values, **new}
            losses = self.problem.losses(vals)
            if row.losses is None or not moves(losses, row.losses):
                continue
            shift = {n: v - row.values[n] for n, v in new.items()}
            copies = [c for c in rows.values() if c.cached_from == cid]
            for r in [row] + [c for c in copies if c.generation < generation]:
                self.store.reestimate(self.job, r.id, vals, losses, generation)
            now = [c for c in copies if c.generation == generation]
            if now:
                first = self.store.candidate(self.job, cid)
                for c in now:
                    self.cached(c.id, first, results if results is not None and c.id in results else None)
            n = max(shift, key=lambda k: abs(shift[k]))
            moved.append((cid, n, row.values[n], new[n]))
        if moved:
            cid, n, old, new_v = max(moved, key=lambda m: abs(m[3] - m[2]))
            self.ctx.progress.line(f"generation {generation}: {len(moved)} told estimate(s) estimated again with the "
                                   f"candidates measured since (the largest move: #{cid} {n} {old:.4g} -> "
                                   f"{new_v:.4g}); the driver is told the new values")
        return values

    def retell(self, driver: "Driver", generation: int) -> int:
        """Tell `driver` the new losses of the candidates retold before `generation` is told (the `retold` rows of
        that generation: re-estimates, rechecks, and a finished search's confirmed picks when it is resumed); the replay
        on resume calls this at the same place. Returns how many of them the driver still held."""
        rows = [t for t in self.store.retold(self.job) if t["generation"] == generation]
        return retell(self.store, self.job, self.problem, driver, rows)

    def measure(self, todo: dict[int, list[str]], told: int,
                results: dict[int, dict | None] | None = None) -> list[int]:
        """Score the estimated objectives `todo[cid]` of done candidates on every item (their other estimated
        objectives on their anchors again, and kept as estimated); record the measured values beside the estimates
        and copy them to the candidates that repeat their recipes (in `results` too, where those are). Objectives
        already measured are left out, so a resumed confirmation does not score them twice. `told`: the
        generations told so far; a candidate of an earlier one was told its estimate, and is recorded as retold
        at `told` (`Store.retold`: the replay tells the estimate at its own generation). Returns the ids
        scored."""
        still_open = self.store.open_estimates(self.job)
        jobs: dict[int, tuple[CandidateRow, list[str], bool]] = {}
        for cid, objs in sorted(todo.items()):
            row = self.store.candidate(self.job, cid)
            objs = [n for n in objs if n in still_open.get(cid, [])]
            if row is None or row.status != "done" or not objs:
                continue
            stored = self.store.items(self.job, cid)
            others = {n: list(stored[n]) for n in still_open[cid] if n not in objs}  # on their anchors again
            jobs[cid] = (row, objs, bool(others))
            self.ctx.runtime.submit(cid, self.problem.decode(row.genome), items=others or None)
        copies = self.store.candidates(self.job, status="cached")
        for out in self.ctx.runtime.as_completed():
            row, objs, partial = jobs[out.cid]
            still = out.ok and partial  # objectives left estimated: the candidate stays estimated
            if out.ok:  # the measured objectives from this scoring, the rest as they were told
                out = replace(out, values={**row.values, **{n: out.values[n] for n in objs}}, estimated=still)
            retold = (told, objs) if row.generation < told else None
            # measured in full it may fail: recorded so; a told one is told the failure (it leaves the population)
            self.record(out, estimated=still, retold=retold,
                        failed_losses=self._told_failure(told) if retold and not out.ok else None)
            if results is not None and out.cid in results:  # a candidate of the batch being told
                results[out.cid] = out.values if out.ok else None
            if out.ok:
                for n in objs:
                    self.store.set_measured(self.job, out.cid, n, out.values[n])
            repeats = [c for c in copies if c.cached_from == out.cid]
            if repeats:
                first = self.store.candidate(self.job, out.cid)
                for c in repeats:
                    self.cached(c.id, first, results if results is not None and c.id in results else None,
                                retold=(told, objs) if c.generation < told else None)
        return sorted(jobs)

    def _told_failure(self, told: int) -> list[float]:
        """The losses a driver is told for a told candidate whose full scoring failed: worse than every loss told
        in generations before `told` (as they were told: a retold candidate's first losses), so the same whatever
        else has been measured since, on a resume too."""
        return self.problem.failure_losses(self._as_told(told, since=0))

    def _as_told(self, generation: int, since: int) -> list[list[float]]:
        """The losses of the candidates of generations before `generation` as the driver held them before the
        retellings of generation `since` (`Store.told_before`); a failure's told losses included."""
        before = self.store.told_before(self.job, since)
        seen = [before.get(r.id, r.losses) for r in self.store.candidates(self.job)
                if r.generation < generation and (r.status == "done" or r.id in before)]
        return [v for v in seen if v is not None]

    def tally(self, counter: FailureCount, batch: Batch) -> bool:
        """Walk the failure counter over the batch's rows in id order, as far as their outcomes are in (cached
        rows count neither way); True once the whole batch is counted. Raises SearchStopped at the limit."""
        while batch.counted < len(batch.rows):
            cid = batch.rows[batch.counted].id
            if cid not in batch.verdicts:
                return False
            verdict = batch.verdicts[cid]
            batch.counted += 1
            if verdict is not None:
                counter.count(verdict.ok, verdict.reason, self.ctx.spec.driver.max_failures_in_a_row, self.job,
                              self.store.path)
        if batch.counter is None:
            batch.counter = counter.copy()
        return True

    def told_losses(self, batch: Batch) -> np.ndarray:
        """The losses a driver is told for a complete batch (rows in id order). A failed candidate is told a loss
        worse than every real one of the batches told so far and of this one (deterministic: never what else
        finished meanwhile), and that loss is stored with it: the replay on resume tells what was told."""
        real = {r.id: self.problem.losses(batch.results[r.id]) for r in batch.rows if batch.results[r.id] is not None}
        out = [real.get(r.id) for r in batch.rows]
        if len(real) < len(batch.rows):
            earlier = [r.losses for r in self.store.candidates(self.job, status="done")
                       if r.generation < batch.generation and r.losses is not None]
            penalty = self.problem.failure_losses(earlier + list(real.values()))
            for i, r in enumerate(batch.rows):
                if out[i] is None:
                    out[i] = penalty
                    self.store.set_losses(self.job, r.id, penalty)
        return np.array(out, dtype=float)

    def ref_point(self, state: LoopState, batch: Batch) -> list[float] | None:
        """The hypervolume reference: the worst losses of generation 0's evaluated candidates."""
        if state.ref_point is not None or batch.generation != 0:
            return state.ref_point
        ok = [self.problem.losses(batch.results[r.id]) for r in batch.rows if batch.results[r.id] is not None]
        return [float(v) for v in np.max(ok, axis=0)] if ok else None

    # ------------------------------------------------------------ what the progress display is told

    def status(self) -> Status:
        """Counts from the store; best values and the hypervolume of the running front."""
        counts = self.store.counts(self.job)
        if self._front is None:
            self._load_front()
        assert self._front is not None
        hv = None
        if self.hv_ref is not None and len(self._front):
            if self._hv is None or self._hv[0] != self.hv_ref:
                self._hv = (self.hv_ref, hypervolume(self._front, np.array(self.hv_ref)))
            hv = self._hv[1]
        d = self.ctx.spec.driver
        return Status(job=self.job, generation=self.generation, asked=sum(counts.values()),
                      done=counts.get("done", 0), cached=counts.get("cached", 0), failed=counts.get("failed", 0),
                      budget=d.max_evaluations, seconds_budget=d.max_seconds, elapsed_before=self.elapsed_before,
                      best=tuple(b[1] for b in self._best if b is not None), hypervolume=hv, front=len(self._front))

    def _load_front(self) -> None:
        """The running front and best values from the store's done candidates (at the first status, and after a
        candidate's values were replaced by measured ones)."""
        k = len(self.ctx.objectives.objectives)
        self._front, self._best, self._hv = np.zeros((0, k)), [None] * k, None
        for r in self.store.candidates(self.job, status="done"):
            if r.values is not None:
                self._landed(r.values, r.estimated, loaded=True)

    def _landed(self, values: dict[str, float], estimated: bool, again: bool = False, loaded: bool = False) -> None:
        """One done candidate into the running front and best values. `again`: a candidate scored anew (its
        estimate replaced by a measurement), so all is read from the store at the next status."""
        if again or (self._front is None and not loaded):
            self._front = None  # the store already holds this candidate: read at the next status
            return
        assert self._front is not None
        losses = np.array(self.problem.losses(values), dtype=float)
        grown = add_to_front(self._front, losses)
        if grown is not self._front:  # it joined the front: the hypervolume is computed again
            self._front, self._hv = grown, None
        for i, o in enumerate(self.ctx.objectives.objectives):
            best = self._best[i]
            if best is None or losses[i] < best[0]:
                self._best[i] = (float(losses[i]), Best(o.name, o.direction or "maximise", float(values[o.name]),
                                                        bool(estimated)))

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

    def checkpoint(self, state: LoopState) -> None:
        """Store the state after a tell with the front of the batches told, and say where the search stands."""
        front = self.front_ids(state.generation)
        self.store.save_checkpoint(self.job, state.generation, state.to_json(), front)
        self.hv_ref = state.ref_point
        self.ctx.progress.line(self.summary(state, front))

    def summary(self, state: LoopState, front: list[int]) -> str:
        counts = self.store.counts(self.job)
        done = self.store.candidates(self.job, status="done")
        best = []
        for k, o in enumerate(self.ctx.objectives.objectives):
            if done:
                v = min(done, key=lambda r: r.losses[k]).values[o.name]
                best.append(f"{o.name} {v:.4g}")
        hv = ""
        if state.ref_point is not None and front:
            F = np.array([r.losses for r in done if r.id in set(front)])
            hv = f" | hypervolume {hypervolume(F, np.array(state.ref_point)):.4g}"
        budget = self.ctx.spec.driver.max_evaluations
        return (f"generation {state.generation}: {state.evaluations}{f'/{budget}' if budget else ''} candidates, "
                f"{counts.get('done', 0)} evaluated, {counts.get('cached', 0)} cached, {counts.get('failed', 0)} failed"
                f" | best: {', '.join(best) or '-'} | front {len(front)}{hv}")
