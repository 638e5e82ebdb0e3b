"""The `evomerge` command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evomerge.checkpoints import CheckpointError, IncompatibleModelsError
from evomerge.merge.export import DEFAULT_SHARD_BYTES, ExportError, parse_size
from evomerge.merge.recipe import RecipeError

# Errors a user can fix: print the message, no traceback.
USER_ERRORS = (RecipeError, CheckpointError, IncompatibleModelsError, ExportError)


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    start = time.perf_counter()
    out = merge_to_dir(recipe, Path(args.output), force=args.force, max_shard_bytes=parse_size(args.shard_size),
                       device=args.device, progress=not args.quiet)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
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
