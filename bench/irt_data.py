"""Per-item correctness of many merged zoo candidates, generated once and cached for bench/irt_accuracy.py.

Candidates: the parents (llama base, arith, cipher), then random genomes of the `sakana_ps` and `layerwise_ps`
spaces (and a few `dfs` paths), decoded to recipes and scored in memory on the fitness split of each zoo task
(500 items each). One JSON line per candidate in `.cache/irt_data/responses.jsonl`, appended as it goes, so an
interrupted generation continues where it stopped.

    OMP_NUM_THREADS=1 .venv/bin/python bench/irt_data.py [--n-ps 80 --n-layerwise 90 --n-dfs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".cache" / "irt_data"
TASKS = ("zoo_mix", "zoo_arith", "zoo_cipher", "zoo_composed")


def plan(n_ps: int, n_layerwise: int, n_dfs: int, seed: int = 0) -> list[dict]:
    """The candidates to score, in a fixed order: (space, genome or parent label)."""
    out: list[dict] = [{"name": f"parent:{p}", "space": "sakana_ps", "parent": p} for p in ("base", "arith", "cipher")]
    for j, (space, n) in enumerate((("sakana_ps", n_ps), ("layerwise_ps", n_layerwise), ("dfs", n_dfs))):
        rng = np.random.default_rng([seed, j])  # one stream per space: changing one count keeps the others
        for k in range(n):
            out.append({"name": f"{space}:{k}", "space": space, "u": [float(x) for x in rng.random(_genes(space))]})
    return out


_SPACES: dict = {}


def _models(zoo: Path) -> dict[str, Path]:
    return {"base": zoo / "llama/base", "arith": zoo / "llama/arith", "cipher": zoo / "llama/cipher"}


def _space(name: str, zoo: Path = REPO / ".cache/zoo"):
    if name not in _SPACES:
        from evomerge.spaces.presets import build_space, load_space_config

        _SPACES[name] = build_space(load_space_config(name), _models(zoo), "base")
    return _SPACES[name]


def _genes(space: str) -> int:
    return _space(space).num_genes


def recipe_of(c: dict, zoo: Path):
    space = _space(c["space"], zoo)
    if "parent" in c:
        genome = dict(space.seeds())[f"parent:{c['parent']}"]
    else:
        lo, hi = (np.asarray(b, dtype=float) for b in space.bounds)
        genome = lo + np.asarray(c["u"]) * (hi - lo)
    return space.decode(genome)


def generate(zoo: Path = REPO / ".cache/zoo", out: Path = DATA, n_ps: int = 80, n_layerwise: int = 90, n_dfs: int = 20,
             tasks: tuple[str, ...] = TASKS, progress: bool = True) -> Path:
    """Score every planned candidate not yet in `out/responses.jsonl`; returns that file."""
    import torch
    from tqdm import tqdm

    from evomerge.scoring import default_scorer
    from evomerge.search.spec import parse_job

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "responses.jsonl"
    done = set()
    if path.is_file():
        done = {json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()}
    todo = [c for c in plan(n_ps, n_layerwise, n_dfs) if c["name"] not in done]
    if not todo:
        return path
    spec = parse_job({
        "name": "irt-data", "models": {"base": str(zoo / "llama/base"), "sources": {
            "arith": str(zoo / "llama/arith"), "cipher": str(zoo / "llama/cipher")}},
        "search_space": "sakana_ps", "store": str(out / "unused.sqlite"),
        "objectives": {"include": [str(REPO / "fitness")], "split": "fitness",
                       "objectives": [{"task": t, "metric": "exact_match", "direction": "maximise"} for t in tasks]},
        "driver": {"budget": 1}, "runtime": {"threads": 1}}, source="<irt data>", base_dir=REPO)
    cwd = os.getcwd()
    os.chdir(REPO)  # task data files are relative to the repository root
    try:
        scorer = default_scorer(spec)
        with path.open("a") as f:
            for c in tqdm(todo, desc="scoring zoo candidates for the IRT bench", disable=not progress, file=sys.stderr):
                start = time.perf_counter()
                try:
                    res = scorer.evaluate(recipe_of(c, zoo))
                except Exception as e:  # noqa: BLE001 - a broken merge is recorded and skipped
                    f.write(json.dumps({**c, "failed": f"{type(e).__name__}: {e}"}) + "\n")
                    continue
                items = {t: {i: int(round(v)) for i, v in res.items[t].items()} for t in tasks}
                f.write(json.dumps({**c, "values": res.values, "items": items,
                                    "seconds": round(time.perf_counter() - start, 3)}) + "\n")
                f.flush()
        scorer.close()
    finally:
        os.chdir(cwd)
    return path


def load(path: Path = DATA / "responses.jsonl", task: str = "zoo_mix") -> tuple[list[str], list[str], np.ndarray]:
    """(candidate names, item ids, responses [candidates x items] of 0/1) for one task; failed candidates skipped."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "items" in r]
    ids = sorted(rows[0]["items"][task])
    Y = np.array([[r["items"][task][i] for i in ids] for r in rows], dtype=float)
    return [r["name"] for r in rows], ids, Y


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache/zoo")
    ap.add_argument("--out", type=Path, default=DATA)
    ap.add_argument("--n-ps", type=int, default=80)
    ap.add_argument("--n-layerwise", type=int, default=90)
    ap.add_argument("--n-dfs", type=int, default=20)
    a = ap.parse_args()
    print(generate(a.zoo, a.out, a.n_ps, a.n_layerwise, a.n_dfs))
