"""What scoring one candidate gives: `FitnessResult`, a plain dataclass without torch.

It sits apart from the `Evaluator` (which imports torch and lm-eval) so that any scorer (the toy one, a plug-in)
and the runtime's `run_one` can build and read it without loading a model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from evomerge.fitness.objectives import Objective, ObjectiveSet

Items = dict[str, list[str]]  # {objective: [item ids]}: score only those items (IRT anchors)


@dataclass
class FitnessResult:
    """Objective values as measured, per-item values keyed by item id, and where the time went."""

    values: dict[str, float]
    items: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0  # the whole evaluate() call
    load_seconds: float = 0.0  # writing the candidate's weights into the model (a recipe's merge included)
    forward_seconds: float = 0.0  # inside the model (lm-eval's model calls)

    @property
    def overhead_seconds(self) -> float:
        """Everything but the forward passes (weight loading included)."""
        return self.seconds - self.forward_seconds

    def losses(self, objectives: ObjectiveSet | Iterable[Objective]) -> list[float]:
        objs = objectives.objectives if isinstance(objectives, ObjectiveSet) else objectives
        return [o.loss(self.values[o.name]) for o in objs]

    def to_dict(self, with_items: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"values": {k: float(v) for k, v in self.values.items()},
                               "seconds": round(self.seconds, 4), "load_seconds": round(self.load_seconds, 4),
                               "forward_seconds": round(self.forward_seconds, 4)}
        if with_items:
            out["items"] = {k: {i: float(v) for i, v in d.items()} for k, d in self.items.items()}
        return out
