"""The archive: one SQLite file (WAL mode) holding jobs, every candidate, the front and optimiser checkpoints.

Why SQLite in WAL mode: one writer (the search loop) and any number of readers (a progress view, a dashboard,
`evomerge status`) at the same time, in one file a user can copy, with transactions that make a checkpoint and
the candidates it covers appear together.

Tables (schema version in `meta`):
- `jobs`: name, spec (JSON), status (running | done | stopped | interrupted), reason, seed, timestamps; (schema 3)
  the objectives with their resolved directions (JSON list of [name, direction]) and the spec as YAML text.
- `candidates`: one row per genome asked for, keyed (job, number). Genome, recipe (YAML) and its hash, origin
  (seed:parent:X, seed:average, driver), generation and index in it, parent lineage, status (pending | running |
  done | failed | cached), failure reason, objective values (as measured) and losses (what the driver saw),
  `estimated` (0: measured on every item, 1: estimated from a subset), worker, timings, cached_from.
- `items`: per-item results of a candidate, one JSON object per (candidate, objective).
- `front`: the candidates on the current Pareto front, rewritten after every generation.
- `checkpoints` (schema 3): the search's state after each told generation, as JSON (counters and how many batches
  were asked by then; the driver is rebuilt by replaying the archive). Never a pickle: a store is shared, and
  unpickling runs code. Rows upgraded from schema 2 have no state (their pickles are dropped unread).
- `scores`: extra evaluations on other splits (the report's test split) for candidates and parents.
- `irt` (schema 2): per job, objective and generation, the IRT calibration fitted then (item parameters, anchors,
  estimator, cross-validated error) or the reason IRT could not help (then the objective was scored in full).
- `retold` (schema 5): a told candidate measured later (IRT rechecks of the front's estimates, the picks'
  confirmation): the generation before whose tell the driver was told its new losses, the objectives measured, the
  losses before and after. `candidates.losses` holds the latest; the replay on resume tells `before` at the
  candidate's own generation.
- `estimates` (schema 2): per candidate and objective scored on anchors, the estimate, its uncertainty, the
  estimator, the anchors' plain mean and how many items were scored; for candidates scored in full while IRT was
  on (calibration), what the estimator would have said beside the measured value (the published error).
"""

from __future__ import annotations

import json
import math
import os
import urllib.parse
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from evomerge.errors import UserError
from evomerge.store import holder
from evomerge.store.schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION

# Filesystems where SQLite's WAL mode is unsafe (its index lives in shared memory on one host; locks over these
# are unreliable or absent): a store written there can be corrupted by a second host's reader or writer.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "lustre", "gpfs", "ceph",
                       "glusterfs", "fuse.glusterfs", "beegfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "efs")
ALLOW_NETWORK_STORE = "EVOMERGE_ALLOW_NETWORK_STORE"  # =1: write anyway, in rollback-journal mode, one host only


def filesystem_of(path: Path, mounts: str | None = None) -> str | None:
    """The filesystem type holding `path`, from /proc/mounts (`mounts`: its text; read when None); None where
    there is no mount table (not Linux)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = str(Path(path).absolute().resolve())
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def network_filesystem(path: Path, mounts: str | None = None) -> str | None:
    """The network filesystem type holding `path`'s folder, or None for a local one."""
    kind = filesystem_of(path.parent if not path.exists() else path, mounts)
    return kind if kind is not None and kind.lower() in NETWORK_FILESYSTEMS else None


class StoreError(UserError, RuntimeError):
    """The store cannot be opened or used as asked: says why and what to do."""


def _damaged(path: Path, e: sqlite3.DatabaseError) -> Exception:
    """A damaged file (a corrupt page, a truncated copy) as a StoreError naming it; other SQLite errors unchanged."""
    text = str(e)
    if "disk is full" in text:
        return StoreError(f"{path}: the disk holding the store is full (SQLite says: {text}); free space there, then "
                          "`evomerge resume` continues from the last checkpoint (nothing stored before it is lost)")
    if "disk I/O error" in text:
        return StoreError(f"{path}: the store could not be written (SQLite says: {text}): is its disk full, over a "
                          "quota or a file-size limit, or failing? Fix that, then `evomerge resume` continues from the "
                          "last checkpoint")
    if "malformed" in text or "disk image" in text:  # ("file is not a database": not ours, said on open)
        return StoreError(f"{path}: the store is damaged (SQLite says: {text}); restore it from a copy, or salvage "
                          f"what is readable with `sqlite3 {path} .recover | sqlite3 recovered.sqlite`")
    return e


class _Guarded:
    """A SQLite connection (or cursor) whose damaged-file errors, at execute time or while rows are read, are
    StoreErrors naming the store: a corrupt page deep in a big store is found only when a query reaches it."""

    def __init__(self, inner: Any, path: Path):
        self._inner, self._path = inner, path

    def _call(self, fn, *args):
        try:
            out = fn(*args)
        except sqlite3.DatabaseError as e:
            raise _damaged(self._path, e) from None
        return _Guarded(out, self._path) if isinstance(out, sqlite3.Cursor) else out

    def execute(self, *args):
        return self._call(self._inner.execute, *args)

    def executemany(self, *args):
        return self._call(self._inner.executemany, *args)

    def fetchone(self):
        return self._call(self._inner.fetchone)

    def fetchall(self):
        return self._call(self._inner.fetchall)

    def __iter__(self):
        return iter(self.fetchall())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class CandidateRow:
    """One candidate as the store holds it (JSON columns decoded)."""

    id: int
    generation: int
    idx: int
    genome: list[float]
    recipe: str
    recipe_hash: str
    origin: str
    status: str
    parents: list[int] = field(default_factory=list)
    reason: str | None = None
    values: dict[str, float] | None = None
    losses: list[float] | None = None
    estimated: bool = False
    worker: str | None = None
    eval_seconds: float | None = None
    cached_from: int | None = None

    def identity(self) -> tuple:
        """What must match between an interrupted-and-resumed run and an uninterrupted one."""
        return (self.id, self.generation, self.idx, tuple(self.genome), self.recipe_hash, self.origin, self.status,
                self.reason, tuple(sorted((self.values or {}).items())), self.cached_from)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Store:
    """Open (or create) a store. `readonly=True` for viewers: they never block the writer."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.writer_tokens: dict[str, str] = {}  # job -> this process's writer lock token (lock.WriterLock)
        try:
            if readonly:
                if not self.path.is_file():
                    raise StoreError(f"{self.path}: no such store")
                # a URI: the path quoted, so that '#', '?' or '%' in it name this file and no other
                uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                remote = network_filesystem(self.path)
                if remote and os.environ.get(ALLOW_NETWORK_STORE) != "1":
                    raise StoreError(f"{self.path}: on a network filesystem ({remote}); SQLite's WAL mode, which the "
                                     "store uses, is unsafe there (a reader or writer on another host can corrupt "
                                     "it). Keep the store on a local disk of the driver's node (copy it elsewhere "
                                     f"when the job is done), or set {ALLOW_NETWORK_STORE}=1 to write it from one "
                                     "host only in rollback-journal mode")
                self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=DELETE" if remote else "PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=30000")
            self.db = _Guarded(self.db, self.path)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not an evomerge store (SQLite says: {e}); give another store path") from None
        self._check_version()

    # ------------------------------------------------------------ schema

    def _check_version(self) -> None:
        try:
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not an evomerge store (SQLite says: {e})") from None
        if not tables:
            if self.readonly:
                raise StoreError(f"{self.path}: empty store")
            with self.transaction():
                for stmt in SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return
        if "meta" not in tables:
            raise StoreError(f"{self.path}: an SQLite file but not an evomerge store (no 'meta' table); "
                             "give another --store path")
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: written by a newer evomerge (store schema {version}, this version reads up "
                             f"to {SCHEMA_VERSION}); upgrade evomerge to open it")
        if version < SCHEMA_VERSION:
            if self.readonly:
                raise StoreError(f"{self.path}: store schema {version} is older than {SCHEMA_VERSION}; open it once "
                                 "for writing (e.g. `evomerge resume`) to upgrade it")
            missing = [v for v in range(version, SCHEMA_VERSION) if v not in MIGRATIONS]
            if missing:
                raise StoreError(f"{self.path}: store schema {version} is older than {SCHEMA_VERSION} and cannot be "
                                 f"upgraded (no migration from version {missing[0]}); re-run the job into a new store")
            for v in range(version, SCHEMA_VERSION):
                with self.transaction():
                    MIGRATIONS[v](self.db)
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(v + 1),))

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    def transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                store.db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                store.db.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ jobs

    def create_job(self, name: str, spec: dict[str, Any], seed: int,
                   objectives: Iterable[tuple[str, str]] | None = None, spec_yaml: str | None = None) -> None:
        """`objectives`: (name, direction) with directions resolved; `spec_yaml`: the spec in its YAML form (a job file, every path absolute)."""
        now = time.time()
        table = None if objectives is None else json.dumps([[str(n), str(d)] for n, d in objectives])
        try:
            self.db.execute("INSERT INTO jobs (name, spec, status, reason, seed, created, updated, objectives, "
                            "spec_yaml) VALUES (?, ?, 'running', NULL, ?, ?, ?, ?, ?)",
                            (name, json.dumps(spec), seed, now, now, table, spec_yaml))  # insertion order kept: gene order
        except sqlite3.IntegrityError:
            raise StoreError(f"{self.path}: a job named '{name}' exists already; `evomerge resume` continues it, "
                             "or give the new job another name") from None

    def job(self, name: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT name, spec, status, reason, seed, created, updated, spec_yaml FROM jobs "
                              "WHERE name=?", (name,)).fetchone()
        if row is None:
            return None
        status, reason = row[2], row[3]
        if status == "running":
            status, reason = self._running_or_not(name, reason)
        return {"name": row[0], "spec": json.loads(row[1]), "status": status, "reason": reason, "seed": row[4],
                "created": row[5], "updated": row[6], "spec_yaml": row[7]}

    def _running_or_not(self, name: str, reason: str | None) -> tuple[str, str | None]:
        """A job stored as `running` is running only while its writer holds the lock: one killed (kill -9, a lost
        node) or stopped by a full disk could not record that it ended, and reads as `interrupted`, with why."""
        try:
            row = self.db.execute("SELECT host, pid, heartbeat FROM writers WHERE job=?", (name,)).fetchone()
        except sqlite3.OperationalError:  # a store from before the writers table (schema 4): nothing to tell by
            return "running", reason
        if row is None:
            why = "no writer holds it"
        else:
            why = holder.gone(str(row[0]), int(row[1]), float(row[2]), time.time())
            if why is None:
                return "running", reason
            why = f"its writer, pid {row[1]} on {row[0]}, ended without recording why ({why}: killed, or its disk filled)"
        return "interrupted", f"{why}; `evomerge resume` continues it"

    def objectives(self, name: str) -> list[tuple[str, str]] | None:
        """The job's objectives and their resolved directions ("maximise" | "minimise"), in the spec's order;
        None for a job stored before schema 3 that has not been resumed since."""
        row = self.db.execute("SELECT objectives FROM jobs WHERE name=?", (name,)).fetchone()
        if row is None or row[0] is None:
            return None
        return [(str(n), str(d)) for n, d in json.loads(row[0])]

    def directions(self, name: str) -> list[tuple[str, str]]:
        """The job's objectives and directions as export and the dashboard show them: the stored table, or for
        a job stored before schema 3 (not resumed since) the directions its losses imply (loss = -value for a
        maximised objective; an objective whose values were all 0 reads as minimised)."""
        stored = self.objectives(name)
        if stored is not None:
            return stored
        rows = [r for r in self.candidates(name, status="done") if r.values and r.losses]
        if not rows:
            return []
        names = list(rows[0].values or {})
        out = []
        for k, n in enumerate(names):
            pairs = [(r.losses[k], r.values[n]) for r in rows if n in r.values and k < len(r.losses)]
            maximised = any(v != 0 for _, v in pairs) and all(math.isclose(loss, -v, rel_tol=1e-9) for loss, v in pairs)
            out.append((n, "maximise" if maximised else "minimise"))
        return out

    def set_objectives(self, name: str, objectives: Iterable[tuple[str, str]]) -> None:
        self.db.execute("UPDATE jobs SET objectives=? WHERE name=?",
                        (json.dumps([[str(n), str(d)] for n, d in objectives]), name))

    def jobs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM jobs ORDER BY created")]

    def set_status(self, name: str, status: str, reason: str | None = None) -> None:
        self.db.execute("UPDATE jobs SET status=?, reason=?, updated=? WHERE name=?", (status, reason, time.time(), name))

    # ------------------------------------------------------------ candidates

    _COLS = ("id, generation, idx, genome, recipe, recipe_hash, origin, status, parents, reason, \"values\", losses, "
             "estimated, worker, eval_seconds, cached_from")

    def add_candidates(self, job: str, rows: Iterable[CandidateRow]) -> None:
        """Insert new candidates (pending); rows already present (a resumed generation) are kept as they are."""
        now = time.time()
        with self.transaction():
            self.db.executemany(
                "INSERT OR IGNORE INTO candidates (job, id, generation, idx, genome, recipe, recipe_hash, origin, parents, "
                "status, submitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(job, r.id, r.generation, r.idx, json.dumps(r.genome), r.recipe, r.recipe_hash, r.origin,
                  json.dumps(r.parents), r.status, now) for r in rows])

    def mark_running(self, job: str, cid: int, worker: str | None = None) -> None:
        self.db.execute("UPDATE candidates SET status='running', worker=?, started=? WHERE job=? AND id=?",
                        (worker, time.time(), job, cid))

    def finish(self, job: str, cid: int, status: str, values: dict[str, float] | None = None,
               losses: list[float] | None = None, items: dict[str, dict[str, float]] | None = None,
               reason: str | None = None, worker: str | None = None, eval_seconds: float | None = None,
               estimated: bool = False, cached_from: int | None = None,
               retold: tuple[int, list[str]] | None = None) -> None:
        """Record a candidate's outcome (and its per-item results) in one transaction. `retold` (generation,
        objectives measured): the candidate was told to the driver before, and this outcome replaces the losses it
        was told; the `retold` row keeps both, written in the same transaction (a resume replays the old losses at
        the candidate's own generation, the new ones before `generation` is told)."""
        with self.transaction():
            if retold is not None:
                self._retold(job, cid, retold[0], list(retold[1]), losses)
            self.db.execute(
                "UPDATE candidates SET status=?, \"values\"=?, losses=?, reason=?, worker=COALESCE(?, worker), "
                "eval_seconds=?, estimated=?, cached_from=?, finished=? WHERE job=? AND id=?",
                (status, None if values is None else json.dumps(values), None if losses is None else json.dumps(losses),
                 reason, worker, eval_seconds, int(estimated), cached_from, time.time(), job, cid))
            for objective, vals in (items or {}).items():
                self.db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?)", (job, cid, objective, json.dumps(vals)))

    def _retold(self, job: str, cid: int, generation: int, objectives: list[str], losses: list[float] | None) -> None:
        """The `retold` row of `cid` at `generation` (inside a transaction, before its losses change). Retold twice
        at one generation (re-estimated, then measured; or measured again on a resume after a crash before its
        estimate was marked measured): the losses told before stay the first `before`, the objectives measured
        are the union."""
        old = self.db.execute("SELECT losses FROM candidates WHERE job=? AND id=?", (job, cid)).fetchone()
        had = self.db.execute("SELECT objectives FROM retold WHERE job=? AND candidate=? AND generation=?",
                              (job, cid, int(generation))).fetchone()
        objs = sorted(set(objectives) | set(json.loads(had[0]) if had else []))
        self.db.execute("INSERT INTO retold VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job, candidate, generation) "
                        "DO UPDATE SET objectives=excluded.objectives, after=excluded.after",
                        (job, cid, int(generation), json.dumps(objs), old[0] if old else None,
                         None if losses is None else json.dumps(losses)))

    def reestimate(self, job: str, cid: int, values: dict[str, float], losses: list[float], generation: int) -> None:
        """A told candidate's estimates made again (IRT `reestimates`): its values and losses replaced, and a
        `retold` row at `generation` (no objective measured) in the same transaction."""
        with self.transaction():
            self._retold(job, cid, generation, [], losses)
            self.db.execute("UPDATE candidates SET \"values\"=?, losses=? WHERE job=? AND id=?",
                            (json.dumps(values), json.dumps(losses), job, cid))

    def retold(self, job: str) -> list[dict[str, Any]]:
        """The told candidates measured later (IRT: rechecks of the front, the picks' confirmation), oldest first:
        candidate, generation (the first generation told after the measurement), objectives measured, before (the
        losses told at the candidate's own generation, or at its previous retelling) and after (the measured
        losses; where the full scoring failed, a failure's losses, worse than every loss told before)."""
        rows = self.db.execute("SELECT candidate, generation, objectives, before, after FROM retold WHERE job=? "
                               "ORDER BY generation, candidate", (job,)).fetchall()
        return [{"candidate": c, "generation": g, "objectives": json.loads(o), "before": _loads(b),
                 "after": _loads(a)} for c, g, o, b, a in rows]

    def told_before(self, job: str, generation: int = 0) -> dict[int, list[float] | None]:
        """The losses the driver held, before generation `generation`'s retellings, for each candidate retold at or
        after it (the `before` of its first such retelling). With 0: the losses told at each retold candidate's own
        generation. A resume, a failure's losses and the entrants' front read the search as it was told from this,
        whatever has been measured since."""
        first: dict[int, list[float] | None] = {}
        for t in self.retold(job):
            if t["generation"] >= generation:
                first.setdefault(t["candidate"], t["before"])
        return first

    def set_losses(self, job: str, cid: int, losses: list[float]) -> None:
        """The losses a driver was told for a failed candidate (decided when its batch is told, after it finished)."""
        self.db.execute("UPDATE candidates SET losses=? WHERE job=? AND id=?", (json.dumps(losses), job, cid))

    def _row(self, r: tuple) -> CandidateRow:
        return CandidateRow(id=r[0], generation=r[1], idx=r[2], genome=json.loads(r[3]), recipe=r[4], recipe_hash=r[5],
                            origin=r[6], status=r[7], parents=_loads(r[8]) or [], reason=r[9], values=_loads(r[10]),
                            losses=_loads(r[11]), estimated=bool(r[12]), worker=r[13], eval_seconds=r[14], cached_from=r[15])

    def candidates(self, job: str, generation: int | None = None, status: str | None = None) -> list[CandidateRow]:
        sql, args = f"SELECT {self._COLS} FROM candidates WHERE job=?", [job]
        if generation is not None:
            sql, args = sql + " AND generation=?", args + [generation]
        if status is not None:
            sql, args = sql + " AND status=?", args + [status]
        return [self._row(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def candidate(self, job: str, cid: int) -> CandidateRow | None:
        r = self.db.execute(f"SELECT {self._COLS} FROM candidates WHERE job=? AND id=?", (job, cid)).fetchone()
        return None if r is None else self._row(r)

    def by_hash(self, job: str, recipe_hash: str) -> CandidateRow | None:
        """The first evaluated (done or failed) candidate with this recipe: the cache."""
        r = self.db.execute(f"SELECT {self._COLS} FROM candidates WHERE job=? AND recipe_hash=? AND status IN "
                            "('done', 'failed') ORDER BY id LIMIT 1", (job, recipe_hash)).fetchone()
        return None if r is None else self._row(r)

    def items(self, job: str, cid: int) -> dict[str, dict[str, float]]:
        return {o: json.loads(v) for o, v in
                self.db.execute("SELECT objective, \"values\" FROM items WHERE job=? AND candidate=?", (job, cid))}

    def counts(self, job: str) -> dict[str, int]:
        return {s: n for s, n in self.db.execute("SELECT status, COUNT(*) FROM candidates WHERE job=? GROUP BY status", (job,))}

    # ------------------------------------------------------------ front, checkpoints, scores

    def set_front(self, job: str, ids: Iterable[int]) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM front WHERE job=?", (job,))
            self.db.executemany("INSERT INTO front VALUES (?, ?)", [(job, i) for i in ids])

    def front(self, job: str) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT candidate FROM front WHERE job=? ORDER BY candidate", (job,))]

    def save_checkpoint(self, job: str, generation: int, state: dict[str, Any],
                        front: Iterable[int] | None = None) -> None:
        """The search's state (JSON) after `generation` (and the front then), in one transaction. Every one is
        kept: together they are the ask/tell order a resume replays (a few hundred bytes each). Refused when this
        store's writer lock on the job (`lock.WriterLock`) was taken over by another process meanwhile."""
        with self.transaction():
            token = self.writer_tokens.get(job)
            if token is not None:
                row = self.db.execute("SELECT host, pid, token FROM writers WHERE job=?", (job,)).fetchone()
                if row is None or row[2] != token:
                    who = f"pid {row[1]} on {row[0]}" if row else "no one"
                    raise StoreError(f"{self.path}: job '{job}' is now held by {who}: this process lost its writer "
                                     "lock (its heartbeat was not seen for too long) and stops without writing")
            self.db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                            (job, generation, time.time(), json.dumps(state)))
            if front is not None:
                self.db.execute("DELETE FROM front WHERE job=?", (job,))
                self.db.executemany("INSERT INTO front VALUES (?, ?)", [(job, i) for i in front])
            self.db.execute("UPDATE jobs SET updated=? WHERE name=?", (time.time(), job))

    def checkpoints(self, job: str) -> list[tuple[int, dict[str, Any] | None]]:
        """(generation, state) of every checkpoint, oldest first; state None: upgraded from a pickle, dropped."""
        return [(int(g), self._state(job, g, s)) for g, s in self.db.execute(
            "SELECT generation, state FROM checkpoints WHERE job=? ORDER BY generation", (job,))]

    def last_checkpoint(self, job: str) -> tuple[int, dict[str, Any] | None] | None:
        r = self.db.execute("SELECT generation, state FROM checkpoints WHERE job=? ORDER BY generation DESC LIMIT 1",
                            (job,)).fetchone()
        return None if r is None else (int(r[0]), self._state(job, r[0], r[1]))

    def _state(self, job: str, generation: int, text: Any) -> dict[str, Any] | None:
        """A checkpoint's JSON, read as data only (anything else is refused, never loaded)."""
        if text is None:
            return None
        try:
            state = json.loads(text.decode() if isinstance(text, bytes) else text)
        except (UnicodeDecodeError, ValueError):
            state = None
        if not isinstance(state, dict):
            raise StoreError(f"{self.path}: job '{job}': the checkpoint of generation {generation} is not JSON "
                             "search state (not one this evomerge wrote; it is not loaded); start the job again under "
                             "another name")
        return state

    def save_score(self, job: str, subject: str, split: str, values: dict[str, float] | None,
                   items: dict[str, dict[str, float]] | None = None, reason: str | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)",
                        (job, subject, split, None if values is None else json.dumps(values),
                         None if items is None else json.dumps(items), reason))

    def scores(self, job: str, split: str) -> dict[str, dict[str, Any]]:
        return {s: {"values": _loads(v), "reason": r} for s, v, r in
                self.db.execute("SELECT subject, \"values\", reason FROM scores WHERE job=? AND split=?", (job, split))}

    # ------------------------------------------------------------ IRT-reduced fitness (schema 2)

    def items_of(self, job: str, objective: str) -> dict[int, dict[str, float]]:
        """Per-item results of every candidate for one objective, in one query (candidate id -> {item: value})."""
        return {int(c): json.loads(v) for c, v in self.db.execute(
            "SELECT candidate, \"values\" FROM items WHERE job=? AND objective=? ORDER BY candidate", (job, objective))}

    def save_irt(self, job: str, objective: str, generation: int, data: dict[str, Any] | None,
                 note: str | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO irt VALUES (?, ?, ?, ?, ?)",
                        (job, objective, generation, None if data is None else json.dumps(data), note))

    def irt(self, job: str, objective: str, generation: int) -> tuple[dict[str, Any] | None, str | None] | None:
        """(calibration, note) fitted for `generation`, or None when none was recorded."""
        r = self.db.execute("SELECT data, note FROM irt WHERE job=? AND objective=? AND generation=?",
                            (job, objective, generation)).fetchone()
        return None if r is None else (_loads(r[0]), r[1])

    def irt_history(self, job: str) -> list[dict[str, Any]]:
        return [{"objective": o, "generation": g, "data": _loads(d), "note": n} for o, g, d, n in self.db.execute(
            "SELECT objective, generation, data, note FROM irt WHERE job=? ORDER BY objective, generation", (job,))]

    def save_estimate(self, job: str, cid: int, objective: str, value: float, sd: float, estimator: str,
                      anchor_mean: float, scored: int, total: int, fit_generation: int,
                      measured: float | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO estimates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job, cid, objective, value, sd, estimator, anchor_mean, measured, scored, total, fit_generation))

    def set_measured(self, job: str, cid: int, objective: str, value: float) -> None:
        """The full-split value of a candidate that was estimated (kept beside its estimate: measured error)."""
        with self.transaction():
            self.db.execute("UPDATE estimates SET measured=? WHERE job=? AND candidate=? AND objective=?",
                            (value, job, cid, objective))

    def open_estimates(self, job: str) -> dict[int, list[str]]:
        """Per candidate, the objectives whose value is still an estimate (estimated, not measured since; a candidate
        scored in full while a calibration was in force has its `measured` set from the start), in objective order."""
        out: dict[int, list[str]] = {}
        for cid, name in self.db.execute("SELECT candidate, objective FROM estimates WHERE job=? AND measured IS NULL "
                                         "ORDER BY candidate, objective", (job,)):
            out.setdefault(cid, []).append(name)
        return out

    def estimates(self, job: str) -> list[dict[str, Any]]:
        cols = ("candidate", "objective", "value", "sd", "estimator", "anchor_mean", "measured", "scored", "total",
                "fit_generation")
        return [dict(zip(cols, r)) for r in self.db.execute(
            f"SELECT {', '.join(cols)} FROM estimates WHERE job=? ORDER BY candidate, objective", (job,))]
