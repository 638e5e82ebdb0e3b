"""Whether a job's writer is still there: the one rule that the writer lock (`lock.py`, may I take this job over?)
and every reader of a job's status (`Store.job`, is this `running` job really running?) share.

A holder on this host is gone when its process no longer exists (a kill -9, a crash, a disk that filled before the
status could be written); a holder elsewhere when its heartbeat is older than `STALE_AFTER` seconds.
"""

from __future__ import annotations

import os
import socket

HEARTBEAT = 5.0  # seconds between a holder's signs of life
STALE_AFTER = 60.0  # seconds without one before another host may take the job over


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def gone(host: str, pid: int, heartbeat: float, now: float, stale_after: float = STALE_AFTER) -> str | None:
    """Why the holder (host, pid, last heartbeat) is gone -- "its process is gone" or "silent for N s" -- or None
    while it may still be writing."""
    if host == socket.gethostname() and not alive(pid):
        return "its process is gone"
    if now - heartbeat > stale_after:
        return f"silent for {now - heartbeat:.0f} s"
    return None
