"""One writer per job: a `run` or `resume` holds the job's row in the store's `writers` table while it searches.

The row names the holder (host, pid, start) and carries a heartbeat that a thread of the holder refreshes every
`HEARTBEAT` seconds, over a connection of its own. A second writer is refused with who holds the job. A lock whose
holder is gone is taken over, with a message: on this host when its process no longer exists (a kill -9, a
crash: resumable at once), elsewhere when its heartbeat is older than `STALE_AFTER` seconds. A holder that was
taken over (paused that long) finds out at its next checkpoint and stops (`Store.save_checkpoint`).

Limits: "older" compares the holder's clock with the reader's (hosts with clocks more than a minute apart can take a
live job over); "this host" is the host name, so containers that share one host name but not their process ids see
each other's holders as gone. Keep one store's writers on one machine, as README says for network filesystems.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from evomerge.store.archive import Store, StoreError
from evomerge.store.holder import HEARTBEAT, STALE_AFTER, gone


class WriterLock:
    """`with WriterLock(store, job) as lock:` -- `lock.note` says whose stale lock was taken over, if any. The store
    then checks, at every checkpoint, that the lock is still this process's (a holder paused past STALE_AFTER and
    taken over stops instead of writing beside its successor)."""

    def __init__(self, store: Store, job: str, stale_after: float = STALE_AFTER, beat: float = HEARTBEAT):
        self.store, self.path, self.job, self.stale_after, self.beat = store, Path(store.path), job, stale_after, beat
        self.host, self.pid, self.token = socket.gethostname(), os.getpid(), uuid.uuid4().hex
        self.note: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def __enter__(self) -> "WriterLock":
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT host, pid, started, heartbeat FROM writers WHERE job=?", (self.job,)).fetchone()
            now = time.time()
            if row is not None:
                host, pid, started, heartbeat = row
                silent = now - heartbeat
                why = gone(host, pid, heartbeat, now, self.stale_after)
                if why is None:
                    db.execute("ROLLBACK")
                    raise StoreError(
                        f"{self.path}: job '{self.job}' is being written by pid {pid} on {host} since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))} (last heartbeat {silent:.0f} s "
                        f"ago); one writer per job: wait for it to end or stop it (`evomerge stop` for a Ray job). "
                        f"A holder silent for {self.stale_after:.0f} s is taken over")
                self.note = f"took over job '{self.job}' from pid {pid} on {host} ({why})"
            db.execute("INSERT OR REPLACE INTO writers VALUES (?, ?, ?, ?, ?, ?)",
                       (self.job, self.host, self.pid, now, now, self.token))
            db.execute("COMMIT")
        finally:
            db.close()
        self.store.writer_tokens[self.job] = self.token
        self._thread = threading.Thread(target=self._heartbeat, name=f"evomerge-writer-{self.job}", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        db = self._connect()
        try:
            while not self._stop.wait(self.beat):
                try:
                    db.execute("UPDATE writers SET heartbeat=? WHERE job=? AND token=?", (time.time(), self.job, self.token))
                except sqlite3.Error:  # a busy or vanished store: the next beat tries again
                    pass
        finally:
            db.close()

    def __exit__(self, *exc: object) -> None:
        self.store.writer_tokens.pop(self.job, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            db = self._connect()
            try:
                db.execute("DELETE FROM writers WHERE job=? AND token=?", (self.job, self.token))
            finally:
                db.close()
        except sqlite3.Error:  # a full disk or a vanished store: the lock goes stale and is taken over then
            pass
