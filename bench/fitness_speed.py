"""Per-candidate fitness evaluation time on the zoo's target task (zoo_mix, 500 items, fitness split).

- in place: one Evaluator per worker (lm-eval tasks and requests built once, HFLM around one persistent
  module); each candidate recipe is written into the module's parameters and scored.
- naive (what Mergenetic does): per candidate, write the merged checkpoint, build a fresh lm-eval HF
  model from it and run `simple_evaluate` (tasks loaded again). Its task index is built once, in its favour.
- with --vllm (run in .venv-vllm): the vLLM engine kept alive with weights pushed in place, against a
  fresh engine per candidate on the written checkpoint.

Prints median seconds per candidate, the ratio, and the fixed-overhead fraction of the in-place path
(everything but lm-eval's model calls, weight writing included).

    .venv/bin/python bench/fitness_speed.py --zoo .cache/zoo [--candidates 6]
    .venv-vllm/bin/python bench/fitness_speed.py --zoo .cache/zoo --vllm
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def recipes(zoo: Path, n: int, seed: int = 0):
    from evomerge.merge.recipe import parse_recipe

    rng = random.Random(seed)
    llama = zoo / "llama"
    out = []
    for _ in range(n):
        out.append(parse_recipe({
            "merge_method": "ties", "base_model": str(llama / "base"), "dtype": "float32",
            "models": [{"model": str(llama / e), "parameters": {"weight": round(rng.uniform(0.1, 1.0), 3),
                                                                "density": round(rng.uniform(0.3, 1.0), 3)}}
                       for e in ("arith", "cipher")]}))
    return out


def objectives():
    from evomerge.fitness.objectives import parse_objectives

    return parse_objectives({"include": [str(REPO / "fitness")], "objectives": [{"task": "zoo_mix"}]}, source="bench")


def in_place(zoo: Path, cands, backend: str) -> tuple[list[float], ...]:
    from evomerge.merge.materialise import Materialiser
    from evomerge.scoring import RecipeScorer

    llama = zoo / "llama"
    mat = Materialiser({k: llama / k for k in ("base", "arith", "cipher")}, anchor="base")
    t = time.perf_counter()
    kw = {"vllm_args": {"max_model_len": 64}} if backend == "vllm" else {}
    ev = RecipeScorer(objectives(), mat, backend=backend, **kw)
    ev.evaluate(cands[0])  # warm-up (first generate call)
    print(f"  worker setup (once): {time.perf_counter() - t:.1f} s")
    secs, overhead, with_merge, loads, scores = [], [], [], [], []
    for r in cands:
        res = ev.evaluate(r)
        secs.append(res.seconds)
        scoring = res.seconds - res.load_seconds  # evaluation proper: the merge written into the model excluded
        overhead.append((scoring - res.forward_seconds) / scoring)
        with_merge.append(res.overhead_seconds / res.seconds)
        loads.append(res.load_seconds)
        scores.append(res.values["zoo_mix"])
    ev.close()
    return secs, overhead, with_merge, loads, scores


def naive_hf(zoo: Path, cands) -> tuple[list[float], list[float]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from evomerge.merge.api import write_recipe

    tm = TaskManager(include_path=str(REPO / "fitness"), include_defaults=False)
    secs, scores = [], []
    cwd = os.getcwd()
    os.chdir(REPO)  # the task YAMLs name their data relative to the repo root
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, r in enumerate(cands):
                start = time.perf_counter()
                out = write_recipe(r, Path(tmp) / f"cand{i}")
                res = simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", tasks=["zoo_mix"],
                                      task_manager=tm, batch_size=64, device="cpu", bootstrap_iters=0, log_samples=True)
                secs.append(time.perf_counter() - start)
                scores.append(float(res["results"]["zoo_mix"]["exact_match,none"]))
    finally:
        os.chdir(cwd)
    return secs, scores


def naive_vllm(zoo: Path, cands) -> tuple[list[float], list[float]]:
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.merge.api import write_recipe

    secs, scores = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(cands):
            start = time.perf_counter()
            out = write_recipe(r, Path(tmp) / f"cand{i}")
            ev = Evaluator(objectives(), out, backend="vllm", vllm_args={"max_model_len": 64})
            scores.append(ev.evaluate().values["zoo_mix"])
            ev.close()
            secs.append(time.perf_counter() - start)
    return secs, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", default=str(REPO / ".cache" / "zoo"))
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--naive-candidates", type=int, default=3)
    ap.add_argument("--vllm", action="store_true", help="benchmark the vLLM backend (run in .venv-vllm)")
    args = ap.parse_args()
    if not args.vllm:
        os.environ.setdefault("TQDM_DISABLE", "1")  # vLLM's offline runner divides by its bar's elapsed time
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="evomerge-hf-"))
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    zoo = Path(args.zoo)
    cands = recipes(zoo, args.candidates)
    backend = "vllm" if args.vllm else "hf"
    print(f"zoo_mix, 500 items, {backend} backend, {torch.get_num_threads()} thread(s)")
    print("in place (one worker, candidate written into the resident model):")
    secs, overhead, with_merge, loads, s1 = in_place(zoo, cands, backend)
    t_in = statistics.median(secs)
    print(f"  per candidate: median {t_in:.3f} s (min {min(secs):.3f}, max {max(secs):.3f}); "
          f"merge written into the model: median {statistics.median(loads) * 1000:.1f} ms")
    print(f"  fixed overhead (all but the model's forward passes): median {statistics.median(overhead):.1%} of the "
          f"evaluation; {statistics.median(with_merge):.1%} counting the merge write too")
    naive = naive_vllm if args.vllm else naive_hf
    label = "fresh engine on the written checkpoint" if args.vllm else "write checkpoint + fresh lm-eval HF model + simple_evaluate"
    print(f"naive ({label}):")
    nsecs, s2 = naive(zoo, cands[: args.naive_candidates])
    t_naive = statistics.median(nsecs)
    print(f"  per candidate: median {t_naive:.3f} s (min {min(nsecs):.3f}, max {max(nsecs):.3f})")
    same = all(abs(a - b) < 1e-9 for a, b in zip(s1, s2))
    print(f"scores agree on the shared candidates: {same} ({s1[: len(s2)]} vs {s2})")
    print(f"RATIO naive / in place: {t_naive / t_in:.1f}x  (target >= 5x)")
    print(f"OVERHEAD fraction (in place, evaluation): {statistics.median(overhead):.1%}  (target <= 10%); "
          f"with the merge write: {statistics.median(with_merge):.1%}")


if __name__ == "__main__":
    main()
