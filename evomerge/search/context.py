"""What the parts of a search share: the job's store, spec, space, runtime, objectives and progress output.
IRT, the front's confirmation and the report take this, not the loop, so that none of them depends on how the
loop is built."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from evomerge.fitness.objectives import ObjectiveSet
    from evomerge.runtime.base import Runtime
    from evomerge.search.spec import JobSpec
    from evomerge.spaces.presets import Space
    from evomerge.store import Store


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
