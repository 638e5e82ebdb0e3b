"""Dashboard API latency on a big store: each route's answer time over HTTP, first request (cold: every recipe
summarised once) and then warm (what the page's 2-second polling sees), against the 200 ms target.

    .venv/bin/python bench/dashboard_api.py [--candidates 10000] [--store PATH] [--repeats 5]

Without --store it runs a toy search (golden models, the toy scorer, NSGA-II, population 50) of that many
candidates into out/bench/dashboard-<N>.sqlite first (about 40 s for 10,000), then serves it on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "models"
sys.path.insert(0, str(REPO))
TARGET_MS = 200.0


def make_store(n: int) -> tuple[Path, str]:
    out = REPO / "out" / "bench"
    store = out / f"dashboard-{n}.sqlite"
    if store.exists():
        return store, "big"
    out.mkdir(parents=True, exist_ok=True)
    job = out / f"dashboard-{n}.yaml"
    job.write_text(yaml.safe_dump({
        "name": "big", "models": {"base": str(GOLDEN / "base"), "sources": {"a": str(GOLDEN / "a"), "b": str(GOLDEN / "b")}},
        "search_space": "sakana_ps", "driver": {"algorithm": "nsga2", "population": 50, "budget": {"evaluations": n},
                                                "seed": 1},
        "runtime": {"kind": "local", "scorer": "evomerge.scoring.toy:scorer"}, "store": str(store),
        "report": str(out / f"dashboard-{n}")}))
    subprocess.run([sys.executable, "-m", "evomerge", "run", str(job)], check=True, capture_output=True)
    return store, "big"


def get(server, path: str) -> tuple[float, int, int]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    start = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    took = (time.perf_counter() - start) * 1000
    conn.close()
    return took, resp.status, len(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=10_000)
    ap.add_argument("--store", default=None)
    ap.add_argument("--job", default="big")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from evomerge.dashboard import make_server
    from evomerge.store import Store

    store, job = (Path(args.store), args.job) if args.store else make_store(args.candidates)
    s = Store(store, readonly=True)
    n = len(s.candidates(job))
    first = s.front(job)[0]
    s.close()
    server, _ = make_server(store, port=0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    print(f"store {store}: job {job}, {n} candidates")
    for route in ("/api/jobs", "/api/poll", f"/api/job?name={job}", f"/api/candidate?job={job}&id={first}"):
        cold, status, size = get(server, route)
        warm = [get(server, route)[0] for _ in range(args.repeats)]
        med = statistics.median(warm)
        print(f"{route:<34} {status} {size / 1024:8.0f} KiB  first {cold:7.0f} ms  then median {med:6.0f} ms  "
              f"RATIO target/median {TARGET_MS / med:5.2f} (>= 1 meets {TARGET_MS:.0f} ms)")
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
