"""How well IRT-reduced fitness estimates a merged candidate's full-split score, on the zoo tasks.

Data: per-item correctness of ~190 zoo candidates (the 3 parents, random `sakana_ps`, `layerwise_ps` and `dfs`
merges) on the fitness split (500 items) of zoo_mix, zoo_arith, zoo_cipher and zoo_composed, from
bench/irt_data.py, cached in .cache/irt_data/ (regenerated, with a progress bar, when missing: ~5-7 minutes on one
CPU thread).

Protocol, per task and split seed: the parents and `--train - 3` random merged candidates are the "seed candidates"
every fit sees; every other merged candidate is held out of every fit (calibration's cross-validation included).
For anchors N in {10, 20, 30, 50, 100}, each anchor method and each estimator: mean absolute error and Spearman
correlation of the estimate against the held-out candidates' full-split score, and the share of the split's items
scored (N / 500). `auto` is the estimator the search would use (least cross-validated error on the seed
candidates, anchors the best of `irt.DRAWS` seeded draws by that error); `mix` is the cross-validated convex mix of
anchor, pirt and merge3; `random subset` is the mean of N uniformly drawn items. Two splits are noisy (about
+-0.003 MAE): `--seeds 6` (about 14 minutes) for decisions. Targets at N = 30 (method irt, auto): MAE <= 0.03,
Spearman >= 0.9, >= 10x fewer items.

With `--search`, also: NSGA-II on zoo_arith and zoo_cipher (500 items each), full fitness against IRT fitness at
equal candidate budgets; the IRT search's front is re-scored in full (for this comparison only) and its hypervolume
compared with the full search's; cost is items scored. Target: within 5% at a fifth of the cost or less.

    OMP_NUM_THREADS=1 .venv/bin/python bench/irt_accuracy.py [--seeds 2 --train 40] [--search] [--out out/bench_irt]
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import irt_data  # noqa: E402

from evomerge.fitness import irt  # noqa: E402

NS = (10, 20, 30, 50, 100)
ESTIMATORS = ("auto", "pirt", "gpirt", "merge3", "mix", "anchor")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y)[0])


def accuracy(task: str, seeds: int, train: int, ns=NS, methods=irt.ANCHOR_METHODS) -> dict:
    names, ids, Y = irt_data.load(task=task)
    parents = [i for i, n in enumerate(names) if n.startswith("parent:")]
    merged = [i for i in range(len(names)) if i not in parents]
    out: dict = {}
    for seed in range(seeds):
        rng = np.random.default_rng([seed, 99])
        perm = [merged[i] for i in rng.permutation(len(merged))]
        fit_rows = parents + perm[: train - len(parents)]
        held = perm[train - len(parents):]
        Yf, truth = Y[fit_rows], Y[held].mean(1)
        cache: dict = {}
        for n in ns:
            base = [Y[j, rng.choice(Y.shape[1], n, replace=False)].mean() for j in held]
            _add(out, ("random subset", "-", n), np.array(base), truth, None)
            for method in methods:
                cal = irt.calibrate(Yf, n, method, seed, parents=list(range(len(parents))), cache=cache)
                for est in ESTIMATORS:
                    e = [cal.estimate(Y[j, cal.anchors.items], None if est == "auto" else est) for j in held]
                    _add(out, (method, est, n), np.array([x.value for x in e]), truth, np.array([x.sd for x in e]),
                         cal.estimator if est == "auto" else None)
    return {"task": task, "items": Y.shape[1], "candidates": len(names), "fit_on": train, "held_out": len(merged) - (train - len(parents)),
            "rows": [{"method": k[0], "estimator": k[1], "anchors": k[2], "mae": float(np.mean(v["mae"])),
                      "spearman": float(np.mean(v["rho"])), "within_1sd": _mean(v["cov1"]), "within_2sd": _mean(v["cov2"]),
                      "items_fraction": k[2] / Y.shape[1], "chosen": sorted(set(v["chosen"]))} for k, v in out.items()]}


def _mean(x: list) -> float | None:
    return float(np.mean(x)) if x else None


def _add(out: dict, key: tuple, est: np.ndarray, truth: np.ndarray, sd: np.ndarray | None, chosen: str | None = None) -> None:
    v = out.setdefault(key, {"mae": [], "rho": [], "cov1": [], "cov2": [], "chosen": []})
    err = np.abs(est - truth)
    v["mae"].append(err.mean())
    v["rho"].append(spearman(est, truth))
    if sd is not None:
        v["cov1"].append(float(np.mean(err <= sd)))
        v["cov2"].append(float(np.mean(err <= 2 * sd)))
    if chosen:
        v["chosen"].append(chosen)


def train_size(task: str, sizes=(16, 24, 40, 80), seeds: int = 2, n: int = 30) -> list[dict]:
    """MAE at N anchors (irt method, auto estimator) as the number of fully scored seed candidates grows."""
    rows = []
    for size in sizes:
        res = accuracy(task, seeds, size, ns=(n,), methods=("irt",))
        r = next(x for x in res["rows"] if x["method"] == "irt" and x["estimator"] == "auto")
        rows.append({"task": task, "fit_on": size, "anchors": n, "mae": r["mae"], "spearman": r["spearman"]})
    return rows


def table(res: dict) -> str:
    lines = [f"{res['task']}: {res['items']} items, fitted on {res['fit_on']} candidates (3 parents), "
             f"{res['held_out']} merged candidates held out; cells: MAE / Spearman"]
    head = f"{'method':<14}{'estimator':<10}" + "".join(f"{'N=' + str(n):>16}" for n in NS)
    lines += [head, "-" * len(head)]
    keys = sorted({(r["method"], r["estimator"]) for r in res["rows"]},
                  key=lambda k: (k[0] != "random subset", k[0], ESTIMATORS.index(k[1]) if k[1] in ESTIMATORS else -1))
    for m, e in keys:
        cells = []
        for n in NS:
            r = next((x for x in res["rows"] if (x["method"], x["estimator"], x["anchors"]) == (m, e, n)), None)
            cells.append(f"{r['mae']:.3f} / {r['spearman']:.3f}" if r else "-")
        lines.append(f"{m:<14}{e:<10}" + "".join(f"{c:>16}" for c in cells))
    lines.append("items scored: " + ", ".join(f"N={n}: {n / res['items']:.0%}" for n in NS))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the search

def search_compare(zoo: Path, out: Path, seeds: int, population: int, generations: int) -> list[dict]:
    from evomerge.search.front import hypervolume, pareto_mask
    from evomerge.search.jobs import make_runtime
    from evomerge.search.loop import Progress, Search
    from evomerge.search.spec import JobSpec, parse_job
    from evomerge.store import Store

    def spec(name: str, seed: int, irt_on: bool) -> dict:
        extra = {"estimator": "irt", "anchors": 30, "seed_candidates": 16, "calibrate_every": 3,
                 "calibrate_count": 1} if irt_on else {}
        return {"name": name, "search_space": "sakana_ps",
                "models": {"base": str(zoo / "llama/base"), "sources": {"arith": str(zoo / "llama/arith"),
                                                                        "cipher": str(zoo / "llama/cipher")}},
                "objectives": {"include": [str(REPO / "fitness")], "split": "fitness", "objectives": [
                    {"task": t, "metric": "exact_match", "direction": "maximise", **extra} for t in ("zoo_arith", "zoo_cipher")]},
                "driver": {"algorithm": "nsga2", "population": population,
                           "budget": {"evaluations": population * generations}, "seed": seed},
                "runtime": {"threads": 1}, "store": str(out / f"{name}.sqlite")}

    rows = []
    os.chdir(REPO)
    for seed in range(seeds):
        res = {}
        for mode in ("full", "irt"):
            s = parse_job(spec(f"{mode}-{seed}", seed, mode == "irt"), source="<bench>", base_dir=REPO)
            Path(s.store).unlink(missing_ok=True)
            store = Store(s.store)
            runtime = make_runtime(s)
            store.create_job(s.name, s.to_dict(), seed)
            search = Search(JobSpec.from_dict(store.job(s.name)["spec"]), store, runtime, Progress(sys.stderr, live=False))
            start = time.perf_counter()
            search.run()
            seconds = time.perf_counter() - start
            done = store.candidates(s.name, status="done")
            items = sum(len(v) for t in ("zoo_arith", "zoo_cipher") for c, v in store.items_of(s.name, t).items()
                        if c in {r.id for r in done})
            front = [store.candidate(s.name, c) for c in store.front(s.name)]
            measured = []
            for r in front:  # the IRT front, re-scored in full (only for this comparison)
                if r.estimated:
                    runtime.submit(r.id, search.space.decode(np.array(r.genome)))
                    measured.append(next(iter(runtime.as_completed())).values)
                else:
                    measured.append(r.values)
            F = np.array([[-v["zoo_arith"], -v["zoo_cipher"]] for v in measured])
            hv_measured = hypervolume(F[pareto_mask(F)], np.zeros(2))
            Fe = np.array([[-r.values["zoo_arith"], -r.values["zoo_cipher"]] for r in front])
            res[mode] = {"hv": hv_measured, "hv_as_seen": hypervolume(Fe[pareto_mask(Fe)], np.zeros(2)),
                         "items": items, "seconds": seconds, "evaluated": len(done),
                         "estimated": sum(r.estimated for r in done)}
            runtime.close()
            store.close()
        rows.append({"seed": seed, **{f"{m}_{k}": v for m, d in res.items() for k, v in d.items()},
                     "hv_ratio": res["irt"]["hv"] / res["full"]["hv"], "cost_ratio": res["irt"]["items"] / res["full"]["items"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(irt_data.TASKS))
    ap.add_argument("--seeds", type=int, default=2, help="train/held-out splits per task")
    ap.add_argument("--train", type=int, default=40, help="fully scored candidates every fit sees (3 parents included)")
    ap.add_argument("--search", action="store_true", help="also compare a full-fitness and an IRT-fitness search")
    ap.add_argument("--search-seeds", type=int, default=2)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache/zoo")
    ap.add_argument("--out", type=Path, default=REPO / "out/bench_irt")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    path = irt_data.DATA / "responses.jsonl"
    n_planned = len(irt_data.plan(80, 90, 20))
    if not path.is_file() or sum(1 for _ in path.open()) < n_planned:
        irt_data.generate(a.zoo)
    report: dict = {"tasks": [], "train_size": [], "search": []}
    for task in a.tasks.split(","):
        start = time.perf_counter()
        res = accuracy(task, a.seeds, a.train)
        report["tasks"].append(res)
        print(table(res) + f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)
    report["train_size"] = train_size("zoo_mix")
    print("zoo_mix, N=30, method irt, estimator auto, by number of fully scored seed candidates:")
    for r in report["train_size"]:
        print(f"  fitted on {r['fit_on']:>3}: MAE {r['mae']:.3f}, Spearman {r['spearman']:.3f}")
    print("\ntargets at N=30 (method irt, estimator auto): MAE <= 0.03, Spearman >= 0.9, >= 10x fewer items")
    for res in report["tasks"]:
        r = next(x for x in res["rows"] if (x["method"], x["estimator"], x["anchors"]) == ("irt", "auto", 30))
        ok = r["mae"] <= 0.03 and r["spearman"] >= 0.9 and r["items_fraction"] <= 0.1
        print(f"  {res['task']:<13} MAE {r['mae']:.3f}  Spearman {r['spearman']:.3f}  items {r['items_fraction']:.0%}  "
              f"within 1 sd {r['within_1sd']:.0%}, 2 sd {r['within_2sd']:.0%}  chosen {'/'.join(r['chosen'])}  "
              f"{'met' if ok else 'NOT met'}")
    if a.search:
        report["search"] = search_compare(a.zoo, a.out, a.search_seeds, a.population, a.generations)
        print("\nsearch: NSGA-II on zoo_arith + zoo_cipher, full fitness vs IRT fitness (30 anchors), equal candidates")
        for r in report["search"]:
            print(f"  seed {r['seed']}: hypervolume full {r['full_hv']:.4f}, IRT {r['irt_hv']:.4f} (front re-scored in "
                  f"full; as the search saw it {r['irt_hv_as_seen']:.4f}) -> ratio {r['hv_ratio']:.3f}; items scored "
                  f"{r['irt_items']} vs {r['full_items']} -> cost {r['cost_ratio']:.2f}; "
                  f"time {r['irt_seconds']:.0f} s vs {r['full_seconds']:.0f} s")
    (a.out / "irt_accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{a.out / 'irt_accuracy.json'}")


if __name__ == "__main__":
    main()
