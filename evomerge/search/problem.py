"""The optimisation problem as a driver sees it, as pymoo's `Problem` does: the space's genome mapped onto the unit
cube every driver works in, and objective values turned into losses (every objective minimised)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from evomerge.fitness.objectives import ObjectiveSet
    from evomerge.spaces.presets import Space


def recipe_text(recipe: Any) -> str:
    return recipe.to_yaml()


def recipe_hash(text: str) -> str:
    """A recipe's identity in the store: candidates of equal hash are one merge, evaluated once."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


FAIL_LOSS = 1e300  # what a failed candidate is told while no real loss has been seen: worse than any, still finite


class Problem:
    """Genome <-> unit cube for one space, and losses for one objective set."""

    def __init__(self, space: "Space", objectives: "ObjectiveSet"):
        self.space, self.objectives = space, objectives
        self.lower, self.upper = (np.asarray(b, dtype=float) for b in space.bounds)
        self.width = self.upper - self.lower
        self.seeds = space.seeds()  # (label, genome): parents, plain averages

    @property
    def n_var(self) -> int:
        return self.space.num_genes

    @property
    def n_obj(self) -> int:
        return len(self.objectives.objectives)

    def to_unit(self, genome: np.ndarray) -> np.ndarray:
        w = np.where(self.width > 0, self.width, 1.0)
        return np.where(self.width > 0, (np.asarray(genome) - self.lower) / w, 0.5)

    def to_genome(self, x: np.ndarray) -> np.ndarray:
        return self.lower + np.clip(x, 0.0, 1.0) * self.width

    def stored_genome(self, x: np.ndarray) -> list[float]:
        """The genome of unit point `x` as the store holds it (the replay on resume compares these bit for bit)."""
        return [float(v) for v in self.to_genome(x)]

    def seed_units(self) -> np.ndarray | None:
        return np.array([self.to_unit(g) for _, g in self.seeds]) if self.seeds else None

    def losses(self, values: dict[str, float]) -> list[float]:
        return [float(o.loss(values[o.name])) for o in self.objectives.objectives]

    def failure_losses(self, seen: list[list[float]]) -> list[float]:
        """What a driver is told for a failed candidate: per objective, worse than every real loss in `seen` (by at
        least 1, and by the worst's own size), so a failure never outranks a real candidate whatever the units
        (a `params` objective of 7e9 included)."""
        if not seen:
            return [FAIL_LOSS] * self.n_obj
        worst = np.max(np.asarray(seen, dtype=float), axis=0)
        return [float(w + max(1.0, abs(w))) for w in worst]

    def decode(self, genome: Any) -> Any:
        return self.space.decode(np.asarray(genome, dtype=float))

    def recipe_key(self, x: np.ndarray) -> str:
        """What unit point `x` means: the hash of the recipe the store would hold for it (the drivers' duplicate
        elimination, `driver.duplicates: skip`)."""
        return recipe_hash(recipe_text(self.decode(self.stored_genome(x))))
