"""The data-flow search space: Sakana's encoding of a layer path as a real-valued genome.

All layers of all sources are laid out in one sequence (source by source, layer by layer) and that
sequence is repeated `repeats` times: T = repeats * (total layers) slots. Each slot has a `keep` gene; the
slot's layer joins the path, in sequence order, where its gene is positive. Scales (the factor on the
residual stream entering a hop) come in three granularities:
- `slot` (the default): one `scale` gene per slot: the scale goes with that copy of the layer (slot r, source,
  layer) wherever it lands in the path, whatever precedes it; the gene count grows linearly with the layers (2 x T
  genes in all). With `segments`, `slot` means one scale per segment, on the hop that enters it.
- `transition`: one gene per (previous layer -> next layer) pair, the embeddings counting as a previous
  layer, as Sakana's scaling matrix W: it grows with the square of the total layers (T + (N+1) x N genes, N
  the total layers), which no search budget covers past a few small models; only where asked.
- `none`: every scale 1 (paths export as mergekit passthrough configs).
Pinned hops (below) have no slot: with `slot` scales they get one gene each (`scale.first`, `scale.last`).

`segments: N` encodes a path instead as N segments, each a run of consecutive layers of one source (genes:
source, start, length, and with `slot` scales the scale of the hop into the segment): 4N genes whatever the
layer counts. A path is then a few long runs (the reader's first layers, then the solver's whole stack), as
paths that work tend to be, and a mutation that lengthens a run by one layer is one small gene move, where the
keep encoding needs several indicators to flip together. A segment of length 0 is off; `repeats` does not apply
(a layer may appear in several segments). A path shorter than `min_layers` grows each segment, in order, towards
its source's last layer (a segment that was off is switched on at its start gene), then repeats the first
segment's source from layer 0; a path longer than `max_layers` loses its last hops.

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
SCALES = ("slot", "transition", "none")  # scale-gene granularity, see the module docstring


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
    scales: Literal["slot", "transition", "none"] = "slot"
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    segments: int = 0  # 0: a keep gene per slot (Sakana's encoding); N > 0: N segments (see the module docstring)
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
        if self.scales not in SCALES:
            from evomerge.config import suggest

            raise SpaceError(f"scales: must be one of {', '.join(SCALES)}, got {self.scales!r}."
                             + suggest(str(self.scales), SCALES, list_known=False))
        lo, hi = self.scale_bounds
        if not 0 < lo <= hi:
            raise SpaceError(f"scale_bounds: must satisfy 0 < low <= high (scales must be positive), got {self.scale_bounds}")
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 0:
            raise SpaceError(f"segments: expected a whole number >= 0 (0: a keep gene per layer slot; N: N runs of "
                             f"layers), got {self.segments!r}")
        if self.segments and self.scales == "transition":
            raise SpaceError("scales: 'transition' needs the keep-gene encoding; with segments use slot or none")
        self.slots = [(n, i) for _ in range(self.repeats) for n in self.sources for i in range(self.sizes[n].num_layers)]
        self.units = [f"{n}.{i}" for n in self.sources for i in range(self.sizes[n].num_layers)]
        pins = int(self.pin_first) + int(self.pin_last)
        room = len(self.slots) if not self.segments else self.segments * max(z.num_layers for z in self.sizes.values())
        if self.max_layers is None:
            self.max_layers = room + pins
        if not 1 <= self.min_layers <= self.max_layers or self.max_layers < pins or self.min_layers > room + pins:
            raise SpaceError(f"min_layers, max_layers: path length bounds [{self.min_layers}, {self.max_layers}] are "
                             f"impossible with {room} {'slots' if not self.segments else 'segment layers'} and {pins} "
                             f"pinned hops; need 1 <= min_layers <= max_layers, max_layers >= {pins}, "
                             f"min_layers <= {room + pins}")

    # ------------------------------------------------------------ genes

    @property
    def _pins(self) -> list[str]:
        return [p for p, on in (("first", self.pin_first), ("last", self.pin_last)) if on]

    @property
    def _per_segment(self) -> int:
        """Genes per segment: source, start, length, and with `slot` scales the scale of the hop into it."""
        return 4 if self.scales == "slot" else 3

    def _pin_scale(self, g: np.ndarray, pin: str) -> float:
        """A pinned hop's `slot` scale: in both encodings the pins' genes are the last ones."""
        return float(g[self.num_genes - len(self._pins) + self._pins.index(pin)])

    @property
    def gene_names(self) -> list[str]:
        if self.segments:
            per = ["source", "start", "length"] + (["scale"] if self.scales == "slot" else [])
            pins = [f"scale.{p}" for p in self._pins] if self.scales == "slot" else []
            return [f"seg{j}.{g}" for j in range(self.segments) for g in per] + pins
        keep = [f"keep.r{k // len(self.units)}.{n}.{i}" for k, (n, i) in enumerate(self.slots)]
        if self.scales == "none":
            return keep
        if self.scales == "slot":
            return keep + ["scale." + k[len("keep."):] for k in keep] + [f"scale.{p}" for p in self._pins]
        return keep + [f"scale.{a}->{b}" for a in [EMBED, *self.units] for b in self.units]

    @property
    def num_genes(self) -> int:
        pins = len(self._pins) if self.scales == "slot" else 0
        if self.segments:
            return self.segments * self._per_segment + pins
        n = len(self.slots)
        if self.scales == "slot":
            return 2 * n + pins
        return n if self.scales == "none" else n + (len(self.units) + 1) * len(self.units)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper): keep genes in [-1, 1], scale genes in `scale_bounds`."""
        if self.segments:
            scale = self._segment_scale_mask()
            lower, upper = np.zeros(len(scale)), np.ones(len(scale))
            lower[scale], upper[scale] = self.scale_bounds
            return lower, upper
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
        if self.segments:
            return self._segment_identity(source)
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
        if self.segments:
            return self._decode_segments(g, name)
        pins = int(self.pin_first) + int(self.pin_last)
        lo, hi = max(self.min_layers - pins, 0), self.max_layers - pins
        keep = g[: len(self.slots)]
        order = sorted(range(len(self.slots)), key=lambda k: (-keep[k], k))  # best first, ties: earlier slot
        kept = {k for k in range(len(self.slots)) if keep[k] > 0}
        if len(kept) > hi:
            kept = set([k for k in order if k in kept][:hi])
        elif len(kept) < lo:
            kept |= set([k for k in order if k not in kept][: lo - len(kept)])
        # (layer, its slot or a pin name): the slot says where a `slot` scale gene sits
        placed: list[tuple[tuple[str, int], int | str]] = [(self.slots[k], k) for k in sorted(kept)]
        if self.pin_first:
            placed.insert(0, ((self.embed, 0), "first"))
        if self.pin_last:
            placed.append(((self.head, self.sizes[self.head].num_layers - 1), "last"))
        hops: list[Hop] = []
        prev = EMBED
        for (model, layer), where in placed:
            hop = Hop(model, layer)
            if self.scales == "transition":
                hop = Hop(model, layer, float(g[self._scale_gene(prev, hop)]))
            elif self.scales == "slot":
                scale = float(g[len(self.slots) + where]) if isinstance(where, int) else self._pin_scale(g, where)
                hop = Hop(model, layer, scale)
            hops.append(hop)
            prev = f"{model}.{layer}"
        return DataflowRecipe(tuple(hops), dict(self.sources), self.embed, self.head, name=name)

    # ------------------------------------------------------------ segments

    def _segment_scale_mask(self) -> np.ndarray:
        mask = np.zeros(self.num_genes, dtype=bool)
        if self.scales == "slot":  # each segment's 4th gene, then the pins'
            mask[np.arange(self.segments) * 4 + 3] = True
            mask[self.segments * 4:] = True
        return mask

    def _segment_layers(self, g: np.ndarray, j: int) -> tuple[str, list[int]]:
        """Segment j's source and layer indices: the source is the gene's share of the source list, the start a
        share of that source's layers, the length a share of (its layers + 1), cut at the source's last layer."""
        per = self._per_segment
        src_g, start_g, len_g = g[j * per: j * per + 3]
        names = list(self.sources)
        source = names[min(int(src_g * len(names)), len(names) - 1)]
        n = self.sizes[source].num_layers
        start = min(int(start_g * n), n - 1)
        length = min(int(len_g * (n + 1)), n - start)
        return source, list(range(start, start + length))

    def _decode_segments(self, g: np.ndarray, name: str | None) -> DataflowRecipe:
        assert self.embed is not None and self.head is not None and self.max_layers is not None
        pins = int(self.pin_first) + int(self.pin_last)
        lo, hi = max(self.min_layers - pins, 0), self.max_layers - pins
        per = self._per_segment
        runs = [self._segment_layers(g, j) for j in range(self.segments)]
        short = lo - sum(len(layers) for _, layers in runs)
        for j, (source, layers) in enumerate(runs):  # too short: segments grow towards their source's end, in order
            n = self.sizes[source].num_layers
            start = layers[-1] + 1 if layers else min(int(g[j * per + 1] * n), n - 1)
            grow = list(range(start, n))[: max(short, 0)]
            layers += grow
            short -= len(grow)
        if short > 0:  # every segment reaches its source's end: the first one's source repeats from layer 0
            n0 = self.sizes[runs[0][0]].num_layers
            runs[0][1].extend(i % n0 for i in range(short))
        placed: list[tuple[str, int, float]] = []
        for j, (source, layers) in enumerate(runs):
            scale = float(g[j * per + 3]) if self.scales == "slot" else 1.0
            placed += [(source, i, scale if k == 0 else 1.0) for k, i in enumerate(layers)]
        placed = placed[:hi]  # too long: the last segments are cut
        hops = [Hop(m, i, sc) for m, i, sc in placed]
        slot = self.scales == "slot"
        if self.pin_first:
            hops.insert(0, Hop(self.embed, 0, self._pin_scale(g, "first") if slot else 1.0))
        if self.pin_last:
            hops.append(Hop(self.head, self.sizes[self.head].num_layers - 1, self._pin_scale(g, "last") if slot else 1.0))
        return DataflowRecipe(tuple(hops), dict(self.sources), self.embed, self.head, name=name)

    def _segment_identity(self, source: str) -> np.ndarray:
        """`source`'s own layers in order as the LAST segment, the earlier ones empty (length 0), every scale 1: a
        search that starts there grows a run in front of it with a single gene (the length of the segment before)."""
        g = np.where(self._segment_scale_mask(), np.clip(1.0, *self.scale_bounds), 0.0)  # scale genes 1, others 0
        per = self._per_segment
        names, n = list(self.sources), self.sizes[source].num_layers
        j = self.segments - 1
        first = 1 if self.pin_first and source == self.embed else 0
        last = n - 1 if self.pin_last and source == self.head else n
        g[j * per] = (names.index(source) + 0.5) / len(names)
        g[j * per + 1] = (first + 0.5) / n
        g[j * per + 2] = min((last - first + 0.5) / (n + 1), 1.0)
        return g

    # ------------------------------------------------------------ costs

    def costs(self, recipe: DataflowRecipe) -> dict[str, int]:
        """Cost objectives of a decoded path: its layer count and the exported checkpoint's parameter count."""
        embed, head = self.sizes[recipe.embed], self.sizes[recipe.head]
        tied = recipe.embed == recipe.head and embed.tied and fold_factors(recipe.scales)[0] == 1.0  # as the export
        params = embed.embed_params + sum(self.sizes[h.model].layer_params for h in recipe.path)
        params += head.final_norm_params + (0 if tied else head.head_params)
        return {"num_layers": len(recipe.path), "num_params": int(params)}
