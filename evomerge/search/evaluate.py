"""The default scorer: the fitness `Evaluator` with the job's models resident, for PS and data-flow recipes.

A parameter-space recipe goes straight to `Evaluator.evaluate(recipe)` (the Materialiser writes the merge into
the worker's one module in place). A data-flow recipe needs a model of another depth: its source modules are
loaded once (a PS source, as in the hybrid space, is re-materialised into its own module per candidate), the
path model shares their tensors (`build_path_model`), and the Evaluator scores it through a backend built for
it (`Evaluator.evaluate(module)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.search.spec import JobSpec


class RecipeScorer:
    def __init__(self, spec: "JobSpec", split: str | None = None):
        from evomerge.fitness.evaluator import Evaluator
        from evomerge.merge.materialise import Materialiser

        objectives = spec.objectives
        self.labels = {str(p): p for p in spec.models.values()}
        self.materialiser = Materialiser(self.labels, anchor=str(spec.models[spec.base]), device=spec.runtime.device)
        self.evaluator = Evaluator(objectives, materialiser=self.materialiser, split=split, backend=spec.runtime.backend,
                                   batch_size=spec.runtime.batch_size, device=spec.runtime.device)
        self.objectives = self.evaluator.objectives
        self._modules: dict[str, Any] = {}
        self._merge_module = None

    def evaluate(self, recipe: Any, items: dict[str, list[str]] | None = None):
        from evomerge.merge.dataflow import DataflowRecipe

        if isinstance(recipe, DataflowRecipe):
            return self._evaluate_path(recipe, items)
        return self.evaluator.evaluate(recipe, items=items)

    def _source_module(self, name: str, spec: Any):
        import torch
        from transformers import AutoModelForCausalLM

        if (ps := spec.merge_recipe) is not None:
            if self._merge_module is None:
                self._merge_module = self.materialiser.build_module()
            self.materialiser.apply(ps, self._merge_module)
            return self._merge_module
        key = str(Path(spec.path).resolve())
        if key not in self._modules:
            self._modules[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).to(
                self.materialiser.device).eval()  # beside the merge module: a path may mix both
        return self._modules[key]

    def _evaluate_path(self, recipe: Any, items: dict[str, list[str]] | None = None):
        from evomerge.merge.pathmodel import build_path_model

        modules = {n: self._source_module(n, s) for n, s in recipe.sources.items()}
        return self.evaluator.evaluate(build_path_model(recipe, modules), items=items)

    def close(self) -> None:
        self.evaluator.close()


def default_scorer(spec: "JobSpec", split: str | None = None) -> RecipeScorer:
    return RecipeScorer(spec, split)
