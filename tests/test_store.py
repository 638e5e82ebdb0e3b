"""The store: schema and its version (and the upgrades), candidates, objectives and JSON checkpoints (never a
pickle), and a reader while a writer writes."""

from __future__ import annotations

import ast
import os
import multiprocessing as mp
import sqlite3
import threading
import time

import pytest

from conftest import REPO, as_schema_2, planted_pickle
from evomerge.store import SCHEMA_VERSION, CandidateRow, Store, StoreError
from evomerge.store import archive


def _row(cid: int, gen: int = 0, h: str | None = None) -> CandidateRow:
    return CandidateRow(id=cid, generation=gen, idx=cid, genome=[0.1 * cid, 0.5], recipe=f"merge_method: ties  # {cid}",
                        recipe_hash=h or f"h{cid}", origin="driver", status="pending", parents=[0])


def test_new_store_is_wal_and_versioned(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    assert store.schema_version == SCHEMA_VERSION
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "jobs", "candidates", "items", "front", "checkpoints", "scores"} <= tables


def test_candidates_round_trip_with_items_and_failures(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.create_job("j", {"a": 1}, seed=3)
    with pytest.raises(StoreError, match="exists already"):
        store.create_job("j", {}, seed=0)
    store.add_candidates("j", [_row(0), _row(1), _row(2, h="h0")])
    store.add_candidates("j", [_row(0)])  # a resumed generation re-adds: kept as is
    store.mark_running("j", 0, worker="w1")
    store.finish("j", 0, "done", values={"acc": 0.5}, losses=[-0.5], items={"acc": {"x1": 1.0, "x2": 0.0}},
                 worker="w1", eval_seconds=1.5)
    store.finish("j", 1, "failed", losses=[1e9], reason="NaN logits")
    assert store.by_hash("j", "h0").id == 0
    store.finish("j", 2, "cached", values={"acc": 0.5}, losses=[-0.5], cached_from=0)
    rows = {r.id: r for r in store.candidates("j")}
    assert rows[0].values == {"acc": 0.5} and rows[0].worker == "w1" and rows[0].parents == [0]
    assert rows[1].status == "failed" and rows[1].reason == "NaN logits"
    assert rows[2].cached_from == 0
    assert store.items("j", 0) == {"acc": {"x1": 1.0, "x2": 0.0}}
    assert store.counts("j") == {"done": 1, "failed": 1, "cached": 1}
    assert store.job("j")["spec"] == {"a": 1}


def test_checkpoints_are_json_every_one_kept_with_the_front(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.create_job("j", {}, seed=0)
    for g in range(1, 7):
        store.save_checkpoint("j", g, {"generation": g, "recent": [f"r{g}"]}, front=[g, g + 1])
    assert store.last_checkpoint("j") == (6, {"generation": 6, "recent": ["r6"]})
    assert [g for g, _ in store.checkpoints("j")] == [1, 2, 3, 4, 5, 6]  # the ask/tell order a resume replays
    assert store.db.execute("SELECT typeof(state) FROM checkpoints LIMIT 1").fetchone()[0] == "text"
    assert store.front("j") == [6, 7]


def test_a_checkpoint_that_is_not_json_is_refused_unread(tmp_path):
    marker = tmp_path / "MARKER"
    store = Store(tmp_path / "s.sqlite")
    store.create_job("j", {}, seed=0)
    store.save_checkpoint("j", 1, {"generation": 1})
    store.db.execute("UPDATE checkpoints SET state=?", (planted_pickle(marker),))
    with pytest.raises(StoreError, match="generation 1 is not JSON search state"):
        store.last_checkpoint("j")
    with pytest.raises(StoreError, match="not JSON"):
        store.checkpoints("j")
    assert not marker.exists()


def test_jobs_keep_their_objectives_and_yaml_spec(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.create_job("j", {"a": 1}, seed=3, objectives=[("acc", "maximise"), ("params", "minimise")],
                     spec_yaml="name: j\n")
    store.create_job("k", {}, seed=0)
    assert store.objectives("j") == [("acc", "maximise"), ("params", "minimise")]
    assert store.job("j")["spec_yaml"] == "name: j\n" and store.job("j")["spec"] == {"a": 1}
    assert store.objectives("k") is None and store.objectives("nosuch") is None
    store.set_objectives("k", [("loss", "minimise")])
    assert store.objectives("k") == [("loss", "minimise")]


def test_a_schema_2_store_upgrades_dropping_its_pickles_unread(tmp_path):
    path, marker = tmp_path / "s.sqlite", tmp_path / "MARKER"
    store = Store(path)
    store.create_job("j", {"a": 1}, seed=0, objectives=[("acc", "maximise")])
    store.add_candidates("j", [_row(0)])
    for g in range(1, 6):
        store.save_checkpoint("j", g, {"generation": g}, front=[0])
    store.close()
    as_schema_2(path, planted_pickle(marker))
    with pytest.raises(StoreError, match="open it once for writing"):
        Store(path, readonly=True)
    store = Store(path)
    assert store.schema_version == SCHEMA_VERSION
    assert store.checkpoints("j") == [(3, None), (4, None), (5, None)]  # generations kept, pickles gone
    assert store.job("j")["spec"] == {"a": 1} and store.objectives("j") is None and store.job("j")["spec_yaml"] is None
    assert [r.id for r in store.candidates("j")] == [0] and store.front("j") == [0]
    store.save_checkpoint("j", 6, {"generation": 6})
    assert store.last_checkpoint("j") == (6, {"generation": 6})
    assert not marker.exists()


def test_evomerge_never_unpickles_and_its_store_and_search_never_import_pickle():
    """Nothing a store holds is ever unpickled; the Ray worker may only check that an error pickles (dumps)."""
    offenders = []
    for path in sorted((REPO / "evomerge").rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib", "shelve") for n in names):
                if not rel.startswith("evomerge/runtime/"):
                    offenders.append(f"{rel}:{node.lineno} imports {names}")
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads", "Unpickler") and \
                    isinstance(node.value, ast.Name) and node.value.id in ("pickle", "cloudpickle", "dill"):
                offenders.append(f"{rel}:{node.lineno} calls {node.value.id}.{node.attr}")
    assert offenders == []


def test_newer_store_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "s.sqlite"
    Store(path).db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="newer evomerge.*upgrade"):
        Store(path)


def test_older_store_without_migration_says_why(tmp_path):
    path = tmp_path / "s.sqlite"
    Store(path).db.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="older than .* cannot be upgraded"):
        Store(path)
    with pytest.raises(StoreError, match="open it once for writing"):
        Store(path, readonly=True)


def test_older_store_is_migrated(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    Store(path).db.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    monkeypatch.setitem(archive.MIGRATIONS, 0, lambda db: db.execute("CREATE TABLE added_in_v1 (x INTEGER)"))
    store = Store(path)
    assert store.schema_version == SCHEMA_VERSION
    assert store.db.execute("SELECT COUNT(*) FROM added_in_v1").fetchone()[0] == 0


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not an evomerge store"):
        Store(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="not an evomerge store"):
        Store(junk)


def _reader(path: str, stop_after: float, out) -> None:
    """Another process polling the store read-only while the writer works, until it has seen all 200 rows."""
    seen, errors = [], []
    store = Store(path, readonly=True)
    out.put("ready")
    end = time.time() + stop_after
    while time.time() < end and (not seen or seen[-1] < 200):
        try:
            seen.append(sum(store.counts("j").values()))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        time.sleep(0.002)
    out.put((seen, errors))


def test_a_reader_in_another_process_while_the_writer_writes(tmp_path):
    path = tmp_path / "s.sqlite"
    store = Store(path)
    store.create_job("j", {}, seed=0)
    q = mp.get_context("spawn").Queue()
    reader = mp.get_context("spawn").Process(target=_reader, args=(str(path), 60.0, q))
    reader.start()
    assert q.get(timeout=60) == "ready"

    def write():
        for g in range(40):
            store.add_candidates("j", [_row(g * 5 + k, g) for k in range(5)])
            for k in range(5):
                store.finish("j", g * 5 + k, "done", values={"acc": 0.1}, losses=[-0.1], items={"acc": {"i": 1.0}})
            store.save_checkpoint("j", g + 1, {"pad": "x" * 10_000}, front=[g])
            time.sleep(0.01)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    seen, errors = q.get(timeout=60)
    reader.join(timeout=30)
    assert errors == []
    assert seen == sorted(seen) and seen[-1] == 200  # counts only grow: every read saw a committed state
    assert len(set(seen)) >= 3  # and it read while the writer was writing


def test_store_paths_with_uri_characters_open_that_file_and_no_other(tmp_path):
    for name in ("a#b.sqlite", "a?mode=rw.sqlite", "100%.sqlite"):
        path = tmp_path / name
        store = Store(path)
        store.create_job("j", {"a": 1}, 0)
        store.close()
        before = {p.name for p in tmp_path.iterdir()}
        assert Store(path, readonly=True).job("j")["spec"] == {"a": 1}
        created = {p.name for p in tmp_path.iterdir()} - before
        assert created <= {f"{name}-wal", f"{name}-shm"}, created  # its own WAL files; no other file opened
    with pytest.raises(StoreError, match="no such store"):
        Store(tmp_path / "missing#x.sqlite", readonly=True)


MOUNTS = """/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
nfs-server:/export /mnt/shared nfs4 rw,vers=4.2 0 0
fs-1.efs:/ /mnt/shared/efs\\040data efs rw 0 0
tmpfs /mnt/shared/tmp tmpfs rw 0 0
"""


def test_network_filesystems_are_told_from_the_mount_table(tmp_path):
    from pathlib import Path

    from evomerge.store.archive import filesystem_of, network_filesystem

    assert network_filesystem(Path("/mnt/shared/out/store.sqlite"), MOUNTS) == "nfs4"
    assert network_filesystem(Path("/mnt/shared/efs data/s.sqlite"), MOUNTS) == "efs"  # the longest mount wins
    assert network_filesystem(Path("/mnt/shared/tmp/s.sqlite"), MOUNTS) is None
    assert network_filesystem(Path("/mnt/sharedx/s.sqlite"), MOUNTS) is None  # a prefix of a name is no mount
    assert filesystem_of(Path("/home/u/s.sqlite"), MOUNTS) == "ext4"
    assert network_filesystem(tmp_path / "s.sqlite") is None  # this machine's temp folder is local
    Store(tmp_path / "s.sqlite").close()  # and a store opens there


def test_a_damaged_page_deep_in_a_store_is_an_error_naming_it(tmp_path):
    """Pages zeroed in the middle of a store: opening may still work, the query that reaches them fails with a
    StoreError that names the file and the salvage command, never an sqlite3 traceback."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    store.create_job("j", {"name": "j"}, 0)
    store.db.executemany("INSERT INTO meta VALUES (?, ?)", [(f"k{i}", "x" * 500) for i in range(400)])
    store.close()
    raw = bytearray(path.read_bytes())
    page = 4096
    assert len(raw) > 20 * page
    raw[20 * page:60 * page] = b"\x5a" * (40 * page)
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"s.sqlite: the store is damaged .*\.recover"):
        s = Store(path, readonly=True)
        s.db.execute("SELECT key, value FROM meta").fetchall()


def test_a_running_job_reads_interrupted_once_its_writer_is_gone(tmp_path):
    """`running` is stored when a search starts; a writer killed with -9, or stopped by a full disk, cannot store
    that it ended. Every reader (status, dashboard, export) is told `interrupted` then, with whose lock was left."""
    import socket
    import subprocess

    store = Store(tmp_path / "s.sqlite")
    store.create_job("j", {"name": "j"}, 0)

    def plant(host: str, pid: int, heartbeat: float) -> None:
        store.db.execute("INSERT OR REPLACE INTO writers VALUES ('j', ?, ?, ?, ?, 't')", (host, pid, heartbeat, heartbeat))

    here, now = socket.gethostname(), time.time()
    plant(here, os.getpid(), now)
    assert store.job("j")["status"] == "running" and store.job("j")["reason"] is None
    plant("elsewhere", 1, now - 10)  # another host, heard from 10 s ago: may well be writing
    assert store.job("j")["status"] == "running"
    plant("elsewhere", 1, now - 3600)
    shown = store.job("j")
    assert shown["status"] == "interrupted" and "pid 1 on elsewhere" in shown["reason"]
    assert "silent for 3600 s" in shown["reason"] and "evomerge resume" in shown["reason"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    plant(here, dead.pid, now)
    assert store.job("j")["status"] == "interrupted" and "its process is gone" in store.job("j")["reason"]
    store.db.execute("DELETE FROM writers")
    assert store.job("j")["status"] == "interrupted"  # no lock at all: nobody is writing it
    store.set_status("j", "done")
    assert store.job("j")["status"] == "done"  # a status that was stored is told as stored
