"""The default scorer: a recipe becomes weights (the merge), the fitness `Evaluator` scores them.

A parameter-space recipe is merged by the worker's `Materialiser` (base and task vectors resident) straight into
the tensors the Evaluator scores: the transformers backend's own module, in place, or (vLLM) a staging copy that
is then pushed into the engine. A data-flow recipe needs a model of another depth: its source modules are loaded
once (a PS source, as in the hybrid space, is re-materialised into its own module per candidate), the path model
shares their tensors (`build_path_model`), and the Evaluator scores that module (`Evaluator.evaluate(module)`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from evomerge.fitness.result import Items

if TYPE_CHECKING:
    from evomerge.fitness.objectives import ObjectiveSet
    from evomerge.fitness.result import FitnessResult
    from evomerge.merge.api import AnyRecipe
    from evomerge.merge.dataflow import DataflowRecipe
    from evomerge.merge.materialise import Materialiser
    from evomerge.merge.sources import Source


class RecipeScorer:
    """Scores recipes on `objectives` (its `split`) with the models of `materialiser` resident. `backend`,
    `batch_size` and `vllm_args` are the Evaluator's; the device is the Materialiser's."""

    def __init__(self, objectives: "ObjectiveSet", materialiser: "Materialiser", *, split: str | None = None,
                 backend: str = "auto", batch_size: int = 64, vllm_args: Mapping[str, Any] | None = None):
        from evomerge.fitness.evaluator import Evaluator, resolve_backend

        self.materialiser = materialiser
        backend = resolve_backend(backend)
        anchor_dir = materialiser.checkpoints[materialiser.anchor].path
        module = materialiser.build_module() if backend == "hf" else None
        self.evaluator = Evaluator(objectives, anchor_dir, module=module, split=split, backend=backend,
                                   batch_size=batch_size, vllm_args=vllm_args)
        self.objectives = self.evaluator.objectives
        if module is not None:  # hf: merged straight into the scored module's tensors, scored where they are
            self._targets = materialiser.targets(module)
            self._weights = None
        else:  # vLLM: merged into a staging copy, which the Evaluator checks and pushes into the engine
            self._targets = {n: t.clone() for n, t in materialiser.base.items()}
            self._weights = self._targets
        self._modules: dict[str, Any] = {}
        self._merge_module = None

    def evaluate(self, recipe: "AnyRecipe", items: Items | None = None) -> "FitnessResult":
        from evomerge.merge.api import layer_path

        if (path := layer_path(recipe)) is not None:  # a layer path runs through the sources' modules
            return self._evaluate_path(path, items)
        start = time.perf_counter()
        self.materialiser.apply(recipe, None, self._targets)
        merged = time.perf_counter() - start
        result = self.evaluator.evaluate(self._weights, items=items)
        return replace(result, seconds=result.seconds + merged, load_seconds=result.load_seconds + merged)

    def _source_module(self, name: str, source: "Source"):
        import torch

        from evomerge.checkpoints.hf import load_model

        if (ps := source.merge_recipe) is not None:
            if self._merge_module is None:
                self._merge_module = self.materialiser.build_module()
            self.materialiser.apply(ps, self._merge_module)
            return self._merge_module
        key = str(Path(source.path).resolve())
        if key not in self._modules:
            self._modules[key] = load_model(key, torch.float32, self.materialiser.device).eval()  # beside the
            # merge module: a path may mix both
        return self._modules[key]

    def _evaluate_path(self, recipe: "DataflowRecipe", items: Items | None = None) -> "FitnessResult":
        from evomerge.merge.pathmodel import build_path_model

        modules = {n: self._source_module(n, s) for n, s in recipe.sources.items()}
        return self.evaluator.evaluate(build_path_model(recipe, modules), items=items)

    def close(self) -> None:
        self.evaluator.close()


def default_scorer(spec: Any, split: str | None = None) -> RecipeScorer:
    """The scorer of a job that names no `runtime.scorer`: its objectives on its models, on its runtime's
    device, backend and batch size. `spec` is the job's `JobSpec` (read, never imported: the search sits above)."""
    from evomerge.merge.materialise import Materialiser

    labels = {str(p): p for p in spec.models.values()}
    materialiser = Materialiser(labels, anchor=str(spec.models[spec.base]), device=spec.runtime.device)
    return RecipeScorer(spec.objectives, materialiser, split=split, backend=spec.runtime.backend,
                        batch_size=spec.runtime.batch_size)
