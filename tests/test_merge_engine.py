"""Recipes, planning, disk merges, in-memory materialisation and export, checked against formulas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from evomerge.checkpoints import IncompatibleModelsError, open_checkpoint
from evomerge.merge.engine import merge_to_dict
from evomerge.merge.export import ExportError
from evomerge.merge.materialise import Materialiser
from evomerge.merge import api
from evomerge.merge.api import load_recipe
from evomerge.merge.recipe import RecipeError, parse_recipe


def write_recipe(tmp_path: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(folder)
    return {n: ck.get(n).float() for n in ck.names()}


def ta_recipe(m: dict[str, Path], **params) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["a"]), "parameters": {"weight": params.get("wa", 0.7)}},
            {"model": str(m["b"]), "parameters": {"weight": params.get("wb", 0.4)}},
        ],
        "dtype": "float32",
    }


# ---------------------------------------------------------------- merges against formulas

def test_task_arithmetic_matches_formula(tiny_llamas, tmp_path):
    merged = merge_to_dict(load_recipe(write_recipe(tmp_path, ta_recipe(tiny_llamas))))
    base, a, b = (tensors(tiny_llamas[k]) for k in ("base", "a", "b"))
    assert set(merged) == set(base)
    for name in base:
        expected = base[name] + 0.7 * (a[name] - base[name]) + 0.4 * (b[name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_gradient_and_filter_settings_vary_by_layer_and_module(tiny_llamas, tmp_path):
    recipe = ta_recipe(tiny_llamas)
    recipe["models"][0]["parameters"]["weight"] = [
        {"filter": "self_attn", "value": 0.0},
        {"value": [0.0, 1.0]},  # gradient across the 3 layers: 0, 0.5, 1
    ]
    recipe["models"][1]["parameters"]["weight"] = 0.0
    merged = merge_to_dict(load_recipe(write_recipe(tmp_path, recipe)))
    base, a = tensors(tiny_llamas["base"]), tensors(tiny_llamas["a"])
    for i, w in enumerate([0.0, 0.5, 1.0]):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(merged[name], base[name] + w * (a[name] - base[name]), rtol=0, atol=1e-6)
        attn = f"model.layers.{i}.self_attn.q_proj.weight"
        torch.testing.assert_close(merged[attn], base[attn], rtol=0, atol=0)
    # tensors outside the layers take the gradient's first value (t = 0), as in mergekit 0.1.5
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[name], base[name], rtol=0, atol=0)


def test_slices_stack_layer_ranges(tiny_llamas, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(tiny_llamas["a"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(tiny_llamas["b"]), "layer_range": [1, 3]}]},
        ],
        "dtype": "float32",
    }
    out = api.write_recipe(load_recipe(write_recipe(tmp_path, recipe)), tmp_path / "stacked")
    merged, a, b = tensors(out), tensors(tiny_llamas["a"]), tensors(tiny_llamas["b"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    for out_i, (src, in_i) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        name = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(merged[name.format(out_i)], src[name.format(in_i)])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])


# ---------------------------------------------------------------- in-memory materialisation

@pytest.mark.parametrize("method,params,extra", [
    ("task_arithmetic", {"weight": 0.6}, {}),
    ("ties", {"weight": 0.6, "density": [0.3, 0.9]}, {"normalize": True}),
    ("dare_ties", {"weight": 0.5, "density": 0.5}, {}),
    ("della", {"weight": 0.5, "density": 0.6}, {"epsilon": 0.1}),
    ("breadcrumbs", {"weight": 0.5, "density": 0.8}, {"gamma": 0.05}),
    ("linear", {"weight": 0.3}, {}),
])
def test_materialise_in_place_equals_disk_merge(tiny_llamas, tmp_path, method, params, extra):
    models = [{"model": str(tiny_llamas[k]), "parameters": dict(params)} for k in ("a", "b", "c")]
    data = {"merge_method": method, "base_model": str(tiny_llamas["base"]), "models": models,
            "parameters": extra, "dtype": "float32", "seed": 7}
    recipe = load_recipe(write_recipe(tmp_path, data))
    expected = merge_to_dict(recipe)

    mat = Materialiser({k: tiny_llamas[k] for k in ("base", "a", "b", "c")}, anchor="base")
    module = mat.build_module()
    ptrs = {n: p.data_ptr() for n, p in module.state_dict(keep_vars=True).items()}
    for _ in range(2):  # twice: the second write starts from a merged state, not the base
        mat.apply(recipe, module)
    state = module.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=2e-6, msg=name)
    assert ptrs == {n: p.data_ptr() for n, p in module.state_dict(keep_vars=True).items()}, "parameters were re-allocated"


def test_random_methods_are_seeded(tiny_llamas, tmp_path):
    data = {"merge_method": "dare_ties", "base_model": str(tiny_llamas["base"]),
            "models": [{"model": str(tiny_llamas[k]), "parameters": {"weight": 0.5, "density": 0.3}} for k in ("a", "b")],
            "seed": 1}
    one = merge_to_dict(parse_recipe(data))
    again = merge_to_dict(parse_recipe(data))
    other = merge_to_dict(parse_recipe({**data, "seed": 2}))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(one[name], again[name])
    assert not torch.equal(one[name], other[name])


# ---------------------------------------------------------------- bad input, before heavy work

@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(merge_methd="ties"), r"recipe.yaml: merge_methd: unknown field. Did you mean 'merge_method'"),
    (lambda d: d.update(merge_method="tiez"), r"merge_method: unknown method 'tiez'. Did you mean 'ties'"),
    (lambda d: d["models"][0]["parameters"].update(densty=0.5), r"models\[0\].parameters.densty: .*Did you mean 'density'"),
    (lambda d: d["models"][1]["parameters"].update(density=1.5), r"models\[1\].parameters.density: .*density"),
    (lambda d: d["models"][1]["parameters"].update(density=[0.5, -0.1]), r"models\[1\].parameters.density"),
    (lambda d: d["models"][0].update(model="no/such/model"), r"models\[0\].model: no model folder with a config.json at 'no/such/model'"),
    (lambda d: d["models"][0]["parameters"].pop("weight"), r"models\[0\].parameters: method 'ties' needs 'weight'"),
    (lambda d: d.update(dtype="float8"), r"dtype: unknown dtype 'float8'"),
    (lambda d: d.update(parameters={"density": 2.0}), r"recipe.yaml: parameters.density: .*density"),
    (lambda d: d.update(parameters={"lambda": "x"}), r"recipe.yaml: parameters.lambda"),
    (lambda d: d.pop("base_model"), r"base_model: method 'ties' needs a base model"),
    (lambda d: d.update(slices=[]), r"give exactly one of 'models'"),
])
def test_bad_recipes_name_file_and_field(tiny_llamas, tmp_path, mutate, match):
    data = ta_recipe(tiny_llamas)
    data["merge_method"] = "ties"
    for m in data["models"]:
        m["parameters"]["density"] = 0.5
    mutate(data)
    with pytest.raises(RecipeError, match=match):
        load_recipe(write_recipe(tmp_path, data))


def test_incompatible_models_fail_before_merging(tiny_llamas, tmp_path):
    from conftest import save_tiny

    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    data = ta_recipe(tiny_llamas)
    data["models"][1]["model"] = str(gpt2)
    with pytest.raises(IncompatibleModelsError, match="gpt2"):
        api.write_recipe(load_recipe(write_recipe(tmp_path, data)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- CLI, export, atomic writes

def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_cli_merge_round_trip_through_transformers(zoo_dir, tmp_path):
    """A sharded merge of zoo experts loads with Auto classes and computes what the in-memory merge computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = zoo_dir / "llama"
    data = {"merge_method": "ties", "base_model": str(llama / "base"),
            "models": [{"model": str(llama / e), "parameters": {"weight": 0.6, "density": 0.7}} for e in ("arith", "cipher")],
            "dtype": "float32"}
    path = write_recipe(tmp_path, data)
    res = run_cli("merge", str(path), "-o", str(tmp_path / "merged"), "--shard-size", "1MB", "-q")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert "ties" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("12+34=", return_tensors="pt").input_ids

    mat = Materialiser({"base": llama / "base", "arith": llama / "arith", "cipher": llama / "cipher"}, anchor="base")
    module = mat.build_module()
    mat.apply(load_recipe(path), module)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module(ids).logits, rtol=0, atol=1e-5)

    again = run_cli("merge", str(path), "-o", str(out), "-q")
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    forced = run_cli("merge", str(path), "-o", str(out), "-q", "--force")
    assert forced.returncode == 0, forced.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_failed_write_leaves_nothing(tiny_llamas, tmp_path):
    from evomerge.merge.export import write_checkpoint

    def broken():
        yield "x", torch.zeros(2)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tmp_path / "out", broken(), {}, None, "card")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="already exists"):
        write_checkpoint(tiny_llamas["a"], iter(()), {}, None, "card")


def test_cli_reports_user_errors_without_traceback(tmp_path):
    path = write_recipe(tmp_path, {"merge_method": "ties", "models": []})
    res = run_cli("merge", str(path), "-o", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "error:" in res.stderr and "Traceback" not in res.stderr
    assert str(path) in res.stderr


def test_a_merge_that_overflows_is_refused_with_the_tensor_and_writes_nothing(tiny_llamas, tmp_path):
    data = ta_recipe(tiny_llamas)
    data["dtype"] = "float16"
    for m in data["models"]:
        m["parameters"]["weight"] = 1e30  # float16 tops out at 65504
    out = tmp_path / "huge"
    with pytest.raises(RecipeError, match=r"merged tensor '[^']+' has \d+ of \d+ values inf or NaN \(torch.float16\)"):
        api.write_recipe(load_recipe(write_recipe(tmp_path, data)), out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing half-written


def test_a_tokenizer_file_linked_outside_its_model_folder_is_refused_before_any_work(tmp_path):
    import shutil

    from evomerge.merge.export import ExportError

    golden = Path(__file__).resolve().parent / "golden" / "models"
    model = tmp_path / "a"
    shutil.copytree(golden / "a", model)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    (model / "merges.txt").symlink_to(secret)
    recipe = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="merges.txt is a symbolic link to .*secret.txt, outside the model folder"):
        api.write_recipe(load_recipe(write_recipe(tmp_path, recipe)), out)
    assert not out.exists()
    (model / "merges.txt").unlink()
    (model / "merges.txt").symlink_to(model / "gone.txt")  # dangling: the output would silently lack it
    with pytest.raises(ExportError, match="merges.txt is a symbolic link to .*gone.txt, which does not exist"):
        api.write_recipe(load_recipe(write_recipe(tmp_path, recipe)), out)
    (model / "merges.txt").unlink()
    link = tmp_path / "link-out"
    link.symlink_to(tmp_path / "real-out")
    with pytest.raises(ExportError, match="link-out is a symbolic link"):  # never written through
        api.write_recipe(load_recipe(write_recipe(tmp_path, recipe)), link, force=True)
    assert not (tmp_path / "real-out").exists()
    (model / "vocab-real.json").write_text('{"a": 0}')
    (model / "vocab.json").symlink_to(model / "vocab-real.json")  # inside the folder: copied as the file it names
    api.write_recipe(load_recipe(write_recipe(tmp_path, recipe)), out)
    assert not (out / "vocab.json").is_symlink() and (out / "vocab.json").read_text() == '{"a": 0}'


def test_a_merge_transformers_could_not_load_is_refused_before_writing(zoo_dir, tmp_path):
    """Every input's config.json disagrees with its tensors (intermediate_size doubled): the merge would write a
    model that does not load. It is refused naming the tensor and both shapes, and nothing is written."""
    import shutil

    from evomerge.checkpoints import CheckpointError

    model = tmp_path / "m"
    shutil.copytree(zoo_dir / "llama" / "arith", model)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]})
    with pytest.raises(CheckpointError, match=r"out: would not load: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has "
                                              r"shape \[\d+, \d+\], its config.json makes it"):
        api.write_recipe(recipe, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_tokenizer_source_without_tokenizer_files_is_said(zoo_dir, tmp_path):
    """The output of a merge whose tokenizer source has no tokenizer lacks one too: `merge` says so on stderr
    (and still writes the weights); with tokenizer files, nothing is said."""
    import shutil

    base = tmp_path / "base"
    base.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(zoo_dir / "llama" / "base" / f, base / f)
    arith = zoo_dir / "llama" / "arith"
    for src, said in ((base, True), (zoo_dir / "llama" / "base", False)):
        path = tmp_path / f"r{int(said)}.yaml"
        path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(src),
                                        "models": [{"model": str(arith), "parameters": {"weight": 0.5}}]}))
        res = run_cli("merge", str(path), "-o", str(tmp_path / f"out{int(said)}"), "-q")
        assert res.returncode == 0, res.stderr
        assert ("has no tokenizer files" in res.stderr) == said, res.stderr
        assert (tmp_path / f"out{int(said)}" / "tokenizer.json").exists() != said
