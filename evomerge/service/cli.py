"""The `evomerge` command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evomerge.checkpoints import CheckpointError, IncompatibleModelsError
from evomerge.fitness.objectives import FitnessConfigError
from evomerge.merge.export import DEFAULT_SHARD_BYTES, ExportError, parse_size
from evomerge.merge.recipe import RecipeError
from evomerge.search.drivers import DriverError
from evomerge.search.spec import JobSpecError, SearchStopped
from evomerge.spaces.ps import SpaceError
from evomerge.store import StoreError

# Errors a user can fix: print the message, no traceback.
USER_ERRORS = (RecipeError, CheckpointError, IncompatibleModelsError, ExportError, FitnessConfigError,
               JobSpecError, SpaceError, DriverError, StoreError, SearchStopped)


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    start = time.perf_counter()
    out = merge_to_dir(recipe, Path(args.output), force=args.force, max_shard_bytes=parse_size(args.shard_size),
                       device=args.device, progress=not args.quiet)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    import os

    from evomerge.fitness.evaluator import Evaluator, default_backend

    if (default_backend() if args.backend == "auto" else args.backend) == "hf":
        os.environ.setdefault("TQDM_DISABLE", "1")  # not for vLLM: its offline runner divides by the bar's time
    from evomerge.fitness.objectives import CandidateFailed, load_objectives

    objectives = load_objectives(args.objectives, split=args.split)
    start = time.perf_counter()
    evaluator = Evaluator(objectives, Path(args.model), backend=args.backend, batch_size=args.batch_size)
    try:
        result = evaluator.evaluate()
    except CandidateFailed as e:
        print(f"candidate failed: {e.reason}", file=sys.stderr)
        return 1
    finally:
        evaluator.close()
    if args.json:
        out = {"model": str(args.model), "backend": evaluator.backend_name, "split": evaluator.objectives.split,
               "objectives": {o.name: {"kind": o.kind, "task": o.task, "metric": evaluator.suite.refs[o.name].metric if o.name in evaluator.suite.refs else None,
                                       "direction": o.direction, "value": result.values[o.name]}
                              for o in evaluator.objectives.objectives},
               **result.to_dict(with_items=True)}
        print(json.dumps(out, indent=1))
        return 0
    width = max(len(n) for n in result.values)
    for o in evaluator.objectives.objectives:
        items = result.items.get(o.name)
        count = f"  ({len(items)} items)" if items else ""
        print(f"{o.name:<{width}}  {result.values[o.name]:.6g}  [{o.direction}]{count}")
    print(f"scored in {result.seconds:.2f} s ({evaluator.backend_name} backend, split {evaluator.objectives.split}; "
          f"{time.perf_counter() - start:.1f} s with setup)")
    return 0


def _search_env() -> None:
    """Quiet third-party progress bars; SIGTERM interrupts like Ctrl-C (the job stays resumable)."""
    import os
    import signal

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import functools

    import tqdm

    # lm-eval and datasets draw their own bars per task load; the search's progress line is the one to read.
    # TQDM_DISABLE alone is not enough: tqdm reads TQDM_* variables once, when it is imported.
    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)  # type: ignore[method-assign]

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_run(args: argparse.Namespace) -> int:
    from evomerge.search.jobs import run_job

    _search_env()
    try:
        run_job(args.job)
    except KeyboardInterrupt:
        print(f"interrupted: the job is resumable with `evomerge resume {args.job}`", file=sys.stderr)
        return 130
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.search.jobs import resume_job

    _search_env()
    try:
        resume_job(args.job, args.name)
    except KeyboardInterrupt:
        print(f"interrupted: the job is resumable with `evomerge resume {args.job}`", file=sys.stderr)
        return 130
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from evomerge.zoo.build import build_zoo

    manifest = build_zoo(Path(args.dir), force=args.force, progress=not args.quiet)
    print(f"zoo ready in {args.dir} ({len(manifest.get('models', {}))} models)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Search for merge recipes that combine fine-tunes of one base model into better models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "merge",
        help="merge models as a recipe says and write a Hugging Face checkpoint",
        description="Merge models as a recipe says and write a checkpoint that transformers and vLLM load with no "
        "custom code: sharded safetensors, config, tokenizer and a model card holding the recipe. A recipe is "
        "either mergekit-format (merge_method: linear, task_arithmetic, ties, dare_ties, dare_linear, della, "
        "breadcrumbs, slerp, ...) or a data-flow path (`dataflow:` with hops of model, layer and scale; scales "
        "are folded into the weights). The folder is written under a temporary name and renamed when complete.",
    )
    p.add_argument("recipe", help="recipe YAML (relative model paths resolve against its folder, then the working directory)")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--shard-size", default=f"{DEFAULT_SHARD_BYTES // 1024**3}GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--device", default="cpu", help="where to compute: cpu (default) or cuda[:N]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    e = sub.add_parser(
        "eval",
        help="score a checkpoint on the objectives of a YAML file",
        description="Score a checkpoint on objectives declared in YAML: lm-eval tasks (registered names, or "
        "task YAMLs in the file's `include` folders) with a metric and a direction, and built-ins "
        "(perplexity, params, layers, latency). Prints one value per objective; --json adds per-item results.",
    )
    e.add_argument("model", help="model folder (Hugging Face format)")
    e.add_argument("--objectives", required=True, help="objectives YAML (see fitness/objectives.yaml)")
    e.add_argument("--split", default=None, help="split to score for every task objective (default: the file's, normally 'fitness'; 'test' for reports)")
    e.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"], help="auto: vLLM on a GPU machine where installed, else transformers")
    e.add_argument("--batch-size", type=int, default=64, help="transformers backend batch size (default 64)")
    e.add_argument("--json", action="store_true", help="print JSON with per-item results")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser(
        "run",
        help="run a merge-recipe search described by a job spec",
        description="Run an evolutionary search for merge recipes: the job spec names the models, the search space "
        "(search_spaces/), the objectives, the driver (random, cmaes, nsga2, nsga3, smsemoa) with its budget and seed, "
        "the runtime and the store. Every candidate goes into the store (SQLite), a checkpoint after every generation. "
        "Ends with the Pareto front scored on the test split beside the parents, and an HTML + JSON report.",
    )
    r.add_argument("job", help="job spec YAML (example: search_spaces/jobs/zoo_mix.yaml)")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "resume",
        help="continue a job from its last checkpoint (after a crash, kill or Ctrl-C)",
        description="Continue a job from its last checkpoint. A resumed job ends with the same candidates and values "
        "as one never interrupted (for evaluation budgets). JOB is the job spec YAML or the store file.",
    )
    s.add_argument("job", help="the job spec YAML, or the store file")
    s.add_argument("--job", dest="name", default=None, help="job name, when the store holds several")
    s.set_defaults(func=cmd_resume)

    zoo = sub.add_parser("zoo", help="the tiny demo model zoo").add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    b = zoo.add_parser(
        "build",
        help="train the tiny model zoo (cached: a second call returns at once)",
        description="Train the tiny model zoo deterministically on CPU: Llama- and Qwen2-style base models and "
        "experts fine-tuned on synthetic skills, plus the task data they are tested on.",
    )
    b.add_argument("dir", nargs="?", default=".cache/zoo", help="output folder (default .cache/zoo)")
    b.add_argument("--force", action="store_true", help="rebuild even if the cached zoo matches")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    b.set_defaults(func=cmd_zoo_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
