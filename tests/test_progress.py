"""The search's output: the live display through a pseudo-terminal, plain lines without one, the numbers both show
(counts, ETA, best values, hypervolume) and what the runtimes say their workers are doing."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from helpers import write_job

from evomerge.fitness.objectives import Objective, ObjectiveSet
from evomerge.fitness.result import FitnessResult
from evomerge.runtime.local import LocalRuntime
from evomerge.runtime.stats import Activity, WorkerActivity, phase
from evomerge.search.front import hypervolume, pareto_mask
from evomerge.search.jobs import run_job
from evomerge.search.progress import Best, Progress, Rate, Status, duration
from evomerge.store import Store

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def toy(tmp_path: Path, delay: float = 0.01) -> Path:
    return write_job(tmp_path, runtime={"scorer": "evomerge.scoring.toy:scorer", "scorer_options": {"delay": delay}})


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "TERM": "xterm-256color",
            "OMP_NUM_THREADS": "1"}


def run_in_pty(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as its stdin, stdout and stderr (120 x 40); everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env(), cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_the_live_display_follows_the_search_to_its_budget(tmp_path):
    rc, raw = run_in_pty([sys.executable, "-m", "evomerge", "run", str(toy(tmp_path))], tmp_path)
    assert rc == 0, raw[-3000:]
    assert "\x1b[" in raw  # drawn with escapes: a live display, not lines
    text = ANSI.sub("", raw).replace("\r", "")
    frames = text.split("evomerge · job toy · ")
    assert len(frames) > 3  # redrawn as candidates landed
    last = frames[-1]  # the display as the job ended (rich draws it once more when it stops)
    assert last.startswith("generation 3 · done")
    assert re.search(r"candidates .* 24/24 done", last)
    assert "evaluated 24 · cached 0 · failed 0 · in flight 0 · queued 0" in last
    assert re.search(r"ETA +0 s \(elapsed \d+", last)
    assert re.search(r"throughput \d+\.\d/min", last)
    assert re.search(r"workers +local +idle", last)
    # the best values and the hypervolume are the stored job's
    store = Store(tmp_path / "out" / "store.sqlite", readonly=True)
    done = store.candidates("toy", status="done")
    fit = max(r.values["fit"] for r in done)
    size = min(r.values["size"] for r in done)
    assert f"fit {fit:.4g} (max) · size {size:.4g} (min)" in last
    F = np.array([r.losses for r in done])
    ref = np.array(store.last_checkpoint("toy")[1]["ref_point"])
    assert f"front      {int(pareto_mask(F).sum())} candidate(s) · hypervolume {hypervolume(F, ref):.4g}" in last
    # the generation lines stay above the display, each once; the front table follows it
    for g in range(1, 5):
        assert text.count(f"generation {g}: {6 * g}/24 candidates") == 1
    assert text.index("generation 3 · done") < text.index("Pareto front of job 'toy'")


def test_without_a_terminal_the_output_is_plain_lines_never_repeated(tmp_path):
    run = subprocess.run([sys.executable, "-m", "evomerge", "run", str(toy(tmp_path))], cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for stream in (run.stdout, run.stderr):
        assert "\x1b" not in stream and "\r" not in stream
        lines = [line for line in stream.splitlines() if line.strip()]
        assert all(a != b for a, b in zip(lines, lines[1:])), lines
    assert [line.split(":")[0] for line in run.stderr.splitlines() if line.startswith("generation")] == [
        "generation 1", "generation 2", "generation 3", "generation 4"]


def test_plain_status_lines_count_to_the_budget_with_an_eta(tmp_path):
    log = io.StringIO()
    run_job(toy(tmp_path, delay=0.0), out=io.StringIO(), progress=Progress(log, live=False, every=0))
    status = [line for line in log.getvalue().splitlines() if line.startswith("toy: ")]
    finished = [int(re.match(r"toy: (\d+)/24 candidates finished", line).group(1)) for line in status]
    assert finished == sorted(set(finished)) and finished[-1] == 24  # one line per landing, never the same twice
    assert len(finished) >= 20  # nearly every candidate (a cached repeat lands with the one it repeats)
    assert "ETA " in status[-1] and "in flight" in status[-1] and "hypervolume" in status[-1]
    assert all("\x1b" not in line for line in log.getvalue().splitlines())


def test_a_line_said_twice_in_a_row_is_written_once():
    log = io.StringIO()
    p = Progress(log, live=False)
    for text in ["a", "a", "b", "a", "a"]:
        p.line(text)
    assert log.getvalue() == "a\nb\na\n"


def test_the_eta_is_the_candidates_left_at_the_measured_rate_or_the_clock_left():
    s0 = Status(job="j", generation=0, asked=10, done=2, budget=50)
    rate = Rate()
    rate.seen(s0, now=100.0)  # a resumed job: 2 finished before this run
    assert rate.per_minute(s0, 100.0) is None and rate.eta(s0, 100.0) is None
    s = Status(job="j", generation=1, asked=20, done=8, cached=2, failed=2, budget=50)  # 12 finished, 10 in this run
    assert rate.per_minute(s, 160.0) == pytest.approx(10.0)
    assert rate.eta(s, 160.0) == pytest.approx(38 / 10 * 60)  # 38 left at 10/min
    timed = Status(job="j", generation=1, asked=20, done=12, budget=50, seconds_budget=600.0, elapsed_before=400.0)
    assert rate.eta(timed, 160.0) == pytest.approx(600 - 400 - 60)  # the clock ends first
    assert [duration(x) for x in (4.4, 185, 7620)] == ["4 s", "3 min 05 s", "2 h 07 min"]


def test_the_recorders_running_front_and_best_values_match_the_store(tmp_path):
    from evomerge.search.jobs import local_runtime
    from evomerge.search.loop import Search
    from evomerge.search.spec import load_job

    spec = load_job(toy(tmp_path, delay=0.0))
    store = Store(spec.store)
    runtime = local_runtime(spec)
    store.create_job(spec.name, spec.to_dict(), spec.driver.seed)
    search = Search(spec, store, runtime, Progress(io.StringIO(), live=False))
    search.run()
    s = search.recorder.status()
    done = store.candidates("toy", status="done")
    F = np.array([r.losses for r in done])
    counts = store.counts("toy")
    assert (s.done, s.cached, s.failed, s.finished, s.budget) == (counts.get("done", 0), counts.get("cached", 0),
                                                                  counts.get("failed", 0), 24, 24)
    assert s.best == (Best("fit", "maximise", max(r.values["fit"] for r in done)),
                      Best("size", "minimise", min(r.values["size"] for r in done)))
    assert s.front == int(pareto_mask(F).sum())
    ref = store.last_checkpoint("toy")[1]["ref_point"]
    assert s.hypervolume == pytest.approx(hypervolume(F, np.array(ref)))
    runtime.close()


class Asking:
    """A scorer that asks the runtime what it is doing, from inside its evaluate call."""

    def __init__(self, runtime_box: list):
        self.objectives = ObjectiveSet((Objective("x", kind="task", task="t", direction="maximise"),), split="fitness",
                                       source="<test>")
        self.box, self.seen = runtime_box, []

    def evaluate(self, recipe):
        self.seen.append(self.box[0].activity())
        return FitnessResult({"x": 1.0}, {}, load_seconds=1e9)  # capped at the call's own time


def test_the_local_runtime_says_what_its_worker_does():
    box: list = []
    scorer = Asking(box)
    rt = LocalRuntime(lambda split: scorer)
    box.append(rt)
    for cid in (7, 8, 9):
        rt.submit(cid, object())
    assert rt.activity() == Activity([WorkerActivity("local", "idle")], queued=3)
    outs = [next(rt.as_completed())]
    first = scorer.seen[0].workers[0]
    assert (first.state, first.cid, first.candidates, scorer.seen[0].queued) == ("busy", 7, 0, 2)  # none measured yet
    outs.append(next(rt.as_completed()))
    second = scorer.seen[1].workers[0]
    # the phase is inferred from the first candidate's measured materialise time
    assert (second.state, second.cid, second.candidates) == (phase(second.seconds, outs[0].materialise_seconds), 8, 1)
    assert second.state in ("materialising", "scoring")
    list(rt.as_completed())
    assert rt.activity() == Activity([WorkerActivity("local", "idle", candidates=3)], queued=0)
    assert (phase(2.0, 1.5), phase(1.0, 1.5), phase(1.0, None)) == ("scoring", "materialising", "busy")


def test_the_ray_runtime_reports_its_slots_without_asking_the_workers():
    from evomerge.runtime.scheduler import RayRuntime, _Slot, _Task

    rt = RayRuntime.__new__(RayRuntime)  # no Ray: the scheduler's own bookkeeping is what is read
    retried = _Task(5, None, None, None, deaths=["RayActorError: killed"])
    rt._slots = [_Slot("ray-0", None, state="busy", task=retried, sent=0.0, candidates=3, materialise=1e9),
                 _Slot("ray-1", None, state="idle", candidates=4), _Slot("ray-2", None, state="dead"),
                 _Slot("ray-3", None, state="starting")]
    from collections import deque

    rt._queue = deque([_Task(6, None, None, None), _Task(7, None, None, None)])
    act = rt.activity()
    assert [(w.name, w.state, w.cid, w.retry, w.candidates) for w in act.workers] == [
        ("ray-0", "materialising", 5, 1, 3), ("ray-1", "idle", None, 0, 4), ("ray-2", "dead", None, 0, 0),
        ("ray-3", "starting", None, 0, 0)]
    assert (act.in_flight, act.queued) == (1, 2)


def test_the_panel_shows_workers_retries_and_only_the_last_dead_ones():
    from rich.console import Console

    class Fake:
        def activity(self):
            dead = [WorkerActivity(f"ray-{i}", "dead") for i in range(5)]
            return Activity([WorkerActivity("ray-5", "scoring", 12, 75.0, 2, retry=1),
                             WorkerActivity("ray-6", "idle", candidates=3)] + dead, queued=4)

    p = Progress(io.StringIO(), live=False)
    p.watch(Fake())
    p.status(Status(job="j", generation=2, asked=20, done=9, cached=1, budget=40,
                    best=(Best("acc", "maximise", 0.5, estimated=True),), hypervolume=0.25, front=3))
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(p.render())
    text = console.file.getvalue()
    assert "job j · generation 2 · searching" in text and "10/40 done" in text
    assert "evaluated 9 · cached 1 · failed 0 · in flight 1 · queued 4" in text
    assert "acc ~0.5 (max)" in text and "3 candidate(s) · hypervolume 0.25" in text
    assert "ray-5      scoring       #12 for 1 min 15 s, retry 1 (2 scored)" in text
    assert "ray-6      idle          (3 scored)" in text
    assert "ray-4" in text and "ray-1" not in text and "(and 2 earlier dead worker(s), replaced)" in text
