"""Real size on one GPU (H100/H200): a 7B-shaped family, the memory plan against the allocator, materialisation
against the HBM and host-copy bounds. Sized to finish in under 8 minutes; prepared on CPU, run once per GPU session.

    python bench/gpu_real_size.py [--out DIR] [--shape mistral-7b] [--experts 2] [--candidates 3]

1. Builds a random bf16 family of the shape (base + experts: Mistral-7B by default, 7.24B parameters each) on the
   GPU and writes it to /dev/shm (else --out), shard by shard.
2. The memory plan for one worker (transformers engine in bf16, batch 8 x 512 tokens, TIES) on this GPU.
3. For sources on `device` and on `host`: builds the worker (Materialiser + the engine's bf16 module), times
   3-model TIES candidates (stable ties) into the module, runs a forward pass of the planned batch, and prints
   torch.cuda.max_memory_allocated against the plan's device total less its CUDA-context allowance (target within
   10%) and seconds per candidate against the placement's bound (target within 2x of the HBM bound for device).
4. If lm-eval is importable here, a short search on the zoo (`.cache/zoo`, carried) with the transformers backend
   on CUDA; else it says it skipped that.
Prints one JSON line per step and writes them to DIR/gpu_real_size.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GiB = 1024**3


def log(out: Path, **row) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(out / "gpu_real_size.jsonl", "a") as f:
        f.write(line + "\n")


def build_family(root: Path, shape: str, experts: int) -> dict[str, Path]:
    """Random base (std 0.02) and experts (+ noise 0.002), generated on the GPU, written shard by shard."""
    from evomerge.zoo.shapes import SHAPES, write_random_family

    return write_random_family(root, SHAPES[shape], experts=experts, shard_bytes=4 * 10**9, device="cuda")


def recipe(paths: dict[str, Path], k: int):
    from evomerge.merge.recipe import parse_recipe

    return parse_recipe({"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "bfloat16", "seed": k,
                         "parameters": {"stable_ties": True},
                         "models": [{"model": str(p), "parameters": {"weight": 0.4 + 0.1 * i, "density": 0.3 + 0.1 * k}}
                                    for i, (n, p) in enumerate(paths.items()) if n != "base"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/gpu-real")
    ap.add_argument("--shape", default="mistral-7b")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from evomerge.memory import Machine, Workload, plan_worker
    from evomerge.merge.materialise import Materialiser

    log(out, step="device", name=torch.cuda.get_device_name(), memory=torch.cuda.mem_get_info()[1], torch=torch.__version__)
    shm = Path("/dev/shm")
    free = shutil.disk_usage(shm).free if shm.is_dir() else 0
    root = (shm if free > (args.experts + 1) * 16 * GiB else out) / f"evomerge-{args.shape}"
    t0 = time.perf_counter()
    paths = build_family(root, args.shape, args.experts)
    log(out, step="family", folder=str(root), seconds=time.perf_counter() - t0)

    machine = Machine.detect("cuda")
    workload = Workload(backend="hf", engine_dtype="bfloat16", batch_size=args.batch, max_length=args.length,
                        methods=("ties",))
    plan = plan_worker([paths["base"], *(p for n, p in paths.items() if n != "base")], workload, machine,
                       rank_cache=False)
    print(plan.render(args.shape))
    log(out, step="plan", chosen=plan.chosen.placement if plan.chosen else None, bandwidth=machine.bandwidth)

    for placement in ("device", "host"):
        option = next(o for o in plan.options if o.placement == placement)
        if not option.fits:
            log(out, step="worker", placement=placement, skipped="does not fit the plan")
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        mat = Materialiser(paths, "base", device="cuda", sources=placement, rank_cache=False)
        module = mat.build_module(torch.bfloat16)
        build = time.perf_counter() - t0
        targets = mat.targets(module)
        times = []
        for k in range(args.candidates + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            mat.apply(recipe(paths, k), module, targets)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        with torch.no_grad():
            ids = torch.randint(0, module.config.vocab_size, (args.batch, args.length), device="cuda")
            t = time.perf_counter()
            logits = module(input_ids=ids).logits
            torch.log_softmax(logits.float(), dim=-1)
            torch.cuda.synchronize()
            forward = time.perf_counter() - t
        del logits
        peak = torch.cuda.max_memory_allocated()
        planned = option.total("device") - next(p.bytes for p in option.parts if p.name == "runtime")
        log(out, step="worker", placement=placement, build_s=build, candidate_s=min(times[1:]), first_s=times[0],
            bound_s=option.materialise_seconds, ratio_to_bound=min(times[1:]) / option.materialise_seconds,
            forward_s=forward, peak_allocated=peak, planned=planned, ratio_measured_planned=peak / planned,
            parts={p.name: p.bytes for p in option.parts})
        del mat, module, targets
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        log(out, step="search", skipped="lm-eval is not installed on this machine")
        return
    zoo = REPO / ".cache" / "zoo"
    if not (zoo / "manifest.json").exists():
        log(out, step="search", skipped="no zoo carried (.cache/zoo)")
        return
    t0 = time.perf_counter()
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu_search.sh"), str(out / "search")], capture_output=True,
                         text=True, timeout=300)
    log(out, step="search", rc=res.returncode, seconds=time.perf_counter() - t0, tail=res.stdout[-1500:] + res.stderr[-800:])


if __name__ == "__main__":
    main()
