"""After an IRT-reduced search: score in full the front candidates a user is most likely to export, so that
the choice is made on measured values.

Why: estimates steer the search well (rank correlation ~0.9), but the single best estimate is biased upwards
(the winner's curse: the candidate with the largest positive error tends to top the front). The picks are the
front's best candidate per objective and its knee (what `evomerge export --best/--knee` selects); scoring them
on every fitness item costs a few evaluations and removes that bias. Confirming the whole front would be fairer
still but, measured on the demo, costs about a third of the budget: corrected values let other estimated
candidates in, round after round. Their anchor estimates stay in the `estimates` table with the measured value
beside them, which adds to the measured error reports publish. The test split is never used for this choice.

Runs after the budget is spent, on the job's runtime; repeats until the picks are measured. Deterministic: the
same archive gives the same result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from evomerge.search.recorder import Recorder


def picks(recorder: "Recorder") -> list[int]:
    """The front's best candidate per objective and its knee (ids, ascending)."""
    from evomerge.search.front import knee_index

    front = set(recorder.front_ids())
    rows = [r for r in recorder.store.candidates(recorder.job, status="done") if r.id in front]
    if not rows:
        return []
    F = np.array([r.losses for r in rows])
    chosen = {rows[int(np.argmin(F[:, k]))].id for k in range(F.shape[1])} | {rows[knee_index(F)].id}
    return sorted(chosen)


def confirm_front(recorder: "Recorder", max_rounds: int = 10) -> list[int]:
    """Score the estimated picks in full until the picks are all measured; returns the ids scored. Outcomes are
    recorded as the search records them (`Recorder.record`), measured (not estimated), and copied to the cached
    candidates that repeat their recipe."""
    ctx, store, job = recorder.ctx, recorder.store, recorder.job
    scored: list[int] = []
    names = [o.name for o in ctx.objectives.objectives]
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        chosen = set(picks(recorder))
        todo = [r for r in store.candidates(job, status="done") if r.id in chosen and r.estimated]
        if not todo:
            rounds -= 1
            break
        if rounds == 1:  # one line, not one per round: later rounds only follow picks the first round moved
            ctx.progress.line(f"confirming the front's picks (best per objective, knee): {len(todo)} estimated "
                              "candidate(s) scored on every fitness item")
        # every objective still estimated; a failure in full scoring is recorded so, and the candidate leaves the front
        scored += recorder.measure({r.id: names for r in todo})
    store.set_front(job, recorder.front_ids())
    if rounds > 1:
        ctx.progress.line(f"confirmed {len(scored)} candidate(s) in {rounds} rounds (each round's full scores moved "
                          "the front, and its new picks were estimates too)")
    chosen = set(picks(recorder))
    left = [r.id for r in store.candidates(job, status="done") if r.id in chosen and r.estimated]
    if left:  # the rounds ran out: what a user exports by --best or --knee may be an estimate, and must be told
        ctx.progress.line(f"warning: after {max_rounds} round(s) of confirmation the front's picks "
                          + ", ".join(f"#{c}" for c in left) + " are still estimated (each round's measured values "
                          "moved the front to new estimates); their values are marked ~, and `evomerge resume` "
                          "with a larger budget scores more candidates in full")
    return sorted(scored)
