"""Dashboard API latency on a big store while a search writes to it: every route's answer time over HTTP, median
and worst, against the 200 ms target.

    .venv/bin/python bench/dashboard_api.py [--candidates 10000] [--store PATH] [--repeats 20] [--no-writer]

Without --store it generates a store of that many candidates through the real Store API (the golden models'
`sakana_ps` space, random genomes decoded into real recipe YAML, the toy scorer's values and items, a front and a
checkpoint per generation of 50, the test split scored for the front and the parents) into
out/bench/dashboard-<N>.sqlite (about 15 s for 10,000; kept and reused). A second job of 200 candidates goes in
the same store, for the compare routes.

Then a writer *process* keeps appending generations to the big job (pending, running, then done one by one,
about 100 candidates a second, a front and a checkpoint per generation, holding the job's writer lock as a search
does) while this process serves the store read-only on 127.0.0.1 and times, round after round, every route the
page uses: the first answer after the server starts (cold: every recipe summarised once) is printed apart from
the rest, as the page meets it once per server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "models"
sys.path.insert(0, str(REPO))
TARGET_MS = 200.0
POPULATION = 50


# ---------------------------------------------------------------- the store

def job_spec(name: str, store: Path, n: int) -> Path:
    folder = store.parent
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{store.name.split('.')[0]}-{name}.yaml"  # the same for the .partial file
    path.write_text(yaml.safe_dump({
        "name": name, "models": {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a"), "b": str(GOLDEN / "b")}},
        "search_space": "sakana_ps", "driver": {"algorithm": "nsga2", "population": POPULATION,
                                                "budget": {"evaluations": n}, "seed": 1},
        "runtime": {"kind": "local", "scorer": "evomerge.scoring.toy:scorer", "scorer_options": {"fail_above": 0.97}},
        "store": str(store)}))
    return path


class Generator:
    """Candidates as a search writes them: pending rows of a generation, then each finished (done, failed by the
    toy's `fail_above`, or cached when its recipe was seen), a front and a checkpoint per generation."""

    def __init__(self, store, spec_path: Path, seed: int):
        from evomerge.scoring import toy
        from evomerge.search.spec import load_job
        from evomerge.spaces.presets import build_space

        self.store = store
        self.spec = load_job(spec_path)
        self.space = build_space(self.spec.search_space, self.spec.models, self.spec.base)
        self.lower, self.upper = (np.asarray(b, dtype=float) for b in self.space.bounds)
        self.scorer = toy.ToyScorer(dict(self.spec.runtime.scorer_options))
        self.rng = np.random.default_rng(seed)
        self.objectives = self.scorer.objectives.objectives
        self.losses: dict[int, list[float]] = {}
        self.seen: dict[str, int] = {}
        self.front: dict[int, np.ndarray] = {}  # kept point by point: a full Pareto sort per generation is O(n^2)

    def add_to_front(self, cid: int, losses: list[float]) -> None:
        p = np.asarray(losses, dtype=float)
        if any(np.all(q <= p) and np.any(q < p) for q in self.front.values()):
            return
        self.front = {i: q for i, q in self.front.items() if not (np.all(p <= q) and np.any(p < q))}
        self.front[cid] = p

    def create(self) -> None:
        self.store.create_job(self.spec.name, self.spec.to_dict(), self.spec.driver.seed,
                              objectives=[(o.name, o.direction) for o in self.objectives], spec_yaml=self.spec.to_yaml())

    def next_id(self) -> int:
        row = self.store.db.execute("SELECT MAX(id) FROM candidates WHERE job=?", (self.spec.name,)).fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def generation(self, g: int, first: int, count: int, pause: float = 0.0) -> list[int]:
        from evomerge.fitness.objectives import CandidateFailed
        from evomerge.search.problem import recipe_hash, recipe_text
        from evomerge.store import CandidateRow

        job = self.spec.name
        seeds = self.space.seeds() if g == 0 else []
        rows, recipes = [], {}
        pool = [] if g == 0 else list(range(max(0, first - POPULATION), first))
        for i in range(count):
            if i < len(seeds):
                origin, genome = seeds[i]
            elif i % 17 == 5 and rows:  # now and then a recipe seen before: the cache answers it
                origin, genome = "driver", np.asarray(rows[0].genome)
            else:
                origin, genome = "driver", self.lower + self.rng.random(len(self.lower)) * (self.upper - self.lower)
            recipe = self.space.decode(np.asarray(genome, dtype=float))
            text = recipe_text(recipe)
            rows.append(CandidateRow(id=first + i, generation=g, idx=i, genome=[float(v) for v in genome], recipe=text,
                                     recipe_hash=recipe_hash(text), origin=origin, status="pending", parents=pool))
            recipes[first + i] = recipe
        self.store.add_candidates(job, rows)
        for r in rows:
            self.store.mark_running(job, r.id, worker="bench-0")
        for r in rows:
            hit = self.seen.get(r.recipe_hash)
            if hit is not None:
                src = self.store.candidate(job, hit)
                self.store.finish(job, r.id, "cached", values=src.values, losses=src.losses, reason=src.reason,
                                  cached_from=hit)
                continue
            self.seen[r.recipe_hash] = r.id
            try:
                res = self.scorer.evaluate(recipes[r.id])
            except CandidateFailed as e:
                self.store.finish(job, r.id, "failed", reason=str(e), worker="bench-0", eval_seconds=0.01)
                self.store.set_losses(job, r.id, [10.0] * len(self.objectives))
            else:
                losses = [float(o.loss(res.values[o.name])) for o in self.objectives]
                self.losses[r.id] = losses
                self.add_to_front(r.id, losses)
                self.store.finish(job, r.id, "done", values=res.values, losses=losses, items=res.items,
                                  worker="bench-0", eval_seconds=0.01)
            if pause:
                time.sleep(pause)
        front = sorted(self.front)
        self.store.save_checkpoint(job, g, {"generation": g, "asked": g + 1}, front=front)
        return front

    def score_test(self, front: list[int]) -> None:
        """The report's test split for the front and the parents, as the end of a search records it."""
        from evomerge.scoring import toy
        from evomerge.merge.api import parse_stored

        test = toy.ToyScorer(dict(self.spec.runtime.scorer_options), "test")
        job = self.spec.name
        for cid in front:
            row = self.store.candidate(job, cid)
            self.store.save_score(job, f"candidate:{cid}", "test",
                                  test.evaluate(parse_stored(row.recipe, check_paths=False)).values)
        for label in self.spec.models:
            row = next((r for r in self.store.candidates(job, generation=0) if r.origin == f"parent:{label}"), None)
            if row is not None and row.status == "done":
                self.store.save_score(job, f"parent:{label}", "test",
                                      test.evaluate(parse_stored(row.recipe, check_paths=False)).values)


def build_store(store_path: Path, n: int, jobs: tuple[tuple[str, int], ...] | None = None) -> None:
    """`jobs`: (name, candidates) per job, into one store file (created; it must not exist)."""
    from evomerge.store import Store

    store = Store(store_path)
    try:
        for k, (name, count) in enumerate(jobs or (("big", n), ("small", 200))):
            gen = Generator(store, job_spec(name, store_path, count), seed=k + 1)
            gen.create()
            g, front = 0, []
            while gen.next_id() < count:
                first = gen.next_id()
                front = gen.generation(g, first, min(POPULATION, count - first))
                g += 1
            gen.score_test(front)
            store.set_status(name, "done", f"budget of {count} evaluations spent")
    finally:
        store.close()


def make_store(n: int) -> Path:
    store = REPO / "out" / "bench" / f"dashboard-{n}.sqlite"
    if not store.exists():
        partial = store.with_suffix(".partial.sqlite")
        for p in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
            p.unlink(missing_ok=True)
        start = time.perf_counter()
        build_store(partial, n)
        partial.rename(store)
        print(f"generated {store} ({n} + 200 candidates) in {time.perf_counter() - start:.1f} s")
    return store


def writer(store_path: str, job: str, stop: "multiprocessing.synchronize.Event", pause: float) -> None:
    """The concurrent search: generations appended to `job` until `stop` is set, holding its writer lock."""
    from evomerge.store import Store
    from evomerge.store.lock import WriterLock

    store = Store(store_path)
    spec = Path(store_path).parent / f"{Path(store_path).name.split('.')[0]}-{job}.yaml"
    gen = Generator(store, spec, seed=int(time.time()))
    for r in store.candidates(job, status="done"):
        gen.losses[r.id] = r.losses
        gen.add_to_front(r.id, r.losses)
    store.set_status(job, "running")
    with WriterLock(store, job):
        g = int(store.db.execute("SELECT MAX(generation) FROM candidates WHERE job=?", (job,)).fetchone()[0]) + 1
        while not stop.is_set():
            gen.generation(g, gen.next_id(), POPULATION, pause=pause)
            g += 1
        store.set_status(job, "done", "bench writer stopped")
    store.close()


# ---------------------------------------------------------------- timing

def get(server, path: str) -> tuple[float, int, bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    start = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    took = (time.perf_counter() - start) * 1000
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status}: {body[:300]!r}")
    return took, resp.status, body


def routes(server, job: str, other: str | None, cursor: str | None) -> dict[str, str]:
    """Every API route the page calls, with the arguments it sends."""
    from evomerge.store import Store

    s = Store(server.store_path, readonly=True)
    try:
        front = s.front(job)
        objs = [n for n, _ in s.directions(job)]
    finally:
        s.close()
    j = quote(job)
    out = {
        "jobs": "/api/jobs", "poll": "/api/poll",
        "job (full)": f"/api/job?name={j}",
        "job (since last poll)": f"/api/job?name={j}&since={quote(cursor or '')}",
        "candidates (page 1)": f"/api/candidates?job={j}",
        "candidates (sorted, filtered)": f"/api/candidates?job={j}&sort=-{quote(objs[0])}&status=done"
                                         f"&gen_min=3&min.{quote(objs[0])}=0.5&offset=100&limit=100",
        "candidate": f"/api/candidate?job={j}&id={front[0]}",
        "diff": f"/api/diff?a={j}:{front[0]}&b={j}:{front[-1]}",
    }
    if other:
        out["fronts (compare)"] = f"/api/fronts?job={j}&job={quote(other)}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=10_000)
    ap.add_argument("--store", default=None, help="an existing store (default: generate one)")
    ap.add_argument("--job", default="big")
    ap.add_argument("--other", default="small", help="a second job for the compare routes ('' for none)")
    ap.add_argument("--repeats", type=int, default=20, help="rounds over every route")
    ap.add_argument("--no-writer", action="store_true", help="time without a concurrent writer")
    ap.add_argument("--pause", type=float, default=0.01, help="the writer's pause between candidates (s)")
    args = ap.parse_args()
    from evomerge.dashboard import make_server
    from evomerge.store import Store

    if args.store:
        store = Path(args.store)
    else:  # a fresh copy each run: the writer grows it, the next run starts at --candidates again
        store = make_store(args.candidates).with_suffix(".run.sqlite")
        for p in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
            p.unlink(missing_ok=True)
        shutil.copyfile(make_store(args.candidates), store)
    s = Store(store, readonly=True)
    n = len(s.candidates(args.job))
    other = args.other if args.other and s.job(args.other) is not None else None
    s.close()

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: the writer shares nothing with the server
    stop = ctx.Event()
    proc = None
    if not args.no_writer:
        proc = ctx.Process(target=writer, args=(str(store), args.job, stop, args.pause))
        proc.start()
        time.sleep(2.0)  # the writer holds its lock and has started a generation
    server, _ = make_server(store, port=0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        print(f"store {store}: job {args.job}, {n} candidates at start; writer: "
              f"{'none' if proc is None else f'process {proc.pid}, about {1 / (args.pause + 0.0005):.0f} candidates/s'}")
        cold, _, body = get(server, f"/api/job?name={quote(args.job)}")
        print(f"first /api/job after the server started (cold: recipes summarised): {cold:.0f} ms, "
              f"{len(body) / 1024:.0f} KiB")
        cursor = json.loads(body)["cursor"]
        times: dict[str, list[float]] = {}
        sizes: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for name, path in routes(server, args.job, other, cursor).items():
                took, _, body = get(server, path)
                times.setdefault(name, []).append(took)
                sizes.setdefault(name, []).append(len(body))
                if name == "job (since last poll)":
                    cursor = json.loads(body)["cursor"]
            time.sleep(0.2)
        s = Store(store, readonly=True)
        n_end = len(s.candidates(args.job))
        s.close()
        print(f"{n_end} candidates at the end ({n_end - n} written meanwhile); {args.repeats} rounds")
        print(f"{'route':<32} {'median':>8} {'worst':>8} {'KiB':>7}  (target {TARGET_MS:.0f} ms)")
        worst_all = 0.0
        for name, ts in times.items():
            worst_all = max(worst_all, max(ts))
            ok = "ok" if max(ts) < TARGET_MS else "OVER"
            print(f"{name:<32} {statistics.median(ts):6.1f}ms {max(ts):6.1f}ms {statistics.median(sizes[name]) / 1024:7.1f}"
                  f"  {ok}")
        print(f"worst answer of all: {worst_all:.1f} ms: {'meets' if worst_all < TARGET_MS else 'misses'} the "
              f"{TARGET_MS:.0f} ms target")
    finally:
        stop.set()
        if proc is not None:
            proc.join(60)
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
