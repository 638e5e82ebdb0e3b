"""What the dashboard server keeps between requests: per job, every finished candidate decoded once, its point
encoded once, and the progress curve carried forward, so that a poll of a 10,000-candidate store while a search
writes costs a few cheap queries instead of decoding the whole table again.

Why a cache and not more SQL: the store is the search's, opened read-only (the dashboard adds no index, no table,
no write). A finished candidate's row never changes unless it is finished again (a resumed job re-evaluating a
failure gives it a new `finished` time), so `(finished, status)` per id tells exactly which rows to read again.

The cursor (`?since=`) names a refresh of one cache: an answer for a cursor holds only the points changed since
(and the ids that stopped being points); a cursor from another server, or an older cache, gets the full answer.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from evomerge.search.front import add_to_front, hypervolume
from evomerge.store import CandidateRow, Store

PROGRESS_POINTS = 300  # at most about this many samples of the progress curves per answer
FETCH_CHUNK = 500  # ids per `IN (...)` query
FINISHED = "('done', 'failed', 'cached')"  # a row in another status is in flight (or again: a retried failure)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ten times the pure-Python loader on recipes


def _finite(v: Any) -> Any:
    """JSON has no NaN/inf: send them as None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def clean(values: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if values is None else {k: _finite(v) for k, v in values.items()}


# ---------------------------------------------------------------- recipe summaries, per recipe hash

_SUMMARIES: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
_SUMMARY_LOCK = threading.Lock()


def summarise(text: str, recipe_hash: str, labels: dict[str, str]) -> str:
    """One line per recipe (`merge.api.describe`) with the job's model names: computed once per recipe hash and
    labels (a stored recipe never changes), with libyaml, so a cold 10,000-candidate job costs about a second."""
    key = (recipe_hash, tuple(sorted(labels.items())))
    line = _SUMMARIES.get(key)
    if line is not None:
        return line
    from evomerge.merge.api import describe, parse_any

    try:
        line = describe(parse_any(yaml.load(text, Loader=_LOADER), check_paths=False))
    except Exception as e:  # noqa: BLE001 - a summary must never break the page; say what happened instead
        line = f"(recipe not readable: {e})"
    else:
        for folder, name in labels.items():
            line = line.replace(f"{folder.rsplit('/', 1)[-1]} ", f"{name} ")
    with _SUMMARY_LOCK:
        _SUMMARIES[key] = line
    return line


# ---------------------------------------------------------------- one job

@dataclass
class Entry:
    """A finished candidate (done, failed or cached) as the dashboard shows it."""

    row: CandidateRow
    finished: float
    summary: str = ""
    estimates: dict[str, Any] = field(default_factory=dict)
    point: bytes | None = None  # its point on the front plot, JSON-encoded (done rows with values only)
    table: dict[str, Any] | None = None  # its row of the candidates table
    seq: int = 0  # the refresh that last changed it


@dataclass
class ProgressState:
    """The progress curves over the settled prefix of the done candidates (every id below it finished): later
    finishes only extend it, so each answer walks the unsettled tail alone."""

    ref: tuple[float, ...] | None = None
    step: int = 1  # the sampling step the samples were taken at
    upto: int = -1  # the last candidate id folded in
    count: int = 0  # done candidates folded in
    front: np.ndarray | None = None
    best: np.ndarray | None = None
    samples: list[tuple[int, int, float | None, list[float]]] = field(default_factory=list)  # (index, id, hv, best)


def sample_step(n: int) -> int:
    """Every step-th done candidate is sampled: the smallest power of two keeping n / step <= PROGRESS_POINTS, so
    that samples taken at a smaller step stay valid (a multiple of 2s is a multiple of s) as the job grows."""
    step = 1
    while math.ceil(n / step) > PROGRESS_POINTS:
        step *= 2
    return step


class JobCache:
    def __init__(self, store_path: str, job: str):
        self.store_path, self.job = store_path, job
        self.lock = threading.Lock()
        self.spec: Any = None  # its stored spec, parsed once (dashboard.data)
        self._reset()

    def _reset(self) -> None:
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.created: float | None = None  # the job's creation time: another job under the same name resets
        self.entries: dict[int, Entry] = {}
        self.newest = 0.0  # the latest finishing time among the entries
        self.total = 0.0  # the sum of the entries' finishing times (checked against the store's)
        self._done: list[CandidateRow] | None = None  # done rows with values, by id (rebuilt when entries change)
        self._gen0: list[CandidateRow] | None = None
        self.gone: dict[int, int] = {}  # ids that stopped being finished -> the refresh that saw it
        self.unfinished: list[dict[str, Any]] = []
        self.front: set[int] = set()
        self.tests: dict[int, dict[str, Any] | None] = {}
        self.estimate_sig: tuple | None = None
        self.estimate_map: dict[int, dict[str, dict[str, Any]]] | None = None
        self.progress_state = ProgressState()

    # ------------------------------------------------------------ refresh

    def refresh(self, store: Store, labels: dict[str, str], split: str, created: float,
                estimated_values: Any, estimates_by_candidate: Any) -> None:
        """Read what changed since the last refresh: finished rows new or finished again, the unfinished rows, the
        front, the test split's scores and the IRT estimates (when their table changed)."""
        if self.created is not None and self.created != created:
            self._reset()  # the job was replaced (another store under the same path)
        self.created = created
        seq = self.seq + 1
        changed: set[int] = set()
        before = set(self.entries)
        db = store.db
        # rows finished since the newest this cache holds (a row finished again gets a new time, so it is
        # among them); then the count and the sum of finishing times of every finished row, against the cache's
        # own: a mismatch (a clock set back, a row no longer finished) reads every row's stamp instead
        where = f"job=? AND status IN {FINISHED}"
        recent = {int(i): (f, st) for i, f, st in db.execute(
            f"SELECT id, finished, status FROM candidates WHERE {where} AND finished >= ?", (self.job, self.newest))}
        stale = [i for i, st in recent.items() if (e := self.entries.get(i)) is None or (e.finished, e.row.status) != st]
        self._fetch(store, stale, labels, seq, changed)
        count, total = db.execute(f"SELECT COUNT(*), TOTAL(finished) FROM candidates WHERE {where}",
                                  (self.job,)).fetchone()
        if count != len(self.entries) or not math.isclose(total, self.total, rel_tol=0.0, abs_tol=0.05):
            stamps = {int(i): (f, st) for i, f, st in db.execute(
                f"SELECT id, finished, status FROM candidates WHERE {where}", (self.job,))}
            for i in [i for i in self.entries if i not in stamps]:
                self.total -= self.entries.pop(i).finished
                self.gone[i] = seq
                changed.add(i)
            stale = [i for i, st in stamps.items() if (e := self.entries.get(i)) is None or (e.finished, e.row.status) != st]
            self._fetch(store, stale, labels, seq, changed)
        self.newest = max((e.finished for e in self.entries.values()), default=0.0) if changed else self.newest
        self.unfinished = [{"id": i, "generation": g, "origin": o, "status": st, "worker": w, "parents": p}
                           for i, g, o, st, w, p in db.execute(
            "SELECT id, generation, origin, status, worker, parents FROM candidates WHERE job=? AND status NOT IN "
            f"{FINISHED} ORDER BY id", (self.job,))]

        rows_changed = set(changed) | (before ^ set(self.entries))  # rows read again, added or gone (not flags)
        front = set(store.front(self.job))
        changed |= (front ^ self.front) & self.entries.keys()
        self.front = front
        tests = {int(s[len("candidate:"):]): v.get("values") for s, v in store.scores(self.job, split).items()
                 if s.startswith("candidate:") and s[len("candidate:"):].isdigit()}
        changed |= {i for i in tests.keys() | self.tests.keys() if tests.get(i) != self.tests.get(i)} & self.entries.keys()
        self.tests = tests

        sig = self._estimate_signature(db)
        if sig != self.estimate_sig or self.estimate_map is None and sig is not None:
            self.estimate_sig = sig
            self.estimate_map = estimates_by_candidate(store, self.job)
            recheck = self.entries.keys()
        else:
            recheck = changed
        for i in list(recheck):
            e = self.entries.get(i)
            if e is None:
                continue
            ests = estimated_values(e.row, self.estimate_map)
            if ests != e.estimates or i in changed:
                e.estimates = ests
                changed.add(i)
        for i in changed:
            e = self.entries.get(i)
            if e is not None:
                e.point = self._point(e, split)
                r = e.row
                e.table = {"id": r.id, "generation": r.generation, "origin": r.origin, "status": r.status,
                           "values": clean(r.values), "estimated": r.estimated, "estimates": e.estimates,
                           "reason": r.reason, "cached_from": r.cached_from, "worker": r.worker,
                           "front": r.id in self.front}
                e.seq = seq
        if changed:
            self.seq = seq
        if rows_changed:
            self._update_done(rows_changed)

    def _update_done(self, changed: set[int]) -> None:
        """Keep the done rows by id: appended to when only newer rows became done (the usual case while a search
        writes), rebuilt otherwise."""
        if any(self.entries[i].row.generation == 0 for i in changed if i in self.entries) or \
                any(i not in self.entries for i in changed):
            self._gen0 = None
        done = self._done
        if done is None:
            return
        last = done[-1].id if done else -1
        rows = {i: e.row for i in changed if (e := self.entries.get(i)) is not None}
        if all(i > last for i in changed):
            done += [rows[i] for i in sorted(rows) if rows[i].status == "done" and rows[i].losses is not None
                     and rows[i].values is not None]
        else:
            self._done = None

    def _fetch(self, store: Store, ids: list[int], labels: dict[str, str], seq: int, changed: set[int]) -> None:
        """Read these finished rows whole (all finished rows in one query when there are many)."""
        if not ids:
            return
        db, where = store.db, f"job=? AND status IN {FINISHED}"
        if len(ids) > FETCH_CHUNK:
            found = db.execute(f"SELECT {store._COLS}, finished FROM candidates WHERE {where}", (self.job,)).fetchall()
        else:
            found = db.execute(f"SELECT {store._COLS}, finished FROM candidates WHERE {where} AND id IN "
                               f"({','.join('?' * len(ids))})", (self.job, *ids)).fetchall()
        wanted = set(ids)
        for r in found:
            if int(r[0]) in wanted:
                row = store._row(r[:-1])
                old = self.entries.get(row.id)
                self.total += r[-1] - (old.finished if old else 0.0)
                self.entries[row.id] = Entry(row, r[-1], summarise(row.recipe, row.recipe_hash, labels))
                self.gone.pop(row.id, None)
                changed.add(row.id)

    def _estimate_signature(self, db: Any) -> tuple | None:
        try:
            return tuple(db.execute("SELECT COUNT(*), COUNT(measured), TOTAL(value) FROM estimates WHERE job=?",
                                    (self.job,)).fetchone())
        except sqlite3.OperationalError:  # a store without the estimates table
            return None

    def _point(self, e: Entry, split: str) -> bytes | None:
        r = e.row
        if r.status != "done" or r.values is None:
            return None
        return json.dumps({"id": r.id, "generation": r.generation, "origin": r.origin, "values": clean(r.values),
                           "estimated": r.estimated, "estimates": e.estimates, "front": r.id in self.front,
                           "parent": r.origin.startswith("parent:"), "summary": e.summary,
                           split: clean(self.tests.get(r.id))}, allow_nan=False).encode()

    # ------------------------------------------------------------ answers

    def generation0(self) -> list[CandidateRow]:
        """The finished rows of generation 0 (the parents are there)."""
        if self._gen0 is None:
            self._gen0 = [e.row for e in self.entries.values() if e.row.generation == 0]
        return self._gen0

    @property
    def cursor(self) -> str:
        return f"{self.epoch}-{self.seq}"

    def since(self, cursor: str | None) -> int | None:
        """The refresh a cursor names, or None when it is not one of this cache's (then: the full answer)."""
        if not cursor or "-" not in cursor:
            return None
        epoch, _, n = cursor.partition("-")
        if epoch != self.epoch or not n.isdigit() or int(n) > self.seq:
            return None
        return int(n)

    def points(self, after: int | None) -> tuple[list[bytes], list[int]]:
        """Encoded points changed after refresh `after` (all for None), and the ids that stopped being points."""
        pts, drop = [], []
        for i in sorted(self.entries):
            e = self.entries[i]
            if after is not None and e.seq <= after:
                continue
            if e.point is not None:
                pts.append(e.point)
            elif after is not None:
                drop.append(i)
        if after is not None:
            drop += [i for i, s in self.gone.items() if s > after]
        return pts, sorted(drop)

    def rows(self) -> list[dict[str, Any]]:
        """Every candidate as the table shows it (finished ones from the cache, the rest as just read)."""
        out = [self.entries[i].table for i in sorted(self.entries)]
        for u in self.unfinished:
            out.append({"id": u["id"], "generation": u["generation"], "origin": u["origin"], "status": u["status"],
                        "values": None, "estimated": False, "estimates": {}, "reason": None, "cached_from": None,
                        "worker": u["worker"], "front": False})
        out.sort(key=lambda c: c["id"])
        return out

    def progress(self, objs: list[dict[str, str]]) -> dict[str, Any]:
        """Hypervolume of the front so far and the best value per objective against the candidates asked for
        (`dashboard.data.progress` over every row, carried forward instead of recomputed: the same numbers)."""
        out: dict[str, Any] = {"evaluations": [], "hypervolume": [], "best": {o["name"]: [] for o in objs},
                               "reference": None}
        if self._done is None:
            self._done = [self.entries[i].row for i in sorted(self.entries)
                          if self.entries[i].row.status == "done" and self.entries[i].row.losses is not None
                          and self.entries[i].row.values is not None]
        done = self._done
        if not done or not objs:
            return out
        k = len(objs)
        gen0 = [r.losses[:k] for r in done if r.generation == 0]
        ref = np.max(np.array(gen0 or [r.losses[:k] for r in done], dtype=float), axis=0)
        st = self.progress_state
        first_unfinished = min((u["id"] for u in self.unfinished), default=None)
        settled = [r for r in done if first_unfinished is None or r.id < first_unfinished]
        step = sample_step(len(done))
        if st.ref != tuple(ref) or step < st.step or (
                st.count and (len(settled) < st.count or settled[st.count - 1].id != st.upto)):
            st = self.progress_state = ProgressState(ref=tuple(ref), front=np.empty((0, k)), best=np.full(k, np.inf))
        st.step = step

        def fold(rows, index, front, best, samples):
            for r in rows:
                loss = np.array(r.losses[:k], dtype=float)
                best = np.minimum(best, loss)
                front = add_to_front(front, loss)
                if index % step == 0 or index == len(done) - 1:
                    samples.append((index, r.id, _finite(hypervolume(front, ref)) if k > 1 else None, list(best)))
                index += 1
            return front, best

        # the settled prefix: folded into the state for good (its samples at this step or finer)
        st.front, st.best = fold(settled[st.count:], st.count, st.front, st.best, st.samples)
        if settled:
            st.count, st.upto = len(settled), settled[-1].id
        last = len(done) - 1
        kept = [s for s in st.samples if s[0] % step == 0 and s[0] < st.count]
        st.samples = kept[:]
        if st.count and st.count - 1 == last:
            samples = kept + ([] if last % step == 0 else [s for s in self._last_sample(settled, ref, k)])
        else:
            tail: list = []
            fold(done[st.count:], st.count, st.front.copy(), st.best.copy(), tail)
            samples = kept + tail
        for index, cid, hv, best in samples:
            out["evaluations"].append(cid + 1)
            out["hypervolume"].append(hv)
            for j, o in enumerate(objs):
                out["best"][o["name"]].append(_finite(float(-best[j] if o["direction"] == "maximise" else best[j])))
        out["reference"] = [float(v) for v in ref]
        return out

    def _last_sample(self, settled: list[CandidateRow], ref: np.ndarray, k: int) -> list:
        st = self.progress_state
        return [(st.count - 1, settled[-1].id, _finite(hypervolume(st.front, ref)) if k > 1 else None, list(st.best))]


class Cache:
    """The server's caches, one per job, created on first use."""

    def __init__(self, store_path: str):
        self.store_path = store_path
        self.jobs: dict[str, JobCache] = {}
        self.lock = threading.Lock()

    def job(self, name: str) -> JobCache:
        with self.lock:
            if name not in self.jobs:
                self.jobs[name] = JobCache(self.store_path, name)
            return self.jobs[name]
