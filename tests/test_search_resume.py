"""Resume identity: `evomerge run` killed with SIGKILL mid-generation, then `evomerge resume`, ends with the same
archive (candidates, genomes, recipes, values, statuses) as an uninterrupted run with the same seed. And a resume
never unpickles: planted pickles are refused or dropped unread, older stores are rebuilt by replay."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import as_schema_2, planted_pickle
from helpers import StopAfter
from evomerge.search.jobs import resume_job, run_job
from evomerge.search.loop import Progress
from evomerge.store import SCHEMA_VERSION, Store, StoreError

GOLDEN = Path(__file__).resolve().parent / "golden" / "models"
REPO = Path(__file__).resolve().parent.parent


def job(folder: Path, algorithm: str, space: str, zoo: Path | None = None, mode: str = "generational") -> Path:
    """A job on the synthetic landscape, or, with `zoo`, on the zoo's models with real lm-eval fitness."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": "killme",
        "models": {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a"), "b": str(GOLDEN / "b")}},
        "search_space": space,
        "driver": {"algorithm": algorithm, "population": 6, "budget": {"evaluations": 48}, "seed": 7, "mode": mode},
        "runtime": {"scorer": "evomerge.scoring.toy:scorer",
                    "scorer_options": {"delay": 0.04, "objectives": 1 if algorithm == "cmaes" else 2,
                                          "fail_above": 0.9}},
        "store": "store.sqlite",
    }
    if zoo is not None:
        llama = zoo / "llama"
        spec["models"] = {"base": str(llama / "base"), "sources": {"arith": str(llama / "arith"), "cipher": str(llama / "cipher")}}
        spec["driver"].update(population=4, budget={"evaluations": 16})
        spec["runtime"] = {"threads": 1, "backend": "hf"}
        spec["objectives"] = {"include": [str(REPO / "fitness")], "objectives": [
            {"task": "zoo_mix", "metric": "exact_match", "direction": "maximise", "limit": 24},
            {"builtin": "params", "direction": "minimise"}]}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# layer paths over the golden models: most genomes repeat a path asked before, which the driver breeds again
# (`driver.duplicates: skip`), so the replay must re-breed them alike
PATHS = {"kind": "dfs", "repeats": 1, "min_layers": 1, "max_layers": 4, "scales": "none"}


@pytest.mark.parametrize("algorithm, space, mode", [("nsga2", "sakana_ps", "generational"),
                                                    ("cmaes", "layerwise_ps", "generational"),
                                                    ("nsga2", "sakana_ps", "steady"),
                                                    ("nsga2", PATHS, "generational")],
                         ids=["nsga2", "cmaes", "nsga2-steady", "nsga2-paths"])
def test_kill_9_mid_search_then_resume_gives_the_same_archive(tmp_path, algorithm, space, mode):
    """Steady mode (lag 1) is killed with a batch asked ahead of the one being waited for: the resume re-submits
    both batches' unfinished rows and reuses the finished ones."""
    # paths: a generation may be bred short (mating found fewer new paths), so the budget ends a few later
    total = 48 if space is not PATHS else None
    kill_and_resume(tmp_path, algorithm, space, zoo=None, population=6, total=total, min_generation=3, mode=mode)


@pytest.mark.slow
def test_kill_9_then_resume_with_real_models_and_lm_eval_fitness(tmp_path, zoo_dir):
    """The same identity with the real pipeline: zoo models merged in memory, scored by lm-eval on zoo_mix."""
    kill_and_resume(tmp_path, "nsga2", "sakana_ps", zoo=zoo_dir, population=4, total=16, min_generation=1)


def kill_and_resume(tmp_path: Path, algorithm: str, space: str | dict, zoo: Path | None, population: int,
                    total: int | None,
                    min_generation: int, mode: str = "generational") -> None:
    straight = run_job(job(tmp_path / "straight", algorithm, space, zoo, mode), out=io.StringIO(),
                       progress=Progress(io.StringIO(), live=False))

    path = job(tmp_path / "killed", algorithm, space, zoo, mode)
    store_path = path.parent / "store.sqlite"
    proc = subprocess.Popen(cli("run", str(path)), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if store_path.is_file():
            try:
                reader = Store(store_path, readonly=True)
            except StoreError:  # the file exists, its schema not yet
                continue
            last = reader.last_checkpoint("killme") if reader.jobs() else None
            if last and last[0] >= min_generation:
                done = [r for r in reader.candidates("killme", generation=last[0]) if r.status in ("done", "failed")]
                if 1 <= len(done) < population:  # part of a generation evaluated: the hard case
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = (last[0], len(done))
            reader.close()
            if killed_at:
                break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert killed_at is not None, f"never caught the run mid-generation: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL

    store = Store(store_path, readonly=True)
    shown = store.job("killme")  # stored `running`, as a crash leaves it; read as what it is
    assert shown["status"] == "interrupted" and f"pid {proc.pid}" in shown["reason"], shown
    store.close()
    resumed = subprocess.run(cli("resume", str(path)), env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Pareto front" in resumed.stdout
    assert "it/s]" not in resumed.stderr, "third-party progress bars leak into the search's output"

    a = [r.identity() for r in Store(straight.store, readonly=True).candidates("killme")]
    b = [r.identity() for r in Store(store_path, readonly=True).candidates("killme")]
    assert (len(a) == total if total is not None else len(a) >= 48) and a == b
    assert Store(store_path, readonly=True).front("killme") == Store(straight.store, readonly=True).front("killme")


# ---------------------------------------------------------------- resume never unpickles


def interrupted(folder: Path, mode: str = "generational", after: int = 20) -> Path:
    """A job cut by Ctrl-C after `after` candidates (three generations of six told, the fourth under way)."""
    path = job(folder, "nsga2", "sakana_ps", mode=mode)
    with pytest.raises(KeyboardInterrupt):
        run_job(path, out=io.StringIO(), progress=StopAfter(after))
    return path


def archive(store_path: Path) -> tuple[list[tuple], list[int]]:
    store = Store(store_path, readonly=True)
    try:
        return [r.identity() for r in store.candidates("killme")], store.front("killme")
    finally:
        store.close()


def test_a_planted_pickle_in_a_checkpoint_is_refused_without_running_it(tmp_path):
    path, marker = interrupted(tmp_path), tmp_path / "MARKER"
    store = Store(path.parent / "store.sqlite")
    store.db.execute("UPDATE checkpoints SET state=?", (planted_pickle(marker),))
    store.close()
    with pytest.raises(StoreError, match="not JSON search state.*not loaded"):
        resume_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    assert not marker.exists()


def test_a_schema_2_store_with_pickled_checkpoints_resumes_by_replay_without_unpickling(tmp_path):
    """A store written before schema 3 (its last checkpoints pickles, here hostile ones) upgrades on resume: the
    pickles are dropped unread, the driver and counters are rebuilt from the candidates, and the job ends with the
    archive of an uninterrupted run."""
    straight = run_job(job(tmp_path / "straight", "nsga2", "sakana_ps"), out=io.StringIO(),
                       progress=Progress(io.StringIO(), live=False))
    path, marker = interrupted(tmp_path / "old"), tmp_path / "MARKER"
    store_path = path.parent / "store.sqlite"
    as_schema_2(store_path, planted_pickle(marker))
    resume_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    assert not marker.exists()
    assert archive(store_path) == archive(straight.store) and len(archive(store_path)[0]) == 48
    store = Store(store_path, readonly=True)
    assert store.schema_version == SCHEMA_VERSION and store.objectives("killme") == [("fit", "maximise"), ("size", "minimise")]
    assert [g for g, state in store.checkpoints("killme") if state is None] == [1, 2, 3]  # upgraded, unread


def test_a_schema_2_steady_job_is_refused_without_unpickling(tmp_path):
    path, marker = interrupted(tmp_path, mode="steady"), tmp_path / "MARKER"
    as_schema_2(path.parent / "store.sqlite", planted_pickle(marker))
    with pytest.raises(StoreError, match="never loaded.*steady-mode job cannot be rebuilt.*under another name"):
        resume_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    assert not marker.exists()


def test_a_replay_that_asks_other_genomes_than_the_stored_ones_is_refused(tmp_path):
    """The fresh driver must ask exactly what the archive holds, else it would continue another search."""
    path = interrupted(tmp_path)
    store = Store(path.parent / "store.sqlite")
    row = store.candidates("killme", generation=1)[2]
    store.db.execute("UPDATE candidates SET genome=? WHERE job='killme' AND id=?",
                     (json.dumps([v + 1e-12 for v in row.genome]), row.id))
    store.close()
    with pytest.raises(StoreError, match="generation 1 asked 6 genomes that are not the 6 stored ones"):
        resume_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))


# ---------------------------------------------------------------- one writer per job


def test_one_writer_per_job_a_second_is_refused_a_dead_or_silent_one_is_taken_over(tmp_path):
    import socket
    import sqlite3

    from evomerge.store.lock import WriterLock

    path = interrupted(tmp_path / "job")
    store_path = tmp_path / "job" / "store.sqlite"
    with WriterLock(Store(store_path), "killme"):  # a live writer (this very process)
        with pytest.raises(StoreError, match=rf"job 'killme' is being written by pid {os.getpid()} on "):
            resume_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
        assert Store(store_path, readonly=True).job("killme")["status"] == "interrupted"  # refused before any work

    def plant(host: str, pid: int, heartbeat: float) -> None:
        db = sqlite3.connect(store_path, isolation_level=None)
        db.execute("INSERT OR REPLACE INTO writers VALUES ('killme', ?, ?, ?, ?, 'theirs')", (host, pid, heartbeat, heartbeat))
        db.close()

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid of this host that no longer runs: a writer killed with -9
    plant(socket.gethostname(), gone.pid, time.time())
    lines = io.StringIO()
    resume_job(path, out=io.StringIO(), progress=Progress(lines, live=False))
    assert f"took over job 'killme' from pid {gone.pid} on {socket.gethostname()} (its process is gone)" in lines.getvalue()
    db = sqlite3.connect(store_path)
    assert db.execute("SELECT COUNT(*) FROM writers").fetchone()[0] == 0  # released when the job ended
    db.close()

    plant("another-host", 1, time.time())  # alive, as far as anyone here can tell
    with pytest.raises(StoreError, match="being written by pid 1 on another-host"):
        resume_job(path, out=io.StringIO(), progress=Progress(io.StringIO(), live=False))
    plant("another-host", 1, time.time() - 3600)  # silent for an hour: taken over
    lines = io.StringIO()
    resume_job(path, out=io.StringIO(), progress=Progress(lines, live=False))
    assert "took over job 'killme' from pid 1 on another-host (silent for 3600 s)" in lines.getvalue()

    paused = Store(store_path)  # a holder paused past the stale time and taken over stops at its next checkpoint
    with WriterLock(paused, "killme"):
        plant("another-host", 1, time.time())  # the successor's row
        with pytest.raises(StoreError, match="now held by pid 1 on another-host: this process lost its writer lock"):
            paused.save_checkpoint("killme", 99, {"generation": 99})
    assert [g for g, _ in paused.checkpoints("killme")][-1] != 99


def test_a_store_whose_disk_fills_mid_search_stops_with_one_line_and_resumes_to_the_same_archive(tmp_path):
    """The store's disk fills mid-search (a file-size limit in the run's process: every write past it fails as on
    a full disk): one line naming the store and what to do, exit 2, no traceback; the store is consistent, and a
    resume with room gives the uninterrupted run's archive."""
    import resource

    straight = run_job(job(tmp_path / "straight", "nsga2", "sakana_ps"), out=io.StringIO(),
                       progress=Progress(io.StringIO(), live=False))
    path = job(tmp_path / "full", "nsga2", "sakana_ps")
    limit = 1_000_000  # bytes per file: the store's WAL passes it about two thirds into this search (measured)

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = subprocess.run(cli("run", str(path)), env=env(), capture_output=True, text=True, timeout=300,
                         preexec_fn=small_disk)
    assert run.returncode == 2, (limit, run.stderr[-2000:])
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "store.sqlite: the store could not be written" in last, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    partial = Store(path.parent / "store.sqlite", readonly=True)
    told = partial.last_checkpoint("killme")[0]
    assert 0 < len(partial.candidates("killme")) < 48 and told >= 1
    stored = partial.db.execute("SELECT status FROM jobs WHERE name='killme'").fetchone()[0]
    shown = partial.job("killme")  # stored `interrupted` when the last write fitted; else read so: its writer is gone
    assert shown["status"] == "interrupted" and shown["reason"].count("evomerge resume") == 1, (stored, shown)
    partial.close()
    resumed = subprocess.run(cli("resume", str(path)), env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert archive(path.parent / "store.sqlite") == archive(Path(straight.store))
