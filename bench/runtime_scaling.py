"""The Ray runtime on the real zoo scorer: throughput with 1 and 2 workers, utilisation, orchestration overhead.

Candidates are `sakana_ps` recipes (TIES over the zoo's arithmetic and cipher experts, random weights and
densities, a fixed seed) scored on zoo_mix by the default scorer (models resident in each worker, merged in
memory, lm-eval in place). Every number comes from one run on one private Ray:

1. throughput: the same candidates through 1 worker, then 2 (each worker warmed up with one candidate first,
   as a search's first candidate builds the worker's caches); candidates per minute and the ratio;
2. varying cost: candidates scored on item subsets from 10% to 100% of the split (as IRT-reduced fitness
   asks), all submitted at once (steady state, no barrier): utilisation and overhead;
3. the same candidates in generations of `--population` with a barrier after each: utilisation lost at barriers;
4. the search loop itself (`Search.run`, random driver, population `--population`, `--search-candidates`
   candidates) in `driver.mode: generational` and `steady` (lag 1) on the same 2 workers. The random driver
   proposes the same candidates in both modes, and each is scored on a share of the split (10% to 100%) fixed
   by its recipe's hash, so both modes evaluate the same candidates at the same costs: the difference is the
   barrier, and the driver and store time between outcomes.

Targets (issue 7): ratio >= 1.8 with 2 workers; utilisation >= 90% with costs that vary; overhead <= 5%.
The machine's load is printed beside the numbers: other processes on a 2-core machine depress the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/runtime_scaling.py [--zoo .cache/zoo] [--candidates 12] [--limit 100]
        [--search-candidates 32] [--only-search]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)  # shares of the split a candidate is scored on: costs that vary


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
    from evomerge.runtime.cluster import Cluster
    from evomerge.search.jobs import ray_runtime

    rt = ray_runtime(spec, cluster=Cluster(cluster.address, owned=False, private=True))
    rt.wait_ready()
    for i, r in enumerate(warm[: rt.workers]):
        rt.submit(-1 - i, r)
    drain(rt)
    rt.reset_stats()
    return rt


class VaryingScorer:
    """The default scorer, on a share of the split chosen by the recipe's hash (deterministic, so the same
    candidate costs the same in every run and mode). The split's item ids come from one full evaluation."""

    def __init__(self, spec, split: str | None = None):
        from evomerge.scoring import default_scorer

        self.inner = default_scorer(spec, split)
        self.objectives = self.inner.objectives
        self.ids: dict[str, list[str]] | None = None

    def evaluate(self, recipe, items=None):
        import hashlib

        if self.ids is None:
            result = self.inner.evaluate(recipe)
            self.ids = {o: sorted(v) for o, v in (result.items or {}).items()}
            return result
        digest = int(hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:8], 16)
        share = FRACTIONS[digest % len(FRACTIONS)]
        return self.inner.evaluate(recipe, {o: v[: max(1, round(len(v) * share))] for o, v in self.ids.items()})

    def close(self) -> None:
        self.inner.close()


def varying_scorer(spec, split: str | None = None) -> VaryingScorer:
    return VaryingScorer(spec, split)


def search_modes(zoo: Path, cluster, limit: int, population: int, n: int) -> dict[str, object]:
    """The search loop in both modes on one 2-worker runtime (warmed up first); utilisation per mode."""
    import io
    import tempfile

    from evomerge.runtime.cluster import Cluster
    from evomerge.search.jobs import ray_runtime
    from evomerge.search.loop import Progress, Search
    from evomerge.store import Store

    spec = job_spec(zoo, limit, 2)
    spec.runtime.scorer = "runtime_scaling:varying_scorer"
    rt = ray_runtime(spec, cluster=Cluster(cluster.address, owned=False, private=True))
    out: dict[str, object] = {}
    seen: list[list[str]] = []
    try:
        rt.wait_ready()
        for i, r in enumerate(candidates(spec, 2, seed=99)):  # each worker: one full evaluation (item ids, caches)
            rt.submit(-1 - i, r)
        drain(rt)
        for mode in ("generational", "steady"):
            spec.driver.algorithm, spec.driver.population, spec.driver.seed = "random", population, 0
            spec.driver.max_evaluations, spec.driver.mode, spec.driver.lag = n, mode, 1
            spec.name = f"bench-{mode}"
            with tempfile.TemporaryDirectory() as tmp:
                store = Store(Path(tmp) / "store.sqlite")
                store.create_job(spec.name, spec.to_dict(), spec.driver.seed)
                rt.reset_stats()
                Search(spec, store, rt, Progress(io.StringIO(), live=False)).run()
                out[mode] = s = rt.stats()
                seen.append([r.recipe_hash for r in store.candidates(spec.name)])
                store.close()
            print(f"search loop, driver.mode {mode}{', lag 1' if mode == 'steady' else ''} (random driver, population "
                  f"{population}, {n} candidates): {s.summary()}; {load()}")
        print(f"the same candidates in both modes: {seen[0] == seen[1]}")
    finally:
        rt.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=str(REPO / ".cache" / "zoo"))
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--limit", type=int, default=400, help="zoo_mix items per candidate (the split's first N)")
    ap.add_argument("--population", type=int, default=4, help="generation size for the barrier measurement")
    ap.add_argument("--search-candidates", type=int, default=32, help="candidates per search-loop run (part 4)")
    ap.add_argument("--only-search", action="store_true", help="run part 4 only")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # the workers import this file's VaryingScorer as `runtime_scaling` (Ray's processes inherit the environment)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH"))
                                               if p)
    sys.path.insert(0, str(REPO / "bench"))
    from evomerge.runtime.cluster import connect

    zoo = Path(args.zoo)
    print(f"before: {load()}")
    cluster = connect(None, num_cpus=2)
    results: dict[int, object] = {}
    try:
        modes = search_modes(zoo, cluster, args.limit, args.population, args.search_candidates)
        gen, steady = modes["generational"], modes["steady"]
        print(f"search loop utilisation: generational {100 * gen.utilisation:.1f}% -> steady "
              f"{100 * steady.utilisation:.1f}% (target >= 90%)")
        if args.only_search:
            return
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
