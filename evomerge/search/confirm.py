"""After an IRT-reduced search: score in full the front candidates a user is most likely to export, so that
the choice is made on measured values.

Why: estimates steer the search well (rank correlation ~0.9), but the single best estimate is biased upwards
(the winner's curse: the candidate with the largest positive error tends to top the front). The picks are the
front's best candidate per objective and its knee (what `evomerge export --best/--knee` selects); each is scored on
every fitness item of the objectives that make it a pick: the best on an objective on that objective (its others
stay estimates, marked so), the knee on all of them. That removes the bias where the choice is made; with two
objectives a best-per-objective pick costs half the items it did when every pick was measured on everything (on the
IRT bench: 5-7% fewer items in all, the same hypervolume). Confirming the whole front would be fairer still but,
measured on the demo, costs about a third of the budget: corrected values let other estimated candidates in, round
after round. Their anchor estimates stay in the `estimates` table with the measured value beside them, which adds
to the measured error reports publish. The test split is never used for this choice.

Runs after the budget is spent, on the job's runtime; repeats until the picks are measured. Deterministic: the
same archive gives the same result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from evomerge.search.recorder import Recorder


def picks(recorder: "Recorder") -> dict[int, list[str]]:
    """The front's best candidate per objective and its knee: {id: the objectives that make it a pick} (ids
    ascending; objectives in the job's order). The knee is a pick by every objective."""
    from evomerge.search.front import knee_index

    names = [o.name for o in recorder.ctx.objectives.objectives]
    front = set(recorder.front_ids())
    rows = [r for r in recorder.store.candidates(recorder.job, status="done") if r.id in front]
    if not rows:
        return {}
    F = np.array([r.losses for r in rows])
    chosen: dict[int, set[str]] = {}
    for k, name in enumerate(names):
        chosen.setdefault(rows[int(np.argmin(F[:, k]))].id, set()).add(name)
    chosen.setdefault(rows[knee_index(F)].id, set()).update(names)
    return {cid: [n for n in names if n in objs] for cid, objs in sorted(chosen.items())}


def unmeasured(recorder: "Recorder") -> dict[int, list[str]]:
    """The picks' objectives that make them picks and are still estimates: {id: [objective, ...]}."""
    still = recorder.store.open_estimates(recorder.job)
    todo = {cid: [n for n in objs if n in still.get(cid, ())] for cid, objs in picks(recorder).items()}
    return {cid: objs for cid, objs in todo.items() if objs}


def confirm_front(recorder: "Recorder", max_rounds: int = 10) -> list[int]:
    """Score the picks' estimated objectives in full (`unmeasured`) until every pick is measured on the objectives
    that make it one; returns the ids scored. Outcomes are recorded as the search records them
    (`Recorder.measure`: the measured objectives beside their estimates, the others scored on their anchors again
    and left estimated), and copied to the cached candidates that repeat their recipe."""
    ctx, store, job = recorder.ctx, recorder.store, recorder.job
    scored: list[int] = []
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        todo = unmeasured(recorder)
        if not todo:
            rounds -= 1
            break
        if rounds == 1:  # one line, not one per round: later rounds only follow picks the first round moved
            ctx.progress.line(f"confirming the front's picks (best per objective, knee): {len(todo)} estimated "
                              "candidate(s) scored on every fitness item of the objectives that make them picks")
        # a failure in full scoring is recorded so, and the candidate leaves the front
        scored += recorder.measure(todo)
    store.set_front(job, recorder.front_ids())
    if rounds > 1:
        ctx.progress.line(f"confirmed {len(scored)} candidate(s) in {rounds} rounds (each round's full scores moved "
                          "the front, and its new picks were estimates too)")
    left = unmeasured(recorder)
    if left:  # the rounds ran out: what a user exports by --best or --knee may be an estimate, and must be told
        ctx.progress.line(f"warning: after {max_rounds} round(s) of confirmation the front's picks "
                          + ", ".join(f"#{c} ({'/'.join(objs)})" for c, objs in left.items()) + " are still "
                          "estimated (each round's measured values moved the front to new estimates); their values "
                          "are marked ~, and `evomerge resume` with a larger budget scores more candidates in full")
    return sorted(set(scored))
