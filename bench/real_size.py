"""Real-size workers on CPU: measured memory against the memory plan, and materialisation speed against its bound.

For random-initialised Llama-family models in bf16 at three sizes up to about 1B parameters (a base and three
"fine-tunes", written once to .cache/bench-real), each placement runs in a fresh process that builds a worker's
state (Materialiser + the scoring engine's bf16 module), materialises 3-model TIES candidates into the module and
runs one forward pass, while a sampler thread reads /proc/self/status every 2 ms. Printed, per run:

  - peak RSS (anonymous memory, what the plan predicts; the page cache of `disk` sources is not the process's)
    against the plan's prediction for the same job on this machine: RATIO measured / planned (target within 15%),
    and the same beyond the runtime (this process before any worker state against the plan's runtime part, which
    is sized for a worker that has lm-eval and Ray imported: this one has torch and transformers only);
  - resident sources against the sum of the checkpoints' sizes (target <= 1.1x with native sources);
  - per-candidate materialisation time against the placement's bound (its inputs read once, the merged model
    written once, over this machine's copy bandwidth measured in the same run; target within 5x);
  - the same TIES recipe through mergekit's in-memory API (`merge_state_dicts`, mergekit 0.1.5 in .venv-mergekit)
    on the same tensors: the smallest size whole, target >= 10x slower than ours.

    .venv/bin/python bench/real_size.py [--sizes small,mid,large] [--candidates 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {  # hidden, layers: ~0.16B, ~0.45B, ~1.0B parameters with a 32000-token vocabulary
    "small": (1024, 8),
    "mid": (1536, 12),
    "large": (2048, 16),
}
BATCH, LENGTH = 2, 128
STABLE_TIES = True  # bf16 task vectors tie at TIES thresholds; mergekit's tie order costs a full sort (--mergekit-ties)  # the forward pass each worker runs (and the plan budgets for)


def family(size: str, root: Path) -> dict[str, Path]:
    from evomerge.zoo.shapes import llama_config, write_random_family

    hidden, layers = SIZES[size]
    return write_random_family(root / size, llama_config(hidden, layers), experts=3, seed=1)


def ties_recipe(paths: dict[str, Path], k: int) -> dict:
    """The k-th candidate: 3-model TIES with weights and densities that change per candidate."""
    experts = [n for n in paths if n != "base"]
    return {"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "bfloat16", "seed": k,
            "parameters": {"stable_ties": STABLE_TIES},
            "models": [{"model": str(paths[e]), "parameters": {"weight": 0.3 + 0.1 * ((i + k) % 4),
                                                             "density": 0.3 + 0.2 * ((i + 2 * k) % 3)}}
                       for i, e in enumerate(experts)]}


class Sampler(threading.Thread):
    """Peak RssAnon and VmRSS of this process, read every 2 ms (VmHWM counts mapped file pages too)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_anon = self.peak_rss = 0
        self.running = True

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS", "VmHWM", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def run(self) -> None:
        while self.running:
            s = self.read()
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            self.peak_rss = max(self.peak_rss, s["VmRSS"])
            time.sleep(0.002)


def worker(args: argparse.Namespace) -> None:
    """One placement in this fresh process: prints one JSON line."""
    import torch

    from evomerge.memory import Machine, Workload, plan_worker
    from evomerge.merge import fused
    from evomerge.merge.materialise import Materialiser
    from evomerge.merge.recipe import parse_recipe

    torch.set_num_threads(args.threads)
    baseline = Sampler.read()["RssAnon"]  # this process before any worker state: its runtime
    sampler = Sampler()
    sampler.start()
    paths = {n: Path(p) for n, p in json.loads(args.paths).items()}
    machine = Machine.detect("cpu")  # the copy bandwidth of --threads threads, measured here
    bandwidth = machine.bandwidth["device"]
    machine = replace(machine, bandwidth={**machine.bandwidth, "disk": bandwidth})  # the families sit in the page cache
    workload = Workload(backend="hf", engine_dtype="bfloat16", sources_dtype=args.sources_dtype, batch_size=BATCH,
                        max_length=LENGTH, methods=("ties",), fused=fused.available(), stable_ties=STABLE_TIES,
                        threads=args.threads)
    plan = plan_worker([paths["base"], *(p for n, p in paths.items() if n != "base")], workload, machine,
                       sources=args.placement, rank_cache=False)
    option = next(o for o in plan.options if o.placement == args.placement)
    predicted_anon = sum(p.bytes for p in option.parts if p.where == "device")

    start = time.perf_counter()
    mat = Materialiser(paths, anchor="base", sources=args.placement, sources_dtype=args.sources_dtype, rank_cache=False)
    module = mat.build_module(torch.bfloat16)
    build_s = time.perf_counter() - start
    targets = mat.targets(module)
    times = []
    for k in range(args.candidates + 1):
        recipe = parse_recipe(ties_recipe(paths, k))
        t0 = time.perf_counter()
        mat.apply(recipe, module, targets)
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        ids = torch.randint(0, module.config.vocab_size, (BATCH, LENGTH))
        logits = module(input_ids=ids).logits
        torch.log_softmax(logits.float(), dim=-1)
    del logits
    time.sleep(0.05)
    sampler.running = False
    sampler.join()
    ckpt_bytes = sum(ck.num_bytes for ck in mat.checkpoints.values())
    per_candidate = min(times[1:])
    print(json.dumps({
        "placement": args.placement, "sources_dtype": args.sources_dtype, "params": mat.checkpoints["base"].num_params,
        "peak_anon": sampler.peak_anon, "peak_rss": sampler.peak_rss, "hwm": Sampler.read()["VmHWM"],
        "predicted": predicted_anon, "parts": {p.name: p.bytes for p in option.parts},
        "resident": mat.resident_bytes, "checkpoints": ckpt_bytes, "build_s": build_s,
        "candidate_s": per_candidate, "first_s": times[0], "bound_s": option.materialise_seconds,
        "sketches": sum(sk.nbytes for sk in mat.sketches.values() if sk is not None), "baseline": baseline,
        "bandwidth": bandwidth}))


def mergekit_time(paths: dict[str, Path], k: int, threads: int = 1) -> float | None:
    """Seconds for mergekit's `merge_state_dicts` on the same TIES candidate (all tensors in memory first)."""
    py = REPO / ".venv-mergekit" / "bin" / "python"
    if not py.exists():
        return None
    recipe = ties_recipe(paths, k)
    code = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from pathlib import Path
from mergekit.merge_methods.api import merge_state_dicts
torch.set_num_threads(int(sys.argv[2]))
r = json.loads(sys.argv[1])
def load(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
models = {"base": load(r["base_model"])}
for i, m in enumerate(r["models"]):
    models[f"e{i}"] = load(m["model"])
ids = [f"e{i}" for i in range(len(r["models"]))]
params = {"weight": {f"e{i}": m["parameters"]["weight"] for i, m in enumerate(r["models"])},
          "density": {f"e{i}": m["parameters"]["density"] for i, m in enumerate(r["models"])}}
with torch.no_grad():
    t = time.perf_counter()
    merge_state_dicts(models, "ties", parameters=params, base="base", dtype=torch.float32, out_dtype=torch.bfloat16)
    print(time.perf_counter() - t)
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([str(py), "-c", code, json.dumps(recipe), str(threads)], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        print(f"mergekit failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        return None
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,mid,large")
    ap.add_argument("--candidates", type=int, default=3, help="timed candidates per run (after one warm-up)")
    ap.add_argument("--root", default=str(REPO / ".cache" / "bench-real"))
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--mergekit-ties", action="store_true", help="break TIES ties as mergekit does (a full sort)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker: tensors merged at once, and the threads the bound's copy uses")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    ap.add_argument("--placement", default="device", help=argparse.SUPPRESS)
    ap.add_argument("--sources-dtype", default="native", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global STABLE_TIES
    STABLE_TIES = not args.mergekit_ties
    if args.worker:
        return worker(args)
    gib = 1024**3
    rows = []
    for size in args.sizes.split(","):
        t0 = time.perf_counter()
        paths = family(size, Path(args.root))
        print(f"[{size}] family ready in {time.perf_counter() - t0:.0f} s: {', '.join(paths)} in {Path(args.root) / size}")
        runs = [("device", "native"), ("disk", "native")] + ([("device", "float32")] if size != "large" else [])
        for placement, sdtype in runs:
            cmd = [sys.executable, __file__, "--worker", "--paths", json.dumps({k: str(v) for k, v in paths.items()}),
                   "--placement", placement, "--sources-dtype", sdtype, "--candidates", str(args.candidates),
                   "--threads", str(args.threads),
                   *(["--mergekit-ties"] if args.mergekit_ties else [])]
            res = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if res.returncode != 0:
                print(res.stderr[-3000:])
                raise SystemExit(f"worker failed: {placement} {sdtype}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["size"] = size
            rows.append(r)
            engine = r["parts"]["engine weights"]
            beyond = r["predicted"] - r["parts"]["runtime"]
            print(f"[{size}] {r['params'] / 1e9:.2f}B sources {placement}/{sdtype}: peak RSS {r['peak_anon'] / gib:.2f} GiB "
                  f"(anon; VmHWM {r['hwm'] / gib:.2f}) vs plan {r['predicted'] / gib:.2f} GiB -> RATIO measured/planned "
                  f"{r['peak_anon'] / r['predicted']:.3f} (target 0.85-1.15); beyond the runtime (this process "
                  f"{r['baseline'] / gib:.2f} GiB, planned {r['parts']['runtime'] / gib:.2f} GiB for a worker with lm-eval "
                  f"and Ray) {(r['peak_anon'] - r['baseline']) / gib:.2f} vs {beyond / gib:.2f} GiB -> RATIO "
                  f"{(r['peak_anon'] - r['baseline']) / beyond:.3f}")
            if placement != "disk":
                print(f"[{size}]     resident sources {r['resident'] / gib:.2f} GiB vs checkpoints {r['checkpoints'] / gib:.2f}"
                      f" GiB -> RATIO {r['resident'] / r['checkpoints']:.2f} (target <= 1.1 native); + engine "
                      f"{engine / gib:.2f} GiB")
            print(f"[{size}]     materialise {r['candidate_s']:.2f} s per candidate (first {r['first_s']:.2f} s) vs bound "
                  f"{r['bound_s']:.3f} s at {r['bandwidth'] / 1e9:.1f} GB/s -> RATIO {r['candidate_s'] / r['bound_s']:.1f}x "
                  "(target <= 5x)")
        if not args.no_mergekit and size == args.sizes.split(",")[0]:
            ours = min(r["candidate_s"] for r in rows if r["size"] == size and r["placement"] == "device"
                       and r["sources_dtype"] == "native")
            mk = mergekit_time(paths, 1, args.threads)
            if mk is not None:
                print(f"[{size}] mergekit merge_state_dicts (tensors already in memory): {mk:.2f} s vs ours {ours:.2f} s "
                      f"-> RATIO {mk / ours:.1f}x faster (target >= 10x)")
    out = REPO / "out" / "bench" / "real_size.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
