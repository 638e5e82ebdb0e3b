"""Fitness evaluation with the transformers backend: objectives YAML, per-item results against a direct
lm-eval run, in-place candidate swaps against fresh loads, directions, built-ins and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from helpers import offline_lm_eval

FITNESS = REPO / "fitness"


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    with offline_lm_eval(HF_HOME=str(tmp_path_factory.mktemp("hf_home"))):
        yield


def objectives(*objs, split: str | None = None):
    from evomerge.fitness.objectives import parse_objectives

    data = {"include": [str(FITNESS)], "objectives": list(objs)}
    if split:
        data["split"] = split
    return parse_objectives(data, source="test.yaml")


@pytest.fixture(scope="module")
def llama(zoo_dir) -> Path:
    return zoo_dir / "llama"


@pytest.fixture(scope="module")
def base_eval(llama):
    from evomerge.fitness.evaluator import Evaluator

    return Evaluator(objectives({"task": "zoo_mix", "limit": 120}, {"task": "zoo_arith", "limit": 60}), llama / "base", backend="hf")


# ---------------------------------------------------------------- per-item results against lm-eval itself

def test_items_match_a_direct_lm_eval_run(llama, base_eval):
    """Same checkpoint, lm-eval's own evaluate() with a freshly loaded HFLM: same per-item scores and ids."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = base_eval.evaluate(llama / "arith")
    model = AutoModelForCausalLM.from_pretrained(llama / "arith", dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(llama / "arith"), batch_size=64)
    cwd = os.getcwd()
    os.chdir(REPO)  # the task YAMLs name their data relative to the repo root
    try:
        tasks = get_task_dict(["zoo_mix"], TaskManager(include_path=str(FITNESS), include_defaults=False))
        ref = evaluate(lm=lm, task_dict=tasks, limit=120, bootstrap_iters=0, log_samples=True)
    finally:
        os.chdir(cwd)
    ref_items = {s["doc"]["id"]: float(s["exact_match"]) for s in ref["samples"]["zoo_mix"]}
    assert ours.items["zoo_mix"] == ref_items
    assert ours.values["zoo_mix"] == pytest.approx(ref["results"]["zoo_mix"]["exact_match,none"])
    assert len(ours.items["zoo_arith"]) == 60 and all(k.startswith("arith-f-") for k in ours.items["zoo_arith"])


def test_items_match_the_zoo_scorer(llama, base_eval):
    """Cross-check with the zoo's own greedy exact-match scorer (no lm-eval involved)."""
    from evomerge.zoo.train import score

    rows = [json.loads(line) for line in (FITNESS / "data/mix/fitness.jsonl").read_text().splitlines()[:120]]
    res = base_eval.evaluate(llama / "cipher", objectives=["zoo_mix"])
    assert res.values["zoo_mix"] == pytest.approx(score(base_eval.backend.module, rows))


# ---------------------------------------------------------------- in place equals fresh

def test_in_place_swap_equals_fresh_load(llama, base_eval):
    from evomerge.fitness.evaluator import Evaluator

    swapped = base_eval.evaluate(llama / "arith")
    fresh = Evaluator(base_eval.objectives, llama / "arith", backend="hf").evaluate()
    assert swapped.values == fresh.values and swapped.items == fresh.items
    again = base_eval.evaluate(llama / "base")  # and back: nothing of the previous candidate remains
    assert again.items == Evaluator(base_eval.objectives, llama / "base", backend="hf").evaluate().items


def test_recipe_candidate_equals_exported_checkpoint(llama, tmp_path):
    """A recipe written into the worker's module in place scores like its exported checkpoint."""
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.merge.api import write_recipe
    from evomerge.merge.materialise import Materialiser
    from evomerge.merge.recipe import parse_recipe
    from evomerge.scoring import RecipeScorer

    objs = objectives({"task": "zoo_mix", "limit": 80})
    recipe = parse_recipe({"merge_method": "ties", "base_model": str(llama / "base"), "dtype": "float32",
                           "models": [{"model": str(llama / e), "parameters": {"weight": w, "density": 0.6}}
                                      for e, w in (("arith", 0.75), ("cipher", 0.25))]})
    mat = Materialiser({k: llama / k for k in ("base", "arith", "cipher")}, anchor="base")
    worker = RecipeScorer(objs, mat, backend="hf")
    in_place = worker.evaluate(recipe)
    out = write_recipe(recipe, tmp_path / "merged")
    fresh = Evaluator(objs, out, backend="hf").evaluate()
    assert in_place.items == fresh.items


# ---------------------------------------------------------------- subsets, directions, built-ins

def test_item_subset_scores_only_those_items(base_eval):
    ids = ["mix-f-00007", "mix-f-00003", "mix-f-00100"]
    full = base_eval.evaluate(objectives=["zoo_mix"])
    sub = base_eval.evaluate(items={"zoo_mix": ids}, objectives=["zoo_mix"])
    assert set(sub.items["zoo_mix"]) == set(ids)
    assert all(sub.items["zoo_mix"][i] == full.items["zoo_mix"][i] for i in ids)
    assert sub.values["zoo_mix"] == pytest.approx(sum(sub.items["zoo_mix"].values()) / 3)


def test_directions_and_losses(llama, tmp_path):
    from evomerge.fitness.evaluator import Evaluator

    text = tmp_path / "text.txt"
    text.write_text("12+34=46\n\n>123=abc\n\n!12345=54321\n")
    objs = objectives({"task": "zoo_arith", "limit": 20},  # direction from lm-eval's higher_is_better
                      {"builtin": "perplexity", "file": str(text)}, {"builtin": "params"}, {"builtin": "layers"},
                      {"builtin": "latency", "max_new_tokens": 4, "repeats": 2})
    ev = Evaluator(objs, llama / "base", backend="hf")
    dirs = {o.name: o.direction for o in ev.objectives.objectives}
    assert dirs == {"zoo_arith": "maximise", "perplexity": "minimise", "params": "minimise", "layers": "minimise",
                    "latency": "minimise"}
    res = ev.evaluate()
    v = res.values
    assert v["params"] == sum(p.numel() for p in ev.backend.module.parameters()) and v["layers"] == 4
    assert 1.0 < v["perplexity"] < math.inf and v["latency"] > 0 and len(res.items["perplexity"]) == 3
    losses = res.losses(ev.objectives)
    assert losses == [-v["zoo_arith"], v["perplexity"], v["params"], v["layers"], v["latency"]]
    arith, ppl = ev.objectives.objectives[0], ev.objectives.objectives[1]
    assert arith.better(0.9, 0.5) and ppl.better(3.0, 5.0) and not ppl.better(5.0, 3.0)


def test_test_split_is_scored_with_its_own_ids(base_eval, llama):
    from evomerge.fitness.evaluator import Evaluator

    res = Evaluator(objectives({"task": "zoo_mix", "limit": 10}), llama / "base", backend="hf", split="test").evaluate()
    assert all(k.startswith("mix-t-") for k in res.items["zoo_mix"]) and len(res.items["zoo_mix"]) == 10


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("obj,match", [
    ({"task": "zoo_mixx"}, r"test.yaml: objective 'zoo_mixx'.task: unknown task 'zoo_mixx'.*Did you mean 'zoo_mix'"),
    ({"task": "zoo_mix", "metric": "acc"}, r"objective 'zoo_mix'.metric: task 'zoo_mix' does not produce 'acc'; it produces: exact_match"),
    ({"task": "zoo_mix", "split": "validation"}, r"objective 'zoo_mix'.split: task 'zoo_mix' has no split 'validation' \(it has: fitness, test\)"),
    ({"task": "zoo_mix", "direction": "up"}, r"objectives\[0\].direction: 'up' is not maximise or minimise"),
    ({"task": "zoo_mix", "limit": 0}, r"objectives\[0\].limit: expected a positive whole number"),
    ({"builtin": "perplexty"}, r"objectives\[0\].builtin: unknown built-in 'perplexty'"),
    ({"task": "zoo_mix", "metrc": "exact_match"}, r"objectives\[0\].metrc: unknown field. Did you mean 'metric'\?"),
])
def test_bad_objectives_say_where_and_what(llama, obj, match):
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import FitnessConfigError

    with pytest.raises(FitnessConfigError, match=match):
        Evaluator(objectives(obj), llama / "base", backend="hf")


def test_unknown_item_ids_are_a_clear_error(base_eval):
    from evomerge.fitness.objectives import FitnessConfigError

    with pytest.raises(FitnessConfigError, match=r"items for task 'zoo_mix': unknown item id\(s\) \['nope'\]"):
        base_eval.evaluate(items={"zoo_mix": ["nope"]}, objectives=["zoo_mix"])


def test_nan_candidate_fails_cleanly_and_the_worker_goes_on(llama, base_eval):
    from evomerge.fitness.evaluator import read_weights
    from evomerge.fitness.objectives import CandidateFailed

    weights = read_weights(llama / "arith")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(CandidateFailed, match="NaN"):
        base_eval.evaluate(weights)
    # NaN produced by the forward pass itself (finite weights): caught by the probe
    huge = read_weights(llama / "arith")
    huge["model.norm.weight"].fill_(3e38)
    huge["lm_head.weight"].fill_(3e38)
    with pytest.raises(CandidateFailed, match="NaN or inf"):
        base_eval.evaluate(huge)
    ok = base_eval.evaluate(llama / "arith", objectives=["zoo_mix"])
    assert math.isfinite(ok.values["zoo_mix"])


# ---------------------------------------------------------------- CLI

def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "evomerge.service.cli", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_cli_eval_json_and_errors(llama, tmp_path):
    spec = tmp_path / "objectives.yaml"
    spec.write_text(yaml.safe_dump({"include": [str(FITNESS)], "objectives": [
        {"task": "zoo_arith", "metric": "exact_match", "direction": "maximise", "limit": 12}, {"builtin": "layers"}]}))
    res = run_cli("eval", str(llama / "arith"), "--objectives", str(spec), "--split", "test", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["split"] == "test" and out["values"]["layers"] == 4
    assert len(out["items"]["zoo_arith"]) == 12 and all(k.startswith("arith-t-") for k in out["items"]["zoo_arith"])
    plain = run_cli("eval", str(llama / "arith"), "--objectives", str(spec))
    assert plain.returncode == 0 and "zoo_arith" in plain.stdout and "[maximise]" in plain.stdout

    spec.write_text(yaml.safe_dump({"include": [str(FITNESS)], "objectives": [{"task": "zoo_arith", "split": "dev"}]}))
    bad = run_cli("eval", str(llama / "arith"), "--objectives", str(spec))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert "no split 'dev'" in bad.stderr and str(spec) in bad.stderr


def test_cli_eval_refuses_pickles_and_custom_code_without_asking(llama, tmp_path):
    """`evomerge eval` loads what `merge` loads: safetensors, no custom code. It never prompts (stdin says `y`)."""
    import shutil

    spec = tmp_path / "objectives.yaml"
    spec.write_text(yaml.safe_dump({"include": [str(FITNESS)], "objectives": [{"task": "zoo_arith", "limit": 4}]}))
    pickled = tmp_path / "pickled"
    shutil.copytree(llama / "arith", pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # a folder of pickle weights only
    custom = tmp_path / "custom"
    shutil.copytree(llama / "arith", custom)
    marker = tmp_path / "RAN"
    (custom / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    for folder, said in ((pickled, "holds only pickle weights"), (custom, "'auto_map' names custom code")):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-m", "evomerge.service.cli", "eval", str(folder), "--objectives", str(spec)],
                             capture_output=True, text=True, env=env, cwd=REPO, input="y\ny\n", timeout=300)
        assert res.returncode == 2 and res.stderr.startswith(f"error: {folder}") and said in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1 and "[y/N]" not in res.stdout + res.stderr
    assert not marker.exists()


def test_example_objectives_file_parses():
    from evomerge.fitness.objectives import load_objectives

    objs = load_objectives(FITNESS / "objectives.yaml", split="test")
    assert objs.split == "test" and objs.names[0] == "zoo_mix"
