"""Data-flow merges: recipes, the in-memory path model, scale folding and the standard-checkpoint export.

The in-memory model applies scales with hooks (the definition); the export folds them into weights. They must
agree to 1e-6 relative when the norms' epsilon is negligible, and to 1e-4 on the trained zoo models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, save_tiny
from evomerge.merge.dataflow import (
    MERGEKIT_CONFIG, DataflowRecipe, Hop, dataflow_to_dict, parse_dataflow, passthrough_config,
    plan_dataflow,
)
from evomerge.merge.engine import merge_to_dict
from evomerge.merge.fold import fold_factors
from evomerge.merge.pathmodel import build_path_model, load_source_modules
from evomerge.merge.api import load_recipe, write_recipe
from evomerge.merge.recipe import RecipeError
from evomerge.service.cli import main as cli_main

EPS_KEYS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps")
IDS = torch.randint(0, 48, (2, 11), generator=torch.Generator().manual_seed(0))


def with_eps(src: Path, dst: Path, eps: float) -> Path:
    """A copy of a model folder whose norms use another epsilon."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key in EPS_KEYS:
        if key in config:
            config[key] = eps
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Pairs (x, x2: a perturbed copy) per family, with default and negligible (1e-12) norm epsilon."""
    root = tmp_path_factory.mktemp("dfs_models")
    out: dict[str, Path] = {}
    for family in ("llama", "gpt2"):
        a = save_tiny(root / family, family, seed=0)
        b = save_tiny(root / f"{family}2", perturb_from=a, seed=1, scale=0.1)
        out |= {family: a, f"{family}2": b}
        out[f"{family}_eps"] = with_eps(a, root / f"{family}_eps", 1e-12)
        out[f"{family}2_eps"] = with_eps(b, root / f"{family}2_eps", 1e-12)
    import transformers as tf

    torch.manual_seed(0)
    gemma = tf.AutoModelForCausalLM.from_config(tf.Gemma2Config(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=64, rms_norm_eps=1e-12))
    with torch.no_grad():  # random post-norm weights, so folding into them is actually exercised
        for n, p in gemma.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    gemma.save_pretrained(root / "gemma2_eps")
    out["gemma2_eps"] = root / "gemma2_eps"
    wide = tf.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    tf.AutoModelForCausalLM.from_config(wide).save_pretrained(root / "wide")
    out["wide"] = root / "wide"
    return out


def recipe_of(sources: dict, path: list[dict], embed: str | None = None, head: str | None = None) -> dict:
    flow: dict = {"path": path}
    if embed:
        flow["embed"] = embed
    if head:
        flow["head"] = head
    return {"sources": {k: str(v) if isinstance(v, Path) else v for k, v in sources.items()}, "dataflow": flow}


def write_yaml(tmp_path: Path, data: dict, name: str = "path.yaml") -> Path:
    (tmp_path / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp_path / name


@torch.no_grad()
def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids).logits


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got - want).abs().max() / want.abs().max()).item()


@torch.no_grad()
def export_and_compare(recipe: DataflowRecipe, out: Path) -> float:
    """Relative logit error between the in-memory (hooked) model and the exported (folded) checkpoint."""
    from transformers import AutoModelForCausalLM

    in_memory = logits(build_path_model(recipe, load_source_modules(recipe)))
    write_recipe(recipe, out)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=False)
    return relative_error(logits(exported), in_memory)


SCALED_PATH = [
    {"model": "A", "layer": 0, "scale": 1.2},
    {"model": "A", "layer": 1, "scale": 0.7},
    {"model": "B", "layer": 1, "scale": 1.5},
    {"model": "A", "layer": 1, "scale": 0.8},  # a repeated layer
    {"model": "B", "layer": 2, "scale": 1.1},
]


# ---------------------------------------------------------------- identity and repeated layers

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_path_reproduces_source_exactly(models, family, tmp_path):
    from transformers import AutoModelForCausalLM

    src = models[family]
    recipe = parse_dataflow(recipe_of({"A": src}, [{"model": "A", "layer": i} for i in range(3)]))
    want = logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))
    assert torch.equal(logits(build_path_model(recipe, load_source_modules(recipe))), want)
    write_recipe(recipe, tmp_path / "out")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)), want)


def test_repeated_layer_shares_tensors_but_has_its_own_attention(models):
    recipe = parse_dataflow(recipe_of({"A": models["llama"]}, [{"model": "A", "layer": i} for i in (0, 1, 1, 1, 2)]))
    sources = load_source_modules(recipe)
    model = build_path_model(recipe, sources)
    layers = model.model.layers
    assert model.config.num_hidden_layers == 5
    src_q = sources["A"].model.layers[1].self_attn.q_proj.weight
    for t in (1, 2, 3):
        assert layers[t].self_attn.q_proj.weight is src_q  # shared Parameter, not a copy
        assert layers[t].self_attn.layer_idx == t
    assert len({id(layers[t].self_attn) for t in range(5)}) == 5
    unique = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates shared tensors
    assert unique == sum(p.numel() for p in sources["A"].parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_with_kv_cache_on_repeated_layers(models, family, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = parse_dataflow(recipe_of({"A": models[family], "B": models[f"{family}2"]}, SCALED_PATH))
    model = build_path_model(recipe, load_source_modules(recipe))
    prompt = IDS[:1, :4]
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    write_recipe(recipe, tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert exported.generate(prompt, max_new_tokens=10, do_sample=False).tolist() == cached.tolist()


@torch.no_grad()
def test_hooked_model_matches_a_hand_written_forward(models):
    """The in-memory model is the definition; check it against the formula, layer by layer."""
    recipe = parse_dataflow(recipe_of({"A": models["llama"], "B": models["llama2"]}, SCALED_PATH))
    sources = load_source_modules(recipe)
    a, b = sources["A"].model, sources["B"].model
    h = a.embed_tokens(IDS)
    pos = torch.arange(IDS.shape[1])[None]
    rope = a.rotary_emb(h, pos)
    mask = torch.full((IDS.shape[1], IDS.shape[1]), float("-inf")).triu(1)[None, None]
    for hop in recipe.path:
        layer = sources[hop.model].model.layers[hop.layer]
        out = layer(h * hop.scale, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        h = out[0] if isinstance(out, tuple) else out
    want = sources["B"].lm_head(b.norm(h))
    got = logits(build_path_model(recipe, sources))
    assert relative_error(got, want) < 1e-6


# ---------------------------------------------------------------- scale folding

def test_fold_factors():
    assert fold_factors([2.0, 4.0, 0.5]) == (2.0, [1.0, 0.25, 0.5])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folded_export_equals_scaled_model_with_negligible_eps(models, family, tmp_path):
    recipe = parse_dataflow(recipe_of({"A": models[f"{family}_eps"], "B": models[f"{family}2_eps"]}, SCALED_PATH,
                                      embed="A", head="B"))
    err = export_and_compare(recipe, tmp_path / "out")
    print(f"{family} eps=1e-12 relative logit error {err:.2e}")
    assert err <= 1e-6
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "auto_map" not in config
    assert not (tmp_path / "out" / MERGEKIT_CONFIG).exists()  # scaled paths have no passthrough form


def test_folding_into_gemma2_post_norms(models, tmp_path):
    recipe = parse_dataflow(recipe_of({"A": models["gemma2_eps"]}, [
        {"model": "A", "layer": 0, "scale": 1.3}, {"model": "A", "layer": 2, "scale": 0.6},
        {"model": "A", "layer": 2, "scale": 1.4}, {"model": "A", "layer": 1, "scale": 0.9}]))
    err = export_and_compare(recipe, tmp_path / "out")
    assert err <= 1e-6


def test_default_eps_error_is_small(models, tmp_path):
    """Even untrained tiny models (small activations, so epsilon matters most) stay well within 1e-3."""
    recipe = parse_dataflow(recipe_of({"A": models["llama"], "B": models["llama2"]}, SCALED_PATH))
    assert export_and_compare(recipe, tmp_path / "out") <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_folded_export_on_trained_zoo_models(family, tmp_path):
    zoo = Path(os.environ.get("EVOMERGE_ZOO", REPO / ".cache" / "zoo"))
    if not (zoo / "manifest.json").exists():
        pytest.skip("the trained zoo is not built (make zoo)")
    names = sorted(p.name for p in (zoo / family).iterdir() if (p / "config.json").exists())
    a, b = zoo / family / names[0], zoo / family / names[1]
    n = json.loads((a / "config.json").read_text())["num_hidden_layers"]
    path = [{"model": "A", "layer": i, "scale": 1.0 + 0.1 * (i % 3) - 0.1} for i in range(n)]
    path += [{"model": "B", "layer": n - 2, "scale": 0.8}, {"model": "B", "layer": n - 1, "scale": 1.25}]
    recipe = parse_dataflow(recipe_of({"A": a, "B": b}, path, embed="A", head="B"))
    err = export_and_compare(recipe, tmp_path / "out")
    print(f"zoo {family} relative logit error {err:.2e}")
    assert err <= 1e-4


# ---------------------------------------------------------------- hybrid PS-then-DFS

def test_hybrid_with_a_parameter_space_source(tiny_llamas, tmp_path):
    mix = {"merge_method": "task_arithmetic", "base_model": str(tiny_llamas["base"]), "dtype": "float32",
           "models": [{"model": str(tiny_llamas["a"]), "parameters": {"weight": 0.6}},
                      {"model": str(tiny_llamas["b"]), "parameters": {"weight": 0.4}}]}
    data = recipe_of({"A": tiny_llamas["c"], "MIX": mix}, [
        {"model": "A", "layer": 0}, {"model": "MIX", "layer": 1, "scale": 0.9}, {"model": "MIX", "layer": 1},
        {"model": "A", "layer": 2, "scale": 1.2}], embed="MIX", head="A")
    recipe = load_recipe(write_yaml(tmp_path, data))
    assert isinstance(recipe, DataflowRecipe)
    exported = dataflow_to_dict(recipe)
    ps = merge_to_dict(recipe.sources["MIX"].merge_recipe)
    torch.testing.assert_close(exported["model.layers.2.mlp.up_proj.weight"], ps["model.layers.1.mlp.up_proj.weight"],
                               rtol=0, atol=0)
    assert export_and_compare(recipe, tmp_path / "out") <= 1e-3


# ---------------------------------------------------------------- CLI and mergekit

def test_cli_merge_writes_standard_checkpoint(models, tmp_path):
    from transformers import AutoConfig

    extra = {"model": str(models["llama2"]), "layer": 0, "scale": 1.2}  # a model folder not named in sources
    data = recipe_of({"A": models["llama"], "B": models["llama2"]}, SCALED_PATH + [extra])
    out = tmp_path / "out"
    assert cli_main(["merge", str(write_yaml(tmp_path, data)), "-o", str(out), "-q"]) == 0
    config = AutoConfig.from_pretrained(out, trust_remote_code=False)
    assert config.num_hidden_layers == len(SCALED_PATH) + 1 and config.model_type == "llama"
    assert "dataflow:" in (out / "README.md").read_text()


def test_passthrough_config_collapses_runs(models):
    recipe = parse_dataflow(recipe_of({"A": models["llama"], "B": models["llama2"]}, [
        {"model": "A", "layer": 0}, {"model": "A", "layer": 1}, {"model": "B", "layer": 1}, {"model": "B", "layer": 2}]))
    cfg = passthrough_config(recipe)
    assert cfg is not None and cfg["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in cfg["slices"]] == [[0, 2], [1, 3]]
    assert passthrough_config(DataflowRecipe(recipe.path, recipe.sources, "A", "A")) is None  # head not last hop's


MERGEKIT = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"


@pytest.mark.slow
@pytest.mark.skipif(not MERGEKIT.exists(), reason="mergekit venv missing (make venv-mergekit)")
def test_mergekit_accepts_the_passthrough_export(models, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = parse_dataflow(recipe_of({"A": models["llama"], "B": models["llama2"]}, [
        {"model": "A", "layer": 0}, {"model": "A", "layer": 1}, {"model": "B", "layer": 1}, {"model": "B", "layer": 2}]))
    ours = write_recipe(recipe, tmp_path / "ours")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(MERGEKIT), str(ours / MERGEKIT_CONFIG), str(tmp_path / "theirs")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "theirs", dtype=torch.float32)
    assert torch.equal(logits(theirs), logits(AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("hop, field, words", [
    ({"model": "NOPE", "layer": 0}, "dataflow.path[1].model", "neither a source name"),
    ({"model": "A", "layer": 3}, "dataflow.path[1].layer", "out of range"),
    ({"model": "A", "layer": 1, "scale": 0}, "dataflow.path[1].scale", "> 0"),
    ({"model": "A", "layer": 1, "scale": -1.0}, "dataflow.path[1].scale", "> 0"),
    ({"model": "W", "layer": 0}, "dataflow.path[1].model", "hidden size"),
    ({"model": "A", "layer": 1, "sacle": 2}, "dataflow.path[1].sacle", "scale"),
])
def test_bad_hops_name_file_and_field(models, tmp_path, hop, field, words):
    data = recipe_of({"A": models["llama"], "W": models["wide"]}, [{"model": "A", "layer": 0}, hop])
    path = write_yaml(tmp_path, data)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: {field}:") and words in str(e.value)


def test_empty_path_and_bad_ps_source_are_clear(models, tmp_path):
    path = write_yaml(tmp_path, recipe_of({"A": models["llama"]}, []))
    with pytest.raises(RecipeError, match=r"dataflow\.path: must be a non-empty list"):
        load_recipe(path)
    bad = recipe_of({"MIX": {"merge_method": "linaer", "models": [str(models["llama"])]}}, [{"model": "MIX", "layer": 0}])
    with pytest.raises(RecipeError, match=r"sources\.MIX\.merge_method: unknown method 'linaer'"):
        load_recipe(write_yaml(tmp_path, bad))


def test_recipe_round_trips_through_yaml(models, tmp_path):
    recipe = parse_dataflow(recipe_of({"A": models["llama"], "B": models["llama2"]}, SCALED_PATH, head="A"))
    again = load_recipe(write_yaml(tmp_path, yaml.safe_load(recipe.to_yaml())))
    assert isinstance(again, DataflowRecipe)
    assert again.path == recipe.path and again.path[2] == Hop("B", 1, 1.5) and again.head == "A"


def test_head_stays_tied_only_while_the_embeddings_are_unscaled(models):
    """GPT-2 ties its head to the token embeddings; folding s_1 into the embeddings must untie them."""
    def tied(first_scale: float) -> bool:
        recipe = parse_dataflow(recipe_of({"A": models["gpt2"]}, [
            {"model": "A", "layer": 0, "scale": first_scale}, {"model": "A", "layer": 1, "scale": 0.5}]))
        plan = plan_dataflow(recipe)
        assert plan.config["tie_word_embeddings"] is plan.tied
        assert ("lm_head.weight" in {t.out_name for t in plan.tensors}) is not plan.tied
        return plan.tied

    assert tied(1.0) and not tied(2.0)


@pytest.mark.slow
def test_lm_eval_wraps_the_path_model(tmp_path):
    """The fitness backends' contract: HFLM takes the in-memory path model as it is (loglikelihood and
    generation, with the KV cache, over a repeated layer)."""
    HFLM = pytest.importorskip("lm_eval.models.huggingface").HFLM
    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.tokenizer import VOCAB_SIZE, save_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    save_tokenizer(tmp_path / "m")
    recipe = parse_dataflow(recipe_of({"A": tmp_path / "m"}, [
        {"model": "A", "layer": 0}, {"model": "A", "layer": 1, "scale": 0.8}, {"model": "A", "layer": 1}]))
    model = build_path_model(recipe, load_source_modules(recipe))
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "m"), batch_size=2)
    ll = lm.loglikelihood([Instance("loglikelihood", {}, ("12+3=", "15"), 0)])
    gen = lm.generate_until([Instance("generate_until", {}, ("12+3=", {"until": ["\n"], "max_gen_toks": 5,
                                                                       "do_sample": False}), 0)])
    assert len(ll) == 1 and ll[0][0] < 0 and len(gen) == 1 and isinstance(gen[0], str)


def test_path_runs_say_a_path_in_words():
    from evomerge.merge.dataflow import Hop, path_runs

    hops = [Hop("reader", 0), Hop("reader", 1), Hop("arith", 0), Hop("arith", 1), Hop("arith", 1, 0.8), Hop("arith", 3)]
    assert path_runs(hops) == "reader 0-1, arith 0-1, arith 1 x0.80, arith 3"
    assert path_runs([{"model": "m", "layer": 2}, {"model": "m", "layer": 3}]) == "m 2-3"
