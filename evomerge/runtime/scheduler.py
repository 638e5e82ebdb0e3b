"""The Ray runtime: candidates go to worker actors as soon as one is free, outcomes come back as they finish.

The loop sees the same `submit` / `as_completed` / `close` as with `LocalRuntime`. Inside:
- one queue of candidates; every worker holds at most one in flight, so a worker that finishes gets the next
  queued candidate before its outcome is handed to the loop (a slow candidate never holds back the others, and
  nothing waits behind it on a busy worker);
- `ray.wait` over the in-flight calls and the starting workers, one event at a time;
- a worker that dies (killed, out of memory, node lost) is killed for good and replaced by a fresh actor; its
  candidate goes back to the front of the queue, up to `max_retries` times, then is recorded as failed with the
  reason. A candidate that raises is failed at once (deterministic: `run_one` turns it into a reason);
- every candidate has a deadline (`candidate_timeout` seconds; by default 10x the median of the first candidates'
  times, within [60 s, 4 h]): a worker past it is killed and replaced like a dead one, and the candidate, once out
  of retries, is failed as "timed out after N s" (a hung candidate never stalls the search);
- outcomes carry only what the scorer measured, so their content does not depend on which worker ran them or in
  which order they finished (the loop records them by candidate id).

For a loop without generation barriers (steady state), `next_outcome()` hands out one outcome at a time and
`free_workers()` says how many more candidates can start at once.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.runtime.base import Items, Outcome, OutcomeStream, ScorerFactory
from evomerge.runtime.cluster import Cluster, connect
from evomerge.runtime.stats import Activity, RuntimeStats, WorkerActivity, phase
from evomerge.runtime.worker import actor_class
from evomerge.errors import UserError

if TYPE_CHECKING:
    from evomerge.merge.api import AnyRecipe

STARTUP_FAILURES = 3  # workers in a row dying before they are ready: the cluster cannot host them, stop
# The default candidate deadline (`candidate_timeout=None`): none until AUTO_AFTER candidates have come back, then
# AUTO_FACTOR x their median time, at least AUTO_FLOOR and at most AUTO_CAP seconds.
AUTO_AFTER, AUTO_FACTOR, AUTO_FLOOR, AUTO_CAP = 5, 10.0, 60.0, 4 * 3600.0


class WorkerStartError(UserError, RuntimeError):
    """No worker can run: they die while starting, or the cluster lacks the resources they ask for."""


@dataclass
class _Task:
    cid: int
    recipe: AnyRecipe
    split: str | None
    items: Items | None
    deaths: list[str] = field(default_factory=list)  # why the workers that held it died


@dataclass
class _Slot:
    """A worker actor as the scheduler sees it."""

    name: str
    handle: Any
    state: str = "starting"  # starting | idle | busy | dead
    ref: Any = None  # the ready() call while starting, the evaluate() call while busy
    task: _Task | None = None
    sent: float = 0.0
    pid: int | None = None
    host: str | None = None
    where: str | None = None  # the name its outcomes carry: name@node
    busy: float = 0.0
    candidates: int = 0
    materialise: float | None = None  # its last outcome's materialise time (the live display's phase)
    started: float = field(default_factory=time.monotonic)  # when its actor was asked for (start_timeout counts)


class RayRuntime(OutcomeStream):
    """`workers` actors, each building its scorers with `scorer` (a picklable `ScorerFactory`) on `threads` CPU
    slots and `gpus` GPUs; a candidate whose worker dies is sent again up to `max_retries` times. Joins the Ray
    at `address` (else RAY_ADDRESS, else a private loopback Ray), or uses `cluster`. Raises the scorer's own error
    if the first worker cannot build it."""

    def __init__(self, scorer: ScorerFactory, workers: int = 1, threads: int = 1, gpus: float = 0,
                 max_retries: int = 2, address: str | None = None, cluster: Cluster | None = None,
                 dashboard: bool = False, start_timeout: float = 600.0, candidate_timeout: float | None = None):
        self._factory = scorer
        self.candidate_timeout = candidate_timeout  # None: derived from the times seen (see AUTO_*)
        self._times: dict[tuple, list[float]] = {}  # per kind of call (`_kind`): anchors-only and full differ
        self.workers = workers
        self.threads = threads
        self.max_retries = max_retries
        self.start_timeout = start_timeout
        self.cluster = cluster or connect(address, num_cpus=max(_cpus(), self.workers * threads), dashboard=dashboard)
        self._options = {"num_cpus": threads, "num_gpus": gpus, "scheduling_strategy": "SPREAD"}
        self._queue: deque[_Task] = deque()
        self._done: deque[Outcome] = deque()
        self._slots: list[_Slot] = []
        self._started = 0
        self._startup_failures = 0
        self._last_ready = time.monotonic()
        self._stats = RuntimeStats(self.workers)
        self._first_sent: float | None = None
        self._last_done = 0.0
        try:
            for _ in range(self.workers):
                self._start_worker()
            info = self._first_ready()
            self.objectives = info["objectives"]
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ the protocol

    def submit(self, cid: int, recipe: AnyRecipe, split: str | None = None, items: Items | None = None) -> None:
        self._queue.append(_Task(cid, recipe, split, items))
        self._dispatch()

    def next_outcome(self, timeout: float | None = None) -> Outcome | None:
        """The next finished outcome; None when nothing is queued or in flight, or after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            if not self._queue and not any(s.state == "busy" for s in self._slots):
                return None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._pump(left)
        return self._done.popleft()

    def free_workers(self) -> int:
        """Workers that would start a candidate now if one were submitted (for a steady-state loop)."""
        return max(sum(s.state == "idle" for s in self._slots) - len(self._queue), 0)

    def pending(self) -> int:
        """Candidates submitted whose outcome has not been handed out yet."""
        return len(self._queue) + sum(s.state == "busy" for s in self._slots) + len(self._done)

    def wait_ready(self, timeout: float | None = None) -> int:
        """Block until every worker has started (benchmarks measure from there); returns how many are ready."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while any(s.state == "starting" for s in self._slots) and time.monotonic() < deadline:
            self._pump(max(deadline - time.monotonic(), 0.0))
        return sum(s.state in ("idle", "busy") for s in self._slots)

    def stats(self) -> RuntimeStats:
        s = self._stats
        s.wall = max(self._last_done - self._first_sent, 0.0) if self._first_sent is not None else 0.0
        s.per_worker = {w.name: {"candidates": w.candidates, "busy": w.busy, "pid": w.pid or 0, "alive": w.state != "dead"}
                        for w in self._slots}
        return s

    def reset_stats(self) -> None:
        """Start a new measurement window (the workers' own counters keep running)."""
        self._stats = RuntimeStats(self.workers)
        self._first_sent = None
        for w in self._slots:
            w.busy, w.candidates = 0.0, 0

    def activity(self) -> Activity:
        """What each worker does now (the live display reads it from its own thread: lengths and copies only)."""
        now, out = time.perf_counter(), []
        for s in list(self._slots):
            task = s.task
            if s.state == "busy" and task is not None:
                out.append(WorkerActivity(s.name, phase(now - s.sent, s.materialise), task.cid, now - s.sent,
                                          s.candidates, len(task.deaths)))
            else:
                out.append(WorkerActivity(s.name, s.state, candidates=s.candidates))
        return Activity(out, len(self._queue))

    def worker_pids(self) -> dict[str, int]:
        """Live workers' process ids (a fault test kills one)."""
        return {s.name: s.pid for s in self._slots if s.pid is not None and s.state in ("idle", "busy")}

    def close(self) -> None:
        import ray

        live = [s for s in self._slots if s.state == "idle"]  # busy ones (Ctrl-C mid-candidate) are just killed
        if live and ray.is_initialized():
            try:  # let scorers release engines and devices; a worker that does not answer is killed anyway
                ray.wait([s.handle.close.remote() for s in live], num_returns=len(live), timeout=10)
            except Exception:  # noqa: BLE001
                pass
        for s in self._slots:
            self._kill(s)
        self._slots.clear()
        self.cluster.close()

    # ------------------------------------------------------------ workers

    def _start_worker(self) -> _Slot:
        name = f"ray-{self._started}"
        self._started += 1
        handle = actor_class().options(**self._options).remote(self._factory, self.threads, name)
        slot = _Slot(name, handle)
        slot.ref = handle.ready.remote()
        self._slots.append(slot)
        return slot

    def _first_ready(self) -> dict[str, Any]:
        """Wait for the first worker to be ready; its scorer's error, if any, is the job's error."""
        import ray

        deadline = time.monotonic() + self.start_timeout
        while True:
            starting = {s.ref: s for s in self._slots if s.state == "starting"}
            if not starting:
                raise WorkerStartError("no Ray worker could start (see the errors above)")
            ready, _ = ray.wait(list(starting), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                raise WorkerStartError(self._no_worker_message())
            slot = starting[ready[0]]
            info = self._started_event(slot)
            if info is not None:
                return info

    def _started_event(self, slot: _Slot) -> dict[str, Any] | None:
        """A worker's ready() came back: make it idle, or (died while starting) replace it."""
        import ray

        # Once a worker runs, a replacement that cannot start (the dead one's device memory not yet freed, a node
        # gone) costs a slot, not the search: it is retried up to STARTUP_FAILURES times in a row, then the search
        # goes on with the workers it has. Before that, the same failure is the job's error.
        alive = any(s.state in ("idle", "busy") for s in self._slots if s is not slot)
        try:
            info = ray.get(slot.ref)
            error: BaseException | None = info.get("error")
        except ray.exceptions.RayError as e:
            info, error = None, e
        if error is not None:
            if info is not None and not alive:  # the scorer cannot be built: the same on every worker, so stop
                raise error
            self._startup_failures += 1
            self._bury(slot, error)
            if self._startup_failures < STARTUP_FAILURES:
                self._start_worker()
            elif not alive:
                raise WorkerStartError(f"{STARTUP_FAILURES} Ray workers in a row died while starting; last: "
                                       f"{_short(error)}") from None
            else:
                print(f"warning: {STARTUP_FAILURES} replacement workers in a row could not start (last: "
                      f"{_short(error)}); the search goes on with {sum(s.state in ('idle', 'busy') for s in self._slots)}"
                      " worker(s)", file=sys.stderr)
            return None
        assert info is not None
        slot.state, slot.ref, slot.pid, slot.host = "idle", None, info["pid"], info["host"]
        slot.where = info["name"]
        self._startup_failures = 0
        self._last_ready = time.monotonic()
        return info

    def _bury(self, slot: _Slot, error: BaseException) -> None:
        slot.state, slot.ref = "dead", None
        self._stats.worker_deaths += 1
        self._kill(slot)

    @staticmethod
    def _kill(slot: _Slot) -> None:
        import ray

        try:
            if ray.is_initialized():
                ray.kill(slot.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _no_worker_message(self) -> str:
        try:
            have = self.cluster.resources()
        except Exception:  # noqa: BLE001
            have = {}
        want = {k: v for k, v in self._options.items() if k.startswith("num_") and v}
        return (f"no Ray worker became ready in {self.start_timeout:.0f} s; each needs {want}, the cluster has "
                f"{ {k: v for k, v in have.items() if k in ('CPU', 'GPU', 'memory')} }. Lower runtime.workers, "
                "runtime.threads or runtime.gpus, or add nodes")

    # ------------------------------------------------------------ scheduling

    def _dispatch(self) -> None:
        """Give queued candidates to idle workers, in queue order."""
        for slot in self._slots:
            if not self._queue:
                return
            if slot.state != "idle":
                continue
            task = self._queue.popleft()
            slot.state, slot.task, slot.sent = "busy", task, time.perf_counter()
            if self._first_sent is None:
                self._first_sent = slot.sent
            slot.ref = slot.handle.evaluate.remote(task.cid, task.recipe, task.split, task.items)

    def _pump(self, timeout: float | None) -> None:
        """Wait for one event (an outcome, a worker ready or dead), handle it, refill idle workers."""
        import ray

        watched = {s.ref: s for s in self._slots if s.state in ("starting", "busy")}
        if not watched:
            if self._queue:
                raise WorkerStartError("candidates are queued but no Ray worker is alive or starting")
            return
        wait = 5.0 if timeout is None else min(timeout, 5.0)
        now = time.perf_counter()
        for s in self._slots:
            limit = self.deadline(s.task) if s.state == "busy" else None
            if limit is not None:
                wait = min(wait, max(limit - (now - s.sent), 0.0) + 0.05)
        ready, _ = ray.wait(list(watched), num_returns=1, timeout=wait)
        if self._expire(ready):
            self._dispatch()
        if not ready:
            # no worker runs: each starting one has start_timeout from when it was asked for (a replacement of a
            # worker killed late in a search too, not from the last time one became ready)
            since = max([self._last_ready] + [s.started for s in self._slots if s.state == "starting"])
            running = any(s.state in ("idle", "busy") for s in self._slots)
            if not running and time.monotonic() - since > self.start_timeout:
                raise WorkerStartError(self._no_worker_message())
            return
        slot = watched[ready[0]]
        if slot.state == "starting":
            self._started_event(slot)
        else:
            self._finished(slot)
        self._dispatch()

    @staticmethod
    def _kind(task: _Task) -> tuple:
        """Calls that take alike long: one split, the same number of items (IRT anchors) or all of them."""
        return task.split, None if task.items is None else sum(len(v) for v in task.items.values())

    def deadline(self, task: _Task | None = None) -> float | None:
        """Seconds a candidate may take before its worker is killed: the given timeout, else derived from the
        median time of the calls of its kind seen so far (None until there are AUTO_AFTER of them: a first call
        on a new split, which builds that split's scorer, or a first full scoring among anchor-only ones, runs
        without one)."""
        if self.candidate_timeout is not None:
            return self.candidate_timeout
        seen = self._times.get(self._kind(task), []) if task is not None else []
        if len(seen) < AUTO_AFTER:
            return None
        median = sorted(seen)[len(seen) // 2]
        return min(max(AUTO_FACTOR * median, AUTO_FLOOR), AUTO_CAP)

    def _expire(self, ready: list[Any]) -> bool:
        """Kill and replace each worker whose candidate is past its deadline (the candidate retried, or failed);
        True when any was."""
        now, expired = time.perf_counter(), False
        for slot in [s for s in self._slots if s.state == "busy" and s.ref not in ready]:
            task = slot.task
            assert task is not None
            deadline = self.deadline(task)
            if deadline is None or now - slot.sent <= deadline:
                continue
            expired = True
            self._stats.lost += now - slot.sent
            self._bury(slot, TimeoutError())
            self._start_worker()
            task.deaths.append(f"timed out after {deadline:.0f} s")
            if len(task.deaths) > self.max_retries:
                self._deliver(Outcome(task.cid, task.split, worker=slot.where or slot.name, reason=(
                    f"timed out after {deadline:.0f} s, {len(task.deaths)} times (runtime.candidate_timeout; "
                    f"runtime.max_retries = {self.max_retries}): its worker was killed each time")),
                    slot, now - slot.sent, 0.0)
            else:
                self._stats.retried += 1
                self._queue.appendleft(task)
        return expired

    def _finished(self, slot: _Slot) -> None:
        import ray

        task, now = slot.task, time.perf_counter()
        assert task is not None
        span = now - slot.sent
        try:
            out: Outcome = ray.get(slot.ref)
            busy = out.seconds
        except ray.exceptions.RayTaskError as e:  # raised outside run_one (e.g. the recipe did not unpickle)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            out = Outcome(task.cid, task.split, reason=f"{type(cause).__name__}: {cause}", worker=slot.where or slot.name)
            busy = span  # the worker was held all along
        except ray.exceptions.RayError as e:  # the worker died: replace it, send the candidate again
            self._stats.lost += span
            self._bury(slot, e)
            self._start_worker()
            task.deaths.append(_short(e))
            if len(task.deaths) > self.max_retries:
                self._deliver(Outcome(task.cid, task.split, worker=slot.where or slot.name, reason=(
                    f"the worker died {len(task.deaths)} times while evaluating this candidate (runtime.max_retries = "
                    f"{self.max_retries}); last: {task.deaths[-1]}")), slot, span, 0.0)
            else:
                self._stats.retried += 1
                self._queue.appendleft(task)
            return
        slot.state, slot.task, slot.ref = "idle", None, None
        self._times.setdefault(self._kind(task), []).append(span)
        self._deliver(out, slot, span, busy)

    def _deliver(self, out: Outcome, slot: _Slot, span: float, busy: float) -> None:
        """Count the outcome (`busy`: the worker's time on it; materialising and scoring come with the outcome)."""
        s = self._stats
        s.candidates += 1
        s.failed += 0 if out.ok else 1
        s.busy += busy
        s.materialise += out.materialise_seconds
        s.score += out.score_seconds
        s.span += span
        slot.busy += busy
        slot.candidates += 1
        if out.ok:
            slot.materialise = out.materialise_seconds
        self._last_done = time.perf_counter()
        self._done.append(out)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _cpus() -> int:
    import os

    return os.cpu_count() or 1
