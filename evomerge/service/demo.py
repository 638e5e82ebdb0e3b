"""`make demo`: the search a newcomer runs first, end to end on the tiny zoo.

1. builds the zoo if it is missing (cached per model);
2. runs a two-objective search (zoo_mix, the target, against zoo_composed) over TIES merges of the arithmetic
   and cipher experts (a weight and a density gene per expert: the `sakana_ps` preset) on a private local Ray
   with two workers, with IRT-reduced fitness: after a calibration phase each new candidate is scored on 30
   anchor items per task and the rest is estimated;
3. prints the Pareto front beside the parents (test split) and writes the HTML + JSON report;
4. exports the best recipe for the target task as mergekit YAML and as a merged checkpoint, then scores that
   checkpoint, loaded fresh from disk, on the test split beside the parents;
5. layer paths: a data-flow search on the zoo's depth family (a reader whose first layers turn the cipher into
   the base's embeddings, and an arithmetic expert) for zoo_composed, arithmetic asked in the cipher, which no
   parent and no weight merge solves; it exports the best path as a standard checkpoint and scores it the same
   way (`bench/dfs_vs_ps.py` compares it with parameter-space search at equal budgets).

Everything lands in OUT (default out/demo); the job spec is written there too, so `evomerge resume`,
`evomerge export` and `evomerge dashboard` work on it afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from evomerge.config import EXAMPLES
from evomerge.spaces.presets import load_space_config

TASKS = EXAMPLES / "fitness"  # the example tasks, package data
TARGET = "zoo_mix"
PATH_TARGET = "zoo_composed"  # the data-flow stage's objective
MARKER = "# written by `make demo` (evomerge/service/demo.py)"


# The search space: the `sakana_ps` preset (TIES, a weight and a density gene per expert), loaded into job.yaml so
# the genes show there. Until 2026-12-06 the demo searched a PS-then-DFS hybrid (task arithmetic, then a layer path
# through the merge and the parents: HYBRID_SPACE in bench/irt_search_quality.py, its `--space hybrid`). On the
# 4-layer llama family no layer path adds anything (see "The depth family"), and the joint genome spent most of the
# budget on paths: its exported picks beat the best parent by +5.5 points on test over seeds 0-2 with IRT (+5.6
# scored in full), this space's by +12.4 (+12.1 in full; bench/demo_margin.py, 2026-12-06). Layer paths are the
# demo's last stage, on the depth family built for them.
SPACE_PRESET = "sakana_ps"


def demo_spec(zoo: Path, out: Path, workers: int, evaluations: int, seed: int = 0, fitness: str = "irt") -> dict:
    """The demo's search job. `fitness`: `irt` (the demo: IRT-reduced objectives) or `full` (every candidate on
    every item: the reference bench/demo_margin.py measures the IRT search's export against)."""
    # 24 seed candidates: two generations. With one (12, calibrate_count 1: cheaper on 280-candidate searches,
    # bench/irt_search_quality.py) a 72-candidate demo's first fits were poor and the exported pick stayed an estimate.
    # 240 candidates (the default --evaluations): at 72, 4 calibration candidates per objective measured zoo_composed's
    # estimates 0.096 off (fitted on seed candidates, read on candidates unlike them); at 240, 18 measured 0.028
    irt = {"estimator": "irt", "anchors": 30, "seed_candidates": 24, "calibrate_every": 2, "calibrate_count": 2,
           "confirm_count": 1} if fitness == "irt" else {}
    return {
        "name": "demo",
        "models": {"base": str(zoo / "llama/base"),
                   "sources": {"arith": str(zoo / "llama/arith"), "cipher": str(zoo / "llama/cipher")}},
        "search_space": load_space_config(SPACE_PRESET),
        "objectives": {
            "include": [str(TASKS)],
            "split": "fitness",
            "objectives": [
                {"task": TARGET, "metric": "exact_match", "direction": "maximise", **irt},
                {"task": "zoo_composed", "metric": "exact_match", "direction": "maximise", **irt},
            ],
        },
        "report_split": "test",
        # duplicates: cache (not the default, skip): a repeat takes its first's measured value. On the hybrid space
        # (bench/irt_search_quality.py's HYBRID_SPACE) a third of the asks were repeats, and with skip its IRT front
        # held near-copies of an over-estimate, each confirmed on its own: +4.0 points on test instead of +6.4
        # (2026-12-03, seed 0). TIES genes rarely repeat at six decimals (0 of 240 asks, 2026-12-06); the setting
        # stays for the odd repeat.
        "driver": {"algorithm": "nsga2", "population": 12, "budget": {"evaluations": evaluations}, "seed": seed,
                   "max_failures_in_a_row": 12, "duplicates": "cache"},
        "runtime": {"kind": "ray", "workers": workers, "threads": 1, "device": "cpu", "backend": "hf",
                    "batch_size": 64},
        "store": str(out / "store.sqlite"),
        "report": str(out / "report"),
    }


# Layer paths through the depth family's reader and arithmetic expert, in the order their layers run; segment genes
# (what found the path fastest in bench/dfs_vs_ps.py, which varies this space)
PATH_SPACE = {"kind": "dfs", "sources": ["reader", "arith"], "segments": 3, "scales": "none", "min_layers": 2,
              "max_layers": 16, "embed": "reader", "head": "arith"}


def paths_spec(zoo: Path, out: Path, evaluations: int) -> dict:
    """The data-flow stage's job: PATH_SPACE, CMA-ES warm-started at the best seed, in-process (bench/dfs_vs_ps.py
    starts from it too)."""
    fam = zoo / "depth"
    return {
        "name": "paths",
        "models": {"base": str(fam / "base"), "sources": {"reader": str(fam / "reader"), "arith": str(fam / "arith")}},
        "search_space": dict(PATH_SPACE),
        "objectives": {"include": [str(TASKS)], "split": "fitness", "objectives": [
            {"task": PATH_TARGET, "metric": "exact_match", "direction": "maximise", "limit": 200}]},
        "report_split": "test",
        "driver": {"algorithm": "cmaes", "options": {"start": "best_seed"}, "population": 16,
                   "budget": {"evaluations": evaluations}, "seed": 0},
        "runtime": {"kind": "local", "workers": 1, "threads": 1, "device": "cpu", "backend": "hf", "batch_size": 64},
        "store": str(out / "store.sqlite"),
        "report": str(out / "report"),
    }


def export_best(job_path: Path, recipe_out: Path, model_out: Path, objective: str):
    """The job's best candidate for `objective`: its recipe as mergekit YAML where mergekit can say it, else ours,
    and its checkpoint. Returns (the selection, export notes, what kind of recipe file was written)."""
    from evomerge.merge.export import ExportError
    from evomerge.service.export import export

    try:
        _, selected, notes = export(job_path, recipe_out, fmt="mergekit", best=objective)
        kind = "mergekit YAML (`mergekit-yaml` accepts it)"
    except ExportError as e:
        _, selected, notes = export(job_path, recipe_out, fmt="recipe", best=objective)
        kind = f"evomerge recipe YAML (`evomerge merge` builds it; not mergekit: {e})"
    export(job_path, model_out, fmt="model", best=objective)
    return selected, notes, kind


def score_folder(folder: Path, split: str = "test", task: str = TARGET) -> float:
    """A task's accuracy of a checkpoint loaded from disk, every item of `split`."""
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import parse_objectives

    objectives = parse_objectives({"include": [str(TASKS)], "split": split,
                                   "objectives": [{"task": task, "metric": "exact_match"}]}, base_dir=TASKS)
    ev = Evaluator(objectives, model=folder, backend="hf")
    try:
        return float(ev.evaluate().values[task])
    finally:
        ev.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=".cache/zoo", help="zoo folder (built if missing)")
    ap.add_argument("--zoo-families", default="llama,depth",
                    help="zoo families to build if missing (comma-separated; empty: every family; default llama,depth: "
                    "the demo never uses qwen2)")
    ap.add_argument("--out", default="out/demo", help="where the store, report, recipe and merged model go")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (one CPU slot each)")
    ap.add_argument("--evaluations", type=int, default=240, help="search budget in candidates (about 100 s on the "
                    "zoo with two workers)")
    ap.add_argument("--path-evaluations", type=int, default=160,
                    help="budget of the data-flow stage (0: skip it)")
    ap.add_argument("--seed", type=int, default=0, help="the search's seed (default 0; the exported merge and its "
                    "margin vary with it: bench/demo_margin.py runs several)")
    ap.add_argument("--fitness", choices=("irt", "full"), default="irt",
                    help="irt (default): IRT-reduced objectives, 30 anchor items per task after calibration; full: "
                    "every candidate on every item, the reference an IRT search is measured against")
    args = ap.parse_args(argv)

    from evomerge.compat.quiet import quiet_third_party
    from evomerge.search.jobs import run_job
    from evomerge.service.cli import search_env
    from evomerge.zoo.build import build_zoo

    t_start = time.perf_counter()
    zoo, out = Path(args.zoo).absolute(), Path(args.out).absolute()
    families = [f for f in (args.zoo_families or "").split(",") if f]
    if families and args.path_evaluations and "depth" not in families:
        families.append("depth")  # the layer-path stage searches the depth family
    build_zoo(zoo, progress=True, families=",".join(families) or None)
    job_path = out / "job.yaml"
    if out.exists():  # the demo is a fresh search each time (the zoo and venv are what is cached) ...
        ours = job_path.is_file() and job_path.read_text().startswith(MARKER)
        if any(out.iterdir()) and not ours:  # ... but it only ever deletes a folder it wrote itself
            print(f"error: {out} exists and is not a demo output folder (no {job_path.name} written by the demo); "
                  "choose another --out or remove it yourself", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True)
    job_path.write_text(MARKER + "\n"
                        + yaml.safe_dump(demo_spec(zoo, out, args.workers, args.evaluations, args.seed, args.fitness),
                                         sort_keys=False))
    scoring = ("IRT-reduced (30 anchors per task after calibration)" if args.fitness == "irt"
               else "scored in full (every item)")
    print(f"\nSearch: {job_path}\n  TIES merges of the zoo's arithmetic and cipher experts (a weight and a density "
          f"per expert); objectives "
          f"{TARGET} (target) and zoo_composed, {scoring}; {args.workers} Ray workers on 127.0.0.1; "
          f"{args.evaluations} candidates, seed {args.seed}.\n", flush=True)
    t0 = time.perf_counter()
    with search_env():
        result = run_job(job_path)
    search_s = time.perf_counter() - t0

    # The best recipe for the target task: mergekit YAML where expressible, else ours; and the checkpoint.
    recipe_out, model_out = out / "best-recipe.yaml", out / "best-model"
    with quiet_third_party():  # the export and the final scoring print only the lines below
        selected, notes, recipe_kind = export_best(job_path, recipe_out, model_out, TARGET)
        for note in notes:
            print(f"note: {note}")

        merged = score_folder(model_out)
    parents = {p["name"]: (p.get("test") or {}).get(TARGET) for p in result.report["parents"]}
    print(f"\nThe best candidate for {TARGET} (#{selected.row.id}; chosen on the fitness split, where an estimate "
          f"(~) counts at the worse end of its 2-sd interval), exported and loaded fresh from disk, on the test split "
          f"({TARGET}: half arithmetic, half cipher items):")
    for name, value in parents.items():
        print(f"  parent {name:<10} {value:.1%}" if value is not None else f"  parent {name:<10} (failed)")
    print(f"  merged            {merged:.1%}")
    best_parent = max(v for v in parents.values() if v is not None)
    gain = (merged - best_parent) * 100
    verdict = (f"beats every parent, by {gain:.1f} points over the best one" if gain > 0
               else f"does NOT beat the best parent ({gain:.1f} points)")
    print(f"\nThe merged model {verdict}.")
    # what bench/demo_margin.py reads (the printed lines are for people; the search's numbers: report.json)
    (out / "demo.json").write_text(json.dumps({
        "seed": args.seed, "fitness": args.fitness, "evaluations": args.evaluations, "search_seconds": search_s,
        "selected": selected.row.id, "merged_test": merged, "parents_test": parents, "gain_points": gain},
        indent=1))
    path_gain = run_paths(zoo, out / "paths", args.path_evaluations) if args.path_evaluations else None
    print(f"\nWhere everything is (search {search_s:.0f} s, demo {time.perf_counter() - t_start:.0f} s in all):")
    print(f"  report      {result.html_path}")
    print(f"  store       {result.store}")
    print(f"  recipe      {recipe_out}  [{recipe_kind}]")
    print(f"  model       {model_out}  (safetensors + config + tokenizer + model card; transformers and vLLM load it)")
    if path_gain is not None:
        print(f"  paths       {out / 'paths'}  (store, report, best-path checkpoint and recipe)")
    print(f"  dashboard   evomerge dashboard --store {result.store}")
    print(f"  resume      evomerge resume {job_path}")
    return 0 if gain > 0 and (path_gain is None or path_gain > 0) else 1


def run_paths(zoo: Path, out: Path, evaluations: int) -> float:
    """Stage 5: the data-flow search, its export and the fresh-from-disk score. Returns the gain in points of the
    exported path over the best parent on zoo_composed (test split, every item)."""
    from evomerge.compat.quiet import quiet_third_party
    from evomerge.merge.dataflow import path_runs
    from evomerge.search.jobs import run_job
    from evomerge.service.cli import search_env

    out.mkdir(parents=True)
    job_path = out / "job.yaml"
    job_path.write_text(MARKER + "\n" + yaml.safe_dump(paths_spec(zoo, out, evaluations), sort_keys=False))
    print(f"\nLayer paths: {job_path}\n  data-flow search through the depth family's reader (its first layers turn "
          f"the cipher into the base's embeddings) and arithmetic expert, for {PATH_TARGET} (arithmetic asked in "
          f"the cipher); {evaluations} candidates, in-process.\n", flush=True)
    with search_env():
        run_job(job_path)
    with quiet_third_party():
        recipe_out, model_out = out / "best-path.yaml", out / "best-path"
        selected, _, kind = export_best(job_path, recipe_out, model_out, PATH_TARGET)
        path = score_folder(model_out, task=PATH_TARGET)
        parents = {n: score_folder(zoo / "depth" / n, task=PATH_TARGET) for n in ("base", "reader", "arith")}
    layers = json.loads((model_out / "config.json").read_text())["num_hidden_layers"]
    described = path_runs(yaml.safe_load(selected.row.recipe)["dataflow"]["path"])
    print(f"\nThe best path for {PATH_TARGET} (#{selected.row.id}: {described}; {layers} layers), exported as a "
          f"standard checkpoint and loaded fresh from disk, on the test split:")
    for name, value in parents.items():
        print(f"  parent {name:<10} {value:.1%}")
    print(f"  path              {path:.1%}   [{kind}: {recipe_out}]")
    gain = (path - max(parents.values())) * 100
    verdict = (f"beats every parent, by {gain:.1f} points over the best one" if gain > 0
               else f"does NOT beat the best parent ({gain:.1f} points)")
    print(f"\nThe path {verdict}.")
    return gain


if __name__ == "__main__":
    sys.exit(main())
