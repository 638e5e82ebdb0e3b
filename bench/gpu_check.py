"""GPU checks and timings: run on a CUDA machine (the tests never need one).

    python bench/gpu_check.py --zoo .cache/zoo [--large-layers 16] [--skip-fitness]

1. Same merge on CUDA as on CPU: for every method, the zoo's llama family materialised in memory on CUDA,
   in memory on CPU and on disk (`merge_to_dict`, CPU) agree (max |diff| printed; random sparsifiers draw
   their masks from a CPU generator, so DARE/DELLA give the same model on any device).
2. Fitness on CUDA: the transformers backend scores the demo recipe on zoo_mix (500 fitness items) on CUDA
   and on CPU; accuracies must agree; seconds per candidate (materialise + score) on each, as a ratio.
3. Materialisation at size: a random Llama family (~0.5B parameters per model, 3 experts) on CUDA against
   the same on this machine's CPU threads: seconds per TIES candidate with per-layer gradients, first
   candidate (builds the rank caches), peak GPU memory against one model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHOD_RECIPES = {
    "linear": {"weight": [0.5, 0.3, 0.2]},
    "task_arithmetic": {"weight": [0.7, 0.25, 0.1]},
    "ties": {"weight": [0.7, 0.5, 0.3], "density": [0.4, 0.6, 0.5]},
    "dare_ties": {"weight": [0.7, 0.5, 0.3], "density": [0.4, 0.6, 0.5]},
    "dare_linear": {"weight": [0.7, 0.5, 0.3], "density": [0.4, 0.6, 0.5]},
    "della": {"weight": [0.7, 0.5, 0.3], "density": [0.4, 0.6, 0.5], "epsilon": [0.1, 0.1, 0.1]},
    "breadcrumbs": {"weight": [0.7, 0.5, 0.3], "density": [0.4, 0.6, 0.5], "gamma": [0.01, 0.01, 0.01]},
}


def zoo_recipe(zoo: Path, method: str) -> dict:
    experts = ["arith", "cipher", "reverse"]
    params = METHOD_RECIPES[method]
    models = []
    for i, e in enumerate(experts):
        p = {k: v[i] for k, v in params.items()}
        models.append({"model": str(zoo / "llama" / e), "parameters": p})
    out = {"merge_method": method, "base_model": str(zoo / "llama" / "base"), "models": models, "dtype": "float32"}
    if method == "linear":
        out["models"].append({"model": str(zoo / "llama" / "base"), "parameters": {"weight": 0.1}})
        del out["base_model"]
    return out


def check_equality(zoo: Path) -> dict:
    from evomerge.merge.engine import merge_to_dict
    from evomerge.merge.materialise import Materialiser
    from evomerge.merge.recipe import parse_recipe

    names = ["base", "arith", "cipher", "reverse"]
    paths = {n: zoo / "llama" / n for n in names}
    mats = {d: Materialiser({str(p): p for p in paths.values()}, anchor=str(paths["base"]), device=d)
            for d in ("cpu", "cuda")}
    modules = {d: m.build_module() for d, m in mats.items()}
    worst = {}
    for method in METHOD_RECIPES:
        recipe = parse_recipe(zoo_recipe(zoo, method))
        for d in ("cpu", "cuda"):
            mats[d].apply(recipe, modules[d])
        cpu = {k: v for k, v in modules["cpu"].state_dict().items()}
        gpu = {k: v.cpu() for k, v in modules["cuda"].state_dict().items()}
        disk = merge_to_dict(recipe)
        d_gpu = max((cpu[k] - gpu[k]).abs().max().item() for k in cpu)
        d_disk = max((gpu[k] - disk[k]).abs().max().item() for k in disk if k in gpu)
        worst[method] = (d_gpu, d_disk)
        print(f"  {method:16s} max|cuda - cpu| {d_gpu:.2e}   max|cuda in-memory - cpu disk merge| {d_disk:.2e}")
    return worst


def time_candidates(scorer, recipes) -> tuple[list[float], list[float]]:
    values, times = [], []
    for r in recipes:
        t = time.perf_counter()
        res = scorer.evaluate(r)
        if scorer.evaluator.backend_name == "hf" and torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        values.append(res.values["zoo_mix"])
    return values, times


def check_fitness(zoo: Path, n: int) -> dict:
    from evomerge.fitness.objectives import parse_objectives
    from evomerge.merge.materialise import Materialiser
    from evomerge.merge.recipe import parse_recipe
    from evomerge.scoring import RecipeScorer

    objectives = parse_objectives({"include": [str(REPO / "fitness")], "split": "fitness",
                                   "objectives": [{"task": "zoo_mix", "metric": "exact_match"}]},
                                  base_dir=REPO)
    names = ["base", "arith", "cipher"]
    paths = {n_: zoo / "llama" / n_ for n_ in names}
    g = torch.Generator().manual_seed(0)
    recipes = []
    for i in range(n):
        wa, wc = (0.7, 0.25) if i == 0 else tuple((torch.rand(2, generator=g) * 0.9 + 0.1).tolist())
        recipes.append(parse_recipe({
            "merge_method": "task_arithmetic", "base_model": str(paths["base"]), "dtype": "float32",
            "models": [{"model": str(paths["arith"]), "parameters": {"weight": wa}},
                       {"model": str(paths["cipher"]), "parameters": {"weight": wc}}]}))
    out = {}
    for device in ("cuda", "cpu"):
        mat = Materialiser({str(p): p for p in paths.values()}, anchor=str(paths["base"]), device=device)
        ev = RecipeScorer(objectives, mat, backend="hf", batch_size=256)
        time_candidates(ev, recipes[:1])  # warm-up (kernels, request building)
        values, times = time_candidates(ev, recipes)
        ev.close()
        out[device] = (values, times)
        print(f"  {device}: zoo_mix accuracies {[round(v, 3) for v in values]}; "
              f"median {sorted(times)[len(times) // 2]:.2f} s per candidate (materialise + 500 items)")
    same = max(abs(a - b) for a, b in zip(out["cuda"][0], out["cpu"][0]))
    print(f"  max |accuracy cuda - cpu| over {n} candidates: {same:.4f}")
    ratio = sorted(out["cpu"][1])[n // 2] / sorted(out["cuda"][1])[n // 2]
    print(f"  RATIO seconds per candidate cpu / cuda: {ratio:.1f}x")
    return {"max_acc_diff": same, "cpu_over_cuda": ratio}


def make_family(root: Path, layers: int) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo import tokenizer as ztok

    cfg = LlamaConfig(vocab_size=ztok.VOCAB_SIZE, hidden_size=1536, intermediate_size=4096,
                      num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=12,
                      max_position_embeddings=256)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(cfg)
    paths = {}
    for i, name in enumerate(["base", "e1", "e2", "e3"]):
        if i:
            with torch.no_grad():
                for p in base.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        base.save_pretrained(root / name, safe_serialization=True)
        ztok.save_tokenizer(root / name)
        paths[name] = root / name
    del base
    torch.cuda.empty_cache()
    return paths


def large_recipe(paths: dict[str, Path], ws: list[float]) -> dict:
    return {"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "float32",
            "parameters": {"normalize": True},
            "models": [{"model": str(paths[e]), "parameters": {"weight": [w, 1 - w / 2, w], "density": [0.3, 0.7, 0.5]}}
                       for e, w in zip(["e1", "e2", "e3"], ws)]}


def check_large(layers: int, cpu_candidates: int) -> dict:
    from evomerge.checkpoints import open_checkpoint
    from evomerge.merge.materialise import Materialiser
    from evomerge.merge.recipe import parse_recipe

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = make_family(Path(tmp), layers)
        ck = open_checkpoint(paths["base"])
        print(f"  family: 4 x {ck.num_params / 1e6:.0f}M parameters, written in {time.perf_counter() - t:.0f} s")
        g = torch.Generator().manual_seed(0)
        recipes = [parse_recipe(large_recipe(paths, torch.rand(3, generator=g).tolist())) for _ in range(6)]
        for device, n in (("cuda", 5), ("cpu", cpu_candidates)):
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            mat = Materialiser(paths, anchor="base", device=device)
            module = mat.build_module()
            targets = mat.targets(module)
            setup = time.perf_counter() - t
            t = time.perf_counter()
            mat.apply(recipes[0], module, targets)
            if device == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t
            times = []
            for r in recipes[1:1 + n]:
                t = time.perf_counter()
                mat.apply(r, module, targets)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            med = sorted(times)[len(times) // 2]
            extra = ""
            if device == "cuda":
                extra = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB = "
                         f"{torch.cuda.max_memory_allocated() / ck.num_bytes:.1f}x one model (fp32)")
            print(f"  {device}: setup {setup:.1f} s, first candidate {first:.2f} s (rank caches), then {med:.3f} s "
                  f"per candidate (median of {len(times)}){extra}")
            out[device] = med
            del mat, module, targets
            torch.cuda.empty_cache()
    print(f"  RATIO materialisation per candidate cpu ({torch.get_num_threads()} threads) / cuda: "
          f"{out['cpu'] / out['cuda']:.1f}x")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=".cache/zoo")
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--large-layers", type=int, default=16)
    ap.add_argument("--cpu-candidates", type=int, default=2)
    ap.add_argument("--skip-fitness", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU paths; run it on a GPU machine")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # compare numerics, not TF32 rounding
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | cpu threads {torch.get_num_threads()}")
    zoo = Path(args.zoo)
    report = {}
    print("1. materialisation on CUDA vs CPU (zoo llama, 3 experts)")
    report["equality"] = check_equality(zoo)
    if not args.skip_fitness:
        print("2. fitness on CUDA vs CPU (transformers backend, zoo_mix fitness split)")
        report["fitness"] = check_fitness(zoo, args.candidates)
    print("3. materialisation at size")
    report["large"] = check_large(args.large_layers, args.cpu_candidates)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
