"""Kill -9 soak: a search killed at random moments, resumed (and killed again) until it finishes, must end with the
archive and front of the uninterrupted run; an export killed mid-write must leave no output folder.

    .venv/bin/python bench/kill_soak.py [--runs 20] [--seed 0] [--max-kills 3]

The job is the resume tests' toy search (golden models, the toy scorer with a per-candidate delay, NSGA-II, 48
candidates), run as `evomerge run` / `evomerge resume` subprocesses. Each kill falls at a uniformly random time
within the uninterrupted run's duration, so some land inside store writes (a generation's checkpoint, a batch of
outcomes), some during start-up and some during the final report. Prints each run's kills (seconds after start,
which command) and the verdict, then the total; exit status 1 if any run's archive differs.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "models"
sys.path.insert(0, str(REPO))


def write_job(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": "soak", "models": {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a"),
                                                                                 "b": str(GOLDEN / "b")}},
            "search_space": "sakana_ps",
            "driver": {"algorithm": "nsga2", "population": 6, "budget": {"evaluations": 48}, "seed": 7},
            "runtime": {"scorer": "evomerge.scoring.toy:scorer", "scorer_options": {"delay": 0.04, "fail_above": 0.9}},
            "store": "store.sqlite"}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def evomerge(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge", *args]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def archive(store: Path) -> tuple:
    from evomerge.store import Store

    s = Store(store, readonly=True)
    try:
        return tuple(r.identity() for r in s.candidates("soak")), tuple(s.front("soak")), s.job("soak")["status"]
    finally:
        s.close()


def run_killed(cmd: list[str], after: float) -> int | None:
    """Start `cmd`, kill -9 it `after` seconds in: None if it was killed, else its exit status (it finished first)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-kills", type=int, default=3, help="kills per run at most (each resume may be killed too)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="evomerge-soak-"))
    start = time.perf_counter()
    straight = write_job(root / "straight")
    subprocess.run(evomerge("run", str(straight)), env=ENV, check=True, capture_output=True)
    duration = time.perf_counter() - start
    want = archive(straight.parent / "store.sqlite")
    print(f"uninterrupted run: {duration:.1f} s, {len(want[0])} candidates, front {len(want[1])}, status {want[2]}")
    bad = kills = 0
    for i in range(args.runs):
        job = write_job(root / f"run{i}")
        log, cmd, rc = [], evomerge("run", str(job)), None
        for _ in range(args.max_kills):
            at = rng.uniform(0.2, duration * 1.1)
            rc = run_killed(cmd, at)
            if rc is not None:  # finished before its kill
                break
            kills += 1
            log.append(f"{cmd[3]} killed at {at:.2f} s")
            if (job.parent / "store.sqlite").exists():
                cmd = evomerge("resume", str(job))
        if rc is None:  # the last one was killed: let the next one finish
            rc = subprocess.run(cmd, env=ENV, capture_output=True).returncode
        got = archive(job.parent / "store.sqlite") if rc == 0 else None
        ok = got == want
        bad += not ok
        print(f"run {i:2d}: {'; '.join(log) or 'never killed'} -> {cmd[3]} rc {rc}: "
              f"{'identical archive and front' if ok else 'DIFFERS'}")
    # an export killed mid-write leaves no OUT (only a hidden temporary, which a new export does not mind)
    out = root / "exported"
    export = evomerge("export", str(straight), "--knee", "--format", "model", "-o", str(out), "--force")
    t0 = time.perf_counter()
    subprocess.run(export, env=ENV, check=True, capture_output=True)
    took = time.perf_counter() - t0
    left = []
    for _ in range(8):
        for p in root.glob(".exported*"):  # temporaries of earlier kills (hidden; a new export does not mind them)
            subprocess.run(["rm", "-rf", str(p)])
        subprocess.run(["rm", "-rf", str(out)])
        rc = run_killed(export, rng.uniform(0.6 * took, took))
        left.append((rc is None, out.exists() and not (out / ".evomerge-output").exists()))
    half = sum(1 for _, h in left if h)
    print(f"exports ({took:.1f} s each) killed in their last 40%: {sum(k for k, _ in left)} of {len(left)}; "
          f"half-written OUT folders: {half}")
    print(f"SOAK: {args.runs} runs, {kills} kill -9s, {args.runs - bad} identical to the uninterrupted run"
          f" ({time.perf_counter() - start:.0f} s)")
    return 1 if bad or half else 0


if __name__ == "__main__":
    raise SystemExit(main())
