"""What the parts of a search share: the job's store, spec, space, runtime, objectives and progress output
(`progress.Progress`).
IRT, the front's confirmation and the report take this, not the loop, so that none of them depends on how the
loop is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from evomerge.search.progress import Progress

if TYPE_CHECKING:
    from evomerge.fitness.objectives import ObjectiveSet
    from evomerge.runtime.base import Runtime
    from evomerge.search.spec import JobSpec
    from evomerge.spaces.presets import Space
    from evomerge.store import Store


@dataclass
class SearchContext:
    spec: "JobSpec"
    store: "Store"
    runtime: "Runtime"
    space: "Space"
    progress: Progress

    @property
    def job(self) -> str:
        return self.spec.name

    @property
    def objectives(self) -> "ObjectiveSet":
        return self.runtime.objectives
