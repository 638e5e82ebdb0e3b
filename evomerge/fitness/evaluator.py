"""The per-worker `Evaluator`: objectives + lm-eval tasks + one backend, built once, scoring many candidates.

Follow one candidate: `evaluate(candidate)` -> `_load` writes its weights into the backend's model in
place (transformers module, or the vLLM engine's weights) -> `probe` fails NaN candidates early ->
`TaskSuite.run` sends the prebuilt lm-eval requests to the model and scores each item -> built-in
objectives -> `FitnessResult`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from evomerge.config import DTYPES
from evomerge.fitness.builtin import TextDocs, latency, perplexity
from evomerge.fitness.objectives import CandidateFailed, FitnessConfigError, Objective, ObjectiveSet, load_objectives
from evomerge.fitness.tasks import TaskSuite

BACKENDS = ("hf", "vllm")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def default_backend() -> str:
    """vLLM on a GPU machine where it is installed, transformers otherwise."""
    return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


@dataclass
class FitnessResult:
    """Objective values as measured, per-item values keyed by item id, and where the time went."""

    values: dict[str, float]
    items: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0  # the whole evaluate() call
    load_seconds: float = 0.0  # writing the candidate's weights into the model
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


class Evaluator:
    """Scores candidates on an objective set. One per worker: build once, call `evaluate` many times.

    `model`: a checkpoint folder (its config, tokenizer and initial weights). With `materialiser`, the
    worker's `Materialiser` (whose anchor gives config and tokenizer), recipes can be passed as candidates.
    """

    def __init__(
        self,
        objectives: ObjectiveSet | str | Path,
        model: str | Path | None = None,
        *,
        backend: str = "auto",
        materialiser=None,
        split: str | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        dtype: str = "float32",
        vllm_args: Mapping[str, Any] | None = None,
    ):
        if not isinstance(objectives, ObjectiveSet):
            objectives = load_objectives(objectives)
        objectives = objectives.with_split(split)
        backend = default_backend() if backend == "auto" else backend
        if backend not in BACKENDS:
            raise FitnessConfigError(f"backend '{backend}' is not one of: auto, {', '.join(BACKENDS)}")
        if model is None and materialiser is None:
            raise FitnessConfigError("Evaluator needs a model folder or a Materialiser")
        self.materialiser = materialiser
        self.model_dir = Path(model) if model is not None else Path(materialiser.checkpoints[materialiser.anchor].path)
        if not (self.model_dir / "config.json").is_file():
            raise FitnessConfigError(f"{self.model_dir}: not a model folder (no config.json)")
        self.suite = TaskSuite(objectives)
        self.objectives = self._resolve_directions(objectives)
        self.backend_name = backend
        self.batch_size = batch_size
        torch_dtype = DTYPES[dtype]
        if backend == "hf":
            from evomerge.fitness.hf import HFBackend

            if materialiser is not None:
                from transformers import AutoTokenizer

                module = materialiser.build_module(dtype=torch_dtype)
                self.backend = HFBackend(module, AutoTokenizer.from_pretrained(self.model_dir), batch_size=batch_size)
            else:
                self.backend = HFBackend.from_dir(self.model_dir, torch_dtype, device, batch_size)
        else:
            from evomerge.fitness.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(self.model_dir, dtype=dtype, **dict(vllm_args or {}))
        self._texts: dict[str, TextDocs] = {}
        self._staging: dict[str, torch.Tensor] | None = None

    def _resolve_directions(self, objectives: ObjectiveSet) -> ObjectiveSet:
        found = self.suite.directions()
        objs = []
        for o in objectives.objectives:
            if o.direction is None:
                d = found.get(o.name)
                if d is None:
                    raise FitnessConfigError(f"{objectives.source}: objective '{o.name}': the task does not say whether "
                                             f"higher is better for its metric; add `direction: maximise` or `minimise`")
                o = replace(o, direction=d)
            objs.append(o)
        return replace(objectives, objectives=tuple(objs))

    # ---------------------------------------------------------------- one candidate
    def evaluate(self, candidate: Any = None, items: Mapping[str, Iterable[str]] | None = None,
                 objectives: Iterable[str] | None = None) -> FitnessResult:
        """Score `candidate` (None: the weights already loaded; a Recipe; a {tensor name: tensor} mapping;
        a checkpoint folder; an `nn.Module` scored as it is, e.g. a data-flow path model of another depth,
        hf backend only). `items`: {task or objective name: [item ids]} scores only those items.
        `objectives`: names to score (default all). Raises `CandidateFailed` for NaN candidates."""
        start = time.perf_counter()
        backend = self._backend_for(candidate)
        fwd0 = backend.forward_seconds
        loaded = time.perf_counter()
        backend.probe()
        objs = self._select(objectives)
        values: dict[str, float] = {}
        per_item: dict[str, dict[str, float]] = {}
        task_objs = [o for o in objs if o.kind == "task"]
        if task_objs:
            for name, (value, its) in self.suite.run(backend.lm, task_objs, items).items():
                values[name], per_item[name] = value, its
        for o in objs:
            if o.kind == "perplexity":
                docs = self._texts.setdefault(o.file, TextDocs(o.file, o.limit))
                values[o.name], per_item[o.name] = perplexity(backend.lm, docs)
            elif o.kind == "params":
                values[o.name] = float(backend.param_count())
            elif o.kind == "layers":
                values[o.name] = float(backend.layer_count())
            elif o.kind == "latency":
                values[o.name] = latency(backend.lm, o)
        for name, v in values.items():
            if v is None or not math.isfinite(v):
                raise CandidateFailed(f"objective '{name}' is {v}: the candidate's outputs are NaN or inf")
        end = time.perf_counter()
        return FitnessResult(values={o.name: values[o.name] for o in objs}, items=per_item, seconds=end - start,
                             load_seconds=loaded - start, forward_seconds=backend.forward_seconds - fwd0)

    def _backend_for(self, candidate: Any):
        """The worker's backend with the candidate loaded into it, or, for a module, a backend around that module
        (its shape may differ from the worker's model, so nothing is copied)."""
        if not isinstance(candidate, torch.nn.Module):
            self._load(candidate)
            return self.backend
        if self.backend_name != "hf":
            raise FitnessConfigError("a module candidate (e.g. a data-flow path model) is scored with the hf backend only")
        from evomerge.fitness.hf import HFBackend

        return HFBackend(candidate, self.backend.tokenizer, batch_size=self.batch_size)

    def _select(self, names: Iterable[str] | None) -> list[Objective]:
        if names is None:
            return list(self.objectives.objectives)
        by_name = {o.name: o for o in self.objectives.objectives}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise FitnessConfigError(f"no objective named {missing} (known: {', '.join(by_name)})")
        return [by_name[n] for n in names]

    def _load(self, candidate: Any) -> None:
        if candidate is None:
            return
        from evomerge.merge.recipe import Recipe

        if isinstance(candidate, Recipe):
            if self.materialiser is None:
                raise FitnessConfigError("a Recipe candidate needs an Evaluator built with materialiser=")
            if self.backend_name == "hf":
                self.materialiser.apply(candidate, self.backend.module, self.backend.targets(list(self.materialiser.base)))
                return
            if self._staging is None:  # merged tensors land here, then go to the engine
                self._staging = {n: t.clone() for n, t in self.materialiser.base.items()}
            self.materialiser.apply(candidate, None, self._staging)
            weights: Mapping[str, torch.Tensor] = self._staging
        elif isinstance(candidate, (str, Path)):
            weights = read_weights(Path(candidate))
        elif isinstance(candidate, Mapping):
            weights = candidate
        else:
            raise TypeError(f"cannot evaluate a {type(candidate).__name__}: give a Recipe, a tensor mapping or a folder")
        bad = [n for n, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CandidateFailed(f"the candidate's weights hold NaN or inf (first: {bad[0]})")
        self.backend.load(weights)

    def close(self) -> None:
        self.backend.close()


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from evomerge.checkpoints import open_checkpoint

    ck = open_checkpoint(folder)
    return {n: ck.get(n) for n in ck.names()}
