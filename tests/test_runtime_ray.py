"""The Ray runtime on a real Ray, on loopback: actors, as-completed dispatch, faults, local and --address modes.

One private Ray is started for the module (as `evomerge run` would start it) and shared by the in-process tests;
command-line runs join it with --address (cheaper than a Ray each), except the zoo search, which starts its own.
The scorer below sleeps as told and logs every evaluation to files, so a test can count evaluations per
candidate and find a worker in the middle of one.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge.fitness.objectives import FitnessConfigError
from evomerge.search.loop import Progress
from evomerge.search.spec import parse_job
from evomerge.store import Store
from helpers import StopAfter

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "models"
AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")


# ------------------------------------------------------------------ a scorer for tests


class Sleeper:
    """Recipes are either dicts ({"sleep": s, "fail": bool, "crash": bool, "value": v}) sent straight to a
    runtime, or real recipes from a search (scored by the toy landscape after `delay` seconds, plus
    `sleep_per_weight` x the recipe's first weight: costs that vary, so completion order is not id order). Each evaluation
    leaves `start.<pid>.<key>` in `log_dir` when it begins and a `<key> <pid> <split>` line in `done.log` when it
    ends."""

    def __init__(self, options: dict[str, Any], split: str | None):
        from evomerge.scoring.toy import ToyScorer

        if options.get("broken"):
            raise FitnessConfigError("objectives.yaml: objectives[0].task: no such task 'nope' (test)")
        if "broken_after" in options:  # the first N scorers build, later ones fail (a device still held)
            built = Path(options["log_dir"])
            if len(list(built.glob("build.*"))) >= options["broken_after"]:
                raise RuntimeError("CUDA out of memory (test)")
            Path(built, f"build.{os.getpid()}").touch()
        self.options = options
        self.toy = ToyScorer(options, split)
        self.objectives = self.toy.objectives

    def evaluate(self, recipe: Any):
        log = self.options.get("log_dir")
        if isinstance(recipe, dict):
            key = str(recipe.get("key", "x"))
        else:
            key = hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:12]
        if log:
            Path(log, f"start.{os.getpid()}.{key}").touch()
        try:
            return self._evaluate(recipe)
        finally:  # failed candidates too (a killed process never gets here)
            if log:
                with open(Path(log, "done.log"), "a") as f:
                    f.write(f"{key} {os.getpid()} {self.toy.split}\n")

    def _evaluate(self, recipe: Any):
        if not isinstance(recipe, dict):
            from evomerge.scoring.toy import numbers

            slope = float(self.options.get("sleep_per_weight", 0.0))
            time.sleep(float(self.options.get("delay", 0.0)) + slope * (numbers(recipe) or [0.0])[0])
            return self.toy.evaluate(recipe)
        time.sleep(float(recipe.get("sleep", 0.0)))
        if recipe.get("crash"):
            os._exit(3)  # the worker process dies, as with an out-of-memory kill
        once = recipe.get("crash_once")
        if once and not Path(once).exists():
            Path(once).touch()
            os._exit(3)
        if recipe.get("fail"):
            raise ValueError("this candidate is broken (test)")
        from evomerge.fitness.result import FitnessResult

        return FitnessResult({"fit": float(recipe.get("value", 0.5)), "size": 0.0}, {})


def sleeper(spec: Any, split: str | None = None) -> Sleeper:
    return Sleeper(dict(spec.runtime.scorer_options), split)


def job_dict(folder: Path, workers: int = 2, population: int = 4, evaluations: int = 12, **options: Any) -> dict:
    return {
        "name": "ray-job",
        "models": {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a"), "b": str(GOLDEN / "b")}},
        "search_space": "sakana_ps",
        "driver": {"algorithm": "nsga2", "population": population, "budget": {"evaluations": evaluations}, "seed": 3},
        "runtime": {"kind": "ray", "workers": workers, "max_retries": 2, "scorer": "test_runtime_ray:sleeper",
                    "scorer_options": {"objectives": 2, "fail_above": 0.9, **options}},
        "store": str(folder / "store.sqlite"),
    }


def write_job(folder: Path, **kw: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(folder, **kw)))
    return path


def spec_for(tmp_path: Path, **kw: Any):
    return parse_job(job_dict(tmp_path, **kw), source="<test>", base_dir=tmp_path)


def env(**extra: str) -> dict[str, str]:
    """For command-line runs: this module's token and loopback settings, the tests folder importable."""
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1", **extra}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge", *args]


# ------------------------------------------------------------------ the module's Ray


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in AUTH}
    token_file = Path.home() / ".ray" / "auth_token"
    had_token_file = token_file.exists()
    saved["PYTHONPATH"] = os.environ.get("PYTHONPATH")
    for k in AUTH:
        os.environ.pop(k, None)
    # workers import this module's scorer: the Ray processes started here inherit this environment
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), saved["PYTHONPATH"]) if p)
    from evomerge.runtime.cluster import connect

    c = connect(None, num_cpus=4)
    try:
        yield c
    finally:
        c.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:  # forget this module's token inside Ray's C++ side too
            from ray._private.authentication_test_utils import reset_auth_token_state

            reset_auth_token_state()
        except Exception:  # noqa: BLE001
            pass
        if not had_token_file and token_file.exists():
            token_file.unlink()


def runtime(tmp_path: Path, cluster, **kw: Any):
    from evomerge.search.jobs import ray_runtime

    rt = ray_runtime(spec_for(tmp_path, **kw), cluster=cluster_view(cluster))
    rt.wait_ready()
    return rt


def cluster_view(cluster):
    """The module's Ray, not owned by the runtime (closing the runtime leaves it running)."""
    from evomerge.runtime.cluster import Cluster

    return Cluster(cluster.address, owned=False, private=True)


# ------------------------------------------------------------------ tests


def test_private_ray_listens_on_loopback_only_and_writes_no_token_file(cluster):
    import psutil

    assert cluster.private and os.environ["RAY_AUTH_MODE"] == "token" and os.environ.get("RAY_AUTH_TOKEN")
    children = psutil.Process().children(recursive=True)
    names = {p.name() for p in children}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names
    listening = [c for p in children for c in _connections(p) if c.status == psutil.CONN_LISTEN]
    assert listening, "no listening sockets found"
    outside = sorted({(c.laddr.ip, c.laddr.port) for c in listening if not _loopback(c.laddr.ip)})
    assert not outside, f"listening beyond loopback: {outside}"
    assert cluster.address.startswith("127.0.0.1:")


def _loopback(ip: str) -> bool:
    import ipaddress

    a = ipaddress.ip_address(ip)
    mapped = getattr(a, "ipv4_mapped", None)
    return (mapped or a).is_loopback


def _connections(p):
    import psutil

    try:
        return p.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_actors_score_candidates_and_report_where_time_went(tmp_path, cluster):
    import ray

    rt = runtime(tmp_path, cluster)
    try:
        pids = rt.worker_pids()
        assert len(pids) == 2 and os.getpid() not in pids.values()
        for i in range(6):
            rt.submit(i, {"key": i, "sleep": 0.2, "value": i / 10})
        outs = {o.cid: o for o in rt.as_completed()}
        assert sorted(outs) == list(range(6))
        assert all(o.ok and o.values["fit"] == pytest.approx(i / 10) for i, o in outs.items())
        node = ray.get_runtime_context().get_node_id()[:8]  # one node here: both name it
        assert {o.worker for o in outs.values()} == {f"ray-0@{node}", f"ray-1@{node}"}
        s = rt.stats()
        assert s.candidates == 6 and s.failed == 0 and s.worker_deaths == 0
        assert s.score >= 6 * 0.2 and s.busy >= s.score and s.span >= s.busy * 0.99
        assert 0.0 < s.utilisation <= 1.0 and 0.0 <= s.overhead < 1.0
        assert rt.next_outcome(timeout=0.1) is None and rt.pending() == 0
    finally:
        rt.close()
    import ray

    assert ray.is_initialized(), "a runtime closes only the Ray it started"


def test_a_slow_candidate_does_not_hold_back_the_others(tmp_path, cluster):
    rt = runtime(tmp_path, cluster)
    try:
        sleeps = [2.4] + [0.3] * 6
        start = time.perf_counter()
        for i, s in enumerate(sleeps):
            rt.submit(i, {"key": i, "sleep": s})
        order = [o.cid for o in rt.as_completed()]
        wall = time.perf_counter() - start
        assert order[-1] == 0 and order != sorted(order)  # the slow one, sent first, finishes last
        # one worker holds the slow candidate while the other clears the six quick ones (1.8 s): wall is about
        # the slowest candidate, not the sum (4.2 s)
        assert wall < 0.8 * sum(sleeps), wall
        assert rt.stats().per_worker["ray-0"]["candidates"] + rt.stats().per_worker["ray-1"]["candidates"] == 7
    finally:
        rt.close()


def test_a_failing_candidate_is_recorded_and_its_worker_goes_on(tmp_path, cluster):
    rt = runtime(tmp_path, cluster, workers=1)
    try:
        pid = rt.worker_pids()["ray-0"]
        rt.submit(0, {"key": 0, "fail": True})
        rt.submit(1, {"key": 1, "value": 0.7})
        outs = {o.cid: o for o in rt.as_completed()}
        assert not outs[0].ok and "ValueError: this candidate is broken (test)" in outs[0].reason
        assert outs[1].ok and outs[1].values["fit"] == pytest.approx(0.7)
        assert rt.worker_pids() == {"ray-0": pid} and rt.stats().worker_deaths == 0
    finally:
        rt.close()


def test_a_replacement_that_cannot_start_costs_a_worker_not_the_search(tmp_path, cluster, capsys):
    """A worker dies; its replacements fail to build their scorer (as when the dead one's GPU memory is not yet
    freed): the search goes on with the workers it has, and the dead worker's candidate is retried there."""
    log = tmp_path / "log"
    log.mkdir()
    rt = runtime(tmp_path, cluster, workers=2, broken_after=2, log_dir=str(log))
    try:
        rt.submit(0, {"key": 0, "sleep": 0.2, "crash_once": str(tmp_path / "crashed")})
        for cid in range(1, 7):
            rt.submit(cid, {"key": cid, "sleep": 0.1, "value": cid / 10})
        outs = {o.cid: o for o in rt.as_completed()}
        assert sorted(outs) == list(range(7)) and all(o.ok for o in outs.values()), outs
        assert rt.wait_ready(60) == 1  # the replacements settle: none starts, the one healthy worker remains
        assert rt.stats().worker_deaths == 1 + 3  # the crashed worker and three replacements that never started
        assert len(rt.worker_pids()) == 1
    finally:
        rt.close()
    assert "replacement workers in a row could not start" in capsys.readouterr().err


def test_a_scorer_that_cannot_be_built_fails_the_start_with_its_own_error(tmp_path, cluster):
    from evomerge.search.jobs import ray_runtime

    with pytest.raises(FitnessConfigError, match="no such task 'nope'"):
        ray_runtime(spec_for(tmp_path, workers=1, broken=True), cluster=cluster_view(cluster))


def test_a_candidate_that_kills_its_worker_every_time_is_failed_after_the_retries(tmp_path, cluster):
    rt = runtime(tmp_path, cluster, workers=2)  # max_retries 2: three workers die on it
    try:
        rt.submit(0, {"key": "crash", "crash": True, "sleep": 0.1})
        for i in range(1, 5):
            rt.submit(i, {"key": i, "sleep": 0.3, "value": 0.2})
        outs = {o.cid: o for o in rt.as_completed()}
        assert sorted(outs) == list(range(5))
        assert not outs[0].ok and "the worker died 3 times" in outs[0].reason
        assert all(outs[i].ok for i in range(1, 5))
        s = rt.stats()
        assert s.worker_deaths == 3 and s.retried == 2 and len(rt.worker_pids()) >= 1
    finally:
        rt.close()


def test_a_hung_candidate_is_killed_at_its_deadline_retried_then_failed_and_the_others_go_on(tmp_path, cluster):
    from evomerge.search.jobs import ray_runtime

    spec = spec_for(tmp_path, workers=2)
    spec.runtime.candidate_timeout, spec.runtime.max_retries = 4.0, 1
    rt = ray_runtime(spec, cluster=cluster_view(cluster))
    rt.wait_ready()
    try:
        rt.submit(0, {"key": "hang", "sleep": 3600})  # hangs: its worker is killed at 4 s, twice
        for i in range(1, 6):
            rt.submit(i, {"key": i, "sleep": 0.2, "value": 0.3})
        outs = {o.cid: o for o in rt.as_completed()}
        assert sorted(outs) == list(range(6)) and all(outs[i].ok for i in range(1, 6))
        assert not outs[0].ok and outs[0].reason.startswith("timed out after 4 s, 2 times (runtime.candidate_timeout")
        s = rt.stats()
        assert s.worker_deaths == 2 and s.retried == 1
        assert rt.wait_ready() == 2 and len(rt.worker_pids()) == 2  # both killed workers were replaced
        rt.submit(6, {"key": 6, "sleep": 0.1, "value": 0.4})  # the replacements take work
        assert [o.ok for o in rt.as_completed()] == [True]
    finally:
        rt.close()


def test_a_worker_killed_long_after_the_last_start_is_replaced_not_the_search_stopped(tmp_path, cluster):
    """The one worker is killed at its candidate's deadline when the last worker start is older than the start
    timeout (late in a long search): its replacement has the start timeout from when it was asked for. (It was
    measured from the last worker that became ready, and the job stopped with "no Ray worker became ready in
    600 s" a second after the kill.)"""
    from evomerge.search.jobs import ray_runtime

    spec = spec_for(tmp_path, workers=1)
    spec.runtime.candidate_timeout, spec.runtime.max_retries = 2.0, 0
    rt = ray_runtime(spec, cluster=cluster_view(cluster))
    rt.wait_ready()
    try:
        rt._last_ready -= 2 * rt.start_timeout  # as if the worker had been running for twice the start timeout
        rt.submit(0, {"key": "hang", "sleep": 3600})  # killed at 2 s, not retried
        rt.submit(1, {"key": 1, "sleep": 0.1, "value": 0.3})  # waits for the replacement
        outs = {o.cid: o for o in rt.as_completed()}
        assert not outs[0].ok and outs[0].reason.startswith("timed out after 2 s, 1 times")
        assert outs[1].ok and outs[1].values
        assert rt.stats().worker_deaths == 1 and len(rt.worker_pids()) == 1
    finally:
        rt.close()


def test_the_default_deadline_comes_from_the_times_of_calls_of_the_same_kind():
    from evomerge.runtime.scheduler import AUTO_AFTER, AUTO_FLOOR, RayRuntime, _Task

    rt = RayRuntime.__new__(RayRuntime)  # the rule alone: no workers needed
    full, anchors = _Task(0, None, None, None), _Task(1, None, None, {"quiz": ["q1", "q2"]})
    test = _Task(2, None, "test", None)
    rt.candidate_timeout, rt._times = None, {rt._kind(full): [2.0] * (AUTO_AFTER - 1)}
    assert rt.deadline(full) is None  # too few candidates to tell what is slow
    rt._times = {rt._kind(anchors): [8.0, 10.0, 12.0, 9.0, 30.0]}
    assert rt.deadline(anchors) == 100.0  # 10x the median
    assert rt.deadline(full) is None and rt.deadline(test) is None  # a full scoring, a new split: their own clocks
    rt._times[rt._kind(full)] = [0.1] * AUTO_AFTER
    assert rt.deadline(full) == AUTO_FLOOR
    rt.candidate_timeout = 7.0
    assert rt.deadline(full) == rt.deadline(test) == 7.0


def test_killing_a_worker_mid_search_loses_nothing_and_repeats_nothing(tmp_path, cluster):
    """SIGKILL a worker while it scores a candidate: the search completes, every candidate is evaluated exactly
    once (the killed one again on a fresh worker, never twice to completion)."""
    from evomerge.search.jobs import run_job

    log = tmp_path / "log"
    log.mkdir()
    path = write_job(tmp_path / "job", workers=2, population=4, evaluations=16, delay=0.25, log_dir=str(log))
    killed: list[tuple[int, str]] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            done = (log / "done.log").read_text().split() if (log / "done.log").exists() else []
            if len(done) >= 3 * 3:  # three candidates finished: well inside the search
                finished = set(done[0::3])
                for f in log.glob("start.*"):
                    _, pid, key = f.name.split(".", 2)
                    # mid-candidate with time to spare (each takes >= 0.25 s): a kill just after the work but
                    # before Ray hands back the result would make the retry a second evaluation
                    if key not in finished and time.time() - f.stat().st_mtime < 0.1:
                        os.kill(int(pid), signal.SIGKILL)
                        killed.append((int(pid), key))
                        return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    t.join(5)
    assert killed, "never caught a worker in the middle of a candidate"
    store = Store(result.store, readonly=True)
    rows = store.candidates("ray-job")
    assert len(rows) == 16 and {r.status for r in rows} <= {"done", "failed", "cached"}
    lines = [line.split() for line in (log / "done.log").read_text().splitlines()]
    done_keys = [key for key, _, split in lines if split == "fitness"]  # the report scores the front on `test` too
    evaluated = [r for r in rows if r.status != "cached"]
    assert len(done_keys) == len(set(done_keys)), "a candidate was evaluated twice"
    assert len(done_keys) == len(evaluated)
    assert killed[0][1] in done_keys  # the killed worker's candidate was finished by another worker
    workers = {r.worker.split("@")[0] for r in evaluated}
    assert "ray-2" in workers, workers  # the replacement worked
    store.close()


def test_a_ray_search_killed_with_sigkill_resumes_to_the_same_archive(tmp_path, cluster):
    """Resume identity with the Ray runtime: `evomerge run --address` killed mid-generation, then `evomerge
    resume --address`, ends with the archive of an uninterrupted run (which ran in-process on the same Ray)."""
    from evomerge.search.jobs import run_job

    straight = run_job(write_job(tmp_path / "straight", population=4, evaluations=20, delay=0.1),
                       out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    path = write_job(tmp_path / "killed", population=4, evaluations=20, delay=0.1)
    store_path = path.parent / "store.sqlite"
    proc = subprocess.Popen(cli("run", str(path), "--address", cluster.address), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and killed_at is None:
        if store_path.is_file():
            try:
                reader = Store(store_path, readonly=True)
            except Exception:  # noqa: BLE001 - the schema is not written yet
                time.sleep(0.02)
                continue
            last = reader.last_checkpoint("ray-job") if reader.jobs() else None
            if last and last[0] >= 2:
                done = [r for r in reader.candidates("ray-job", generation=last[0]) if r.status in ("done", "failed")]
                if 1 <= len(done) < 4:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = (last[0], len(done))
            reader.close()
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert killed_at is not None, f"never caught the run mid-generation: {proc.stderr.read().decode()[-2000:]}"
    resumed = subprocess.run(cli("resume", str(path), "--address", cluster.address), env=env(), capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = [r.identity() for r in Store(straight.store, readonly=True).candidates("ray-job")]
    b = [r.identity() for r in Store(store_path, readonly=True).candidates("ray-job")]
    assert len(a) == 20 and a == b
    assert Store(store_path, readonly=True).front("ray-job") == Store(straight.store, readonly=True).front("ray-job")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evomerge_run_joins_a_cluster_by_address(tmp_path):
    """A separate `ray start --head` on 127.0.0.1 with token auth (its own token); `evomerge run --address`
    runs its workers there."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="evr-", dir="/tmp")  # Ray's socket paths must stay short
    head_env = env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="a" * 64,
                   RAY_USAGE_STATS_ENABLED="0")
    head_env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={temp}"],
                            env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        path = write_job(tmp_path / "job", evaluations=4)
        run = subprocess.run(cli("run", str(path), "--address", f"127.0.0.1:{port}"), env=head_env,
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-3000:] + (head.stderr.read().decode()[-2000:] if head.poll() else "")
        rows = Store(path.parent / "store.sqlite", readonly=True).candidates("ray-job")
        assert len(rows) == 4 and {r.worker.split("@")[0] for r in rows if r.status == "done"} <= {"ray-0", "ray-1"}
        assert head.poll() is None  # the job disconnected; the cluster it joined runs on
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def test_runtime_kind_follows_workers_and_address(tmp_path, monkeypatch):
    """auto: Ray with more than one worker or an address (--address, else RAY_ADDRESS); local otherwise."""
    import evomerge.runtime.scheduler as scheduler
    from evomerge.search import jobs
    from evomerge.runtime.local import LocalRuntime

    made: list[str | None] = []

    class Fake:
        def __init__(self, scorer, address=None, **options):
            made.append(address)

    monkeypatch.setattr(scheduler, "RayRuntime", Fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    one = spec_for(tmp_path, workers=1)
    one.runtime.kind = "auto"
    assert isinstance(jobs.make_runtime(one), LocalRuntime)
    assert isinstance(jobs.make_runtime(one, "10.0.0.1:6379"), Fake) and made[-1] == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert isinstance(jobs.make_runtime(one), Fake) and made[-1] == "10.0.0.2:6379"
    assert isinstance(jobs.make_runtime(one, "10.0.0.1:6379"), Fake) and made[-1] == "10.0.0.1:6379"
    one.runtime.kind = "local"
    assert isinstance(jobs.make_runtime(one), LocalRuntime)
    monkeypatch.delenv("RAY_ADDRESS")
    two = spec_for(tmp_path, workers=2)
    two.runtime.kind = "auto"
    assert isinstance(jobs.make_runtime(two), Fake) and made[-1] is None


def test_local_runtime_builds_scorers_from_a_factory_per_split_and_times_each_outcome():
    """No job spec: a factory builds one scorer per split, on first use; each outcome splits the scorer's call
    into materialising (the result's load_seconds) and scoring, and the stats add them up."""
    from evomerge.fitness.objectives import Objective, ObjectiveSet
    from evomerge.fitness.result import FitnessResult
    from evomerge.runtime.local import LocalRuntime

    built: list[str | None] = []

    class Loading:
        def __init__(self, split: str | None):
            built.append(split)
            self.objectives = ObjectiveSet((Objective("fit", kind="task", task="toy", direction="maximise"),),
                                           split=split or "fitness", source="<test>")

        def evaluate(self, recipe):  # no `items`: this scorer scores whole splits only
            time.sleep(0.05)
            return FitnessResult({"fit": recipe["value"]}, {"fit": {"a": 1}}, load_seconds=0.03)

    rt = LocalRuntime(Loading, threads=1)
    try:
        assert built == [None]
        rt.submit(0, {"value": 0.25})
        rt.submit(1, {"value": 0.5}, split="test")
        outs = list(rt.as_completed())
        assert built == [None, "test"] and [o.cid for o in outs] == [0, 1]
        assert [o.values for o in outs] == [{"fit": 0.25}, {"fit": 0.5}] and outs[0].items == {"fit": {"a": 1.0}}
        for o in outs:
            assert o.seconds >= 0.05 and o.materialise_seconds == 0.03
            assert o.score_seconds == pytest.approx(o.seconds - 0.03)
        s = rt.stats()
        assert s.candidates == 2 and s.materialise == pytest.approx(0.06)
        assert s.materialise + s.score == pytest.approx(s.busy) and s.busy >= 0.1
    finally:
        rt.close()


def test_runtime_fields_are_checked_with_file_and_field(tmp_path):
    from evomerge.search.spec import JobSpecError

    for field_name, value, message in [("kind", "spark", "runtime.kind: must be auto, local or ray"),
                                       ("gpus", -1, "runtime.gpus: must be a number"),
                                       ("max_retries", -1, "runtime.max_retries: must be a whole number >= 0"),
                                       ("candidate_timeout", 0, "runtime.candidate_timeout: must be a finite number")]:
        data = job_dict(tmp_path)
        data["runtime"][field_name] = value
        with pytest.raises(JobSpecError, match=field_name) as e:
            parse_job(data, source="job.yaml", base_dir=tmp_path)
        assert str(e.value).startswith("job.yaml: " + message)


def _stop(head: subprocess.Popen) -> None:
    """`ray start --block` stops the processes it started on SIGTERM; whatever is left of its group is killed."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_a_zoo_search_with_two_ray_workers_through_evomerge_run(tmp_path, zoo_dir):
    """The real pipeline on a private Ray started by `evomerge run`: zoo models resident in two actors, merged in
    memory, scored by lm-eval."""
    llama = zoo_dir / "llama"
    spec = {
        "name": "zoo-ray",
        "models": {"base": str(llama / "base"), "sources": {"arith": str(llama / "arith"), "cipher": str(llama / "cipher")}},
        "search_space": "sakana_ps",
        "objectives": {"include": [str(REPO / "fitness")], "objectives": [
            {"task": "zoo_mix", "metric": "exact_match", "direction": "maximise", "limit": 64}]},
        # enough work (about 0.5 s a candidate) that a worker ready a few seconds after the other still gets some:
        # dispatch starts with the first ready worker, and on a busy 2-core machine the second can lag
        "driver": {"algorithm": "random", "population": 4, "budget": {"evaluations": 16}, "seed": 0},
        "runtime": {"workers": 2, "threads": 1, "backend": "hf"},
        "store": str(tmp_path / "store.sqlite"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    clean = {k: v for k, v in env().items() if k not in AUTH}
    run = subprocess.run(cli("run", str(path)), env=clean, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Pareto front" in run.stdout and "runtime: 16 candidates on 2 workers" in run.stdout
    assert "it/s]" not in run.stderr, "third-party progress bars leak from the workers"
    rows = Store(tmp_path / "store.sqlite", readonly=True).candidates("zoo-ray")
    assert len(rows) == 16 and all(r.status in ("done", "cached") for r in rows)
    assert {r.worker.split("@")[0] for r in rows if r.status == "done"} == {"ray-0", "ray-1"}
    assert all(0.0 <= r.values["zoo_mix"] <= 1.0 for r in rows)


def test_steady_search_on_ray_matches_the_in_process_one_also_interrupted_and_resumed(tmp_path, cluster):
    """Steady mode (lag 1) with candidates of varying cost on 2 Ray workers (completion order is not id order):
    every candidate evaluated once, and the same archive and checkpointed failure counters as in-process on one
    worker. Then a Ray run interrupted mid-search and resumed in-process ends with that archive too."""
    from evomerge.search.jobs import local_runtime, ray_runtime
    from evomerge.search.loop import Search
    from evomerge.search.state import LoopState

    log = tmp_path / "log"
    log.mkdir()

    def search(name: str, make, progress: Progress | None = None, store_path: Path | None = None):
        data = job_dict(tmp_path / name, population=4, evaluations=24, sleep_per_weight=0.25, fail_above=0.5,
                        log_dir=str(log) if name == "ray" else None)
        data["driver"].update(mode="steady", lag=1, max_failures_in_a_row=50)
        spec = parse_job(data, source="<test>", base_dir=tmp_path)
        store = Store(store_path or spec.store)
        if store.job(spec.name) is None:
            store.create_job(spec.name, spec.to_dict(), spec.driver.seed)
        rt = make(spec)
        try:
            Search(spec, store, rt, progress or Progress(io.StringIO(), live=False)).run()
        finally:
            stats = rt.stats()
            rt.close()
            rows = store.candidates("ray-job")
            states = [LoopState.from_json(state) for _, state in store.checkpoints("ray-job")]  # every one is kept
            saved = [(s.generation, s.failures.failures_in_a_row, s.failures.recent, s.ahead) for s in states]
            store.close()
        return rows, saved, stats

    local_rows, local_saved, _ = search("local", local_runtime)
    ray_rows, ray_saved, stats = search("ray", lambda spec: ray_runtime(spec, cluster=cluster_view(cluster)))
    assert len(ray_rows) == 24 and [r.identity() for r in ray_rows] == [r.identity() for r in local_rows]
    assert ray_saved == local_saved and len(ray_saved) == 6 and any(a for *_, a in ray_saved)  # asked ahead
    evaluated = [r for r in ray_rows if r.status != "cached"]
    lines = [line.split() for line in (log / "done.log").read_text().splitlines()]
    done_keys = [key for key, _, split in lines if split == "fitness"]
    assert sorted(done_keys) == sorted(r.recipe_hash[:12] for r in evaluated)  # each evaluated exactly once
    order = {r.recipe_hash[:12]: r.id for r in evaluated}
    assert [order[k] for k in done_keys] != sorted(order[k] for k in done_keys)  # finished out of id order
    assert {r.worker.split("@")[0] for r in evaluated} == {"ray-0", "ray-1"} and 0 < stats.utilisation <= 1

    with pytest.raises(KeyboardInterrupt):
        search("cut", lambda spec: ray_runtime(spec, cluster=cluster_view(cluster)), progress=StopAfter(10))
    cut = tmp_path / "cut" / "store.sqlite"
    assert Store(cut, readonly=True).job("ray-job")["status"] == "interrupted"
    resumed_rows, _, _ = search("cut", local_runtime, store_path=cut)  # one worker now, not two
    assert [r.identity() for r in resumed_rows] == [r.identity() for r in local_rows]
