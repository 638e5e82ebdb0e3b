"""IRT-reduced fitness in the search loop: which candidates are scored in full, when the IRT model is (re)fitted,
and how an anchor-only outcome becomes an estimated value. The math is in `evomerge.fitness.irt`.

For each objective with `estimator: irt`, generation by generation:
1. seed phase: every candidate is scored in full until `seed_candidates` candidates (the parents and the first
   population's random genomes first) are; generation g0 is the first after that;
2. at g0, and every `calibrate_every` generations after it, a calibration is fitted (`irt.calibrate`) on every
   candidate of earlier generations scored in full, and recorded in the store (`irt` table). A resumed search
   loads it from there (and would refit identically: fits are seeded, float64, one thread);
3. other generations' candidates are scored on the anchors only; their value is the estimate (`estimated`,
   with its uncertainty and estimator in the `estimates` table), moved by the errors the calibration makes on the
   candidates of earlier generations scored in full that answered the anchors alike (`irt.neighbours`: where a
   leave-one-out over those candidates says it helps; the estimator then reads `<name>+neighbours`). In the
   generation before each refit, `calibrate_count` candidates (seeded choice) are scored in full: they feed the
   refit and measure the estimator's error on candidates no fit has seen (the `measured` column beside it);
4. before a generation is told to the driver, up to `confirm_count` of its estimated candidates whose interval
   (estimate +- 2 sd) on the objective overlaps the front have it scored in full (`entrants`, `Recorder.measure`):
   the driver is told the measured values, and they join the next refit (the front, where the search is heading,
   is where the fits need data);
5. every `recheck_every` generations, before the tell, the estimated member of an earlier generation that the
   front leans on most (the largest exclusive hypervolume) is scored in full on the objective, and the driver is
   told its measured losses (`rechecks`, `Driver.revise`). Why: an estimate told once stays what the driver
   believes; an over-estimated one (0.83 told, 0.66 measured, on the layerwise_ps bench) survives every
   generation as an elite that dominates the true front's candidates, and the search stalls around it.
Where IRT cannot help (too few informative items, items not 0/1, the objective not their mean, a failed fit),
the objective is scored in full until the next refit, and the progress output says why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from evomerge.fitness import irt
from evomerge.runtime.base import Outcome
from evomerge.search.front import contributions, pareto_mask

if TYPE_CHECKING:
    from evomerge.fitness.objectives import Objective
    from evomerge.search.context import SearchContext
    from evomerge.store import CandidateRow, Store


@dataclass
class _InForce:
    """The calibration an objective uses in this generation."""

    cal: irt.Calibration
    fit_generation: int
    item_ids: list[str]
    anchor_ids: list[str]


class IRTPolicy:
    def __init__(self, store: "Store", job: str, objectives: list["Objective"], say=print):
        self.store, self.job, self.objectives, self.say = store, job, objectives, say
        self.anchored: dict[int, dict[str, list[str]]] = {}  # candidate -> {objective: anchor item ids}
        self.current: dict[str, _InForce | None] = {}
        self.neighbours: dict[str, irt.Neighbours] = {}  # objective -> this generation's correction
        self._raw: dict[tuple[str, int, int], float] = {}  # (objective, fit generation, candidate) -> estimate
        self._fits: dict[tuple[str, int], tuple[irt.Calibration, list[str]] | None] = {}  # `_stored_fit`'s
        self._said: set[str] = set()

    @classmethod
    def for_context(cls, ctx: "SearchContext") -> "IRTPolicy | None":
        objs = [o for o in ctx.objectives.objectives if getattr(o, "estimator", "full") == "irt"]
        return cls(ctx.store, ctx.job, objs, ctx.progress.line) if objs else None

    # ------------------------------------------------------------ before a generation

    def plan(self, generation: int, rows: list["CandidateRow"]) -> None:
        """Decide, for every candidate of `generation`, which objectives are scored on anchors only."""
        self.anchored, self.current, self.neighbours = {}, {}, {}
        for o in self.objectives:
            measured = self._full_rows(o, generation)  # read once: g0, the fit in force and the correction use it
            g0 = self._first_generation(o, generation, measured[0])
            force = self._in_force(o, generation, g0)
            self.current[o.name] = force
            if force is None:
                continue
            self.neighbours[o.name] = self._neighbours(o, force, generation, *measured)
            full = self._calibration_rows(o, generation, rows, g0)
            for r in rows:
                if r.id not in full:
                    self.anchored.setdefault(r.id, {})[o.name] = force.anchor_ids

    def items_for(self, cid: int) -> dict[str, list[str]] | None:
        """The item subset to score this candidate on (None: every item)."""
        return self.anchored.get(cid)

    def _full_rows(self, o: "Objective", before: int, items: dict[int, dict[str, float]] | None = None
                   ) -> tuple[list["CandidateRow"], list[dict[str, float]]]:
        """Candidates of generations < `before` scored on every item of `o` (in id order), with those items
        (`items`: `o`'s per-item results, read from the store where not given)."""
        items = self.store.items_of(self.job, o.name) if items is None else items
        total = max((len(v) for v in items.values()), default=0)
        rows, its = [], []
        for r in self.store.candidates(self.job, status="done"):
            if r.generation < before and len(items.get(r.id, {})) == total > 0:
                rows.append(r)
                its.append(items[r.id])
        return rows, its

    def _first_generation(self, o: "Objective", generation: int, rows: list["CandidateRow"]) -> int | None:
        """g0: the first generation with `seed_candidates` fully scored candidates before it (None: not yet);
        `rows`: `_full_rows(o, generation)`'s."""
        per_gen = np.bincount([r.generation for r in rows], minlength=generation) if rows else np.zeros(generation)
        reached = np.flatnonzero(np.cumsum(per_gen) >= o.seed_candidates)
        if len(reached) == 0:
            self._once(f"{o.name}:seed", f"IRT for {o.name}: scoring in full until {o.seed_candidates} candidates are "
                       f"(seed_candidates; {len(rows)} so far), then {o.anchors} anchors per candidate")
            return None
        return int(reached[0]) + 1

    def _in_force(self, o: "Objective", generation: int, g0: int | None) -> _InForce | None:
        if g0 is None:
            return None
        # nothing new to refit on: never
        period = o.calibrate_every if o.calibrate_count > 0 or o.confirm_count > 0 else 10 ** 9
        fit_gen = g0 + period * ((generation - g0) // period)
        stored = self.store.irt(self.job, o.name, fit_gen)
        if stored is None:
            stored = self._fit(o, fit_gen)
        data, note = stored
        if data is None:
            self._once(f"{o.name}:{fit_gen}", f"IRT for {o.name} (fit of generation {fit_gen}): {note}; scoring "
                       f"{o.name} in full" + (" until the next refit" if period < 10 ** 9 else ""))
            return None
        cal = irt.Calibration.from_dict(data["calibration"])
        return _InForce(cal, fit_gen, data["item_ids"], [data["item_ids"][i] for i in cal.anchors.items])

    def _fit(self, o: "Objective", fit_gen: int) -> tuple[dict[str, Any] | None, str | None]:
        rows, its = self._full_rows(o, fit_gen)
        ids = list(its[0]) if its else []
        try:
            Y = np.array([[it[i] for i in ids] for it in its], dtype=float)
            if Y.size and not np.isin(Y, (0.0, 1.0)).all():
                raise irt.IRTUnavailable(f"its per-item values are not 0/1 (metric {o.metric or 'default'}); IRT "
                                         "models right/wrong answers only")
            for r, y in zip(rows, Y):
                if abs(float((r.values or {}).get(o.name, np.nan)) - float(y.mean())) > 1e-6:
                    raise irt.IRTUnavailable("its value is not the mean of its per-item results (the metric's "
                                             "aggregation is not a mean), so it cannot be estimated from items")
            parents = [k for k, r in enumerate(rows) if r.origin.startswith("parent:")]
            estimators = irt.AUTO if o.irt_estimator == "auto" else (o.irt_estimator,)
            checks = self.measured(o.name)
            tried: list[tuple[int, float]] = []
            for n in anchor_counts(o.anchors, len(ids), o.max_error):
                cal = irt.calibrate(Y, n, o.anchor_method, o.anchor_seed, parents, estimators,
                                    extra_residuals=[(r, raw_sd) for r, raw_sd, _ in checks])
                error, basis = printed_error(cal, [abs(r) for r, _, _ in checks])
                tried.append((n, error))
                if o.max_error is None or error <= o.max_error:
                    break
            else:
                raise irt.IRTUnavailable(
                    f"its error stays above max_error {o.max_error:g} with up to {tried[-1][0]} anchors of "
                    f"{len(ids)} items (" + ", ".join(f"{n}: {e:.3f}" for n, e in tried) + ")")
        except irt.IRTUnavailable as e:
            self.store.save_irt(self.job, o.name, fit_gen, None, str(e))
            return None, str(e)
        more = f"; {len(cal.anchors.items)} anchors to reach max_error {o.max_error:g} ({', '.join(f'{n}: {e:.3f}' for n, e in tried)})" \
            if len(tried) > 1 else ""
        data = {"calibration": cal.to_dict(), "item_ids": ids, "fitted_on": [r.id for r in rows],
                "printed_error": error, "printed_basis": basis}
        self.store.save_irt(self.job, o.name, fit_gen, data)
        lost = ""
        if cal.estimator in ("mean", "anchor") and cal.model_mae is not None and cal.baselines \
                and cal.model_mae >= min(cal.baselines.values()):  # replaced by the better baseline (irt._honest)
            lost = (f" (the model, {cal.model_mae:.3f}, lost to the {min(cal.baselines, key=cal.baselines.get)}, "
                    "which is used instead)")
        self.say(f"IRT for {o.name} (generation {fit_gen}): fitted on {len(rows)} fully scored candidates, "
                 f"{cal.model.dims} dimension(s), {len(cal.anchors.items)} anchors of {len(ids)} items "
                 f"({cal.anchors.method}), estimator {cal.estimator}{lost}: error {error:.3f} ({basis}; anchor mean "
                 f"{cal.baselines.get('anchor mean', float('nan')):.3f}, random subset "
                 f"{cal.baselines.get('random subset', float('nan')):.3f}){more}")
        return data, None

    def _neighbours(self, o: "Objective", force: _InForce, generation: int, rows: list["CandidateRow"],
                    its: list[dict[str, float]]) -> irt.Neighbours:
        """The neighbour correction (`irt.neighbours`) this generation's estimates of `o` get: from every candidate
        of earlier generations scored in full (the fit's, calibration and confirmed ones), its answers on the
        calibration's anchors and the calibration's residual on it. Earlier generations only, so the same on a
        resume and whatever order this generation's candidates finish in. `rows`, `its`: `_full_rows`'s."""
        answers, residuals = [], []
        for r, it in zip(rows, its):
            y = np.array([it[i] for i in force.anchor_ids], dtype=float)
            key = (o.name, force.fit_generation, r.id)
            if key not in self._raw:
                self._raw[key] = float(force.cal.estimate(y).value)
            answers.append(y)
            residuals.append(float(np.mean([it[i] for i in force.item_ids])) - self._raw[key])
        nb = irt.neighbours(np.array(answers).reshape(len(rows), len(force.anchor_ids)), np.array(residuals))
        if nb.scale is not None:
            self._once(f"{o.name}:nb:{force.fit_generation}",
                       f"IRT for {o.name} (generation {generation}): estimates corrected by the {len(rows)} measured "
                       f"candidates' errors, weighted by how alike they answered the anchors (scale {nb.scale:g}, "
                       f"prior {nb.prior:g}): leave-one-out error {nb.loo_mae:.3f}, uncorrected {nb.raw_mae:.3f}")
        return nb

    def measured(self, objective: str) -> list[tuple[float, float, int]]:
        """Calibration candidates so far: (estimate - measured, the estimate's unscaled sd, candidate id), in id
        order: errors of estimates made before the candidate was scored in full."""
        scale = {h["generation"]: irt.Calibration.from_dict(h["data"]["calibration"]).sd_scale
                 for h in self.store.irt_history(self.job) if h["objective"] == objective and h["data"]}
        # calibration candidates only (scored in full when estimated): the front's picks measured later were chosen
        # for their estimates, and their errors are the winner's curse, not the estimator's typical error
        return [(e["value"] - e["measured"], e["sd"] / scale.get(e["fit_generation"], 1.0), e["candidate"])
                for e in self.store.estimates(self.job) if e["objective"] == objective and e["measured"] is not None
                and e["scored"] == e["total"]]

    def _calibration_rows(self, o: "Objective", generation: int, rows: list["CandidateRow"],
                          g0: int | None) -> set[int]:
        """Candidates of this generation scored in full to calibrate: `calibrate_count` of them (seeded) among those
        that will be evaluated, in the generation before each refit (`g0`: `_first_generation`'s)."""
        if g0 is None or o.calibrate_count == 0 or (generation - g0) % o.calibrate_every != o.calibrate_every - 1:
            return set()
        fresh = self._evaluated(rows)
        return {fresh[i].id for i in calibration_choice([0.0] * len(fresh), o.calibrate_count,
                                                         [o.anchor_seed, generation, 17])}

    def _evaluated(self, rows: list["CandidateRow"]) -> list["CandidateRow"]:
        """The rows the recorder will evaluate rather than answer from the cache (`Recorder.start`): the first of
        their recipe, in the store and in the batch. A calibration candidate that is a repeat would be a copy of an
        earlier candidate's anchors, scored in full by nobody. The same on a resume: a row of this generation that
        was evaluated before the stop is its recipe's first in the store."""
        seen: set[str] = set()
        out = []
        for r in sorted(rows, key=lambda r: r.id):
            hit = self.store.by_hash(self.job, r.recipe_hash)
            if r.recipe_hash not in seen and (hit is None or hit.id >= r.id):
                out.append(r)
            seen.add(r.recipe_hash)
        return out

    # ------------------------------------------------------------ before the driver is told

    def confirming(self) -> bool:
        """Whether this generation may confirm anything (`entrants`): an objective in force with a confirm_count."""
        return any(self.current.get(o.name) is not None and o.confirm_count > 0 for o in self.objectives)

    def entrants(self, rows: list["CandidateRow"], front: np.ndarray, losses: Callable[[dict], list[float]],
                 names: list[str]) -> dict[int, list[str]]:
        """Which estimates of a generation's candidates are measured (scored on every item) before the driver is
        told, {candidate: [objective, ...]}: per IRT objective, up to `confirm_count` candidates whose interval on
        it (estimate +- 2 sd) overlaps the front, the ones whose estimate lies farthest beyond the front first.
        `front`: the losses (objectives in `names` order, `losses(values)`) of the front the batch is measured
        against: earlier generations' candidates and this one's never estimated. Read from the `estimates` table,
        so a resumed generation chooses the same.

        Why: the driver keeps the candidates that look best, and an estimate that looks best is more often too high
        than too low (the winner's curse). A candidate the front would take on its estimate, or might take within
        its uncertainty, is measured before it is told; the others cannot change the front whatever their error."""
        ests = {(e["candidate"], e["objective"]): e for e in self.store.estimates(self.job)}
        chosen: dict[int, list[str]] = {}
        for o in self.objectives:
            if self.current.get(o.name) is None or o.confirm_count == 0:
                continue
            k, candidates = names.index(o.name), []
            for r in rows:
                e = ests.get((r.id, o.name))
                if r.values is None or e is None or o.name not in self.anchored.get(r.id, {}):
                    continue
                # the estimates the candidate was first given, also once it is measured (a resume chooses alike)
                values = {**r.values, **{n: ests[r.id, n]["value"] for n in self.anchored[r.id] if (r.id, n) in ests}}
                point = np.array(losses(values), dtype=float)
                best = point.copy()  # the interval's end the front likes better (either direction)
                best[k] = min(losses({**values, o.name: e["value"] + s * 2 * e["sd"]})[k] for s in (-1, 1))
                candidates.append((r.id, point, best))
            for cid in overlapping(front, candidates, k, o.confirm_count):
                chosen.setdefault(cid, []).append(o.name)
        return dict(sorted(chosen.items()))

    def reestimates(self, generation: int) -> dict[int, dict[str, float]]:
        """The told estimates as what has been measured since says they should read, {candidate: {objective:
        value}}: every done candidate of an earlier generation whose estimate on an IRT objective (`reestimate`)
        was not measured before `generation` is estimated again under the fit it was scored with (its anchor
        answers are that fit's anchors), with the neighbour correction rebuilt from every candidate scored on
        every item before `generation` (`irt.neighbours`). No item is scored.

        Why: a search breeds near-copies of what it keeps, and measures some of them (calibration, entrants,
        rechecks); the correction an estimate got when it was made knew none of those. Offline on a demo run's
        rechecked candidates (the estimates the front leant on most, told 0.02-0.04 too high) the estimate rebuilt
        so was 0.005 off, told 0.024. A pure function of what was measured before `generation` (a generation
        resumed after a crash, its rechecks measured already, gets the same)."""
        objs = [o for o in self.objectives if o.reestimate]
        if not objs:
            return {}
        since: dict[tuple[int, str], int] = {}  # (candidate, objective) -> the generation a retelling measured it
        for t in self.store.retold(self.job):
            for n in t["objectives"]:
                since.setdefault((t["candidate"], n), t["generation"])
        rows = {r.id: r for r in self.store.candidates(self.job, status="done")}
        out: dict[int, dict[str, float]] = {}
        by_fit: dict[tuple[str, int], list[int]] = {}
        for e in self.store.estimates(self.job):
            c, n = e["candidate"], e["objective"]
            r = rows.get(c)
            if r is None or r.generation >= generation or since.get((c, n), generation) < generation:
                continue
            if e["measured"] is not None and (c, n) not in since:  # scored in full in its own generation
                continue  # (calibration, entrants)
            by_fit.setdefault((n, e["fit_generation"]), []).append(c)
        for o in objs:
            fits = sorted(f for n, f in by_fit if n == o.name)
            if not fits:
                continue
            items = self.store.items_of(self.job, o.name)
            full, its = self._full_rows(o, generation, items)
            kept = [(r, it) for r, it in zip(full, its) if since.get((r.id, o.name), -1) < generation]
            for f in fits:
                fit = self._stored_fit(o.name, f)
                if fit is None:
                    continue
                cal, ids = fit
                anchor_ids = [ids[i] for i in cal.anchors.items]
                answers, residuals = [], []
                for r, it in kept:
                    y = np.array([it[i] for i in anchor_ids], dtype=float)
                    residuals.append(float(np.mean([it[i] for i in ids])) - self._raw_estimate(o.name, f, r.id, cal, y))
                    answers.append(y)
                nb = irt.neighbours(np.array(answers).reshape(len(kept), len(anchor_ids)), np.array(residuals))
                for c in by_fit[o.name, f]:
                    its_c = items.get(c, {})
                    if any(i not in its_c for i in anchor_ids):
                        continue
                    y = np.array([its_c[i] for i in anchor_ids], dtype=float)
                    raw = self._raw_estimate(o.name, f, c, cal, y)
                    out.setdefault(c, {})[o.name] = float(np.clip(raw + nb.shift(y), 0.0, 1.0))
        return dict(sorted(out.items()))

    def _stored_fit(self, objective: str, fit: int) -> tuple[irt.Calibration, list[str]] | None:
        """The calibration and item ids of `objective`'s fit made at generation `fit`, as stored (None: no model
        was fitted then); read once (a stored fit never changes)."""
        key = (objective, fit)
        if key not in self._fits:
            stored = self.store.irt(self.job, objective, fit)
            self._fits[key] = (None if stored is None or stored[0] is None else
                               (irt.Calibration.from_dict(stored[0]["calibration"]), stored[0]["item_ids"]))
        return self._fits[key]

    def _raw_estimate(self, objective: str, fit: int, cid: int, cal: irt.Calibration, y: np.ndarray) -> float:
        key = (objective, fit, cid)
        if key not in self._raw:
            self._raw[key] = float(cal.estimate(y).value)
        return self._raw[key]

    def rechecking(self, generation: int) -> bool:
        """Whether `rechecks` may choose anything before `generation` is told."""
        return any(self.current.get(o.name) is not None and o.recheck_every > 0
                   and generation % o.recheck_every == 0 for o in self.objectives)

    def rechecks(self, generation: int, rows: list["CandidateRow"], names: list[str], ref: np.ndarray,
                 reestimated: dict[int, dict[str, float]] | None = None,
                 losses_of: Callable[[dict], list[float]] | None = None) -> dict[int, list[str]]:
        """Which told estimates are measured before `generation` is told, {candidate: [objective, ...]}: per IRT
        objective due (`recheck_every`), the candidate of an earlier generation still estimated on it whose losses
        add most hypervolume (`ref`: the search's reference point) to the front of `rows` (the done candidates up
        to `generation`, and those this generation's rechecks measured; candidates with equal losses count as one
        point), ties to the lower id; none where none adds any. Chosen on the losses as they were before this
        generation's rechecks, re-estimated (`reestimated`: `reestimates(generation)`, the values; `losses_of`
        turns values into losses): a candidate this generation measured already (a resume after a crash) gets its
        re-estimate back, or the losses it was told before, so a resumed generation chooses what the
        uninterrupted one did."""
        due = [o for o in self.objectives if self.current.get(o.name) is not None and o.recheck_every > 0
               and generation % o.recheck_every == 0]
        if not due or not rows:
            return {}
        still = {cid: set(objs) for cid, objs in self.store.open_estimates(self.job).items()}
        losses = {r.id: r.losses for r in rows}
        by_id = {r.id: r for r in rows}
        for t in self.store.retold(self.job):
            c = t["candidate"]
            if t["generation"] == generation and t["objectives"] and c in by_id:  # measured by this very recheck
                back, values = (reestimated or {}).get(c, {}), by_id[c].values
                losses[c] = t["before"]  # as told, unless the re-estimate before the recheck moved it (`moves`)
                if losses_of is not None and values is not None and all(n in back for n in t["objectives"]):
                    again = list(losses_of({**values, **back}))
                    if t["before"] is not None and moves(again, t["before"]):
                        losses[c] = again
                still.setdefault(c, set()).update(t["objectives"])
        ids = [r.id for r in rows if losses[r.id] is not None]
        F = np.array([losses[c] for c in ids], dtype=float).reshape(len(ids), len(names))
        on = pareto_mask(F)
        front = [c for c, k in zip(ids, on) if k]
        # equal rows (two candidates estimated alike) share one point's volume; each would add nothing alone
        points, which = np.unique(F[on], axis=0, return_inverse=True)
        gain = dict(zip(front, contributions(points, ref)[np.ravel(which)]))
        older = {r.id for r in rows if r.generation < generation}
        chosen: dict[int, list[str]] = {}
        for o in due:
            pool = [(-gain[c], c) for c in front if c in older and o.name in still.get(c, ()) and gain[c] > 0]
            if pool:
                chosen.setdefault(min(pool)[1], []).append(o.name)
        return {cid: [n for n in names if n in objs] for cid, objs in sorted(chosen.items())}

    def _once(self, key: str, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.say(text)

    # ------------------------------------------------------------ after a candidate

    def finish(self, out: Outcome) -> Outcome:
        """Anchor-only objectives get their estimate as value (`estimated`); a fully scored candidate while a
        calibration is in force records what the estimator would have said (the measured error)."""
        if not out.ok:
            return out
        planned = self.anchored.get(out.cid, {})
        values, estimated = dict(out.values or {}), out.estimated
        for o in self.objectives:
            force = self.current.get(o.name)
            if force is None:
                continue
            its = out.items.get(o.name, {})
            missing = [i for i in force.anchor_ids if i not in its]
            if missing:
                return replace(out, values=None, reason=f"IRT: objective '{o.name}' has no result for anchor item(s) "
                               f"{missing[:3]}: the scorer did not score the items it was asked for")
            y = np.array([its[i] for i in force.anchor_ids], dtype=float)
            est = force.cal.estimate(y)
            if o.name in self.neighbours:  # measured candidates that answered the anchors alike were misjudged
                est = self.neighbours[o.name].correct(est, y)
            measured = None if o.name in planned else values[o.name]
            if o.name in planned:
                values[o.name], estimated = float(est.value), True
            self.store.save_estimate(self.job, out.cid, o.name, float(est.value), float(est.sd), est.estimator,
                                     float(y.mean()), len(its), len(force.item_ids), force.fit_generation, measured)
        return replace(out, values=values, estimated=estimated)


# A re-estimate (`IRTPolicy.reestimates`) that moves no loss by more than this (an accuracy's units: one item in 500)
# is not told: it would hardly reorder candidates, and telling every tiny move would add a `retold` row per
# estimated candidate and generation
REESTIMATE_MIN_MOVE = 0.002


def moves(new: list[float], old: list[float]) -> bool:
    """Whether a re-estimate's losses `new` differ from the told `old` enough to be told (REESTIMATE_MIN_MOVE)."""
    return bool(np.max(np.abs(np.asarray(new, dtype=float) - np.asarray(old, dtype=float))) > REESTIMATE_MIN_MOVE)


RECENT = 12  # the latest calibration candidates the printed error pools (candidates drift: older ones tell less)


def printed_error(cal: irt.Calibration, measured: list[float]) -> tuple[float, str]:
    """The error a search prints for an objective, and what it is measured on: the mean |error| over the fit's
    honest check (candidates held out of every choice of the fit) and the latest RECENT calibration candidates
    (each estimated by the calibration then in force, then scored in full), pooled. Never the in-fit
    cross-validation's: its held-out candidates had a say in the anchors."""
    recent = measured[-RECENT:]
    n = cal.honest_n if cal.honest_mae is not None else 0
    if n + len(recent) == 0:
        return cal.printed_error(), "in-fit cross-validation"
    total = (cal.honest_mae or 0.0) * n + float(np.sum(recent))
    basis = f"{n} candidates held out of the fit" + (f" and the latest {len(recent)} calibration candidates"
                                                        if recent else "")
    return total / (n + len(recent)), basis


def front_margin(front: np.ndarray, point: np.ndarray, k: int) -> float:
    """How far `point` (losses) lies beyond the front along objective k: the least loss on k among the front's
    points at least as good on every other objective, minus the point's (positive: the front would take it;
    infinite: no front point is as good elsewhere)."""
    if len(front) == 0:
        return float("inf")
    others = np.delete(np.arange(front.shape[1]), k)
    cover = np.all(front[:, others] <= point[others], axis=1)
    return float(np.min(front[cover, k]) - point[k]) if cover.any() else float("inf")


def overlapping(front: np.ndarray, candidates: list[tuple[int, np.ndarray, np.ndarray]], k: int,
                count: int) -> list[int]:
    """Of `candidates` (id, losses at the estimate, the same with objective k at its interval's better end), the up
    to `count` whose interval on k reaches beyond the front, the ones whose estimate lies farthest beyond it first
    (`front_margin`; ties by id)."""
    margins = [(-front_margin(front, point, k), cid) for cid, point, best in candidates
               if front_margin(front, best, k) > 0]
    return [cid for _, cid in sorted(margins)[:count]]


def anchor_counts(anchors: int, items: int, max_error: float | None) -> list[int]:
    """The anchor counts a fit tries, in order: the objective's own, then (with a max_error) doubling up to half the
    items; scoring more than half on every candidate would save less than it risks. The error compared with
    max_error is the printed one, which pools the latest calibration candidates' measured errors: a fit cannot
    talk its way under max_error on its own held-out check alone."""
    counts = [anchors]
    while max_error is not None and counts[-1] * 2 <= items // 2:
        counts.append(counts[-1] * 2)
    if max_error is not None and counts[-1] < items // 2:
        counts.append(items // 2)
    return counts


def calibration_choice(sds: list[float], count: int, seed: list[int]) -> list[int]:
    """Which of a generation's candidates (given their estimates' sds) are scored in full to calibrate: `count`
    of them, seeded."""
    rng = np.random.default_rng(seed)
    k = min(count, len(sds))
    return sorted(int(i) for i in rng.choice(len(sds), size=k, replace=False))


def irt_summary(store: "Store", job: str) -> dict[str, Any]:
    """For reports: per IRT objective, the last calibration, how many candidates were estimated, the error measured
    on calibration candidates, and the share of items scored."""
    out: dict[str, Any] = {}
    history = store.irt_history(job)
    if not history:
        return out
    ests = store.estimates(job)
    done = {r.id for r in store.candidates(job, status="done")}
    told = len(store.checkpoints(job))
    retold = [t for t in store.retold(job) if t["generation"] < told]  # in the search (the picks': at `told`)
    for name in sorted({h["objective"] for h in history}):
        fits = [h for h in history if h["objective"] == name]
        last = fits[-1]
        mine = [e for e in ests if e["objective"] == name]
        checks = [e for e in mine if e["measured"] is not None and e["scored"] == e["total"]]  # calibration
        picks = [e for e in mine if e["measured"] is not None and e["scored"] != e["total"]]  # confirmed later
        items = store.items_of(job, name)
        total = max((len(v) for v in items.values()), default=0)
        # a confirmed candidate was scored twice: its anchors, then every item (the store keeps the latter); one
        # confirmed on another objective only scored its anchors here again
        elsewhere = {e["candidate"] for e in ests if e["objective"] != name and e["measured"] is not None
                     and e["scored"] != e["total"]}
        scored = sum(len(v) for c, v in items.items() if c in done) + sum(e["scored"] or 0 for e in picks) + sum(
            e["scored"] or 0 for e in mine if e["measured"] is None and e["candidate"] in elsewhere
            and e["candidate"] in done)
        entry: dict[str, Any] = {
            "fits": [_fit_summary(h) for h in fits],
            "estimated": sum(1 for e in mine if e["measured"] is None),
            "calibration_checks": len(checks),
            "measured_mae": float(np.mean([abs(e["value"] - e["measured"]) for e in checks])) if checks else None,
            # |error| <= 2 sd on the calibration candidates (target: 90%), and how wide that interval is
            "within_2sd": float(np.mean([abs(e["value"] - e["measured"]) <= 2 * e["sd"] for e in checks]))
            if checks else None,
            "mean_2sd": float(np.mean([2 * e["sd"] for e in checks])) if checks else None,
            "printed_error": (last["data"] or {}).get("printed_error"),
            "printed_basis": (last["data"] or {}).get("printed_basis"),
            # confirmed: estimated, then measured because their interval overlapped the front (before the driver
            # was told) or as the front's picks after the search; chosen for high estimates, their error is larger
            "confirmed": len(picks),
            "confirmed_items": sum(total + (e["scored"] or 0) for e in picks),
            "confirmed_mae": float(np.mean([abs(e["value"] - e["measured"]) for e in picks])) if picks else None,
            # of those, told on their estimate and measured in a later generation (`rechecks`)
            "rechecked": sum(1 for t in retold if name in t["objectives"]),
            "items_per_candidate": total, "items_scored": scored, "items_full": total * len(done),
            "items_fraction": scored / (total * len(done)) if total and done else None,
        }
        if last["data"] is None:
            entry["fallback"] = last["note"]
        out[name] = entry
    return out


def _fit_summary(h: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"generation": h["generation"], "note": h["note"]}
    if h["data"]:
        cal = irt.Calibration.from_dict(h["data"]["calibration"])
        out.update(estimator=cal.estimator, cv_mae=cal.cv_mae, dims=cal.model.dims, anchors=len(cal.anchors.items),
                   anchor_method=cal.anchors.method, fitted_on=len(h["data"]["fitted_on"]))
    return out
