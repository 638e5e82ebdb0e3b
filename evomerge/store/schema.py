"""The store's tables as SQL, its schema version, and the upgrades from each older version (see `archive.py` for
what the tables hold). Kept apart from `Store` so that a schema change reads in one place."""

from __future__ import annotations

import sqlite3
from typing import Callable

SCHEMA_VERSION = 5

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL, reason TEXT, seed INTEGER,
    created REAL NOT NULL, updated REAL NOT NULL, objectives TEXT, spec_yaml TEXT);
CREATE TABLE IF NOT EXISTS candidates (
    job TEXT NOT NULL, id INTEGER NOT NULL, generation INTEGER NOT NULL, idx INTEGER NOT NULL,
    genome TEXT NOT NULL, recipe TEXT NOT NULL, recipe_hash TEXT NOT NULL, origin TEXT NOT NULL,
    parents TEXT, status TEXT NOT NULL, reason TEXT, "values" TEXT, losses TEXT, estimated INTEGER DEFAULT 0,
    worker TEXT, submitted REAL, started REAL, finished REAL, eval_seconds REAL, cached_from INTEGER,
    PRIMARY KEY (job, id));
CREATE INDEX IF NOT EXISTS candidates_hash ON candidates (job, recipe_hash);
CREATE INDEX IF NOT EXISTS candidates_gen ON candidates (job, generation);
CREATE TABLE IF NOT EXISTS items (
    job TEXT NOT NULL, candidate INTEGER NOT NULL, objective TEXT NOT NULL, "values" TEXT NOT NULL,
    PRIMARY KEY (job, candidate, objective));
CREATE TABLE IF NOT EXISTS front (job TEXT NOT NULL, candidate INTEGER NOT NULL, PRIMARY KEY (job, candidate));
CREATE TABLE IF NOT EXISTS checkpoints (
    job TEXT NOT NULL, generation INTEGER NOT NULL, created REAL NOT NULL, state TEXT,
    PRIMARY KEY (job, generation));
CREATE TABLE IF NOT EXISTS scores (
    job TEXT NOT NULL, subject TEXT NOT NULL, split TEXT NOT NULL, "values" TEXT, items TEXT, reason TEXT,
    PRIMARY KEY (job, subject, split));
"""
_IRT_SCHEMA = """
CREATE TABLE IF NOT EXISTS irt (
    job TEXT NOT NULL, objective TEXT NOT NULL, generation INTEGER NOT NULL, data TEXT, note TEXT,
    PRIMARY KEY (job, objective, generation));
CREATE TABLE IF NOT EXISTS estimates (
    job TEXT NOT NULL, candidate INTEGER NOT NULL, objective TEXT NOT NULL, value REAL NOT NULL, sd REAL,
    estimator TEXT NOT NULL, anchor_mean REAL, measured REAL, scored INTEGER, total INTEGER, fit_generation INTEGER,
    PRIMARY KEY (job, candidate, objective));
"""
_WRITERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS writers (
    job TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started REAL NOT NULL, heartbeat REAL NOT NULL,
    token TEXT NOT NULL);
"""
_RETOLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS retold (
    job TEXT NOT NULL, candidate INTEGER NOT NULL, generation INTEGER NOT NULL, objectives TEXT NOT NULL,
    before TEXT, after TEXT, PRIMARY KEY (job, candidate, generation));
"""
SCHEMA += _IRT_SCHEMA + _WRITERS_SCHEMA + _RETOLD_SCHEMA


def _add_irt_tables(db: sqlite3.Connection) -> None:
    """Schema 1 -> 2: the IRT tables (IRT-reduced fitness); nothing else changes."""
    for stmt in _IRT_SCHEMA.strip().split(";"):
        if stmt.strip():
            db.execute(stmt)


def _columns(db: sqlite3.Connection, table: str) -> dict[str, str]:
    return {r[1]: r[2].upper() for r in db.execute(f"PRAGMA table_info({table})")}


def _json_checkpoints(db: sqlite3.Connection) -> None:
    """Schema 2 -> 3: checkpoints hold JSON state, and the pickled ones are dropped without being read (the search
    rebuilds what it can from the candidates, `search/resume.py`); jobs gain their objective table and YAML spec."""
    for column in ("objectives", "spec_yaml"):
        if column not in _columns(db, "jobs"):
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
    if _columns(db, "checkpoints").get("state") == "TEXT":
        return  # already JSON
    db.execute("CREATE TABLE checkpoints_v3 (job TEXT NOT NULL, generation INTEGER NOT NULL, created REAL NOT NULL, "
               "state TEXT, PRIMARY KEY (job, generation))")
    db.execute("INSERT INTO checkpoints_v3 SELECT job, generation, created, NULL FROM checkpoints")
    db.execute("DROP TABLE checkpoints")
    db.execute("ALTER TABLE checkpoints_v3 RENAME TO checkpoints")


def _add_writers(db: sqlite3.Connection) -> None:
    """Schema 3 -> 4: the writers table (one writer per job, `lock.py`)."""
    db.execute(_WRITERS_SCHEMA.strip().rstrip(";"))


def _add_retold(db: sqlite3.Connection) -> None:
    """Schema 4 -> 5: the retold table (a told candidate measured later, `Store.retold`)."""
    db.execute(_RETOLD_SCHEMA.strip().rstrip(";"))


# version -> function upgrading a store of that version to version + 1
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _add_irt_tables, 2: _json_checkpoints,
                                                               3: _add_writers, 4: _add_retold}
