"""A synthetic scorer: objectives computed from a recipe's numbers, no model run. It lets the loop, the store
and resume be tested (and demonstrated) in seconds. Use it with `runtime.scorer: evomerge.scoring.toy:scorer`.

Objectives: `fit` (maximise): 1 - mean squared distance of the recipe's weights and densities from `target`
(default 0.6); `size` (minimise): the mean weight. Options (`runtime.scorer_options`): `objectives` (1 or 2),
`target`, `delay` (seconds per evaluation), `fail_above` (candidates whose first weight is above it fail:
a stand-in for merges that break a model), `fail_all` (every candidate fails).
"""

from __future__ import annotations

import time
from typing import Any

from evomerge.fitness.objectives import CandidateFailed, Objective, ObjectiveSet
from evomerge.fitness.result import FitnessResult


def numbers(recipe: Any) -> list[float]:
    """Every weight, density and scale in a recipe, in a fixed order."""
    out: list[float] = []

    def walk(x: Any, key: str | None = None) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, str(k))
        elif isinstance(x, list):
            for v in x:
                walk(v, key)
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and key in ("weight", "density", "scale", "value"):
            out.append(float(x))

    walk(recipe.to_dict())
    if hasattr(recipe, "path"):
        out.append(len(recipe.path) / 10.0)
    return out


class ToyScorer:
    def __init__(self, options: dict[str, Any], split: str | None = None):
        self.options = options
        self.split = split or "fitness"
        objs = [Objective("fit", kind="task", task="toy", direction="maximise"),
                Objective("size", kind="task", task="toy", direction="minimise")][: int(options.get("objectives", 2))]
        self.objectives = ObjectiveSet(tuple(objs), split=self.split, source="<toy>")

    def evaluate(self, recipe: Any) -> FitnessResult:
        time.sleep(float(self.options.get("delay", 0.0)))
        xs = numbers(recipe) or [0.0]
        if self.options.get("fail_all"):
            raise CandidateFailed("toy: every candidate fails (fail_all)")
        if "fail_above" in self.options and xs[0] > float(self.options["fail_above"]):
            raise CandidateFailed(f"toy: first weight {xs[0]:.3f} > {self.options['fail_above']} (fail_above)")
        target = float(self.options.get("target", 0.6))
        shift = 0.01 if self.split == "test" else 0.0  # the report split differs a little, as held-out data does
        errors = [(x - target) ** 2 for x in xs]
        fit = 1.0 - sum(errors) / len(errors) - shift
        weights = [x for x in xs]
        values = {"fit": fit, "size": sum(weights) / len(weights)}
        items = {"fit": {str(i): 1.0 - e for i, e in enumerate(errors[:8])}}
        return FitnessResult({o.name: values[o.name] for o in self.objectives.objectives}, items)


def scorer(spec: Any, split: str | None = None) -> ToyScorer:
    return ToyScorer(dict(spec.runtime.scorer_options), split)
