"""Merge speed and memory: evomerge against mergekit on the same recipe and models.

Measured in one run, printed as ratios:
  1. per-candidate in-memory materialisation (evomerge's search hot path) vs `mergekit-yaml` (a disk merge,
     what mergekit-evolve runs per candidate);
  2. `evomerge merge` to disk vs `mergekit-yaml`, both as fresh processes;
  3. peak extra memory of one materialisation against the size of one model (the per-worker rank caches,
     sorted task-vector magnitudes built by the first candidate, are resident state and reported apart).

Models: a ~57M-parameter Llama family (random base, three "fine-tunes" = base + small perturbations) with
the zoo's character tokenizer, written to .cache/bench-large once. Recipe: 3-model TIES with per-layer gradients.
mergekit runs from its own venv (.venv-mergekit; `make venv-mergekit` builds it); without it, parts 1-2
print what is missing and only evomerge's own numbers are shown.

    .venv/bin/python bench/merge_speed.py [--candidates 5] [--disk-runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
LARGE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=256)


def make_large_family(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo import tokenizer as ztok

    names = ["base", "expert1", "expert2", "expert3"]
    if all((root / n / "model.safetensors").exists() for n in names):
        return {n: root / n for n in names}
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=ztok.VOCAB_SIZE, **LARGE))
    for i, name in enumerate(names):
        model = base
        if i:
            model = LlamaForCausalLM(base.config)
            model.load_state_dict(base.state_dict())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / name, safe_serialization=True)
        ztok.save_tokenizer(root / name)
    return {n: root / n for n in names}


def recipe(paths: dict[str, Path], weights: tuple[float, float, float]) -> dict:
    experts = ["expert1", "expert2", "expert3"]
    return {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths[e]), "parameters": {"weight": [w, 1.0 - w / 2, w], "density": [0.3, 0.7, 0.5]}}
            for e, w in zip(experts, weights)
        ],
        "parameters": {"normalize": True, "lambda": 1.0},
        "dtype": "float32",
    }


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--disk-runs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from evomerge.checkpoints import open_checkpoint
    from evomerge.merge.materialise import Materialiser
    from evomerge.merge.recipe import parse_recipe

    paths = make_large_family(REPO / ".cache" / "bench-large")

    ck = open_checkpoint(paths["base"])
    model_bytes = ck.num_bytes
    print(f"models: 4 x {ck.num_params / 1e6:.1f}M parameters ({model_bytes / 2**20:.0f} MiB each, fp32), "
          f"torch threads {torch.get_num_threads()}")

    # 1. in-memory materialisation
    t0 = time.perf_counter()
    mat = Materialiser(paths, anchor="base")
    module = mat.build_module()
    targets = mat.targets(module)
    setup = time.perf_counter() - t0
    rng = torch.Generator().manual_seed(0)
    recipes = [parse_recipe(recipe(paths, tuple(torch.rand(3, generator=rng).tolist()))) for _ in range(args.candidates + 1)]
    t = time.perf_counter()
    mat.apply(recipes[0], module, targets)  # the first candidate also builds the rank caches
    first = time.perf_counter() - t
    cache_bytes = sum(r.nbytes for r in mat.ranks.values())
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux)
    rss_before = rss_kib("VmRSS")
    times = []
    for r in recipes[1:]:
        t = time.perf_counter()
        mat.apply(r, module, targets)
        times.append(time.perf_counter() - t)
    peak_extra = (rss_kib("VmHWM") - rss_before) * 1024
    per_candidate = sorted(times)[len(times) // 2]
    print(f"evomerge in-memory: setup {setup:.1f} s once per worker, first candidate {first:.2f} s (builds rank caches: "
          f"{cache_bytes / 2**20:.0f} MiB resident = {cache_bytes / model_bytes:.2f}x one model), "
          f"then {per_candidate:.3f} s per candidate (median of {len(times)})")
    print(f"peak extra memory during materialisation: {peak_extra / 2**20:.0f} MiB = {peak_extra / model_bytes:.2f}x one model (target <= 1.5x)")
    del mat, module, targets

    # 2. disk merges, fresh processes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = tmp / "recipe.yaml"
        cfg.write_text(yaml.safe_dump(recipe(paths, (0.6, 0.3, 0.5))))
        env = dict(os.environ)
        evo = [timed([sys.executable, "-m", "evomerge", "merge", str(cfg), "-o", str(tmp / "evo"), "--force", "-q"], env)
               for _ in range(args.disk_runs)]
        evo_disk = min(evo)
        print(f"evomerge merge (disk, fresh process): {evo_disk:.2f} s (best of {len(evo)})")
        mk = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
        if not mk.exists():
            print("mergekit not installed (.venv-mergekit): run `make venv-mergekit` for the comparison")
            return
        mk_times = [timed([str(mk), str(cfg), str(tmp / "mk"), "--allow-crimes", "--out-shard-size", "2B"], env)
                    for _ in range(args.disk_runs)]
        mk_disk = min(mk_times)
        print(f"mergekit-yaml (disk, fresh process): {mk_disk:.2f} s (best of {len(mk_times)})")
        from safetensors.torch import load_file

        ours = {}
        for f in (tmp / "evo").glob("*.safetensors"):
            ours.update(load_file(f))
        theirs = {}
        for f in (tmp / "mk").glob("*.safetensors"):
            theirs.update(load_file(f))
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
        print(f"max |evomerge - mergekit| over all tensors: {diff:.2e}")
    print()
    print(f"RATIO in-memory per candidate vs mergekit-yaml: {mk_disk / per_candidate:.1f}x faster (target >= 10x)")
    print(f"RATIO evomerge merge vs mergekit-yaml (disk): {mk_disk / evo_disk:.2f}x (target >= 1.0)")
    print(json.dumps({"per_candidate_s": per_candidate, "evomerge_disk_s": evo_disk, "mergekit_disk_s": mk_disk,
                      "peak_extra_over_model": peak_extra / model_bytes}))


if __name__ == "__main__":
    main()
