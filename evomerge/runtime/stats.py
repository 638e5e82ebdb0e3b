"""Where the workers' time went: utilisation and orchestration overhead, measured while a search runs.

Definitions (the README's "Running on Ray" uses the same words):
- wall: from the first candidate sent to the last outcome received;
- busy: time the workers spent inside their `evaluate` calls; `utilisation = busy / (workers x wall)` (so idle
  time at generation barriers, while the driver asks and tells, and while a dead worker is replaced, counts);
- span: per candidate, from being sent to a worker to its outcome being back in the driver; `overhead` is the
  part of the spans spent neither materialising nor scoring (serialisation, scheduling, transfer, driver
  bookkeeping), as a fraction of all spans.

`Activity` is the other view, of now rather than of the window: what each worker is doing, for the live display.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RuntimeStats:
    workers: int
    candidates: int = 0
    failed: int = 0
    retried: int = 0  # candidates sent again because their worker died
    worker_deaths: int = 0
    wall: float = 0.0
    busy: float = 0.0
    materialise: float = 0.0
    score: float = 0.0
    span: float = 0.0
    lost: float = 0.0  # seconds of work lost with workers that died
    per_worker: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def utilisation(self) -> float:
        return self.busy / (self.workers * self.wall) if self.wall > 0 and self.workers else 0.0

    @property
    def overhead(self) -> float:
        return max(self.span - self.materialise - self.score, 0.0) / self.span if self.span > 0 else 0.0

    @property
    def per_minute(self) -> float:
        return 60.0 * self.candidates / self.wall if self.wall > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.candidates} candidates on {self.workers} workers in {self.wall:.1f} s "
                f"({self.per_minute:.1f}/min): utilisation {100 * self.utilisation:.1f}%, orchestration overhead "
                f"{100 * self.overhead:.2f}% of candidate time; {self.failed} failed, {self.worker_deaths} worker "
                f"deaths, {self.retried} retried")

    def to_dict(self) -> dict[str, object]:
        return {"workers": self.workers, "candidates": self.candidates, "failed": self.failed, "retried": self.retried,
                "worker_deaths": self.worker_deaths, "wall": self.wall, "busy": self.busy,
                "materialise": self.materialise, "score": self.score, "span": self.span, "lost": self.lost,
                "utilisation": self.utilisation, "overhead": self.overhead, "per_minute": self.per_minute,
                "per_worker": self.per_worker}


@dataclass(frozen=True)
class WorkerActivity:
    """One worker right now. `state`: starting | idle | materialising | scoring | busy | dead. A worker is not asked
    mid-candidate (it runs one call at a time), so materialising vs scoring is inferred: a candidate younger than
    the worker's last measured materialise time is materialising, an older one scoring; `busy` until it has one."""

    name: str
    state: str
    cid: int | None = None  # the candidate (or report subject) in flight
    seconds: float = 0.0  # since it was sent
    candidates: int = 0  # outcomes this worker delivered
    retry: int = 0  # earlier attempts at the candidate in flight (its worker died or timed out)


@dataclass(frozen=True)
class Activity:
    workers: list[WorkerActivity]
    queued: int  # submitted, not yet sent to a worker

    @property
    def in_flight(self) -> int:
        return sum(w.state in ("materialising", "scoring", "busy") for w in self.workers)


def phase(seconds: float, materialise: float | None) -> str:
    """Materialising or scoring, from the time since the candidate was sent and the last materialise time."""
    if materialise is None:
        return "busy"
    return "materialising" if seconds < materialise else "scoring"
