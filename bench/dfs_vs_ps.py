"""Data-flow search against parameter-space search on the zoo's depth family, at equal evaluation budgets.

The depth family (`evomerge zoo build` builds it: `depth/base`, `depth/arith`, `depth/reader`, see README's zoo
section) is designed so that a layer path can win: the reader's first two layers turn a prompt in the cipher into
the base's embeddings of the deciphered prompt, the arithmetic expert computes, and the composed task (arithmetic
asked in the cipher) needs both in sequence, so the path [reader 0-1, arith 0-7] (ten layers, longer than either
parent) solves what no parent and no weight merge does. What this bench measures is whether the *search* finds
such a path, at what budget, and whether the exported checkpoint reproduces it.

Per seed, searches with the same driver (CMA-ES), population and budget, one objective (zoo_composed on the
fitness split), reported on the test split:
- ps: a TIES merge of the two experts over the base (weight and density per expert: `sakana_ps`);
- dfs: layer paths through the reader and the arithmetic expert (`segments: 3`, reader embeddings, arithmetic
  head), CMA-ES warm-started at the best seed (`start: best_seed`);
- dfs-swapped: as dfs with the sources listed [arith, reader] (the empty segments' genes then name arith);
- dfs-keep: the same paths in Sakana's encoding (a keep gene per layer), warm-started;
- dfs-sakana: Sakana's encoding, CMA-ES from the centre of the cube (seeds injected);
- hybrid: a TIES merge offered as a third source to a path through it and the experts (segments, warm start).
It prints, per seed, each search's best candidate on the test split, the evaluation at which the best was first
reached, and the gap DFS - PS; then exports the best path found (`evomerge export --format model`) and scores
the checkpoint with `evomerge eval`: its test score must equal the in-memory one.

    python bench/dfs_vs_ps.py --zoo .cache/zoo --out out/bench_dfs [--seeds 3 --budget 240 --population 16]
                              [--searches ps,dfs,dfs-swapped,dfs-keep,dfs-sakana,hybrid]

Up to `budget` candidates per search (identical recipes are evaluated once), 200 items each, a few per second
on one thread: about 12 minutes for 3 seeds of every search at 240. Writes OUT/dfs_vs_ps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import run  # noqa: E402  (bench scripts share the in-process search runner)

import yaml  # noqa: E402

from evomerge.merge.dataflow import path_runs  # noqa: E402
from evomerge.service.demo import PATH_SPACE, PATH_TARGET, paths_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OBJECTIVE = PATH_TARGET  # zoo_composed

SEGMENTS = PATH_SPACE  # the demo's layer-path space
KEEP = {**{k: v for k, v in SEGMENTS.items() if k != "segments"}, "repeats": 1}
# name -> (search space, CMA-ES start); every search gets the same budget, population and objective
SEARCHES = {
    "ps": ("sakana_ps", "best_seed"),
    "dfs": (SEGMENTS, "best_seed"),  # segment genes, warm start: what the README recommends
    # the same with the sources listed the other way round: an empty segment's genes at 0 name the FIRST source at
    # its layer 0, so with [reader, arith] the reader prefix is one gene (a length) from the arith seed; here the
    # source gene must move too
    "dfs-swapped": ({**SEGMENTS, "sources": ["arith", "reader"]}, "best_seed"),
    "dfs-keep": (KEEP, "best_seed"),  # Sakana's keep genes, warm start
    "dfs-sakana": (KEEP, "center"),  # Sakana's keep genes, CMA-ES from the centre of the cube
    "hybrid": ({"kind": "hybrid", "ps": {"method": "ties", "parameters": {"normalize": False, "lambda": 1.0}},
                "dfs": {**{k: v for k, v in SEGMENTS.items() if k not in ("kind", "head")}, "head": "merge"}},
               "best_seed"),
}


def job(name: str, zoo: Path, out: Path, space, start: str, seed: int, budget: int, population: int, limit: int) -> dict:
    """The demo's data-flow job (`paths_spec`) with this search's space, start, seed, population and item limit."""
    spec = paths_spec(zoo, out, budget)
    spec.update(name=name, search_space=space, store=str(out / f"{name}.sqlite"), report=str(out / name))
    spec["driver"].update(options={"start": start}, population=population, seed=seed)
    spec["objectives"]["objectives"][0]["limit"] = limit
    return spec


def first_reached(rows, best: float) -> int:
    """Evaluations (in ask order) until the search first scored its best fitness value."""
    ordered = sorted((r for r in rows if r.values), key=lambda r: (r.generation, r.id))  # failed rows: no values
    return next(i + 1 for i, r in enumerate(ordered) if r.values[OBJECTIVE] >= best)


def exported_test_score(store: Path, name: str, cid: int, out: Path, limit: int) -> float:
    """The exported checkpoint, loaded fresh, on the test split's first `limit` items (as the report scored it)."""
    folder = out / f"{name}-export"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "evomerge", "export", str(store), "--candidate", str(cid), "--format", "model",
                    "-o", str(folder), "--force", "-q"], check=True, env=env, cwd=REPO)
    objectives = out / "objectives.yaml"
    objectives.write_text(json.dumps({"include": [str(REPO / "fitness")], "split": "test", "objectives": [
        {"task": OBJECTIVE, "metric": "exact_match", "direction": "maximise", "limit": limit}]}))
    done = subprocess.run([sys.executable, "-m", "evomerge", "eval", str(folder), "--objectives", str(objectives),
                           "--split", "test", "--json"], check=True, env=env, cwd=REPO, capture_output=True, text=True)
    return float(json.loads(done.stdout)["values"][OBJECTIVE])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=str(REPO / ".cache/zoo"))
    ap.add_argument("--out", default=str(REPO / "out/bench_dfs"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=240, help="candidates per search (the same for every space)")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--limit", type=int, default=200, help="items of the objective on the fitness split")
    ap.add_argument("--searches", default=",".join(SEARCHES), help=f"a subset of {', '.join(SEARCHES)}")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    zoo, out = Path(args.zoo).resolve(), Path(args.out).resolve()
    if not (zoo / "depth/reader/model.safetensors").exists():
        print(f"{zoo}: no depth family (depth/base, depth/arith, depth/reader); build it: evomerge zoo build {zoo}",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    spaces = args.searches.split(",")
    unknown = [k for k in spaces if k not in SEARCHES]
    if unknown:
        print(f"--searches: {unknown} unknown; choose from {', '.join(SEARCHES)}", file=sys.stderr)
        return 2
    from evomerge.compat.quiet import quiet_third_party

    results: dict = {"settings": vars(args), "seeds": []}
    for seed in range(args.seeds):
        entry: dict = {"seed": seed}
        for kind in spaces:
            name = f"{kind}-{seed}"
            space, start = SEARCHES[kind]
            with quiet_third_party():
                rows, rep, seconds = run(job(name, zoo, out, space, start, seed, args.budget, args.population,
                                             args.limit), report=True)
            best = max(rep["front"], key=lambda c: c["fitness"][OBJECTIVE])
            recipe = yaml.safe_load(best["recipe_yaml"])
            entry[kind] = {"best_fitness": best["fitness"][OBJECTIVE], "best_test": best["test"][OBJECTIVE],
                           "candidate": best["id"], "evaluated": len(rows),
                           "recipe": best["recipe"] + (f": {path_runs(recipe['dataflow']['path'])}"
                                                       if "dataflow" in recipe else ""),
                           "first_reached_at": first_reached(rows, best["fitness"][OBJECTIVE]),
                           "seconds": round(seconds, 1)}
            if "parents" not in entry:
                entry["parents"] = {p["name"]: p["test"][OBJECTIVE] for p in rep["parents"]}
        if "dfs" in entry:
            d = entry["dfs"]
            d["exported_test"] = exported_test_score(out / f"dfs-{seed}.sqlite", f"dfs-{seed}", d["candidate"], out,
                                                     args.limit)
        results["seeds"].append(entry)
        line = " | ".join(f"{k} {entry[k]['best_test']:.3f} (fitness {entry[k]['best_fitness']:.3f}, at eval "
                          f"{entry[k]['first_reached_at']}/{entry[k]['evaluated']})" for k in spaces)
        gap = f" | gap dfs-ps {100 * (entry['dfs']['best_test'] - entry['ps']['best_test']):+.1f} points" \
            if {"dfs", "ps"} <= set(spaces) else ""
        exported = f" | exported path test {entry['dfs']['exported_test']:.3f}" if "dfs" in entry else ""
        print(f"seed {seed}: parents {entry['parents']} | {line}{gap}{exported}", flush=True)
        if spaces:
            print("         best: " + "; ".join(f"{k} {entry[k]['recipe']}" for k in spaces), flush=True)
    (out / "dfs_vs_ps.json").write_text(json.dumps(results, indent=2) + "\n")
    if {"dfs", "ps"} <= set(spaces):
        gaps = [100 * (s["dfs"]["best_test"] - s["ps"]["best_test"]) for s in results["seeds"]]
        same = all(abs(s["dfs"]["exported_test"] - s["dfs"]["best_test"]) < 1e-9 for s in results["seeds"])
        print(f"\ngap dfs - ps on test, per seed: {', '.join(f'{g:+.1f}' for g in gaps)} points (claim: >= +5 each: "
              f"{all(g >= 5 for g in gaps)}); exported checkpoints reproduce the in-memory test score: {same}")
    print(f"written {out / 'dfs_vs_ps.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
