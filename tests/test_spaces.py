"""Search spaces: every genome decodes to a valid recipe, deterministically; seeds decode to the parents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.merge.dataflow import DataflowRecipe, parse_dataflow, plan_dataflow
from evomerge.merge.plan import plan_merge
from evomerge.merge.recipe import parse_recipe
from evomerge.spaces.presets import build_space, load_space_config, preset_names
from evomerge.spaces.ps import ParameterSpace, SpaceError

GOLDEN = Path(__file__).resolve().parent / "golden" / "models"
MODELS = {"base": GOLDEN / "base", "a": GOLDEN / "a", "b": GOLDEN / "b"}
SPACES = {name: build_space(load_space_config(name), MODELS, "base") for name in ("sakana_ps", "layerwise_ps", "dfs", "ps_then_dfs")}


def test_presets_are_package_data():
    """Read from inside the package, where pyproject's package-data puts them in a wheel (tests/test_package.py
    builds and installs one), not from the checkout's root."""
    import fnmatch
    import tomllib

    import evomerge
    from evomerge.spaces.presets import PRESET_DIR

    assert PRESET_DIR == Path(evomerge.__file__).parent / "examples" / "search_spaces"
    names = preset_names()
    assert {"sakana_ps", "layerwise_ps", "dfs", "ps_then_dfs"} <= set(names)
    patterns = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["evomerge"]
    assert all(any(fnmatch.fnmatch(f"examples/search_spaces/{n}.yaml", p) for p in patterns) for n in names)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_genes_are_named_and_bounded(name):
    space = SPACES[name]
    lower, upper = space.bounds
    assert len(space.gene_names) == len(set(space.gene_names)) == space.num_genes == len(lower) == len(upper)
    assert np.all(lower <= upper)


def _check_valid(recipe) -> None:
    """Valid = it re-parses from its own YAML and plans against the models' headers (every check a merge runs)."""
    data = yaml.safe_load(recipe.to_yaml())
    if isinstance(recipe, DataflowRecipe):
        plan_dataflow(recipe)
        parse_dataflow(data, check_paths=False)
    else:
        plan_merge(recipe)
        parse_recipe(data, check_paths=True)


genome_values = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False)


@pytest.mark.parametrize("name", sorted(SPACES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_genome_decodes_to_a_valid_recipe_deterministically(name, data):
    space = SPACES[name]
    genome = np.array(data.draw(st.lists(genome_values, min_size=space.num_genes, max_size=space.num_genes)))
    first = space.decode(genome)
    _check_valid(first)
    assert space.decode(genome.copy()).to_yaml() == first.to_yaml()


@pytest.mark.parametrize("name", sorted(SPACES))
def test_bound_corners_and_nan_decode(name):
    space = SPACES[name]
    lower, upper = space.bounds
    for genome in (lower, upper, (lower + upper) / 2, np.full(space.num_genes, np.nan)):
        if name in ("dfs", "ps_then_dfs") and np.isnan(genome).any():
            continue  # the DFS space clips; NaN genomes never come from a driver (they work in [0, 1])
        _check_valid(space.decode(genome))


def test_sakana_seeds_are_the_parents_and_the_average():
    space = SPACES["sakana_ps"]
    seeds = dict(space.seeds())
    assert set(seeds) == {"parent:base", "parent:a", "parent:b", "average"}
    a = space.decode(seeds["parent:a"])
    params = {Path(s.model).name: dict(s.parameters) for s in a.models}
    assert params == {"a": {"weight": 1.0, "density": 1.0}, "b": {"weight": 0.0, "density": 1.0}}
    avg = space.decode(seeds["average"])
    assert {s.parameters["weight"] for s in avg.models} == {0.5}


def test_layerwise_space_uses_slices_filters_and_a_method_gene():
    space = SPACES["layerwise_ps"]
    assert space.gene_names[0] == "method" and "weight.g1.mlp.b" in space.gene_names
    lower, upper = space.bounds
    seen = set()
    for m in np.linspace(0, 1, 9):
        genome = (lower + upper) / 2
        genome[0] = m
        recipe = space.decode(genome)
        seen.add(recipe.merge_method)
        assert [sl.sources[0].layer_range for sl in recipe.slices] == [(0, 2), (2, 4)]
        weight = recipe.slices[0].sources[1].parameters["weight"]
        assert [e.get("filter") for e in weight] == ["self_attn", "mlp", None]
    assert seen == {"ties", "dare_ties", "task_arithmetic", "della"}


def test_random_methods_get_a_fixed_seed():
    space = ParameterSpace(MODELS, "base", methods=["dare_ties"], seed=7)
    genome = (space.bounds[0] + space.bounds[1]) / 2
    assert space.decode(genome).seed == 7


def test_hybrid_offers_the_merge_as_a_layer_source():
    space = SPACES["ps_then_dfs"]
    label, genome = space.seeds()[-1]
    recipe = space.decode(genome)
    assert label == "average" and "merge" in recipe.sources and recipe.embed == "merge"
    assert [h.model for h in recipe.path] == ["merge"] * 4


@pytest.mark.parametrize("cfg, match", [
    ({"kind": "ps", "method": "slerp"}, "cannot be searched"),
    ({"kind": "ps", "methd": "ties"}, "Did you mean 'method'"),
    ({"kind": "ps", "layer_groups": 9}, "layer_groups"),
    ({"kind": "ps", "density_bounds": [0.5, 2]}, "density_bounds"),
    ({"kind": "dfs", "sources": ["nope"]}, "not models of the job"),
    ({"kind": "dfs", "repeats": 0}, "repeats"),
    ({"kind": "tree"}, "ps, dfs or hybrid"),
])
def test_bad_space_configs_say_which_field(cfg, match):
    with pytest.raises(SpaceError, match=match):
        build_space(cfg, MODELS, "base")


def test_the_old_bounds_keys_still_work_with_a_warning():
    from evomerge.config import EvomergeDeprecationWarning

    new = build_space({"kind": "ps", "weight_bounds": [0.2, 0.8], "density_bounds": [0.3, 0.9]}, MODELS, "base")
    with pytest.warns(EvomergeDeprecationWarning, match=r"(weight|density): renamed to '(weight|density)_bounds'"):
        old = build_space({"kind": "ps", "weight": [0.2, 0.8], "density": [0.3, 0.9]}, MODELS, "base")
    assert (old.weight_bounds, old.density_bounds) == (new.weight_bounds, new.density_bounds) == ((0.2, 0.8), (0.3, 0.9))
    with pytest.raises(SpaceError, match="both are given"):
        build_space({"kind": "ps", "weight": [0.2, 0.8], "weight_bounds": [0.2, 0.8]}, MODELS, "base")


NEW_METHODS = ["multislerp", "karcher", "sce", "ram", "ramplus_tl"]


def test_every_method_with_enough_values_is_a_choice_of_the_method_gene():
    """The methods mergekit 0.1.5 added decode from the method gene into recipes that merge; those without a
    weight or density ignore those genes (the same recipe whatever they say)."""
    from evomerge.merge.engine import merge_to_dict

    space = ParameterSpace(MODELS, "base", methods=["ties", *NEW_METHODS], layer_groups=2, modules=["self_attn", "*"])
    lower, upper = space.bounds
    for i, method in enumerate(space.methods):
        g = np.random.default_rng(i).uniform(lower, upper)
        g[0] = (i + 0.5) / len(space.methods)
        recipe = space.decode(g)
        assert recipe.merge_method == method
        weights = {k for sl in recipe.slices for s in sl.sources for k in s.parameters}
        assert weights == ({"weight"} if method == "multislerp" else {"weight", "density"} if method == "ties" else set())
        if not weights:  # every other genome with this method gene is the same recipe
            assert space.decode(np.where(np.arange(len(g)) == 0, g, lower)).to_yaml() == recipe.to_yaml()
        merged = merge_to_dict(recipe)
        assert len(merged) == 39 and all(torch.isfinite(t).all() for t in merged.values())
    # karcher averages the base in: the base is a source of every slice
    karcher = space.decode(space.genome({}, 1.0, "karcher"))
    assert karcher.base_model == str(MODELS["base"]) and all(sl.sources[0].model == karcher.base_model for sl in karcher.slices)
    # one-model methods with the t a space fixes
    one = ParameterSpace({"base": MODELS["base"], "a": MODELS["a"]}, "base", methods=["ties", "nearswap", "arcee_fusion"],
                         parameters={"t": 0.05})
    for method in one.methods:
        recipe = one.decode(one.genome({"a": 0.5}, 0.5, method))
        assert recipe.merge_method == method and recipe.parameters == ({"t": 0.05} if method == "nearswap" else {})
        plan_merge(recipe)


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ["karcher", "sce"]}, "no weight or density to search"),
    ({"methods": ["ties", "nearswap"]}, "nearswap' cannot be searched here without t"),
    ({"methods": ["ties", "nearswap"], "parameters": {"t": 0.1}}, "exactly 1 model.*the space has 2 \\(a, b\\)"),
    ({"methods": ["ties", "arcee_fusion"]}, "exactly 1 model"),
    ({"methods": ["ties", "karcher2"]}, "no such method"),
])
def test_methods_a_space_cannot_decode_are_refused(kwargs, match):
    with pytest.raises(SpaceError, match=match):
        ParameterSpace(MODELS, "base", **kwargs)


def test_genome_shaping_defaults_are_written_into_the_stored_space():
    """A job's stored space names its scale granularity even when the job file does not, so a later change of the
    default cannot silently re-read a stored genome (the dfs default moved from transition to slot)."""
    from evomerge.spaces.presets import pin_defaults

    assert pin_defaults({"kind": "dfs", "repeats": 1}) == {"kind": "dfs", "repeats": 1, "scales": "slot"}
    assert pin_defaults({"kind": "dfs", "scales": "transition"})["scales"] == "transition"
    assert pin_defaults({"kind": "hybrid", "ps": {}, "dfs": {"repeats": 1}})["dfs"] == {"repeats": 1, "scales": "slot"}
    assert pin_defaults({"kind": "hybrid", "ps": {}})["dfs"] == {"scales": "slot"}
    assert pin_defaults({"kind": "ps", "method": "ties"}) == {"kind": "ps", "method": "ties",
                                                               "parameters": {"stable_ties": True}}
    assert pin_defaults({"kind": "ps", "method": "linear"}) == {"kind": "ps", "method": "linear"}
    assert pin_defaults({"kind": "ps", "method": ["linear", "breadcrumbs"], "parameters": {"stable_ties": False}}
                        )["parameters"] == {"stable_ties": False}
    assert pin_defaults({"kind": "hybrid", "ps": {}})["ps"] == {"parameters": {"stable_ties": True}}  # ties: the default
    assert pin_defaults({"kind": "ps"}, stable_ties=None) == {"kind": "ps"}  # a stored spec: merged as it was


def test_a_stored_ties_spec_keeps_mergekits_tie_order(tmp_path):
    """A job file gets stable ties pinned; a stored spec without them (searched in mergekit's order) reads back
    without them, so its resumed merges and recipe text stay as they were."""
    from evomerge.search.spec import JobSpec, parse_job

    from helpers import GOLDEN as golden

    job = {"name": "j", "models": {"base": str(golden / "base"), "sources": {"a": str(golden / "a")}},
           "search_space": {"kind": "ps", "method": "ties"}, "objectives": {"objectives": [{"builtin": "params"}]},
           "driver": {"budget": {"evaluations": 8}}, "store": str(tmp_path / "s.sqlite")}
    fresh = parse_job(job, check_paths=False)
    assert fresh.search_space["parameters"] == {"stable_ties": True}
    stored = JobSpec.from_dict({**fresh.to_dict(), "search_space": {"kind": "ps", "method": "ties"}})
    assert "parameters" not in stored.search_space
    assert JobSpec.from_dict(fresh.to_dict()).search_space["parameters"] == {"stable_ties": True}


def test_a_stored_spec_without_scales_is_read_with_the_default_it_was_written_under(tmp_path):
    """Specs stored before `scales` was pinned decode with the old default (transition): an old store resumes
    with the genome length it was written with; a fresh job file gets today's default (slot)."""
    from evomerge.search.spec import JobSpec, parse_job

    from helpers import GOLDEN as golden

    job = {"name": "j", "models": {"base": str(golden / "base"), "sources": {"a": str(golden / "a")}},
           "search_space": {"kind": "dfs", "repeats": 1}, "objectives": {"objectives": [{"builtin": "params"}]},
           "driver": {"budget": {"evaluations": 8}}, "store": str(tmp_path / "s.sqlite")}
    fresh = parse_job(job, check_paths=False)
    assert fresh.search_space["scales"] == "slot"
    assert JobSpec.from_dict(fresh.to_dict()).search_space["scales"] == "slot"  # stored after pinning: kept
    old = {**fresh.to_dict(), "search_space": {"kind": "dfs", "repeats": 1}}  # what an older evomerge stored
    assert JobSpec.from_dict(old).search_space["scales"] == "transition"
