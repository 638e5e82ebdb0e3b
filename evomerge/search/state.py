"""What a search carries between candidates and between runs: the checkpointed counters (`LoopState`, stored as
JSON after every tell), the failure counter, one ask's batch in flight, and the budget both loops spend.

Why JSON and no driver state: a store is a shared artefact, and unpickling one would run whatever its writer put
in it. The driver is rebuilt on resume by replaying the archive into a freshly seeded one (`resume.py`); all a
checkpoint adds to the candidates table is the counters and `asked`, the number of batches asked when this one was
told, which is the whole ask/tell interleaving (asks and tells each come in order).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from evomerge.search.spec import SearchStopped
from evomerge.store import CandidateRow

RECENT = 20  # failure reasons kept for the diagnosis


@dataclass
class FailureCount:
    """Candidates failed in a row and the last reasons. Walked in id order (`Recorder.tally`), so its value never
    depends on which candidate finished first."""

    failures_in_a_row: int = 0
    recent: list[str] = field(default_factory=list)

    def count(self, ok: bool, reason: str | None, limit: int, job: str, store_path: Any) -> None:
        """One verdict; raises SearchStopped at `limit` failures in a row."""
        if ok:
            self.failures_in_a_row, self.recent = 0, []
            return
        self.failures_in_a_row += 1
        self.recent = (self.recent + [reason or "?"])[-RECENT:]
        if self.failures_in_a_row >= limit:
            common, n = Counter(self.recent).most_common(1)[0]
            raise SearchStopped(
                f"job '{job}' stopped: {self.failures_in_a_row} candidates failed in a row (limit "
                f"driver.max_failures_in_a_row = {limit}). Most common reason ({n} of the last {len(self.recent)}): "
                f"{common}. Look at the failed candidates in {store_path}, fix the cause outside the spec (model "
                "files, task data, devices, memory: `evomerge resume` runs the spec stored with the job), then "
                "`evomerge resume` continues; a cause in the spec itself needs a new job.")

    def copy(self) -> "FailureCount":
        return FailureCount(self.failures_in_a_row, list(self.recent))


@dataclass
class LoopState:
    """Everything besides the candidates table that a resumed search needs; stored as JSON after every tell."""

    generation: int = 0  # generations (batches) told
    next_id: int = 0
    evaluations: int = 0  # candidates asked for so far
    failures: FailureCount = field(default_factory=FailureCount)  # at the told batch's last row
    elapsed: float = 0.0  # seconds spent searching (time budgets survive a resume)
    ref_point: list[float] | None = None  # hypervolume reference (losses): the worst of generation 0
    asked: int = 0  # batches asked when batch `generation - 1` was told; those beyond it were asked ahead

    @property
    def ahead(self) -> int:
        """Batches asked but not told at this checkpoint (steady mode)."""
        return max(self.asked - self.generation, 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LoopState":
        data = dict(data)
        failures = data.pop("failures", None) or {}
        return cls(failures=FailureCount(int(failures.get("failures_in_a_row", 0)),
                                         [str(r) for r in failures.get("recent", [])]),
                   generation=int(data["generation"]), next_id=int(data["next_id"]),
                   evaluations=int(data["evaluations"]), elapsed=float(data["elapsed"]),
                   ref_point=None if data.get("ref_point") is None else [float(v) for v in data["ref_point"]],
                   asked=int(data["asked"]))


@dataclass(frozen=True)
class Verdict:
    """What a finished candidate tells the failure counter. A cached candidate has none (it counts neither way)."""

    ok: bool
    reason: str | None = None


@dataclass
class Batch:
    """One ask's candidates (a generation) while they are evaluated. Outcomes land in any order; `verdicts`
    are walked in id order (`Recorder.tally`), so the failure counter never depends on which finished first."""

    generation: int
    X: np.ndarray
    rows: list[CandidateRow]
    results: dict[int, dict[str, float] | None] = field(default_factory=dict)  # None: failed
    verdicts: dict[int, Verdict | None] = field(default_factory=dict)  # None: cached
    counted: int = 0  # how many rows (from the first) the failure counter has walked
    counter: FailureCount | None = None  # the counter just after this batch's last row

    @property
    def complete(self) -> bool:
        return len(self.results) == len(self.rows)


@dataclass(frozen=True)
class Budget:
    """`driver.budget`: evaluations asked for and seconds spent. One rule for both loops: the generational loop
    stops asking generations, the steady loop batches, once it is spent. A clock budget is not repeatable."""

    max_evaluations: int | None = None
    max_seconds: float | None = None

    def spent(self, evaluations: int, elapsed: float) -> bool:
        if self.max_evaluations is not None and evaluations >= self.max_evaluations:
            return True
        return self.max_seconds is not None and elapsed >= self.max_seconds
