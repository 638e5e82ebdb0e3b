"""The Ray runtime on the real zoo scorer: throughput with 1 and 2 workers, utilisation, orchestration overhead.

Candidates are `sakana_ps` recipes (TIES over the zoo's arithmetic and cipher experts, random weights and
densities, a fixed seed) scored on zoo_mix by the default scorer (models resident in each worker, merged in
memory, lm-eval in place). Every number comes from one run on one private Ray:

1. throughput: the same candidates through 1 worker, then 2 (each worker warmed up with one candidate first,
   as a search's first candidate builds the worker's caches); candidates per minute and the ratio;
2. varying cost: candidates scored on item subsets from 10% to 100% of the split (as IRT-reduced fitness
   asks), all submitted at once (steady state, no barrier): utilisation and overhead;
3. the same candidates in generations of `--population` with a barrier after each (what the generational loop
   does today): utilisation lost at the barriers.

Targets (issue 7): ratio >= 1.8 with 2 workers; utilisation >= 90% with costs that vary; overhead <= 5%.
The machine's load is printed beside the numbers: other processes on a 2-core machine depress the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/runtime_scaling.py [--zoo .cache/zoo] [--candidates 12] [--limit 100]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def job_spec(zoo: Path, limit: int, workers: int):
    from evomerge.search.spec import parse_job

    llama = zoo / "llama"
    return parse_job({
        "name": "bench", "search_space": "sakana_ps",
        "models": {"base": str(llama / "base"), "sources": {"arith": str(llama / "arith"), "cipher": str(llama / "cipher")}},
        "objectives": {"include": [str(REPO / "fitness")], "objectives": [
            {"task": "zoo_mix", "metric": "exact_match", "direction": "maximise", "limit": limit}]},
        "driver": {"algorithm": "random", "population": 4, "budget": 4},
        "runtime": {"kind": "ray", "workers": workers, "threads": 1, "backend": "hf"},
        "store": "/tmp/unused.sqlite",
    }, source="bench", base_dir=REPO)


def candidates(spec, n: int, seed: int = 0) -> list:
    """`n` recipes of the sakana_ps space at random genomes (the space decodes them, as the search does)."""
    import numpy as np

    from evomerge.spaces.presets import build_space

    space = build_space(spec.search_space, spec.models, spec.base)
    lo, hi = (np.asarray(b, dtype=float) for b in space.bounds)
    rng = np.random.default_rng(seed)
    return [space.decode(lo + rng.random(len(lo)) * (hi - lo)) for _ in range(n)]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def drain(rt) -> list:
    return list(rt.as_completed())


def runtime(spec, cluster, warm: list):
    """A runtime on the shared Ray with every worker warmed up by one candidate (not measured)."""
    from evomerge.runtime import RayRuntime
    from evomerge.runtime.cluster import Cluster

    rt = RayRuntime(spec, cluster=Cluster(cluster.address, owned=False, private=True))
    rt.wait_ready()
    for i, r in enumerate(warm[: rt.workers]):
        rt.submit(-1 - i, r)
    drain(rt)
    rt.reset_stats()
    return rt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=str(REPO / ".cache" / "zoo"))
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--limit", type=int, default=400, help="zoo_mix items per candidate (the split's first N)")
    ap.add_argument("--population", type=int, default=4, help="generation size for the barrier measurement")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from evomerge.runtime.cluster import connect

    zoo = Path(args.zoo)
    print(f"before: {load()}")
    cluster = connect(None, num_cpus=2)
    results: dict[int, object] = {}
    try:
        spec1 = job_spec(zoo, args.limit, 1)
        cands = candidates(spec1, args.candidates)
        warm = candidates(spec1, 2, seed=99)
        item_ids: list[str] = []
        for workers in (1, 2):
            rt = runtime(job_spec(zoo, args.limit, workers), cluster, warm)
            try:
                for i, r in enumerate(cands):
                    rt.submit(i, r)
                outs = drain(rt)
                assert all(o.ok for o in outs), [o.reason for o in outs if not o.ok]
                item_ids = sorted(outs[0].items.get("zoo_mix", {}))
                results[workers] = s = rt.stats()
                print(f"{workers} worker{'s' if workers > 1 else ''}: {s.summary()}; mean candidate "
                      f"{(s.materialise + s.score) / s.candidates:.3f} s (materialise {s.materialise / s.candidates:.3f} s)"
                      f"; {load()}")
                if workers == 2:
                    import pickle

                    per = max(s.span - s.materialise - s.score, 0.0) / s.candidates
                    print(f"per candidate: {1000 * per:.1f} ms of orchestration; a recipe pickles to "
                          f"{len(pickle.dumps(cands[0]))} bytes, an outcome to {len(pickle.dumps(outs[0]))} bytes")
                    varying(rt, cands, item_ids, args.population)
            finally:
                rt.close()
        one, two = results[1], results[2]
        slow = (two.materialise + two.score) / two.candidates / ((one.materialise + one.score) / one.candidates)
        print(f"\nthroughput: {one.per_minute:.1f} -> {two.per_minute:.1f} candidates/min with 2 workers: "
              f"{two.per_minute / one.per_minute:.2f}x (target >= 1.8x); a candidate took {slow:.2f}x as long with 2 "
              "workers as with 1 (CPU contention: the ideal ratio is 2 / that)")
    finally:
        cluster.close()
    print(f"after: {load()}")


def varying(rt, cands: list, item_ids: list[str], population: int) -> None:
    """Candidates of varying cost (item subsets of 10%..100%), streamed, then in generations with barriers."""
    rng = random.Random(1)
    sizes = [max(1, round(len(item_ids) * f)) for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    plan = [(r, {"zoo_mix": item_ids[: rng.choice(sizes)]}) for r in cands + cands[: len(cands) // 2]]
    rt.reset_stats()
    for i, (r, items) in enumerate(plan):
        rt.submit(i, r, items=items)
    drain(rt)
    s = rt.stats()
    print(f"varying cost, streamed (no barrier): {s.summary()}  (target: utilisation >= 90%, overhead <= 5%)")
    rt.reset_stats()
    for g in range(0, len(plan), population):
        for i, (r, items) in enumerate(plan[g: g + population]):
            rt.submit(g + i, r, items=items)
        drain(rt)
    s = rt.stats()
    print(f"varying cost, generations of {population} with a barrier: {s.summary()}")


if __name__ == "__main__":
    main()
