"""The default scorer: a recipe becomes weights (the merge), the fitness `Evaluator` scores them.

A parameter-space recipe is merged by the worker's `Materialiser` (the sources resident as the memory plan placed
them) straight into the tensors the Evaluator scores: the transformers backend's own module, in place, or (vLLM)
one tensor at a time into the engine's weight reload, so no copy of the whole model is ever staged. A data-flow recipe needs a model of another depth: its source modules are loaded
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
    `batch_size`, `max_length` and `vllm_args` are the Evaluator's; the device is the Materialiser's. `dtype`: the
    scoring engine's weights (default: the anchor checkpoint's own dtype)."""

    def __init__(self, objectives: "ObjectiveSet", materialiser: "Materialiser", *, split: str | None = None,
                 backend: str = "auto", batch_size: int = 64, vllm_args: Mapping[str, Any] | None = None,
                 dtype: str | None = None, max_length: int | None = None):
        from evomerge.config import DTYPES
        from evomerge.fitness.evaluator import Evaluator, resolve_backend

        self.materialiser = materialiser
        backend = resolve_backend(backend)
        anchor = materialiser.checkpoints[materialiser.anchor]
        self.dtype = dtype or anchor.float_dtype
        self._torch_dtype = DTYPES[self.dtype]
        module = materialiser.build_module(self._torch_dtype) if backend == "hf" else None
        self.evaluator = Evaluator(objectives, anchor.path, module=module, split=split, backend=backend,
                                   batch_size=batch_size, vllm_args=vllm_args, dtype=self.dtype, max_length=max_length)
        self.objectives = self.evaluator.objectives
        # hf: merged straight into the scored module's tensors, scored where they are; vLLM: streamed into the engine
        self._targets = materialiser.targets(module) if module is not None else None
        self._modules: dict[str, Any] = {}
        self._merge_module = None

    def evaluate(self, recipe: "AnyRecipe", items: Items | None = None) -> "FitnessResult":
        from evomerge.merge.api import layer_path

        if (path := layer_path(recipe)) is not None:  # a layer path runs through the sources' modules
            return self._evaluate_path(path, items)
        if self._targets is None:  # the engine's reload consumes the merge tensor by tensor: timed as its load
            return self.evaluator.evaluate(self.materialiser.iter_merged(recipe, self._torch_dtype), items=items)
        start = time.perf_counter()
        self.materialiser.apply(recipe, None, self._targets)
        merged = time.perf_counter() - start
        result = self.evaluator.evaluate(None, items=items)
        return replace(result, seconds=result.seconds + merged, load_seconds=result.load_seconds + merged)

    def _source_module(self, name: str, source: "Source"):
        """The module a path reads source `name`'s layers from. A PS merge is materialised into the engine's own
        module (hf; a path model is scored instead of it, so it is free) or into one module of its own. A folder
        shares the resident tensors where the plan keeps them on the device in the engine's dtype, else it is
        loaded once as a module of its own."""
        from evomerge.checkpoints.hf import load_model

        if (ps := source.merge_recipe) is not None:
            if self._merge_module is None:
                engine = self.evaluator.backend.module if self._targets is not None else None
                self._merge_module = engine if engine is not None else self.materialiser.build_module(self._torch_dtype)
            self.materialiser.apply(ps, self._merge_module)
            return self._merge_module
        key = str(Path(source.path).resolve())
        if key not in self._modules:
            mat = self.materialiser
            label = mat.label_of(key)
            like = self.evaluator.backend.module if self._targets is not None else None
            shared = mat.shared_module(label, like) if label is not None and like is not None else None
            self._modules[key] = shared if shared is not None else load_model(key, self._torch_dtype, mat.device).eval()
        return self._modules[key]

    def _evaluate_path(self, recipe: "DataflowRecipe", items: Items | None = None) -> "FitnessResult":
        from evomerge.merge.pathmodel import build_path_model

        modules = {n: self._source_module(n, s) for n, s in recipe.sources.items()}
        return self.evaluator.evaluate(build_path_model(recipe, modules), items=items)

    def close(self) -> None:
        self.evaluator.close()


def default_scorer(spec: Any, split: str | None = None) -> RecipeScorer:
    """The scorer of a job that names no `runtime.scorer`: its objectives on its models, on its runtime's
    device, backend and batch size, with the sources placed as the memory plan chose (a worker is handed the
    spec with `runtime.sources` and `runtime.rank_cache` resolved; `auto` left as it is means `device` and on).
    `spec` is the job's `JobSpec` (read, never imported: the search sits above)."""
    from evomerge.merge.materialise import Materialiser

    rt = spec.runtime
    labels = {str(p): p for p in spec.models.values()}
    materialiser = Materialiser(labels, anchor=str(spec.models[spec.base]), device=rt.device,
                                sources="device" if rt.sources == "auto" else rt.sources,
                                sources_dtype=rt.sources_dtype, rank_cache=rt.rank_cache is not False)
    return RecipeScorer(spec.objectives, materialiser, split=split, backend=rt.backend, batch_size=rt.batch_size,
                        dtype=None if rt.dtype == "auto" else rt.dtype, max_length=rt.max_length,
                        vllm_args=vllm_engine_args(rt))


def vllm_engine_args(rt: Any) -> dict[str, Any]:
    """vLLM's engine arguments from the runtime spec: its memory budget on each GPU (the plan's `engine_memory`,
    as the fraction vLLM takes), the context it must hold, tensor parallelism over `gpus` GPUs, and
    `enforce_eager` when the spec sets it."""
    import torch

    args: dict[str, Any] = {}
    if rt.max_length:
        args["max_model_len"] = int(rt.max_length)
    if getattr(rt, "enforce_eager", None) is not None:  # a spec stored before the field existed has none
        args["enforce_eager"] = bool(rt.enforce_eager)
    if rt.device.startswith("cuda") and torch.cuda.is_available():
        if rt.engine_memory:
            total = torch.cuda.mem_get_info()[1]
            args["gpu_memory_utilization"] = min(0.95, rt.engine_memory * 1024**3 / total)
        if rt.gpus and rt.gpus > 1:
            args["tensor_parallel_size"] = int(rt.gpus)
    return args
