"""The data-flow search space: every genome decodes, deterministically, to a valid path within the bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.merge.dataflow import dataflow_to_dict, passthrough_config, plan_dataflow
from evomerge.merge.pathmodel import build_path_model, load_source_modules
from evomerge.spaces import DataflowSpace


@pytest.fixture(scope="module")
def space_sources(tiny_llamas):
    return {"A": tiny_llamas["a"], "B": tiny_llamas["b"]}


def test_genes_are_named_and_bounded(space_sources):
    space = DataflowSpace.from_sources(space_sources, repeats=2)
    lower, upper = space.bounds
    names = space.gene_names
    assert space.num_genes == len(names) == len(lower) == len(upper) == 2 * 6 + 7 * 6
    assert len(set(names)) == len(names)
    assert names[0] == "keep.r0.A.0" and names[6] == "keep.r1.A.0" and names[12] == "scale.embed->A.0"
    assert (lower < upper).all() and (lower[12:] > 0).all()
    assert DataflowSpace.from_sources(space_sources, scales="none").num_genes == 2 * 6


def test_identity_genome_reproduces_the_source(space_sources):
    space = DataflowSpace.from_sources(space_sources, repeats=3, embed="B")
    recipe = space.decode(space.identity_genome())
    assert [(h.model, h.layer, h.scale) for h in recipe.path] == [("B", 0, 1.0), ("B", 1, 1.0), ("B", 2, 1.0)]
    pinned = DataflowSpace.from_sources(space_sources, pin_first=True, pin_last=True)
    assert [(h.model, h.layer) for h in pinned.decode(pinned.identity_genome()).path] == [("A", 0), ("A", 1), ("A", 2)]
    from transformers import AutoModelForCausalLM

    ids = torch.arange(10)[None] % 48
    with torch.no_grad():
        got = build_path_model(recipe, load_source_modules(recipe))(ids).logits
        want = AutoModelForCausalLM.from_pretrained(space_sources["B"], dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("options", [
    {},
    {"repeats": 3, "min_layers": 4, "max_layers": 6},
    {"pin_first": True, "pin_last": True, "max_layers": 5, "embed": "A", "head": "B"},
    {"scales": "none", "min_layers": 2, "max_layers": 2},
])
def test_random_genomes_decode_to_valid_paths(space_sources, options):
    space = DataflowSpace.from_sources(space_sources, **options)
    lower, upper = space.bounds
    rng = np.random.default_rng(0)
    readers = plan_dataflow(space.decode(space.identity_genome())).readers  # headers opened once
    for _ in range(50):
        genome = rng.uniform(lower - 0.5, upper + 0.5)  # out-of-bounds genes are clipped, not refused
        recipe = space.decode(genome)
        assert recipe.path == space.decode(genome.copy()).path  # deterministic
        assert space.min_layers <= len(recipe.path) <= space.max_layers
        assert all(space.scale_bounds[0] <= h.scale <= space.scale_bounds[1] for h in recipe.path) or space.scales == "none"
        if space.pin_first:
            assert (recipe.path[0].model, recipe.path[0].layer) == (space.embed, 0)
        if space.pin_last:
            assert (recipe.path[-1].model, recipe.path[-1].layer) == (space.head, 2)
        plan_dataflow(recipe, readers)  # a valid model: raises if not
        if space.scales == "none":
            assert passthrough_config(recipe) is not None or recipe.embed != recipe.path[0].model or recipe.head != recipe.path[-1].model


def test_length_bounds_keep_the_strongest_genes(space_sources):
    space = DataflowSpace.from_sources(space_sources, repeats=1, min_layers=2, max_layers=3, scales="none")
    keep_all = np.linspace(0.1, 0.6, 6)  # all six positive: the three largest (B.0, B.1, B.2) stay
    assert [(h.model, h.layer) for h in space.decode(keep_all).path] == [("B", 0), ("B", 1), ("B", 2)]
    keep_none = np.array([-0.9, -0.1, -0.5, -0.2, -0.8, -0.7])  # none positive: the two highest join, in order
    assert [(h.model, h.layer) for h in space.decode(keep_none).path] == [("A", 1), ("B", 0)]


def test_scale_belongs_to_the_transition(space_sources):
    space = DataflowSpace.from_sources(space_sources, repeats=2)
    g = space.identity_genome("A")
    names = space.gene_names
    g[names.index("keep.r1.A.1")] = 1.0  # path A.0 A.1 A.2 A.1
    g[names.index("scale.A.2->A.1")] = 0.6
    g[names.index("scale.A.0->A.1")] = 1.3
    assert [(h.layer, h.scale) for h in space.decode(g).path] == [(0, 1.0), (1, 1.3), (2, 1.0), (1, 0.6)]


def test_costs_count_the_exported_checkpoint(space_sources):
    space = DataflowSpace.from_sources(space_sources, repeats=2)
    rng = np.random.default_rng(1)
    lower, upper = space.bounds
    for _ in range(3):
        recipe = space.decode(rng.uniform(lower, upper))
        costs = space.costs(recipe)
        exported = dataflow_to_dict(recipe)
        assert costs["num_layers"] == len(recipe.path)
        assert costs["num_params"] == sum(t.numel() for t in exported.values())


def test_impossible_bounds_are_refused(space_sources):
    with pytest.raises(ValueError, match="scales must be positive"):
        DataflowSpace.from_sources(space_sources, scale_bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="impossible"):
        DataflowSpace.from_sources(space_sources, min_layers=5, max_layers=3)
