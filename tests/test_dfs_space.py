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


@pytest.mark.parametrize("scales, count, first_scale", [
    ("slot", 2 * 12, "scale.r0.A.0"),  # the default: one scale per slot
    ("transition", 2 * 6 + 7 * 6, "scale.embed->A.0"),  # Sakana's W: (layers + 1) x layers
    ("none", 2 * 6, None),
])
def test_genes_are_named_and_bounded(space_sources, scales, count, first_scale):
    space = DataflowSpace.from_sources(space_sources, repeats=2, scales=scales)
    lower, upper = space.bounds
    names = space.gene_names
    assert space.num_genes == len(names) == len(lower) == len(upper) == count
    assert len(set(names)) == len(names)
    assert names[0] == "keep.r0.A.0" and names[6] == "keep.r1.A.0"
    assert first_scale is None or names[12] == first_scale
    assert (lower < upper).all() and (lower[12:] > 0).all()
    assert DataflowSpace.from_sources(space_sources, repeats=2).scales == "slot"


def test_gene_counts_grow_linearly_unless_asked():
    """Two 8-layer and two 32-layer models, each layer allowed twice: the default's genes grow with the layers,
    Sakana's transition matrix with their square (the README's table)."""
    from evomerge.spaces.dataflow import SourceSizes

    def count(layers: int, scales: str, pins: bool = False) -> int:
        sizes = {n: SourceSizes(layers, 1, 1, 1, 1, False) for n in ("A", "B")}
        return DataflowSpace({"A": "a", "B": "b"}, sizes, repeats=2, scales=scales, pin_first=pins, pin_last=pins).num_genes

    assert [count(8, "slot"), count(8, "transition"), count(8, "none")] == [64, 32 + 17 * 16, 32]
    assert [count(32, "slot"), count(32, "transition"), count(32, "none")] == [256, 128 + 65 * 64, 128]
    assert count(8, "slot", pins=True) == 66  # one more scale per pinned hop


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
    {"segments": 3, "min_layers": 2, "max_layers": 7},
    {"segments": 2, "scales": "none", "pin_first": True, "pin_last": True, "min_layers": 5, "embed": "B"},
    {"segments": 2, "min_layers": 5},  # late starts leave runs short: they grow, then the first source repeats
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
    space = DataflowSpace.from_sources(space_sources, repeats=2, scales="transition")
    g = space.identity_genome("A")
    names = space.gene_names
    g[names.index("keep.r1.A.1")] = 1.0  # path A.0 A.1 A.2 A.1
    g[names.index("scale.A.2->A.1")] = 0.6
    g[names.index("scale.A.0->A.1")] = 1.3
    assert [(h.layer, h.scale) for h in space.decode(g).path] == [(0, 1.0), (1, 1.3), (2, 1.0), (1, 0.6)]


def test_scale_belongs_to_the_slot(space_sources):
    space = DataflowSpace.from_sources(space_sources, repeats=2, pin_first=True, pin_last=True, max_layers=6)
    g = space.identity_genome("A")
    names = space.gene_names
    g[names.index("keep.r1.A.1")] = 1.0  # path A.0 (pinned) A.1 A.1 A.2 (pinned)
    g[names.index("scale.r0.A.1")] = 0.7
    g[names.index("scale.r1.A.1")] = 1.2
    g[names.index("scale.first")] = 0.9
    g[names.index("scale.last")] = 1.4
    assert [(h.layer, h.scale) for h in space.decode(g).path] == [(0, 0.9), (1, 0.7), (1, 1.2), (2, 1.4)]


def test_segments_are_runs_of_layers(space_sources):
    space = DataflowSpace.from_sources(space_sources, segments=3, head="B")
    names = space.gene_names
    assert space.num_genes == 12 and names[:4] == ["seg0.source", "seg0.start", "seg0.length", "seg0.scale"]
    g = space.identity_genome("B")  # B's layers as the last segment, the others empty
    assert [(h.model, h.layer, h.scale) for h in space.decode(g).path] == [("B", 0, 1.0), ("B", 1, 1.0), ("B", 2, 1.0)]
    g[names.index("seg1.source")] = 0.2  # A (first of two sources)
    g[names.index("seg1.start")] = 0.0
    g[names.index("seg1.length")] = 0.5  # int(0.5 * (3 + 1)) = 2 layers
    g[names.index("seg1.scale")] = 0.8  # the hop into the segment
    assert [(h.model, h.layer, h.scale) for h in space.decode(g).path] == [
        ("A", 0, 0.8), ("A", 1, 1.0), ("B", 0, 1.0), ("B", 1, 1.0), ("B", 2, 1.0)]
    g[names.index("seg1.start")] = 0.9  # a run is cut at its source's last layer
    assert [(h.model, h.layer) for h in space.decode(g).path][:2] == [("A", 2), ("B", 0)]
    # the gene count does not grow with the layers
    from evomerge.spaces.dataflow import SourceSizes

    for layers in (8, 32):
        sizes = {n: SourceSizes(layers, 1, 1, 1, 1, False) for n in ("A", "B")}
        assert DataflowSpace({"A": "a", "B": "b"}, sizes, segments=3).num_genes == 12
    with pytest.raises(ValueError, match="transition"):
        DataflowSpace.from_sources(space_sources, segments=2, scales="transition")


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


def test_segment_paths_grow_repeat_and_cut_exactly():
    """The length rules of the segment encoding, on sources of 3 (A) and 4 (B) layers, checked hop by hop."""
    from evomerge.spaces.dataflow import SourceSizes

    sizes = {"A": SourceSizes(3, 1, 1, 1, 1, False), "B": SourceSizes(4, 1, 1, 1, 1, False)}

    def path(genes, **options):
        space = DataflowSpace({"A": "a", "B": "b"}, sizes, scales="none", **options)
        return [f"{h.model}{h.layer}" for h in space.decode(np.array(genes, dtype=float)).path]

    # runs [A2], [B3] and an empty one, min 6: A and B are at their ends, the empty run starts at its start gene
    # (B3), then the first run's source repeats from layer 0
    assert path([0, .99, .3, .9, .99, .3, .9, .99, 0], segments=3, min_layers=6) == ["A2", "A0", "A1", "A2", "B3", "B3"]
    # runs [A0 A1 A2] and [B0 B1 B2 B3], max 4: the last hops are cut
    assert path([0, 0, 1, .9, 0, 1], segments=2, min_layers=2, max_layers=4) == ["A0", "A1", "A2", "B0"]
    # a short run grows towards its source's end before anything repeats
    assert path([0, 0, .3, .9, .5, .2], segments=2, min_layers=5) == ["A0", "A1", "A2", "B2", "B3"]
    with pytest.raises(ValueError, match="segments: expected a whole number >= 0"):
        DataflowSpace({"A": "a", "B": "b"}, sizes, segments=2.5)
    with pytest.raises(ValueError, match="Did you mean 'slot'"):
        DataflowSpace({"A": "a", "B": "b"}, sizes, scales="slots")


def test_segment_identity_with_pins_and_scales(space_sources):
    space = DataflowSpace.from_sources(space_sources, segments=2, pin_first=True, pin_last=True)
    names = space.gene_names
    assert names[-2:] == ["scale.first", "scale.last"] and space.num_genes == 2 * 4 + 2
    g = space.identity_genome("A")
    assert [(h.model, h.layer, h.scale) for h in space.decode(g).path] == [("A", 0, 1.0), ("A", 1, 1.0), ("A", 2, 1.0)]
    g[names.index("scale.first")], g[names.index("seg1.scale")], g[names.index("scale.last")] = 0.7, 1.2, 1.4
    assert [h.scale for h in space.decode(g).path] == [0.7, 1.2, 1.4]  # first (pinned), A1 enters seg1, last (pinned)
