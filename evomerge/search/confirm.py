"""After an IRT-reduced search: choose the front's picks on cautious values and score in full those still
estimated, so that what a user exports is chosen and shown on measured values.

Why: estimates steer the search well (rank correlation ~0.9), but the single best estimate is biased upwards
(the winner's curse: the candidate with the largest positive error tends to top the front). The picks are the best
candidate per objective and the front's knee (what `evomerge export --best/--knee` and the report select, all
through `choose`). They are chosen on cautious losses: a value still an estimate counts at the worse end of its
2-sd interval (the interval the calibration sizes to cover at least 90% of errors), a measured value as it is. So
an estimate becomes a pick only where it beats the measured candidates even at its worse end; measuring it then
rarely moves the picks again. Choosing on point estimates instead made the confirmation a chase: each measured pick
came out lower than its estimate, the next-best estimate took its place, and on the IRT bench 5 of 6 searches still
ended with estimated picks after 10 rounds.

Each pick is scored on every fitness item of the objectives that make it a pick: the best on an objective on that
objective (its others stay estimates, marked so), the knee on all of them. Confirming the whole front would be
fairer still but, measured on the demo, costs about a third of the budget. The picks' anchor estimates stay in the
`estimates` table with the measured value beside them, which adds to the measured error reports publish. The test
split is never used for this choice.

Runs after the budget is spent, on the job's runtime; repeats until the picks are measured. Deterministic: the
same archive gives the same result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from evomerge.search.front import knee_index

if TYPE_CHECKING:
    from evomerge.search.recorder import Recorder
    from evomerge.store import CandidateRow, Store


CAUTION_SDS = 2.0  # an estimate counts at value -/+ 2 sd when picks are chosen (the interval calibrated to 90%)


@dataclass(frozen=True)
class Picks:
    """The candidates a user is pointed to: the best per objective (objective name -> id) and the front's knee."""

    best: dict[str, int]
    knee: int | None

    def by_candidate(self, names: Sequence[str]) -> dict[int, list[str]]:
        """{id: the objectives that make it a pick} (ids ascending; objectives in `names`' order). The knee is a
        pick by every objective."""
        chosen: dict[int, set[str]] = {}
        for name, cid in self.best.items():
            chosen.setdefault(cid, set()).add(name)
        if self.knee is not None:
            chosen.setdefault(self.knee, set()).update(names)
        return {cid: [n for n in names if n in objs] for cid, objs in sorted(chosen.items())}


def cautious_losses(store: "Store", job: str, rows: Sequence["CandidateRow"], names: Sequence[str]) -> np.ndarray:
    """The rows' losses (objectives in `names`' order) with every value still an estimate moved to the worse end of
    its interval: loss + CAUTION_SDS * sd (a loss is the value or its negative, so this is the worse end whichever
    the direction). Measured values are kept as they are."""
    sds = {(e["candidate"], e["objective"]): e["sd"] for e in store.estimates(job) if e["measured"] is None}
    F = np.array([r.losses for r in rows], dtype=float).reshape(len(rows), len(names))
    for i, r in enumerate(rows):
        for k, name in enumerate(names):
            sd = sds.get((r.id, name))
            if sd is not None:
                F[i, k] += CAUTION_SDS * float(sd)
    return F


def choose(store: "Store", job: str, names: Sequence[str], front: Iterable[int]) -> Picks:
    """The picks by cautious losses (`cautious_losses`): best per objective over every done candidate (lowest id on
    ties), knee (`knee_index`) over the done candidates of `front`. The one rule `confirm_front`, `evomerge export
    --best/--knee` and the report share."""
    done = [r for r in store.candidates(job, status="done") if r.losses is not None]
    if not done:
        return Picks({}, None)
    F = cautious_losses(store, job, done, names)
    best = {name: done[min(range(len(done)), key=lambda i: (F[i, k], done[i].id))].id for k, name in enumerate(names)}
    on_front = set(front)
    idx = [i for i, r in enumerate(done) if r.id in on_front]
    knee = done[idx[knee_index(F[idx])]].id if idx else None
    return Picks(best, knee)


def picks(recorder: "Recorder") -> dict[int, list[str]]:
    """The running search's picks (`choose` over its current front): {id: the objectives that make it a pick}."""
    names = [o.name for o in recorder.ctx.objectives.objectives]
    return choose(recorder.store, recorder.job, names, recorder.front_ids()).by_candidate(names)


def unmeasured(recorder: "Recorder") -> dict[int, list[str]]:
    """The picks' objectives that make them picks and are still estimates: {id: [objective, ...]}."""
    still = recorder.store.open_estimates(recorder.job)
    todo = {cid: [n for n in objs if n in still.get(cid, ())] for cid, objs in picks(recorder).items()}
    return {cid: objs for cid, objs in todo.items() if objs}


def confirm_front(recorder: "Recorder", told: int, max_rounds: int = 10) -> list[int]:
    """Score the picks' estimated objectives in full (`unmeasured`) until every pick is measured on the objectives
    that make it one; returns the ids scored. Outcomes are recorded as the search records them
    (`Recorder.measure`: the measured objectives beside their estimates, the others scored on their anchors again
    and left estimated; retold at `told`, the generations told, so a resumed search tells the driver their
    measured losses before its next tell), and copied to the cached candidates that repeat their recipe."""
    ctx, store, job = recorder.ctx, recorder.store, recorder.job
    scored: list[int] = []
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        todo = unmeasured(recorder)
        if not todo:
            rounds -= 1
            break
        if rounds == 1:  # one line, not one per round: later rounds only follow picks the first round moved
            ctx.progress.line(f"confirming the front's picks (best per objective, knee; an estimate counts at the "
                              f"worse end of its {CAUTION_SDS:g}-sd interval): {len(todo)} estimated candidate(s) "
                              "scored on every fitness item of the objectives that make them picks")
        # a failure in full scoring is recorded so, and the candidate leaves the front
        scored += recorder.measure(todo, told)
    store.set_front(job, recorder.front_ids())
    if rounds > 1:
        ctx.progress.line(f"confirmed {len(scored)} candidate(s) in {rounds} rounds (each round's full scores moved "
                          "the front, and its new picks were estimates too)")
    left = unmeasured(recorder)
    if left:  # the rounds ran out: what a user exports by --best or --knee may be an estimate, and must be told
        ctx.progress.line(f"warning: after {max_rounds} round(s) of confirmation the front's picks "
                          + ", ".join(f"#{c} ({'/'.join(objs)})" for c, objs in left.items()) + " are still "
                          "estimated (each round's measured values moved the front to new estimates); their values "
                          f"are marked ~, and `evomerge resume` runs up to {max_rounds} more rounds")
    return sorted(set(scored))
