"""`evomerge submit / jobs / status / logs / stop` against a real Ray head that this module starts.

The head is deliberately started with token authentication (RAY_AUTH_MODE=token, a token of its own passed in
RAY_AUTH_TOKEN, so ~/.ray is never touched) and with every listener on 127.0.0.1
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, --node-ip-address and --dashboard-host 127.0.0.1), in its own temp dir and
ports. It is stopped by killing its own process tree and process group: never `ray stop`, which would also stop
other Ray instances on the machine.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from evomerge.search.spec import JobSpecError
from evomerge.service.submit import Jobs, ServiceError, check_address, check_id, portable_spec
from evomerge.store import Store
from helpers import cli, free_port, toy_spec

GOLDEN = Path(__file__).resolve().parent / "golden" / "models"
REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


@dataclass
class Head:
    address: str
    token: str
    pid: int
    temp_dir: Path


def _stop_head(pid: int) -> None:
    """Kill the head's process tree and group (ours only), politely first."""
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for p in procs:  # job drivers run in sessions of their own: not in the group
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=8)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def head():
    if not RAY.exists():
        pytest.skip(f"{RAY} missing")
    temp_dir = Path(tempfile.mkdtemp(prefix="evsvc-"))  # short: Ray's unix sockets live under it
    token = secrets.token_hex(24)
    env = {**os.environ, "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(RAY.parent.parent),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    cmd = [str(RAY), "start", "--head", "--block", "--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats",
           "--min-worker-port", "0", "--max-worker-port", "0"] + [x for k, v in ports.items() for x in (k, str(v))]
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        import requests

        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{(temp_dir / 'head.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code in (200, 401):
                    break
            except requests.exceptions.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Ray head did not come up in 90 s")
            time.sleep(0.5)
        yield Head(address, token, proc.pid, temp_dir)
    finally:
        _stop_head(proc.pid)
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def token(head, monkeypatch, tmp_path):
    """The client environment: the head's token in RAY_AUTH_TOKEN and a HOME without ~/.ray."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    return head.token


# ---------------------------------------------------------------- no head needed


def test_ids_and_addresses_are_validated():
    assert check_id("evomerge-zoo_mix-1a2b.3") == "evomerge-zoo_mix-1a2b.3"
    for bad in ("", "../etc", "a/b", "-x", "a b", "x" * 101, "job?id=1", "ü"):
        with pytest.raises(ServiceError, match="not valid"):
            check_id(bad)
    assert check_address("http://127.0.0.1:8265/") == "http://127.0.0.1:8265"
    assert check_address("https://head.example.org") == "https://head.example.org"
    for bad in ("127.0.0.1:8265", "http://h:8265/api", "http://user@h:8265", "ftp://h", "http://h:99999", "http://h:1?x=y"):
        with pytest.raises(ServiceError, match="--address"):
            check_address(bad)


def test_the_ray_token_never_travels_over_plain_http_to_another_host(monkeypatch):
    from evomerge.service.submit import PLAIN_HTTP_ENV, check_token_transport

    monkeypatch.delenv(PLAIN_HTTP_ENV, raising=False)
    for fine in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://head.example.org"):
        check_token_transport(fine)
    with pytest.raises(ServiceError, match="refusing to send the Ray token over plain http to 10.0.0.5.*ssh -L"):
        check_token_transport("http://10.0.0.5:8265")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 32)  # the client itself refuses before it sends anything
    with pytest.raises(ServiceError, match="refusing to send"):
        Jobs("http://head.example.org:8265")
    monkeypatch.setenv(PLAIN_HTTP_ENV, "1")  # told: a network the user trusts
    check_token_transport("http://10.0.0.5:8265")


def test_the_spec_travels_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    path = toy_spec(tmp_path / "jobs", "travel")
    spec = portable_spec(path)
    assert Path(spec["models"]["base"]).is_absolute() and Path(spec["models"]["base"]) .resolve() == (GOLDEN / "base").resolve()
    assert spec["store"] == str(tmp_path / "jobs" / "out" / "store.sqlite")
    from evomerge.search.spec import parse_job
    from evomerge.spaces.presets import load_space_config, pin_defaults

    # inlined, defaults pinned: the cluster's presets (or a later default) cannot change it
    assert spec["search_space"] == pin_defaults(load_space_config("sakana_ps"))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    monkeypatch.chdir(moved)  # the YAML form reads back to the same job from anywhere
    assert parse_job(spec, source="again", base_dir=moved).to_dict() == spec


def test_inline_objectives_with_relative_includes_travel(tmp_path, monkeypatch):
    """The example job: objectives written inline, their `include` relative to the spec's folder."""
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load((REPO / "search_spaces" / "jobs" / "zoo_mix.yaml").read_text())
    data["models"] = {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a"), "b": str(GOLDEN / "b")}}
    jobs = tmp_path / "jobs"
    (jobs / "fitness").mkdir(parents=True)
    for f in (REPO / "fitness").glob("*.yaml"):
        (jobs / "fitness" / f.name).write_text(f.read_text())
    data["objectives"]["include"] = ["fitness"]
    path = jobs / "inline.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = portable_spec(path)
    assert spec["objectives"]["include"] == [str(jobs / "fitness")]


def test_a_bad_spec_or_name_is_refused_before_anything_is_sent(tmp_path, capsys):
    unreachable = f"http://127.0.0.1:{free_port()}"
    bad = toy_spec(tmp_path, "bad name")
    rc, _, err = cli(capsys, "submit", str(bad), "--address", unreachable)
    assert rc == 2 and "job name 'bad name' is not valid" in err
    broken = toy_spec(tmp_path, "broken")
    data = yaml.safe_load(broken.read_text())
    data["models"]["sources"]["a"] = "no/such/model"
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(JobSpecError, match="models.sources.a"):
        portable_spec(broken)
    rc, _, err = cli(capsys, "submit", str(toy_spec(tmp_path, "ok")), "--address", unreachable, "--id", "../x")
    assert rc == 2 and "job id '../x' is not valid" in err


def test_an_unreachable_head_fails_within_seconds(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    start = time.monotonic()
    rc, _, err = cli(capsys, "jobs", "--address", f"http://127.0.0.1:{free_port()}")
    assert rc == 2 and "cannot reach the Ray head at http://127.0.0.1:" in err
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- a real head


def test_every_listener_of_the_head_is_on_loopback(head):
    procs = [psutil.Process(head.pid)] + psutil.Process(head.pid).children(recursive=True)
    listening = []
    for p in procs:
        try:
            listening += [c.laddr for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    assert listening, "no listening sockets found"
    def loopback(ip: str) -> bool:
        a = ipaddress.ip_address(ip)
        return a.is_loopback or bool(getattr(a, "ipv4_mapped", None) and a.ipv4_mapped.is_loopback)

    assert all(loopback(addr.ip) for addr in listening), listening


def test_a_missing_or_wrong_token_is_a_clear_error(head, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    rc, _, err = cli(capsys, "jobs", "--address", head.address)
    assert rc == 2 and f"the Ray head at {head.address} requires a token: set RAY_AUTH_TOKEN" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    rc, _, err = cli(capsys, "jobs", "--address", head.address)
    assert rc == 2 and "refused the token from RAY_AUTH_TOKEN" in err
    # the token file Ray itself would read works as well as the variable
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(head.token + "\n")
    rc, _, err = cli(capsys, "jobs", "--address", head.address)
    assert rc == 0, err


def test_an_unknown_job_id_is_a_clear_error(token, head, capsys):
    for command in ("status", "logs", "stop"):
        rc, _, err = cli(capsys, command, "evomerge-no-such-job", "--address", head.address)
        assert rc == 2 and "no job 'evomerge-no-such-job' on the Ray head" in err, (command, err)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:ssl=None is deprecated")  # inside Ray's log tailing (aiohttp)
def test_a_submitted_search_runs_and_the_cli_follows_it(token, head, tmp_path, capsys):
    spec = toy_spec(tmp_path / "jobs", "remote-toy")
    rc, out, err = cli(capsys, "submit", str(spec), "--address", head.address)
    assert rc == 0, err
    job_id = out.strip()
    assert job_id.startswith("evomerge-remote-toy-")
    info = Jobs(head.address).wait(job_id, timeout=180)
    assert info.status == "SUCCEEDED", Jobs(head.address).logs(job_id)[-3000:]

    rc, out, _ = cli(capsys, "status", job_id, "--address", head.address)
    assert rc == 0 and "status:     SUCCEEDED" in out and "name:       remote-toy" in out
    rc, out, _ = cli(capsys, "logs", job_id, "--address", head.address)
    assert rc == 0 and "Pareto front of job 'remote-toy'" in out and "generation 4: 24/24 candidates" in out
    rc, followed, _ = cli(capsys, "logs", job_id, "--follow", "--address", head.address)  # a finished job: all, then end
    assert rc == 0 and "Pareto front of job 'remote-toy'" in followed
    rc, out, _ = cli(capsys, "jobs", "--address", head.address)
    assert rc == 0 and job_id in out and "SUCCEEDED" in out and "remote-toy" in out

    # the job ran where the spec's relative store path points (resolved on the submitting side)
    store = Store(tmp_path / "jobs" / "out" / "store.sqlite", readonly=True)
    assert store.job("remote-toy")["status"] == "done" and len(store.candidates("remote-toy")) == 24
    store.close()


@pytest.mark.slow
def test_stop_of_a_search_on_ray_workers_ends_it_interrupted_within_the_grace_period(token, head, tmp_path, capsys):
    """SIGTERM (what `evomerge stop` sends) reaches a driver whose workers are Ray actors: Ray's own SIGTERM handler
    would kill it on the spot, leaving the job `running`; it ends `interrupted (SIGTERM)`, resumable, before Ray's
    SIGKILL."""
    spec = toy_spec(tmp_path / "jobs", "ray-toy", evaluations=600, delay=0.2)
    data = yaml.safe_load(spec.read_text())
    data["runtime"].update(kind="ray", workers=2)
    spec.write_text(yaml.safe_dump(data))
    rc, out, err = cli(capsys, "submit", str(spec), "--address", head.address, "--id", "evomerge-ray-toy-1")
    assert rc == 0, err
    jobs = Jobs(head.address)
    deadline = time.monotonic() + 180
    while "generation 1:" not in jobs.logs("evomerge-ray-toy-1"):
        assert time.monotonic() < deadline, jobs.logs("evomerge-ray-toy-1")[-2000:]
        assert jobs.info("evomerge-ray-toy-1").status in ("PENDING", "RUNNING"), jobs.logs("evomerge-ray-toy-1")[-2000:]
        time.sleep(0.5)
    rc, out, _ = cli(capsys, "stop", "evomerge-ray-toy-1", "--wait", "60", "--address", head.address)
    assert rc == 0 and "evomerge-ray-toy-1: STOPPED" in out
    store = Store(tmp_path / "jobs" / "out" / "store.sqlite", readonly=True)
    job = store.job("ray-toy")
    assert job["status"] == "interrupted" and job["reason"].startswith("interrupted (SIGTERM)"), job
    assert store.last_checkpoint("ray-toy") is not None
    store.close()


@pytest.mark.slow
def test_stop_ends_a_longer_job_and_leaves_it_resumable(token, head, tmp_path, capsys):
    spec = toy_spec(tmp_path / "jobs", "long-toy", evaluations=600, delay=0.2)
    rc, out, err = cli(capsys, "submit", str(spec), "--address", head.address, "--id", "evomerge-long-toy-1")
    assert rc == 0 and out.strip() == "evomerge-long-toy-1", err
    jobs = Jobs(head.address)
    deadline = time.monotonic() + 120
    while "generation 1:" not in jobs.logs("evomerge-long-toy-1"):  # well into the search
        assert time.monotonic() < deadline, jobs.logs("evomerge-long-toy-1")[-2000:]
        assert jobs.info("evomerge-long-toy-1").status in ("PENDING", "RUNNING")
        time.sleep(0.5)
    rc, out, _ = cli(capsys, "stop", "evomerge-long-toy-1", "--wait", "60", "--address", head.address)
    assert rc == 0 and "evomerge-long-toy-1: STOPPED" in out
    store = Store(tmp_path / "jobs" / "out" / "store.sqlite", readonly=True)
    job = store.job("long-toy")
    assert job["status"] in ("interrupted", "running")  # SIGTERM is Ctrl-C (interrupted) unless SIGKILL came first
    assert store.last_checkpoint("long-toy") is not None and len(store.candidates("long-toy")) < 600
    store.close()


def test_a_server_that_is_not_a_ray_head_is_named_so(capsys, monkeypatch, tmp_path):
    """A loopback server that answers /api/version without a Ray version (another service on that port)."""
    import http.server
    import threading

    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the base class's name
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 32)
    try:
        rc, _, err = cli(capsys, "jobs", "--address", f"http://127.0.0.1:{srv.server_address[1]}")
    finally:
        srv.shutdown()
    assert rc == 2 and "is not a Ray head's dashboard (its /api/version names no Ray version)" in err, err
