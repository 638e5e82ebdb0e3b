"""Search quality on the tiny zoo: does the search find merges worth having, and do the drivers beat random search?

Three claims, each checked over several seeds at equal budgets (evaluations):
1. the best recipe found for the target task (zoo_mix, by CMA-ES on the fitness split) beats every parent on the
   TEST split by >= 10 points;
2. NSGA-II's front on two objectives (zoo_arith, zoo_cipher accuracy) has a hypervolume >= 1.1x random search's
   (summed over seeds; reference point: 0 accuracy on both);
3. CMA-ES on one objective (zoo_mix) ends with a better best value than random search, seed by seed.

Random search asks for the same genomes whatever the objectives, so one random run per seed, scoring all three
objectives, serves claims 2 and 3.

    python bench/search_quality.py --zoo .cache/zoo --out out/bench_search [--seeds 3 --population 8 --generations 6]

Writes OUT/search_quality.json and prints a table. Needs a built zoo (`make zoo`). Takes about
seeds x 3 runs x population x generations evaluations (about 1-3 s each on one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def job_spec(name: str, zoo: Path, out: Path, algorithm: str, objectives: list[dict], seed: int, population: int,
             generations: int, space: str) -> dict:
    return {
        "name": name,
        "models": {"base": str(zoo / "llama/base"),
                   "sources": {"arith": str(zoo / "llama/arith"), "cipher": str(zoo / "llama/cipher")}},
        "search_space": space,
        "objectives": {"include": [str(REPO / "fitness")], "split": "fitness", "objectives": objectives},
        "report_split": "test",
        "driver": {"algorithm": algorithm, "population": population,
                   "budget": {"evaluations": population * generations}, "seed": seed},
        "runtime": {"threads": 1},
        "store": str(out / f"{name}.sqlite"),
        "report": str(out / name),
    }


def run(spec_dict: dict, report: bool):
    from evomerge.search.jobs import make_runtime
    from evomerge.search.loop import Progress, Search
    from evomerge.search.report import build_report, write_report
    from evomerge.search.spec import JobSpec, parse_job
    from evomerge.store import Store

    spec = parse_job(spec_dict, source=f"<bench {spec_dict['name']}>", base_dir=REPO)
    Path(spec.store).unlink(missing_ok=True)
    store = Store(spec.store)
    runtime = make_runtime(spec)
    store.create_job(spec.name, spec.to_dict(), spec.driver.seed)
    spec = JobSpec.from_dict(store.job(spec.name)["spec"])
    search = Search(spec, store, runtime, Progress(sys.stderr, live=False))
    start = time.perf_counter()
    search.run()
    seconds = time.perf_counter() - start
    rep = None
    if report:
        rep = build_report(search.ctx)
        write_report(rep, Path(spec.report))
    rows = store.candidates(spec.name, status="done")
    runtime.close()
    return rows, rep, seconds


def hv_two(rows, a: str, b: str) -> float:
    from evomerge.search.front import hypervolume, pareto_mask

    F = np.array([[-r.values[a], -r.values[b]] for r in rows])
    return hypervolume(F[pareto_mask(F)], np.array([0.0, 0.0])) if len(F) else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=str(REPO / ".cache/zoo"))
    ap.add_argument("--out", default=str(REPO / "out/bench_search"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--limit", type=int, default=200, help="items per task objective on the fitness split")
    ap.add_argument("--space", default="sakana_ps")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    zoo, out = Path(args.zoo).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mix = {"task": "zoo_mix", "metric": "exact_match", "direction": "maximise", "limit": args.limit}
    arith = {"task": "zoo_arith", "metric": "exact_match", "direction": "maximise", "limit": args.limit // 2}
    cipher = {"task": "zoo_cipher", "metric": "exact_match", "direction": "maximise", "limit": args.limit // 2}
    common = dict(zoo=zoo, out=out, population=args.population, generations=args.generations, space=args.space)

    results: dict = {"settings": vars(args), "seeds": []}
    for seed in range(args.seeds):
        r_rows, _, r_s = run(job_spec(f"random-{seed}", algorithm="random", objectives=[mix, arith, cipher], seed=seed,
                                      **common), report=False)
        n_rows, _, n_s = run(job_spec(f"nsga2-{seed}", algorithm="nsga2", objectives=[arith, cipher], seed=seed,
                                      **common), report=False)
        c_rows, c_rep, c_s = run(job_spec(f"cmaes-{seed}", algorithm="cmaes", objectives=[mix], seed=seed, **common),
                                 report=True)
        best = max(c_rep["front"], key=lambda c: c["fitness"]["zoo_mix"])
        parents_test = {p["name"]: p["test"]["zoo_mix"] for p in c_rep["parents"]}
        entry = {
            "seed": seed,
            "random": {"best_mix": max(r.values["zoo_mix"] for r in r_rows), "hv": hv_two(r_rows, "zoo_arith", "zoo_cipher"),
                       "evaluated": len(r_rows), "seconds": round(r_s, 1)},
            "nsga2": {"hv": hv_two(n_rows, "zoo_arith", "zoo_cipher"), "evaluated": len(n_rows), "seconds": round(n_s, 1)},
            "cmaes": {"best_mix": max(r.values["zoo_mix"] for r in c_rows), "evaluated": len(c_rows), "seconds": round(c_s, 1),
                      "best_recipe_id": best["id"], "best_test_mix": best["test"]["zoo_mix"], "best_recipe": best["recipe_yaml"]},
            "parents_test_mix": parents_test,
        }
        results["seeds"].append(entry)
        print(f"seed {seed}: random best mix {entry['random']['best_mix']:.3f} hv {entry['random']['hv']:.4f} | "
              f"nsga2 hv {entry['nsga2']['hv']:.4f} | cmaes best mix {entry['cmaes']['best_mix']:.3f}, test "
              f"{entry['cmaes']['best_test_mix']:.3f} vs parents {parents_test}", flush=True)

    seeds = results["seeds"]
    margin = min(s["cmaes"]["best_test_mix"] - max(s["parents_test_mix"].values()) for s in seeds)
    hv_ratio = sum(s["nsga2"]["hv"] for s in seeds) / max(1e-12, sum(s["random"]["hv"] for s in seeds))
    cma_wins = sum(s["cmaes"]["best_mix"] > s["random"]["best_mix"] for s in seeds)
    results["claims"] = {
        "best_beats_parents_on_test_by_10_points": {"value": margin * 100, "pass": margin >= 0.10},
        "nsga2_hv_over_random_at_least_1.1": {"value": hv_ratio, "pass": hv_ratio >= 1.1},
        "cmaes_beats_random_every_seed": {"value": f"{cma_wins}/{len(seeds)}", "pass": cma_wins == len(seeds)},
    }
    (out / "search_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\nclaim                                        value      pass")
    for k, v in results["claims"].items():
        val = f"{v['value']:.3f}" if isinstance(v["value"], float) else v["value"]
        print(f"{k:<44} {val:<10} {v['pass']}")
    print(f"\nwritten {out / 'search_quality.json'}")
    return 0 if all(v["pass"] for v in results["claims"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
