"""`make demo`: build the zoo, merge the arithmetic and cipher experts, and compare the merge with its
parents on the target task (`mix`: half arithmetic items, half cipher items; neither expert solves it).

This is the foundation's demo: one hand-written task-arithmetic recipe. The search (later) finds such recipes itself.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

DEMO_RECIPE = {
    "name": "zoo arithmetic + cipher (task arithmetic)",
    "merge_method": "task_arithmetic",
    "base_model": "{zoo}/llama/base",
    "models": [
        {"model": "{zoo}/llama/arith", "parameters": {"weight": 0.7}},
        {"model": "{zoo}/llama/cipher", "parameters": {"weight": 0.25}},
    ],
    "parameters": {"normalize": False},
    "dtype": "float32",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", default=".cache/zoo", help="zoo folder (built if missing)")
    ap.add_argument("--out", default="out/demo", help="where the recipe and merged model go")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.recipe import load_recipe
    from evomerge.zoo.build import build_zoo
    from evomerge.zoo.tasks import read_jsonl
    from evomerge.zoo.train import score

    zoo, out = Path(args.zoo).absolute(), Path(args.out).absolute()
    build_zoo(zoo, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.yaml"
    text = yaml.safe_dump(DEMO_RECIPE, sort_keys=False).replace("{zoo}", str(zoo))
    recipe_path.write_text(text)
    t0 = time.perf_counter()
    merged = merge_to_dir(load_recipe(recipe_path), out / "merged", force=True)
    merge_s = time.perf_counter() - t0

    tasks = ("arith", "cipher", "mix")
    items = {t: read_jsonl(zoo / "data" / t / "test.jsonl") for t in tasks}
    rows = []
    for label, folder in [("base", zoo / "llama/base"), ("arith expert", zoo / "llama/arith"),
                          ("cipher expert", zoo / "llama/cipher"), ("merged", merged)]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        rows.append((label, {t: score(model, items[t]) for t in tasks}))
    print(f"\nTest split, greedy exact match ({len(items['mix'])} items per task); the target is 'mix' "
          "(half arithmetic, half cipher items):")
    print(f"  {'model':<16}" + "".join(f"{t:>9}" for t in tasks))
    for label, acc in rows:
        print(f"  {label:<16}" + "".join(f"{acc[t]:9.1%}" for t in tasks))
    best_parent = max(acc["mix"] for _, acc in rows[:-1])
    gain = (rows[-1][1]["mix"] - best_parent) * 100
    verdict = f"beats the best parent by {gain:.1f} points" if gain > 0 else f"is {-gain:.1f} points below the best parent"
    print(f"\nOn 'mix' the merge {verdict}.")
    print(f"Recipe: {recipe_path}\nMerged model ({merge_s:.1f} s): {merged}")
    print(f"Reproduce: evomerge merge {recipe_path} -o OUT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
