"""The PS-then-DFS hybrid space: a parameter-space merge, then a layer path through it and the parents.

The genome is the PS genes (prefixed `ps.`) followed by the DFS genes (prefixed `dfs.`). Decoding builds the PS
recipe first and offers it to the path as one more source, named `merge`; so Sakana's hybrid (merge the
weights, then stack layers of the merge and the parents) is one genome, searched jointly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from evomerge.merge.dataflow import DataflowRecipe
from evomerge.spaces.dataflow import DataflowSpace
from evomerge.spaces.ps import ParameterSpace

MERGE = "merge"


@dataclass
class HybridSpace:
    ps: ParameterSpace
    dfs: DataflowSpace  # its sources include MERGE (sized as the base; replaced by the PS recipe at decode)
    split: int = field(init=False)

    def __post_init__(self) -> None:
        if MERGE not in self.dfs.sources:
            raise ValueError(f"the DFS part of a hybrid space needs a source named '{MERGE}'")
        self.split = self.ps.num_genes

    @property
    def gene_names(self) -> list[str]:
        return [f"ps.{n}" for n in self.ps.gene_names] + [f"dfs.{n}" for n in self.dfs.gene_names]

    @property
    def num_genes(self) -> int:
        return self.ps.num_genes + self.dfs.num_genes

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        (pl, pu), (dl, du) = self.ps.bounds, self.dfs.bounds
        return np.concatenate([pl, dl]), np.concatenate([pu, du])

    def decode(self, genome: np.ndarray, name: str | None = None) -> DataflowRecipe:
        g = np.asarray(genome, dtype=np.float64)
        if g.shape != (self.num_genes,):
            raise ValueError(f"genome has shape {g.shape}; this space has {self.num_genes} genes")
        merged = self.ps.decode(g[: self.split], name=f"{name} (PS part)" if name else None)
        path = self.dfs.decode(g[self.split:], name=name)
        return replace(path, sources={**path.sources, MERGE: merged})

    def seeds(self) -> list[tuple[str, np.ndarray]]:
        """Each PS seed followed by the path that is the merge itself (the merge's layers in order)."""
        ident = self.dfs.identity_genome(MERGE)
        return [(label, np.concatenate([g, ident])) for label, g in self.ps.seeds()]

    def describe(self) -> dict[str, Any]:
        encoding = {"segments": self.dfs.segments} if self.dfs.segments else {"repeats": self.dfs.repeats}
        return {"kind": "hybrid", "ps": self.ps.describe(),
                "dfs": {**encoding, "scales": self.dfs.scales, "num_genes": self.dfs.num_genes},
                "num_genes": self.num_genes}
