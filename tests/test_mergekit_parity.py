"""Our engine reproduces mergekit 0.1.5 on the committed goldens (tests/golden/, see make_golden.py).

Each case folder holds a mergekit recipe (model paths relative to the folder) and the tensors `mergekit-yaml`
produced from it. float32 recipes: every output tensor must match within 1e-5. float16 / bfloat16 recipes
(mergekit computes those in their dtype): with `compute_dtype: recipe` every method gives mergekit's bits exactly
(ramplus_tl and arcee_fusion, which mergekit writes in float32, with `out_dtype: float32`); the default float32
compute is nearer the float32 merge than mergekit's numbers are, for every method.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge.api import load_recipe, parse_any, to_mergekit
from evomerge.merge.engine import merge_to_dict
from evomerge.merge.recipe import RecipeError

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "recipe.yaml").is_file() and (p / "merged.safetensors").is_file())
TOLERANCE = 1e-5
HALF = {"float16": 2**-10, "bfloat16": 2**-7}  # dtype -> its step at 1 (one ulp): rounding moves v by <= |v| * step / 2
# Methods whose every half-precision rounding compute_dtype: recipe makes as mergekit does (the task-vector
# family; linear and slerp, which mergekit computes in float32 from rounded inputs; the methods with a
# `combine_rounded`). A method left out would compute in float32 from the rounded inputs (README, "Half precision").
EXACT_IN_HALF = {
    "linear", "task_arithmetic", "ties", "breadcrumbs_ties", "slerp", "nearswap", "ram", "ramplus_tl", "sce", "nuslerp",
    "multislerp", "model_stock", "karcher", "arcee_fusion",
}
# Of those, the methods whose mergekit steps promote to float32 (a float32 factor): mergekit writes their tensors in
# float32 whatever the dtype, which evomerge gives with out_dtype: float32 (by default it rounds them to the dtype).
PROMOTED_TO_FLOAT32 = {"ramplus_tl", "arcee_fusion"}


def _recipe_dtype(case: str) -> str | None:
    return yaml.safe_load((GOLDEN / case / "recipe.yaml").read_text()).get("dtype")


FLOAT32_CASES = [c for c in CASES if _recipe_dtype(c) not in HALF]
HALF_CASES = [c for c in CASES if _recipe_dtype(c) in HALF]


def test_goldens_are_present():
    assert {"linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "slices_ties"} <= set(CASES)
    # every deterministic method of mergekit 0.1.5 has a case (dare_*, della* are random: tests/test_methods.py)
    assert {"nuslerp", "model_stock", "multislerp", "multislerp_nobase", "karcher", "sce", "nearswap", "arcee_fusion",
            "ram", "ramplus_tl"} <= set(CASES)
    exact = {f"{m}_{s}" for m in EXACT_IN_HALF for s in ("fp16", "bf16")}
    assert exact == set(HALF_CASES) and len(HALF_CASES) == 28  # every half-precision golden is matched bit for bit


@pytest.mark.parametrize("case", FLOAT32_CASES)
def test_engine_matches_mergekit(case):
    expected = load_file(GOLDEN / case / "merged.safetensors")
    merged = merge_to_dict(load_recipe(GOLDEN / case / "recipe.yaml"))
    assert sorted(merged) == sorted(expected), f"{case}: tensor names differ"
    for name, want in expected.items():
        got = merged[name].to(torch.float32)
        assert got.shape == want.shape, f"{case}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
        diff = (got - want).abs().max().item()
        assert diff <= TOLERANCE, f"{case}: {name} differs from mergekit by {diff:.3g}"


@pytest.mark.parametrize("case", [c for c in HALF_CASES if load_recipe(GOLDEN / c / "recipe.yaml").merge_method in EXACT_IN_HALF])
def test_compute_dtype_recipe_gives_mergekits_half_precision_bits(case):
    recipe = load_recipe(GOLDEN / case / "recipe.yaml")
    recipe.compute_dtype = "recipe"
    expected = load_file(GOLDEN / case / "merged.safetensors")
    half = getattr(torch, recipe.dtype)
    if recipe.merge_method in PROMOTED_TO_FLOAT32:
        rounded = merge_to_dict(recipe)  # the default out dtype: mergekit's float32 tensors rounded to the dtype
        assert all(torch.equal(rounded[n], want.to(half)) for n, want in expected.items())
        recipe.out_dtype = "float32"
    merged = merge_to_dict(recipe)
    assert sorted(merged) == sorted(expected)
    for name, want in expected.items():
        out = torch.float32 if recipe.merge_method in PROMOTED_TO_FLOAT32 else half
        assert merged[name].dtype == want.dtype == out, name
        assert torch.equal(merged[name], want), f"{case}: {name} differs in {int((merged[name] != want).sum())} entries"
    recipe.compute_dtype = "float32"  # the default is another model: the check above can fail
    assert any(not torch.equal(t, expected[n]) for n, t in merge_to_dict(recipe).items())


@pytest.mark.parametrize("case", HALF_CASES)
def test_default_float32_compute_is_nearer_the_float32_merge_than_mergekit(case):
    recipe = load_recipe(GOLDEN / case / "recipe.yaml")
    float32 = load_file(GOLDEN / case.rsplit("_", 1)[0] / "merged.safetensors")
    theirs = load_file(GOLDEN / case / "merged.safetensors")
    ours = merge_to_dict(recipe)
    ours_err = max((ours[n].float() - t).abs().max().item() for n, t in float32.items())
    theirs_err = max((theirs[n].float() - t).abs().max().item() for n, t in float32.items())
    largest = max(t.abs().max().item() for t in float32.values())
    # one rounding of the float32 merge: at most half a step at the largest value
    assert ours_err <= largest * HALF[recipe.dtype] / 2
    assert ours_err < theirs_err, f"{case}: ours {ours_err:.3g}, mergekit's {theirs_err:.3g}"


def test_compute_dtype_is_checked_and_stays_out_of_mergekit_yaml():
    data = yaml.safe_load((GOLDEN / "ties_bf16" / "recipe.yaml").read_text())
    folder = GOLDEN / "ties_bf16" / "recipe.yaml"
    with pytest.raises(RecipeError, match="compute_dtype: got 'half'; use float32"):
        parse_any({**data, "compute_dtype": "half"}, source_file=folder)
    with pytest.raises(RecipeError, match="compute_dtype: 'recipe' computes in the recipe's dtype: set dtype"):
        parse_any({k: v for k, v in {**data, "compute_dtype": "recipe"}.items() if k != "dtype"}, source_file=folder)
    recipe = parse_any({**data, "compute_dtype": "recipe"}, source_file=folder)
    assert "compute_dtype: recipe" in recipe.to_yaml()
    text, notes = to_mergekit(recipe)
    assert "compute_dtype" not in yaml.safe_load(text) and not notes
    _, notes = to_mergekit(parse_any(data, source_file=folder))
    assert notes and "compute_dtype: recipe gives mergekit's numbers" in notes[0]


@pytest.mark.parametrize("case", ["ties_bf16", "slerp_fp16"])
def test_the_search_materialises_compute_dtype_recipe_as_the_engine_does(case):
    from evomerge.merge.materialise import Materialiser

    recipe = load_recipe(GOLDEN / case / "recipe.yaml")
    recipe.compute_dtype = "recipe"
    expected = load_file(GOLDEN / case / "merged.safetensors")
    mat = Materialiser(dict(recipe.paths), anchor=recipe.base_model)
    for name, tensor in mat.iter_merged(recipe):
        assert torch.equal(tensor.to(expected[name].dtype), expected[name]), name
