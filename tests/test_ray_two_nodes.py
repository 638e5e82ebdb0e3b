"""A search submitted to a Ray cluster of two nodes on this machine, all on loopback with token auth: candidates run
on workers of both nodes; the second node is killed mid-search (raylet and workers, no grace) and the search
completes with every candidate recorded once, as an uninterrupted single-process run records them; a node added
again takes work. The cluster runs in a process of its own (tests/ray_nodes.py); every listener of it, on every
node, is checked to be on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from evomerge.search.jobs import run_job
from evomerge.search.loop import Progress
from evomerge.service.submit import Jobs
from evomerge.store import Store, StoreError
from helpers import cli, free_port, toy_spec

HELPER = Path(__file__).resolve().parent / "ray_nodes.py"
RAY = Path(sys.executable).parent / "ray"


class Nodes:
    """The helper process: commands in, one JSON line per answer out (read on a thread, so waits can time out)."""

    def __init__(self, env: dict[str, str], dashboard_port: int):
        self.proc = subprocess.Popen([sys.executable, str(HELPER), str(dashboard_port), env["RAY_TMPDIR"]], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def answer(self, timeout: float = 120) -> dict:
        try:
            return json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            pytest.fail(f"the Ray nodes' helper said nothing in {timeout:.0f} s (rc {self.proc.poll()})")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def listeners(self) -> list:
        found = []
        for p in [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True):
            try:
                found += [c.laddr for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                continue
        return found

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:  # what `quit` did not end (job drivers run in sessions of their own)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    return a.is_loopback or bool(getattr(a, "ipv4_mapped", None) and a.ipv4_mapped.is_loopback)


def done_on(store_path: Path, job: str, node: str) -> int:
    """Candidates of `job` finished by a worker on `node` (worker names are ray-N@<node id, 8 digits>)."""
    try:
        store = Store(store_path, readonly=True)
    except StoreError:  # not created yet
        return 0
    try:
        return sum(1 for r in store.candidates(job) if r.status == "done" and (r.worker or "").endswith("@" + node[:8]))
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:ssl=None is deprecated")
def test_a_search_on_two_ray_nodes_loses_one_completes_and_a_node_added_again_takes_work(tmp_path, monkeypatch, capsys):
    if not RAY.exists():
        pytest.skip(f"{RAY} missing")
    temp = Path(tempfile.mkdtemp(prefix="ev2n-"))  # short: Ray's unix sockets live under it
    token = secrets.token_hex(24)
    env = {**os.environ, "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(RAY.parent.parent), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "RAY_TMPDIR": str(temp), "HOME": str(temp)}
    for name in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    nodes = Nodes(env, free_port())
    try:
        first = nodes.answer()
        head, second = first["nodes"]
        listening = nodes.listeners()
        assert len(listening) >= 10 and all(loopback(a.ip) for a in listening), listening  # both nodes' raylets and agents

        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the client: the token in its environment, no ~/.ray
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        spec = toy_spec(tmp_path / "jobs", "two-nodes", evaluations=90, delay=0.4)
        data = yaml.safe_load(spec.read_text())
        data["runtime"].update(kind="ray", workers=2)  # one CPU per node: one worker on each
        spec.write_text(yaml.safe_dump(data))
        store_path = tmp_path / "jobs" / "out" / "store.sqlite"

        jobs = Jobs(first["dashboard"])
        deadline = time.monotonic() + 60
        while True:  # the head's Jobs API comes up a little after its node
            try:
                jobs.list()
                break
            except Exception:  # noqa: BLE001
                assert time.monotonic() < deadline, "the head's Jobs API did not come up in 60 s"
                time.sleep(0.5)
        rc, out, err = cli(capsys, "submit", str(spec), "--address", first["dashboard"], "--id", "evomerge-two-nodes-1")
        assert rc == 0, err

        def wait_for(what: str, test, timeout: float = 180) -> None:
            deadline = time.monotonic() + timeout
            while not test():
                status = jobs.info("evomerge-two-nodes-1").status
                if status not in ("PENDING", "RUNNING"):
                    pytest.fail(f"{what}: job {status}\n{jobs.logs('evomerge-two-nodes-1')[-4000:]}")
                assert time.monotonic() < deadline, (what, jobs.logs("evomerge-two-nodes-1")[-3000:])
                time.sleep(0.3)

        wait_for("work on the second node", lambda: done_on(store_path, "two-nodes", second) >= 3)
        assert done_on(store_path, "two-nodes", head) >= 1  # and on the head's
        assert nodes.ask("kill") == {"killed": second}
        at_kill = done_on(store_path, "two-nodes", head)
        wait_for("the head's worker going on alone", lambda: done_on(store_path, "two-nodes", head) >= at_kill + 3)
        added = nodes.ask("add")["added"]
        wait_for("work on the node added again", lambda: done_on(store_path, "two-nodes", added) >= 2)
        assert all(loopback(a.ip) for a in nodes.listeners())
        info = jobs.wait("evomerge-two-nodes-1", timeout=300)
        logs = jobs.logs("evomerge-two-nodes-1")
        assert info.status == "SUCCEEDED", logs[-3000:]
    finally:
        nodes.close()
        shutil.rmtree(temp, ignore_errors=True)

    store = Store(store_path, readonly=True)
    rows = store.candidates("two-nodes")
    assert store.job("two-nodes")["status"] == "done"
    assert [r.id for r in rows] == list(range(90)) and all(r.status == "done" for r in rows), \
        [(r.id, r.status, r.reason) for r in rows if r.status != "done"]
    per_node = {n: sum(1 for r in rows if r.worker.endswith("@" + n[:8])) for n in (head, second, added)}
    assert all(per_node.values()), per_node

    # the same job in one process, uninterrupted: the same candidates, values and front
    data["runtime"] = {k: v for k, v in data["runtime"].items() if k not in ("workers",)} | {"kind": "local"}
    data["store"] = str(tmp_path / "straight" / "store.sqlite")
    straight = tmp_path / "jobs" / "straight.yaml"  # beside the submitted one: its relative paths name the same
    straight.write_text(yaml.safe_dump(data))
    import io

    run_job(straight, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    alone = Store(tmp_path / "straight" / "store.sqlite", readonly=True)
    assert [r.identity() for r in rows] == [r.identity() for r in alone.candidates("two-nodes")]
    assert store.front("two-nodes") == alone.front("two-nodes")
