"""What a running search shows: a live display on a terminal, plain lines everywhere else.

Why two forms: at 7B a generation takes hours, so a terminal user needs to see inside it (candidates done, in
flight and queued against the budget, what each worker does, throughput, ETA, the best values and the
hypervolume) while it runs; a log (CI, a Ray job's driver log, a pipe) needs lines that make sense read later, one
per event worth keeping and never the same line twice in a row.

Who tells what: the search's `Recorder` pushes a `Status` (counts from the store, best values and hypervolume
from its running front) after every submitted batch and every recorded outcome; the runtime is pulled for its
`Activity` (workers and queue) when the display redraws, from rich's refresh thread, so a worker's seconds
move while a long candidate runs. The display never reads the store itself: SQLite connections stay on the
search's thread.

On a terminal (`live`): a rich `Live` panel; `line` prints above it (generation summaries and notes stay in the
scrollback), `candidate` updates the panel's last line. Plain: `line` writes a line (an identical line right
after itself is dropped), `candidate` writes nothing, and a status line is written at most every `every`
seconds (default 60) when an outcome lands: one per candidate with `every=0`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, TextIO

EVERY = 60.0  # plain output: seconds between status lines (generation lines and notes come whenever they happen)


@dataclass(frozen=True)
class Best:
    objective: str
    direction: str  # maximise | minimise
    value: float
    estimated: bool = False  # IRT: the value is an estimate from anchor items


@dataclass(frozen=True)
class Status:
    """Where the search stands, as its thread knows it (the display adds the runtime's activity and the clock)."""

    job: str
    generation: int  # the generation (batch) asked last
    asked: int  # candidates asked so far (stored rows)
    done: int = 0
    cached: int = 0
    failed: int = 0
    budget: int | None = None  # driver.budget.evaluations
    seconds_budget: float | None = None  # driver.budget.seconds
    elapsed_before: float = 0.0  # seconds searched by earlier runs of this job (a resume)
    best: tuple[Best, ...] = ()
    hypervolume: float | None = None  # of the running front, against the checkpointed reference (None before it)
    front: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.cached + self.failed


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min: what a person reads at a glance."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass
class Rate:
    """Candidates finished per second in this run (a resume measures its own), and the ETA it gives."""

    start: float | None = None
    finished0: int = 0

    def seen(self, status: Status, now: float) -> None:
        if self.start is None:
            self.start, self.finished0 = now, status.finished

    def per_minute(self, status: Status, now: float) -> float | None:
        if self.start is None or now <= self.start or status.finished <= self.finished0:
            return None
        return 60.0 * (status.finished - self.finished0) / (now - self.start)

    def eta(self, status: Status, now: float) -> float | None:
        """Seconds to the end of the budget: the candidates left at the measured rate, or the clock budget left,
        whichever ends first. None before one candidate has finished in this run, or without a budget."""
        rate = self.per_minute(status, now)
        left: list[float] = []
        if status.budget is not None and rate:
            left.append(max(status.budget - status.finished, 0) / (rate / 60.0))
        if status.seconds_budget is not None and self.start is not None:
            left.append(max(status.seconds_budget - status.elapsed_before - (now - self.start), 0.0))
        return min(left) if left else None


class Progress:
    """The search's output. `Progress(stream, live=False)` writes plain lines only (what tests and logs use);
    `live=None` chooses a live display when `stream` is a terminal (and rich is importable, and TERM is not
    `dumb`). `every`: seconds between plain status lines (0: one per outcome)."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, every: float = EVERY):
        self.stream = stream or sys.stderr
        if live is None:
            live = _is_terminal(self.stream) and os.environ.get("TERM", "") != "dumb" and _has_rich()
        self.live = bool(live) and _has_rich()
        self.every = every
        self.runtime: Any = None  # has `activity()` (LocalRuntime, RayRuntime); read at redraw
        self.status_now: Status | None = None
        self.phase_now = "searching"
        self.last_candidate = ""
        self.rate = Rate()
        self._last_line: str | None = None
        self._last_plain = float("-inf")
        self._depth = 0
        self._live: Any = None  # rich.live.Live while active
        self._drawn = float("-inf")  # when the search's thread last redrew (rich's thread redraws twice a second)

    # ------------------------------------------------------------ what the search calls

    def line(self, text: str) -> None:
        """A line worth keeping (a generation's summary, a note). The same line twice in a row is written once."""
        if text == self._last_line:
            return
        self._last_line = text
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, emoji=False)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def candidate(self, text: str) -> None:
        """An outcome landed (`text` says which and its values): the live panel's last line."""
        self.last_candidate = text
        self._refresh()

    def status(self, status: Status) -> None:
        """The search's counts after a batch was submitted or an outcome recorded."""
        now = time.monotonic()
        self.rate.seen(status, now)
        landed = self.status_now is not None and status.finished > self.status_now.finished
        self.status_now = status
        if self._live is not None:
            self._refresh()
        elif landed and now - self._last_plain >= self.every:
            self._last_plain = now
            self.line(self.plain(now))

    def phase(self, text: str) -> None:
        """What the search does now: searching, confirming the front's picks, scoring the report split."""
        self.phase_now = text
        self._refresh()

    def watch(self, runtime: Any) -> None:
        """The runtime whose workers the display shows (needs `activity()`; others show no worker rows)."""
        self.runtime = runtime

    @contextlib.contextmanager
    def active(self) -> Iterator["Progress"]:
        """The live display is up inside this block (re-entrant: the search, then confirmation and the report,
        share one display); plain output needs nothing."""
        if self.live and self._depth == 0:
            self._start()
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0 and self._live is not None:
                live, self._live = self._live, None
                live.stop()

    # ------------------------------------------------------------ what is shown

    def activity(self) -> Any:
        get = getattr(self.runtime, "activity", None)
        if get is None:
            return None
        try:
            return get()
        except Exception:  # noqa: BLE001 - a display never stops a search
            return None

    def plain(self, now: float | None = None) -> str:
        """One status line: counts against the budget, in flight and queued, throughput, ETA, best, hypervolume."""
        s, now = self.status_now, time.monotonic() if now is None else now
        if s is None:
            return f"{self.phase_now}"
        act = self.activity()
        parts = [f"{s.finished}{f'/{s.budget}' if s.budget else ''} candidates finished ({s.done} evaluated, "
                 f"{s.cached} cached, {s.failed} failed)"]
        if act is not None:
            parts[0] += f", {act.in_flight} in flight, {act.queued} queued"
        rate, eta = self.rate.per_minute(s, now), self.rate.eta(s, now)
        parts.append(f"{rate:.1f}/min" if rate is not None else "-/min")
        parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA -")
        parts.append("best " + (", ".join(_best(b) for b in s.best) or "-"))
        if s.hypervolume is not None:
            parts.append(f"hypervolume {s.hypervolume:.4g}")
        return f"{s.job}: " + " | ".join(parts)

    def render(self) -> Any:
        """The live panel (rich renderables); called by rich's refresh thread, reads only memory."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        s, now = self.status_now, time.monotonic()
        act = self.activity()
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        title = Text(f"evomerge · job {s.job} · generation {s.generation} · {self.phase_now}" if s
                     else f"evomerge · {self.phase_now}", style="bold")
        if s is not None:
            bar = Table.grid(padding=(0, 1))
            bar.add_row(ProgressBar(total=float(s.budget or max(s.asked, 1)), completed=float(s.finished), width=30),
                        Text(f"{s.finished}/{s.budget if s.budget else '-'} done"))
            grid.add_row("candidates", bar)
            flight = f" · in flight {act.in_flight} · queued {act.queued}" if act is not None else ""
            grid.add_row("", Text(f"evaluated {s.done} · cached {s.cached} · failed {s.failed}{flight}"))
            rate, eta = self.rate.per_minute(s, now), self.rate.eta(s, now)
            elapsed = now - self.rate.start if self.rate.start is not None else 0.0
            grid.add_row("throughput", Text(f"{rate:.1f}/min" if rate is not None else "-/min"))
            grid.add_row("ETA", Text(f"{duration(eta) if eta is not None else '-'} (elapsed {duration(elapsed)})"))
            best = " · ".join(_best(b) for b in s.best) or "-"
            hv = f"hypervolume {s.hypervolume:.4g}" if s.hypervolume is not None else "hypervolume - (after generation 0)"
            grid.add_row("best", Text(best))
            grid.add_row("front", Text(f"{s.front} candidate(s) · {hv}"))
        if act is not None:
            shown = _shown(act.workers)
            for i, w in enumerate(shown):
                grid.add_row("workers" if i == 0 else "", Text(_worker(w)))
            if len(shown) < len(act.workers):
                grid.add_row("", Text(f"(and {len(act.workers) - len(shown)} earlier dead worker(s), replaced)"))
        if self.last_candidate:
            grid.add_row("last", Text(self.last_candidate))
        return Group(title, grid)

    # ------------------------------------------------------------ rich

    def _start(self) -> None:
        from rich.console import Console
        from rich.live import Live

        # Other output to the same terminal goes above the panel (rich's proxies); stdout only when it is a
        # terminal too: `evomerge run job.yaml > log` keeps its stdout in the file.
        console = Console(file=self.stream, force_terminal=True, highlight=False)
        self._live = Live(console=console, get_renderable=self.render, refresh_per_second=2, transient=False,
                          redirect_stdout=self.stream in (sys.stderr, sys.stdout) and _is_terminal(sys.stdout),
                          redirect_stderr=self.stream is sys.stderr)
        self._live.start()

    def _refresh(self) -> None:
        """Redraw now, at most ten times a second (toy candidates land far faster than a terminal needs)."""
        now = time.monotonic()
        if self._live is not None and now - self._drawn >= 0.1:
            self._drawn = now
            self._live.refresh()


def _best(b: Best) -> str:
    arrow = "max" if b.direction == "maximise" else "min"
    return f"{b.objective} {'~' if b.estimated else ''}{b.value:.4g} ({arrow})"


def _worker(w: Any) -> str:
    if w.cid is None:
        return f"{w.name:<10} {w.state:<13} ({w.candidates} scored)"
    retry = f", retry {w.retry}" if w.retry else ""
    return f"{w.name:<10} {w.state:<13} #{w.cid} for {duration(w.seconds)}{retry} ({w.candidates} scored)"


def _shown(workers: list[Any], dead: int = 3) -> list[Any]:
    """Live workers, then the last few dead ones (replacements accumulate over a long search)."""
    alive = [w for w in workers if w.state != "dead"]
    gone = [w for w in workers if w.state == "dead"]
    return alive + gone[-dead:]


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _has_rich() -> bool:
    import importlib.util

    return importlib.util.find_spec("rich") is not None


__all__ = ["Best", "Progress", "Rate", "Status", "duration"]
