"""Tiny model zoo: acceptance constraints, offline loading, determinism, cache, committed data, lm-eval.

The built zoo is read from $EVOMERGE_ZOO (default: .cache/zoo under the repo root) and built there when missing
or stale: copied from the committed zoo/ (seconds), trained only where the code changed a model (about 9 minutes
for all on 2 CPU cores). Tests that need it are marked slow.
"""

from __future__ import annotations

import filecmp
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evomerge.zoo import tasks as ztasks
from evomerge.zoo import tokenizer as ztok
from evomerge.zoo import train as ztrain
from evomerge.zoo import build as zbuild
from evomerge.zoo.build import ZooSpec, build_zoo, is_built, model_names

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("EVOMERGE_ZOO", ROOT / ".cache" / "zoo"))
if not ZOO.is_absolute():
    ZOO = ROOT / ZOO

OWN_SKILL = {"arith": "arith", "cipher": "cipher", "reverse": "reverse"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))


@pytest.fixture(scope="session")
def zoo() -> Path:
    if not is_built(ZOO):
        build_zoo(ZOO)
    return ZOO


@pytest.fixture(scope="session")
def test_scores(zoo) -> dict[str, dict[str, float]]:
    """Accuracy of every zoo model on every eval task's test split, scored here (not read from the manifest)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    data = {t: ztasks.read_jsonl(zoo / "data" / t / "test.jsonl") for t in ztasks.EVAL_TASKS}
    out = {}
    for name in model_names(ZooSpec()):
        model = AutoModelForCausalLM.from_pretrained(zoo / name, dtype=torch.float32)
        out[name] = {t: ztrain.score(model, items) for t, items in data.items()}
    return out


# ---- fast tests -------------------------------------------------------------------------------------


def test_splits_are_disjoint_and_large():
    data = ztasks.generate_all()
    for task, splits in data.items():
        keys = {s: {r["prompt"] for r in rows} for s, rows in splits.items()}
        assert len(splits["fitness"]) >= 500 and len(splits["test"]) >= 500, task
        assert not keys["fitness"] & keys["test"], task
        assert not (keys["fitness"] | keys["test"]) & keys["train"], task
    # arith and composed share one operand-pair partition; cipher holds digit strings out in both directions
    digits = lambda rows: {r["prompt"][1:-1] if r["prompt"][0] == ">" else r["answer"] for r in rows}  # noqa: E731
    spec = ztasks.TaskSpec()
    assert ztasks.decipher(ztasks.encipher("0123456789", spec), spec) == "0123456789"
    assert not (digits(data["cipher"]["fitness"]) | digits(data["cipher"]["test"])) & digits(data["cipher"]["train"])


def test_committed_fitness_data_equals_regenerated(tmp_path):
    ztasks.write_fitness_data(tmp_path)
    for task in ztasks.EVAL_TASKS:
        for split in ("fitness", "test"):
            committed = ROOT / "fitness" / "data" / task / f"{split}.jsonl"
            assert filecmp.cmp(committed, tmp_path / task / f"{split}.jsonl", shallow=False), committed
        assert (ROOT / "fitness" / f"zoo_{task}.yaml").exists()


def test_tokenizer_and_model_load_offline_through_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ztrain.ModelSpec(family="qwen2", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    model = ztrain.make_model(spec, seed=0)
    ztrain.save_model(model, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("93+34=")["input_ids"] == [ztok.BOS_ID] + ztok.encode("93+34=")
    assert tok.decode(ztok.encode("<gfb=") + [ztok.EOS_ID], skip_special_tokens=True) == "<gfb="
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ztok.BOS_ID, ztok.EOS_ID, ztok.PAD_ID)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again).__name__ == "Qwen2ForCausalLM"
    x = torch.tensor([[ztok.BOS_ID] + ztok.encode("12+34=")])
    assert torch.allclose(model(x).logits, again(x).logits, atol=1e-5)  # eager vs sdpa attention


def test_the_committed_zoo_is_the_current_code_s_zoo():
    """Every model of the committed families (llama, qwen2; the depth family's models are over 5 MB each and are
    trained on every machine) is in zoo/ with the job key the current settings and training code give it (so a
    build copies it and trains nothing), and with safetensors weights only. Editing the training code or a setting
    without committing the retrained models (`make zoo-prebuilt`) fails here, before a machine of another CPU kind
    trains those families on its own."""
    assert zbuild.PREBUILT == ROOT / "zoo"
    spec = zbuild.select_families(ZooSpec(), list(zbuild.COMMITTED_FAMILIES))
    for name in model_names(spec):
        meta = json.loads((ROOT / "zoo" / name / "zoo_model.json").read_text())
        assert meta["job_key"] == zbuild.job_key(spec, *name.split("/")), (name, "stale: run make zoo-prebuilt")
        weights = sorted(p.name for p in (ROOT / "zoo" / name).iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        assert weights == ["model.safetensors"], (name, weights)
    committed = {f"{f.parent.name}/{f.name}" for f in (ROOT / "zoo").glob("*/*") if f.is_dir()}
    assert committed == set(model_names(spec)), committed ^ set(model_names(spec))
    big = [str(f) for f in (ROOT / "zoo").rglob("*") if f.is_file() and f.stat().st_size > 5 * 2**20]
    assert not big, big  # the project tracks no file over 5 MB


def test_a_prebuilt_model_is_copied_only_when_its_job_key_matches(tmp_path):
    tiny = ztrain.ModelSpec(hidden_size=16, intermediate_size=32, num_hidden_layers=2)
    steps = ztrain.TrainSpec(steps=2, batch_size=4, warmup=1, seed=1, task_weights={"arith": 1.0})
    spec = ZooSpec(families={"llama": zbuild.FamilySpec(tiny, steps, {"arith": replace(steps, seed=2)})})
    first = build_zoo(tmp_path / "a", progress=False, spec=spec, workers=1, prebuilt=None)
    assert {n: m["source"] for n, m in first["models"].items()} == {"llama/base": "trained", "llama/arith": "trained"}
    meta = json.loads((tmp_path / "a/llama/arith/zoo_model.json").read_text())
    assert meta["built_on"]["aten_capability"] == torch.backends.cpu.get_cpu_capability()
    assert meta["built_on"]["threads"] == 1 and first["models"]["llama/arith"]["built_on"] == meta["built_on"]

    copied = build_zoo(tmp_path / "b", progress=False, spec=spec, workers=1, prebuilt=tmp_path / "a")
    assert {n: m["source"] for n, m in copied["models"].items()} == {"llama/base": "prebuilt", "llama/arith": "prebuilt"}
    for name in ("llama/base", "llama/arith"):
        for f in ("model.safetensors", "zoo_model.json", "config.json", "tokenizer.json"):
            assert filecmp.cmp(tmp_path / "a" / name / f, tmp_path / "b" / name / f, shallow=False), (name, f)
        assert copied["models"][name]["accuracy"] == first["models"][name]["accuracy"]
    assert not list((tmp_path / "b").glob("*/*.tmp"))

    # another expert seed: a new job key for the expert only; the base is still copied, the expert trained
    spec2 = ZooSpec(families={"llama": zbuild.FamilySpec(tiny, steps, {"arith": replace(steps, seed=3)})})
    mixed = build_zoo(tmp_path / "c", progress=False, spec=spec2, workers=1, prebuilt=tmp_path / "a")
    assert {n: m["source"] for n, m in mixed["models"].items()} == {"llama/base": "prebuilt", "llama/arith": "trained"}
    assert filecmp.cmp(tmp_path / "a/llama/base/model.safetensors", tmp_path / "c/llama/base/model.safetensors", shallow=False)
    assert not filecmp.cmp(tmp_path / "a/llama/arith/model.safetensors", tmp_path / "c/llama/arith/model.safetensors", shallow=False)
    # force retrains even what the prebuilt folder holds (and, deterministic on one machine, to the same bytes)
    forced = build_zoo(tmp_path / "d", progress=False, spec=spec, workers=1, prebuilt=tmp_path / "a", force=True)
    assert {m["source"] for m in forced["models"].values()} == {"trained"}
    assert filecmp.cmp(tmp_path / "a/llama/arith/model.safetensors", tmp_path / "d/llama/arith/model.safetensors", shallow=False)


def test_training_is_bitwise_deterministic():
    data = {t: d["train"] for t, d in ztasks.generate_all().items()}
    spec = ztrain.ModelSpec(hidden_size=64, intermediate_size=128)
    tspec = ztrain.TrainSpec(steps=15, batch_size=16, warmup=5, seed=3, task_weights={"arith": 1, "cipher": 1})
    ztrain.set_deterministic(1)
    runs = []
    for _ in range(2):
        m = ztrain.make_model(spec, seed=7)
        ztrain.train_model(m, data, tspec)
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["model.embed_tokens.weight"], ztrain.make_model(spec, seed=7).state_dict()["model.embed_tokens.weight"])


# ---- tests on the built zoo -------------------------------------------------------------------------


@pytest.mark.slow
def test_zoo_layout_and_cache_hit(zoo):
    for name in model_names(ZooSpec()):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            assert (zoo / name / f).exists(), (name, f)
    t = time.time()
    manifest = build_zoo(zoo, progress=False)
    assert time.time() - t < 2.0
    assert set(manifest["models"]) == set(model_names(ZooSpec()))
    # the zoo's data is the committed fitness data (plus train splits)
    for task in ztasks.EVAL_TASKS:
        for split in ("fitness", "test"):
            assert filecmp.cmp(zoo / "data" / task / f"{split}.jsonl", ROOT / "fitness" / "data" / task / f"{split}.jsonl", shallow=False)


@pytest.mark.slow
def test_no_split_shares_items_in_built_zoo(zoo):
    for task in ztasks.ALL_TASKS:
        p = {s: {r["prompt"] for r in ztasks.read_jsonl(zoo / "data" / task / f"{s}.jsonl")} for s in ("train", "fitness", "test")}
        assert not p["fitness"] & p["test"] and not p["train"] & (p["fitness"] | p["test"]), task


@pytest.mark.slow
def test_experts_master_their_skill(test_scores):
    for fam, fs in ZooSpec().families.items():
        if fs.depth:  # the depth family's experts are path parts, tested in test_zoo_depth.py
            continue
        for skill in fs.skills:
            assert test_scores[f"{fam}/{skill}"][skill] >= 0.9, (fam, skill, test_scores[f"{fam}/{skill}"])


@pytest.mark.slow
def test_no_parent_solves_the_mix_target(test_scores):
    for name, acc in test_scores.items():
        assert acc["mix"] <= 0.75, (name, acc)


@pytest.mark.slow
def test_manifest_matches_own_scores(zoo, test_scores):
    man = build_zoo(zoo, progress=False)
    for name, acc in test_scores.items():
        for task, a in acc.items():
            assert man["models"][name]["accuracy"]["test"][task] == pytest.approx(a, abs=0.01), (name, task)


@pytest.mark.slow
def test_lm_eval_agrees_with_own_scorer(zoo, monkeypatch):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(ROOT)  # data_files in the YAMLs are relative to the repo root
    name = "llama/cipher"
    model = AutoModelForCausalLM.from_pretrained(zoo / name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(zoo / name)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=64, device="cpu")
    tm = TaskManager(include_path=str(ROOT / "fitness"), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=["zoo_mix"], task_manager=tm, bootstrap_iters=0, log_samples=False)
    got = res["results"]["zoo_mix"]["exact_match,none"]
    own = ztrain.score(model, ztasks.read_jsonl(ROOT / "fitness" / "data" / "mix" / "fitness.jsonl"))
    assert got == pytest.approx(own)
    assert 0.3 < own < 0.75  # a parent: about half of mix (its own skill), not all of it


# Merges the zoo is built to reward (the search finds their neighbours: `make demo`). Which one wins depends on the
# machine that trained the zoo (float results of training differ between CPUs), so the test picks among them on
# the fitness split, as a search would, and holds the pick to the margin on the test split.
CANDIDATE_MERGES = [
    ("task_arithmetic", 0.7, 0.25, {}), ("task_arithmetic", 0.8, 0.2, {}),
    ("ties", 0.8, 0.3, {"density": 0.3}), ("ties", 1.0, 0.3, {"density": 0.3}), ("ties", 1.0, 0.5, {"density": 0.3}),
]


@pytest.mark.slow
def test_a_merge_picked_on_the_fitness_split_beats_every_parent_on_mix(zoo, test_scores):
    """A merge of the arithmetic and cipher experts keeps both skills: the best of a few on the fitness split is
    >= 10 points over the best llama parent on mix test, with both skills at >= 60%.

    Measured on the machine that first built the zoo: parents' mix 0.64 (base), 0.66 (arith), 0.51 (cipher); task
    arithmetic (0.7, 0.25) 0.81 (arith 0.67, cipher 0.94). On a 2-core AMD EPYC (2026-12): best parent 0.618; the
    pick, TIES (1.0, 0.3, density 0.3), 0.728 (arith 0.83, cipher 0.61).
    """
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import merge_to_dict
    from evomerge.merge.recipe import parse_recipe

    model = AutoModelForCausalLM.from_pretrained(zoo / "llama/base", dtype=torch.float32)
    fitness = ztasks.read_jsonl(zoo / "data" / "mix" / "fitness.jsonl")

    def load(method: str, w_arith: float, w_cipher: float, extra: dict) -> None:
        recipe = parse_recipe({
            "merge_method": method, "base_model": str(zoo / "llama/base"), "parameters": {"normalize": False},
            "models": [{"model": str(zoo / "llama/arith"), "parameters": {"weight": w_arith, **extra}},
                       {"model": str(zoo / "llama/cipher"), "parameters": {"weight": w_cipher, **extra}}],
            "dtype": "float32"})
        missing, unexpected = model.load_state_dict(merge_to_dict(recipe), strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)

    on_fitness = []
    for merge in CANDIDATE_MERGES:
        load(*merge)
        on_fitness.append(ztrain.score(model, fitness))
    pick = CANDIDATE_MERGES[on_fitness.index(max(on_fitness))]
    load(*pick)
    items = {t: ztasks.read_jsonl(zoo / "data" / t / "test.jsonl") for t in ("arith", "cipher", "mix")}
    merged = {t: ztrain.score(model, its) for t, its in items.items()}
    best_parent = max(test_scores[f"llama/{r}"]["mix"] for r in ("base", "arith", "cipher"))
    assert best_parent <= 0.75, test_scores
    assert merged["mix"] >= best_parent + 0.10, (pick, merged, best_parent)
    assert merged["arith"] >= 0.6 and merged["cipher"] >= 0.6, (pick, merged)  # both skills kept, not a switch


def test_zoo_build_refuses_a_prebuilt_folder_that_is_not_there(tmp_path, capsys):
    from evomerge.service.cli import main

    assert main(["zoo", "build", str(tmp_path / "zoo"), "--prebuilt", str(tmp_path / "missing"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prebuilt: ") and str(tmp_path / "missing") in err[0]
    assert not (tmp_path / "zoo").exists()  # refused before anything was written
