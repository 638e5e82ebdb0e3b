"""The data-flow search space: Sakana's encoding of a layer path as a real-valued genome.

All layers of all sources are laid out in one sequence (source by source, layer by layer) and that
sequence is repeated `repeats` times: T = repeats * (total layers) slots. Each slot has a `keep` gene; the
slot's layer joins the path, in sequence order, where its gene is positive. With `scales="transition"`
there is one `scale` gene per transition (previous layer -> next layer, the embeddings counting as a
previous layer): the scale of a hop is the gene of the transition into it, so a layer's input scale depends
on where it comes from, as in Sakana's scaling matrix W.

Decoding is deterministic and always gives a valid path: genes are clipped to their bounds; too many kept
slots drop the lowest genes, too few add the highest unkept ones (ties: the earlier slot), so the path
length stays within [min_layers, max_layers]; optional pinned hops put the embed source's first layer
first and the head source's last layer last. Parameter count and layer count are there as cost objectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import numpy as np

from evomerge.checkpoints import classify_tensor
from evomerge.checkpoints.arch import Architecture
from evomerge.merge.dataflow import DataflowRecipe, Hop
from evomerge.merge.fold import fold_factors
from evomerge.merge.recipe import Recipe
from evomerge.merge.sources import Source, as_source
from evomerge.spaces.ps import SpaceError

EMBED = "embed"


@dataclass(frozen=True)
class SourceSizes:
    """What the cost objectives need to know of a source, read from its headers."""

    num_layers: int
    layer_params: int  # parameters of one layer
    embed_params: int  # token (and position) embeddings and other model-level tensors
    final_norm_params: int
    head_params: int  # the output head matrix (vocab x hidden)
    tied: bool  # the head is the token embedding


def source_sizes(name: str, spec: Source | Path | Recipe) -> SourceSizes:
    reader = as_source(spec).open(name)
    arch = Architecture.from_config(reader.config, reader.names())
    counts = {"embed": 0, "final_norm": 0, "head": 0, "layer0": 0}
    for n, shape in reader.shapes.items():
        role = classify_tensor(n)
        size = int(np.prod(shape))
        if role.kind == "layer":
            counts["layer0"] += size if role.layer == 0 else 0
        elif role.kind in ("embed", "other"):
            counts["embed"] += size
        else:
            counts[role.kind] += size
    head = counts["head"] or int(arch.vocab_size or 0) * int(arch.hidden_size or 0)
    return SourceSizes(arch.num_layers, counts["layer0"], counts["embed"], counts["final_norm"], head, arch.tied_embeddings)


@dataclass
class DataflowSpace:
    """Genome <-> path. Build with `DataflowSpace.from_sources` (reads headers) or give `sizes` directly."""

    sources: dict[str, Source]  # source name -> model folder or PS merge, in sequence order
    sizes: dict[str, SourceSizes]
    repeats: int = 2  # r: how often the layer sequence repeats (a layer can appear up to r times)
    min_layers: int = 1
    max_layers: int | None = None  # default: no bound (every slot plus the pinned hops)
    pin_first: bool = False  # the path always starts with layer 0 of the embed source
    pin_last: bool = False  # and ends with the last layer of the head source
    embed: str | None = None  # default: the first source
    head: str | None = None  # default: the embed source
    scales: Literal["transition", "none"] = "transition"
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    slots: list[tuple[str, int]] = field(init=False, repr=False)
    units: list[str] = field(init=False, repr=False)

    @classmethod
    def from_sources(cls, sources: Mapping[str, Source | Path | Recipe], **options) -> "DataflowSpace":
        held = {n: as_source(s) for n, s in sources.items()}
        return cls(held, {n: source_sizes(n, s) for n, s in held.items()}, **options)

    def __post_init__(self) -> None:
        if len(self.sources) < 1 or set(self.sources) != set(self.sizes):
            raise SpaceError("sources: give at least one source, and the sizes of every source")
        self.embed = self.embed or next(iter(self.sources))
        self.head = self.head or self.embed
        for role, name in (("embed", self.embed), ("head", self.head)):
            if name not in self.sources:
                raise SpaceError(f"{role}: '{name}' is not one of the sources ({', '.join(self.sources)}); name one of them")
        if self.repeats < 1:
            raise SpaceError(f"repeats: must be >= 1 (how often each source's layers may appear), got {self.repeats}")
        lo, hi = self.scale_bounds
        if not 0 < lo <= hi:
            raise SpaceError(f"scale_bounds: must satisfy 0 < low <= high (scales must be positive), got {self.scale_bounds}")
        self.slots = [(n, i) for _ in range(self.repeats) for n in self.sources for i in range(self.sizes[n].num_layers)]
        self.units = [f"{n}.{i}" for n in self.sources for i in range(self.sizes[n].num_layers)]
        pins = int(self.pin_first) + int(self.pin_last)
        if self.max_layers is None:
            self.max_layers = len(self.slots) + pins
        if not 1 <= self.min_layers <= self.max_layers or self.max_layers < pins or self.min_layers > len(self.slots) + pins:
            raise SpaceError(f"min_layers, max_layers: path length bounds [{self.min_layers}, {self.max_layers}] are "
                             f"impossible with {len(self.slots)} slots and {pins} pinned hops; need "
                             f"1 <= min_layers <= max_layers, max_layers >= {pins}, min_layers <= {len(self.slots) + pins}")

    # ------------------------------------------------------------ genes

    @property
    def gene_names(self) -> list[str]:
        keep = [f"keep.r{k // len(self.units)}.{n}.{i}" for k, (n, i) in enumerate(self.slots)]
        if self.scales == "none":
            return keep
        return keep + [f"scale.{a}->{b}" for a in [EMBED, *self.units] for b in self.units]

    @property
    def num_genes(self) -> int:
        n = len(self.slots)
        return n if self.scales == "none" else n + (len(self.units) + 1) * len(self.units)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper): keep genes in [-1, 1], scale genes in `scale_bounds`."""
        n = len(self.slots)
        lower, upper = np.full(self.num_genes, -1.0), np.full(self.num_genes, 1.0)
        lower[n:], upper[n:] = self.scale_bounds
        return lower, upper

    def _scale_gene(self, prev: str, hop: Hop) -> int:
        row = 0 if prev == EMBED else 1 + self.units.index(prev)
        return len(self.slots) + row * len(self.units) + self.units.index(f"{hop.model}.{hop.layer}")

    def identity_genome(self, source: str | None = None) -> np.ndarray:
        """The genome whose path is `source`'s layers in order (default: the embed source), every scale 1 (clipped
        to the bounds): a natural starting point for the search. Its model is `source` itself when `source` is
        also the embed and head source."""
        source = source or self.embed
        lower, upper = self.bounds
        g = np.where(np.arange(self.num_genes) < len(self.slots), lower, np.clip(1.0, *self.scale_bounds))
        first_rep = len(self.units)
        for k, (n, _) in enumerate(self.slots[:first_rep]):
            if n == source:
                g[k] = upper[k]
        if self.pin_first and source == self.embed:  # the pinned hop already supplies this layer
            g[self.slots.index((source, 0))] = lower[0]
        if self.pin_last and source == self.head:
            g[self.slots.index((source, self.sizes[source].num_layers - 1))] = lower[0]
        return g

    # ------------------------------------------------------------ decoding

    def decode(self, genome: np.ndarray, name: str | None = None) -> DataflowRecipe:
        """The path a genome encodes: always valid, same genome -> same path."""
        g = np.asarray(genome, dtype=np.float64)
        if g.shape != (self.num_genes,):
            raise ValueError(f"genome has shape {g.shape}; this space has {self.num_genes} genes")
        g = np.clip(g, *self.bounds)
        assert self.embed is not None and self.head is not None and self.max_layers is not None
        pins = int(self.pin_first) + int(self.pin_last)
        lo, hi = max(self.min_layers - pins, 0), self.max_layers - pins
        keep = g[: len(self.slots)]
        order = sorted(range(len(self.slots)), key=lambda k: (-keep[k], k))  # best first, ties: earlier slot
        kept = {k for k in range(len(self.slots)) if keep[k] > 0}
        if len(kept) > hi:
            kept = set([k for k in order if k in kept][:hi])
        elif len(kept) < lo:
            kept |= set([k for k in order if k not in kept][: lo - len(kept)])
        layers = [self.slots[k] for k in sorted(kept)]
        if self.pin_first:
            layers.insert(0, (self.embed, 0))
        if self.pin_last:
            layers.append((self.head, self.sizes[self.head].num_layers - 1))
        hops: list[Hop] = []
        prev = EMBED
        for model, layer in layers:
            hop = Hop(model, layer)
            if self.scales == "transition":
                hop = Hop(model, layer, float(g[self._scale_gene(prev, hop)]))
            hops.append(hop)
            prev = f"{model}.{layer}"
        return DataflowRecipe(tuple(hops), dict(self.sources), self.embed, self.head, name=name)

    # ------------------------------------------------------------ costs

    def costs(self, recipe: DataflowRecipe) -> dict[str, int]:
        """Cost objectives of a decoded path: its layer count and the exported checkpoint's parameter count."""
        embed, head = self.sizes[recipe.embed], self.sizes[recipe.head]
        tied = recipe.embed == recipe.head and embed.tied and fold_factors(recipe.scales)[0] == 1.0  # as the export
        params = embed.embed_params + sum(self.sizes[h.model].layer_params for h in recipe.path)
        params += head.final_norm_params + (0 if tied else head.head_params)
        return {"num_layers": len(recipe.path), "num_params": int(params)}
