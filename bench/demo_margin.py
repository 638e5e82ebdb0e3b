"""`make demo`'s margin with IRT-reduced fitness against the same demo scored in full, seed by seed.

The demo exports its best recipe for zoo_mix, loads it fresh from disk and scores it on the test split beside the
parents; its margin is the merged model's accuracy minus the best parent's, in points. Whether IRT costs that
margin is a question for the whole search (the estimates steer what is bred; the pick is chosen on them), so this
bench runs the demo's search stage (`python -m evomerge.service.demo --path-evaluations 0`) per seed twice, once
with IRT-reduced objectives (`--fitness irt`, the demo) and once scoring every candidate on every item (`--fitness
full`), and prints per seed and over seeds:
- the margin of each (points on zoo_mix test) and the IRT search's mean margin minus the full-fitness one's;
- the zoo_mix fitness value of each exported pick against its test value (what the fitness split promises and what
  the test split gives: 2026-12-05, up to 0.04 apart either way);
- items the IRT search scored over items the full-fitness search scored (both objectives), and search seconds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/demo_margin.py --zoo .cache/zoo --out out/bench_demo [--seeds 0,1,2]

Runs one demo at a time (each uses both Ray workers; about 2-3.5 minutes each on a 2-core machine); a seed and mode
whose `demo.json` exists under OUT is not run again (delete OUT to start over). The test split has 500 items: one
margin carries about 2 points of noise from it alone, and seeds move the margin by more: read the means.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from evomerge.store import Store  # noqa: E402
from irt_search_quality import items_scored  # noqa: E402

MODES = ("irt", "full")


def run_demo(zoo: Path, out: Path, seed: int, fitness: str, evaluations: int) -> dict:
    """One demo search stage; its `demo.json` (run only where missing)."""
    folder = out / f"{fitness}-{seed}"
    summary = folder / "demo.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    log = out / f"{fitness}-{seed}.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "evomerge.service.demo", "--zoo", str(zoo), "--zoo-families", "llama",
           "--path-evaluations", "0", "--out", str(folder), "--seed", str(seed), "--fitness", fitness,
           "--evaluations", str(evaluations)]
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if not summary.is_file():
        raise SystemExit(f"error: the demo for seed {seed} ({fitness}) exited {rc} without {summary}; see {log}")
    print(f"  {fitness} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(summary.read_text())


def pick_and_items(folder: Path, selected: int) -> tuple[float | None, int]:
    """The exported pick's zoo_mix value on the fitness split as the search's store holds it (measured where the
    demo's confirmation of its picks reached it), and every item scoring the search ran
    (`irt_search_quality.items_scored`)."""
    store = Store(folder / "store.sqlite", readonly=True)
    try:
        row = store.candidate("demo", selected)
        return (None if row.values is None else float(row.values["zoo_mix"])), items_scored(store, "demo")
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=".cache/zoo", help="zoo folder (`make zoo` builds it)")
    ap.add_argument("--out", default="out/bench_demo", help="one folder per seed and mode, and their logs")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds (default 0,1,2)")
    ap.add_argument("--evaluations", type=int, default=240, help="candidates per search (the demo's 240)")
    args = ap.parse_args(argv)
    zoo, out = Path(args.zoo).absolute(), Path(args.out).absolute()
    if not (zoo / "llama" / "base").is_dir():
        print(f"error: {zoo}: no zoo there (llama/base missing); run `make zoo` or pass --zoo", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    runs = {(m, s): run_demo(zoo, out, s, m, args.evaluations) for s in seeds for m in MODES}

    print(f"\nmake demo's search stage, {args.evaluations} candidates, IRT-reduced against scored in full (zoo_mix: "
          "fitness value of the exported pick -> its test value; margin: test points over the best parent)")
    print(f"{'seed':>4}  {'IRT pick fit->test':>19}  {'margin':>6}  {'full pick fit->test':>20}  {'margin':>6}  "
          f"{'items IRT/full':>14}  {'seconds IRT/full':>16}")
    items: dict[tuple[str, int], int] = {}
    for s in seeds:
        cells = []
        for m in MODES:
            r = runs[m, s]
            fit, items[m, s] = pick_and_items(out / f"{m}-{s}", r["selected"])
            cells.append(f"{'-' if fit is None else f'{fit:.3f}'} -> {r['merged_test']:.3f}")
            cells.append(f"{r['gain_points']:+.1f}")
        print(f"{s:>4}  {cells[0]:>19}  {cells[1]:>6}  {cells[2]:>20}  {cells[3]:>6}  "
              f"{items['irt', s] / items['full', s]:>13.3f}x  "
              f"{runs['irt', s]['search_seconds']:>6.0f} / {runs['full', s]['search_seconds']:<6.0f}")
    mean = {m: sum(runs[m, s]["gain_points"] for s in seeds) / len(seeds) for m in MODES}
    share = sum(items["irt", s] for s in seeds) / sum(items["full", s] for s in seeds)
    print(f"over {len(seeds)} seeds: margin IRT {mean['irt']:+.1f}, full {mean['full']:+.1f} points "
          f"(IRT - full: {mean['irt'] - mean['full']:+.1f}); items IRT / full {share:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
