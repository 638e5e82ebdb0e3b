"""lm-eval's task options on objectives (num_fewshot, apply_chat_template, fewshot_as_multiturn, system_instruction,
gen_kwargs), asserted on the requests lm-eval builds and on what generation then does; a registered lm-eval task
(gsm8k) from the datasets cache and offline without it; vLLM engine options in the runtime."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO
from helpers import offline_lm_eval

FITNESS = REPO / "fitness"
ARITH = [json.loads(line) for line in (FITNESS / "data/arith/fitness.jsonl").read_text().splitlines()]
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    with offline_lm_eval():
        yield


def objectives(*objs, include=(str(FITNESS),)):
    from evomerge.fitness.objectives import parse_objectives

    return parse_objectives({"include": list(include), "objectives": list(objs)}, source="test.yaml")


def split_shots(text: str) -> list[tuple[str, str]]:
    """Zoo arithmetic examples written back to back ("13+54=6726+16=42"): (prompt, answer) pairs, read left to
    right (every answer is its prompt's sum, which tells where it ends). Raises when the text is not such a run."""
    out, pos = [], 0
    while pos < len(text):
        m = re.compile(r"(\d+)\+(\d+)=").match(text, pos)
        assert m is not None, text[pos:]
        answer = str(int(m[1]) + int(m[2]))
        assert text.startswith(answer, m.end()), text[pos:]
        out.append((m[0], answer))
        pos = m.end() + len(answer)
    return out


def built(ev, items=None) -> dict[str, list]:
    """{objective name: its generate_until requests in document order}."""
    plan, _ = ev.suite.build(ev.backend.lm, list(ev.objectives.objectives), items)
    out = {}
    for o in ev.objectives.objectives:
        run = ev.suite.runs[ev.suite.key_of[o.name]]
        out[o.name] = [run._by_doc[i][0] for i in plan[ev.suite.key_of[o.name]]]
    return out


@pytest.fixture(scope="module")
def llama(zoo_dir) -> Path:
    return zoo_dir / "llama"


@pytest.fixture(scope="module")
def chat_model(llama, tmp_path_factory) -> Path:
    """The zoo base model with a chat template set on its tokenizer (the zoo's tokenizers have none)."""
    folder = tmp_path_factory.mktemp("chat") / "base"
    shutil.copytree(llama / "base", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return folder


# ---------------------------------------------------------------- few-shot contexts

def test_fewshot_contexts_hold_n_examples_from_other_items(llama):
    from evomerge.fitness.evaluator import Evaluator

    ev = Evaluator(objectives({"task": "zoo_arith", "limit": 8, "num_fewshot": 3, "name": "three"},
                              {"task": "zoo_arith", "limit": 8, "name": "zero"}), llama / "base", backend="hf")
    reqs = built(ev)
    shots = {d["prompt"] + d["answer"] for d in ARITH}
    for i, (three, zero) in enumerate(zip(reqs["three"], reqs["zero"])):
        doc = ARITH[i]
        assert zero.arguments[0] == doc["prompt"]  # the task's own num_fewshot: 0
        ctx = three.arguments[0]
        assert ctx.endswith(doc["prompt"])
        examples = ["".join(pair) for pair in split_shots(ctx[: -len(doc["prompt"])])]
        assert len(examples) == 3
        assert all(e in shots for e in examples)  # real items of the split, with their answers
        assert doc["prompt"] + doc["answer"] not in examples  # never the item itself
    # an item keeps its examples whatever else is built with it (an IRT anchor subset, another limit)
    sub = built(ev, {"three": ["arith-f-00005", "arith-f-00002"], "zero": ["arith-f-00002"]})
    assert [r.arguments[0] for r in sub["three"]] == [reqs["three"][2].arguments[0], reqs["three"][5].arguments[0]]


def test_chat_template_and_system_instruction_are_applied(chat_model):
    from evomerge.fitness.evaluator import Evaluator

    common = {"task": "zoo_arith", "limit": 4, "num_fewshot": 2}
    ev = Evaluator(objectives({**common, "name": "plain"},
                              {**common, "name": "multi", "apply_chat_template": True, "system_instruction": "Be exact."},
                              {**common, "name": "single", "apply_chat_template": True, "fewshot_as_multiturn": False}),
                   chat_model, backend="hf")
    reqs = built(ev)
    for i in range(4):
        prompt = ARITH[i]["prompt"]
        plain = reqs["plain"][i].arguments[0]  # the same examples (seeded by the item), as plain text
        (q1, a1), (q2, a2) = split_shots(plain[: -len(prompt)])
        assert reqs["multi"][i].arguments[0] == (f"<|system|>Be exact.\n<|user|>{q1}\n<|assistant|>{a1}\n"
                                                 f"<|user|>{q2}\n<|assistant|>{a2}\n<|user|>{prompt}\n<|assistant|>")
        assert reqs["single"][i].arguments[0] == f"<|user|>{q1}{a1}{q2}{a2}{prompt}\n<|assistant|>"
    assert ev.objectives.objectives[1].multiturn and not ev.objectives.objectives[2].multiturn


def test_chat_template_needs_one_on_the_tokenizer(llama):
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import FitnessConfigError

    with pytest.raises(FitnessConfigError, match=r"test.yaml: apply_chat_template \(task zoo_arith\): the tokenizer of "
                                                 r".*llama/base has no chat template; give it one"):
        Evaluator(objectives({"task": "zoo_arith", "apply_chat_template": True}), llama / "base", backend="hf")


# ---------------------------------------------------------------- generation options

def test_gen_kwargs_reach_the_generate_requests_and_bound_generation(llama):
    from evomerge.fitness.evaluator import Evaluator

    ev = Evaluator(objectives({"task": "zoo_arith", "limit": 12, "gen_kwargs": {"max_gen_toks": 2, "until": ["\n", "+"]}}),
                   llama / "base", backend="hf")
    reqs = built(ev)["zoo_arith"]
    # merged over the task's generation_kwargs (until, do_sample: false, max_gen_toks: 16)
    assert all(r.arguments[1] == {"until": ["\n", "+"], "do_sample": False, "max_gen_toks": 2} for r in reqs)
    res = ev.evaluate(llama / "arith")
    tok = ev.backend.tokenizer
    resps = [r.resps[0] for r in reqs]
    assert all(len(tok(x, add_special_tokens=False)["input_ids"]) <= 2 for x in resps)
    # the arithmetic expert answers 2-digit sums; 3-digit answers are cut at 2 tokens and score 0
    for d, x in zip(ARITH[:12], resps):
        assert res.items["zoo_arith"][d["id"]] == float(x == d["answer"])
        if len(d["answer"]) > 2:
            assert res.items["zoo_arith"][d["id"]] == 0.0
    full = Evaluator(objectives({"task": "zoo_arith", "limit": 12}), llama / "base", backend="hf").evaluate(llama / "arith")
    assert full.values["zoo_arith"] > res.values["zoo_arith"]


@pytest.mark.parametrize("extra,match", [
    ({"num_fewshot": -1}, r"objectives\[0\].num_fewshot: expected a whole number of examples >= 0, got -1"),
    ({"num_fewshot": True}, r"objectives\[0\].num_fewshot: expected a whole number"),
    ({"apply_chat_template": "chatml"}, r"objectives\[0\].apply_chat_template: expected true or false, got 'chatml' "
                                        r"\(lm-eval 0.4 takes a template name too"),
    ({"fewshot_as_multiturn": True}, r"objectives\[0\].fewshot_as_multiturn: few-shot turns need a chat template"),
    ({"system_instruction": 3}, r"objectives\[0\].system_instruction: expected a string, got 3"),
    ({"gen_kwargs": "temperature=0"}, r"objectives\[0\].gen_kwargs: expected a mapping"),
    ({"gen_kwargs": {"temprature": 0.5}}, r"objectives\[0\].gen_kwargs.temprature: unknown generation option. "
                                          r"Did you mean 'temperature'\?"),
    ({"gen_kwargs": {"max_new_tokens": 5}}, r"objectives\[0\].gen_kwargs.max_new_tokens: write 'max_gen_toks'"),
    ({"gen_kwargs": {"top_p": 1.5}}, r"objectives\[0\].gen_kwargs.top_p: expected a number in \(0, 1\], got 1.5"),
    ({"gen_kwargs": {"until": [1]}}, r"objectives\[0\].gen_kwargs.until: expected a stop string or a list"),
    ({"num_fewshots": 2}, r"objectives\[0\].num_fewshots: unknown field. Did you mean 'num_fewshot'\?"),
])
def test_bad_options_are_one_line_errors(extra, match):
    from evomerge.fitness.objectives import FitnessConfigError

    with pytest.raises(FitnessConfigError, match=r"^test.yaml: " + match):
        objectives({"task": "zoo_arith", **extra})


def test_gen_kwargs_on_a_loglikelihood_task_are_refused(llama, tmp_path):
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import FitnessConfigError

    (tmp_path / "d.jsonl").write_text('{"q": "1+1=", "a": "2"}\n')
    (tmp_path / "ll.yaml").write_text(
        "task: zoo_ll\ndataset_path: json\ndataset_kwargs: {data_files: {fitness: %s}}\ntest_split: fitness\n"
        "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n" % (tmp_path / "d.jsonl"))
    with pytest.raises(FitnessConfigError, match=r"objective 'zoo_ll'.gen_kwargs: task 'zoo_ll' is a loglikelihood "
                                                 r"task .*remove gen_kwargs"):
        Evaluator(objectives({"task": "zoo_ll", "gen_kwargs": {"max_gen_toks": 3}}, include=[str(tmp_path)]),
                  llama / "base", backend="hf")


def test_options_round_trip_through_to_dict():
    from evomerge.fitness.objectives import parse_objectives

    objs = objectives({"task": "zoo_arith", "num_fewshot": 2, "apply_chat_template": True, "system_instruction": "S",
                       "gen_kwargs": {"until": ["\n"], "temperature": 0.0}})
    d = objs.to_dict()
    assert d["objectives"][0] == {"name": "zoo_arith", "task": "zoo_arith", "num_fewshot": 2, "apply_chat_template": True,
                                  "system_instruction": "S", "gen_kwargs": {"temperature": 0.0, "until": ["\n"]}}
    assert parse_objectives(d, source="again").objectives == objs.objectives
    hash(objs.objectives[0])  # objectives stay hashable with gen_kwargs


# ---------------------------------------------------------------- a registered lm-eval task

def _cache_gsm8k(cache: Path, tmp: Path) -> None:
    """Put a two-split dataset where `datasets` keeps openai/gsm8k (config main) once downloaded: the layout its
    offline mode reads (CACHE/openai___gsm8k/main/0.0.0/HASH/ with the splits' arrow files and dataset_info.json)."""
    import datasets

    rows = {"train": [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(1, 6)],
            "test": [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}]}
    for split, rs in rows.items():
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    built_ = tmp / "built"
    datasets.load_dataset("json", data_files={s: str(tmp / f"{s}.jsonl") for s in rows}, cache_dir=str(built_))
    (src,) = [p for p in built_.glob("json/*/*/*") if (p / "dataset_info.json").is_file()]
    dest = cache / "openai___gsm8k" / "main" / "0.0.0" / src.name
    dest.mkdir(parents=True)
    for split in rows:
        shutil.copy(src / f"json-{split}.arrow", dest / f"gsm8k-{split}.arrow")
    info = json.loads((src / "dataset_info.json").read_text())
    info.update(config_name="main", dataset_name="gsm8k", builder_name="gsm8k")
    (dest / "dataset_info.json").write_text(json.dumps(info))


def test_registered_task_offline_from_the_cache_and_without_it(llama, tmp_path, monkeypatch):
    import datasets

    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.objectives import FitnessConfigError

    cache = tmp_path / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    spec = {"task": "gsm8k", "split": "test", "num_fewshot": 2, "metric": "exact_match,strict-match",
            "gen_kwargs": {"max_gen_toks": 4}}
    with pytest.raises(FitnessConfigError) as e:
        Evaluator(objectives(spec, include=()), llama / "base", backend="hf")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("test.yaml: objective 'gsm8k': task 'gsm8k' needs the dataset openai/gsm8k (config main), "
                          f"which is not in the Hugging Face datasets cache ({cache}) and offline mode is on")
    assert msg.endswith("python -c \"import datasets; datasets.load_dataset('openai/gsm8k', 'main')\"")

    _cache_gsm8k(cache, tmp_path)
    ev = Evaluator(objectives(spec, include=()), llama / "base", backend="hf")
    (req,) = built(ev)["gsm8k"]
    ctx = req.arguments[0]
    assert ctx.endswith("Question: What is 2+3?\nAnswer:") and ctx.count("Question:") == 3  # 2 examples from train
    assert len(re.findall(r"#### \d+", ctx)) == 2
    assert req.arguments[1]["max_gen_toks"] == 4 and "Question:" in req.arguments[1]["until"]
    res = ev.evaluate()
    assert res.values["gsm8k"] in (0.0, 1.0) and list(res.items["gsm8k"]) == ["0"]


# ---------------------------------------------------------------- vLLM engine options in the runtime

def _job(runtime: dict) -> dict:
    import yaml

    data = yaml.safe_load((REPO / "search_spaces/jobs/zoo_mix.yaml").read_text())
    data["runtime"] = {**data["runtime"], **runtime}
    return data


def test_runtime_engine_options():
    from evomerge.scoring.recipe_scorer import vllm_engine_args
    from evomerge.search.spec import JobSpecError, parse_job

    base = REPO / "search_spaces/jobs"
    spec = parse_job(_job({"enforce_eager": True, "max_length": 512}), "job.yaml", base, check_paths=False)
    assert spec.runtime.enforce_eager is True
    assert vllm_engine_args(spec.runtime) == {"max_model_len": 512, "enforce_eager": True}
    assert parse_job(spec.to_dict(), "again", check_paths=False).runtime.enforce_eager is True
    assert "enforce_eager" not in vllm_engine_args(parse_job(_job({}), "job.yaml", base, check_paths=False).runtime)
    for key, ours in (("max_model_len", "runtime.max_length"), ("gpu_memory_utilization", "runtime.engine_memory")):
        with pytest.raises(JobSpecError, match=rf"^job.yaml: runtime.{key}: vLLM's name; evomerge's is {ours}"):
            parse_job(_job({key: 0.5}), "job.yaml", base, check_paths=False)
    with pytest.raises(JobSpecError, match=r"^job.yaml: runtime.enforce_eager: must be true, false or null"):
        parse_job(_job({"enforce_eager": "yes"}), "job.yaml", base, check_paths=False)
    with pytest.raises(JobSpecError, match=r"runtime.enforce_eagre: unknown field. Did you mean 'enforce_eager'\?"):
        parse_job(_job({"enforce_eagre": True}), "job.yaml", base, check_paths=False)
