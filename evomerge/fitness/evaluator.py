"""The per-worker `Evaluator`: objectives + lm-eval tasks + one backend, built once, scoring many candidates.

It scores weights, never recipes: a {tensor name: tensor} mapping, a checkpoint folder, an `nn.Module`, or the
weights already written into its model (the scorer, `evomerge.scoring`, turns a recipe into those weights).
Follow one candidate: `evaluate(candidate)` -> `_load` writes its weights into the backend's model in
place (transformers module, or the vLLM engine's weights) -> `probe` fails NaN candidates early ->
`TaskSuite.run` sends the prebuilt lm-eval requests to the model and scores each item -> built-in
objectives -> `FitnessResult`.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from evomerge.config import DTYPES
from evomerge.fitness.builtin import TextDocs, latency, perplexity
from evomerge.fitness.objectives import CandidateFailed, FitnessConfigError, Objective, ObjectiveSet, load_objectives
from evomerge.fitness.result import FitnessResult
from evomerge.fitness.tasks import TaskSuite

BACKENDS = ("hf", "vllm")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def default_backend() -> str:
    """vLLM on a GPU machine where it is installed, transformers otherwise."""
    return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


def resolve_backend(name: str) -> str:
    """`auto` -> the default backend; anything else must be one of BACKENDS."""
    backend = default_backend() if name == "auto" else name
    if backend not in BACKENDS:
        raise FitnessConfigError(f"backend '{backend}' is not one of: auto, {', '.join(BACKENDS)}")
    return backend


class Evaluator:
    """Scores candidates on an objective set. One per worker: build once, call `evaluate` many times.

    `model`: a checkpoint folder (its config, tokenizer and, unless `module` is given, initial weights).
    `module` (hf backend): the model candidates are written into, already built (a scorer's Materialiser builds
    it with the anchor's weights); the scorer then writes each candidate into it in place and calls `evaluate()`.
    """

    def __init__(
        self,
        objectives: ObjectiveSet | str | Path,
        model: str | Path,
        *,
        backend: str = "auto",
        module: nn.Module | None = None,
        split: str | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        dtype: str = "float32",
        vllm_args: Mapping[str, Any] | None = None,
        max_length: int | None = None,
    ):
        if not isinstance(objectives, ObjectiveSet):
            objectives = load_objectives(objectives)
        objectives = objectives.with_split(split)
        backend = resolve_backend(backend)
        if module is not None and backend != "hf":
            raise FitnessConfigError(f"a prebuilt module is for the hf backend, not '{backend}'")
        self.model_dir = Path(model)
        if not (self.model_dir / "config.json").is_file():
            raise FitnessConfigError(f"{self.model_dir}: not a model folder (no config.json)")
        from evomerge.checkpoints import open_checkpoint
        from evomerge.checkpoints.hf import check_no_custom_code

        open_checkpoint(self.model_dir)  # safetensors only, for every backend (vLLM would load a .bin too)
        check_no_custom_code(self.model_dir)
        self.suite = TaskSuite(objectives)
        self._check_chat_template(objectives.source)
        self.objectives = self._resolve_directions(objectives)
        self.backend_name = backend
        self.batch_size = batch_size
        torch_dtype = DTYPES[dtype]
        if backend == "hf":
            from evomerge.fitness.hf import HFBackend

            if module is not None:
                from evomerge.checkpoints.hf import load_tokenizer

                self.backend = HFBackend(module, load_tokenizer(self.model_dir), batch_size=batch_size,
                                         max_length=max_length)
            else:
                self.backend = HFBackend.from_dir(self.model_dir, torch_dtype, device, batch_size)
        else:
            from evomerge.fitness.vllm_backend import VLLMBackend

            args = dict(vllm_args or {})
            if max_length and "max_model_len" not in args:
                args["max_model_len"] = max_length
            self.backend = VLLMBackend(self.model_dir, dtype=dtype, **args)
        self._texts: dict[str, TextDocs] = {}

    def _check_chat_template(self, source: str) -> None:
        """Objectives with `apply_chat_template` need a tokenizer that has one: said before any model is loaded (lm-eval
        would fail on the first request, transformers with a message that names neither objective nor folder)."""
        tasks = self.suite.chat_runs()
        if not tasks:
            return
        from evomerge.checkpoints.hf import load_tokenizer

        if not getattr(load_tokenizer(self.model_dir), "chat_template", None):
            raise FitnessConfigError(f"{source}: apply_chat_template (task {', '.join(tasks)}): the tokenizer of "
                                     f"{self.model_dir} has no chat template; give it one (`chat_template` in "
                                     "tokenizer_config.json, or a chat_template.jinja file) or drop apply_chat_template")

    def _resolve_directions(self, objectives: ObjectiveSet) -> ObjectiveSet:
        found = self.suite.directions()
        objs = []
        for o in objectives.objectives:
            if o.kind == "sum":
                terms = tuple((w, t if t.direction else replace(t, direction=found.get(f"{o.name}/{t.name}")))
                              for w, t in o.terms)
                dirs = {t.direction for _, t in terms}
                if o.direction is None and (len(dirs) != 1 or None in dirs):
                    raise FitnessConfigError(f"{objectives.source}: objective '{o.name}': its terms do not share one "
                                             "direction; add `direction: maximise` or `minimise` to the sum")
                objs.append(replace(o, terms=terms, direction=o.direction or dirs.pop()))
                continue
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
        """Score `candidate` (None: the weights already loaded or written in place; a {tensor name: tensor}
        mapping, or an iterator of (name, tensor) pairs, streamed into the backend one tensor at a time; a
        checkpoint folder; an `nn.Module` scored as it is, e.g. a data-flow path model of another depth,
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
        task_objs = [p for o in objs for p in o.task_parts()]
        if task_objs:
            for name, (value, its) in self.suite.run(backend.lm, task_objs, items).items():
                values[name], per_item[name] = value, its
        for o in objs:
            if o.kind == "sum":  # the terms' values weighted; items as TERM:ID
                parts = [(w, f"{o.name}/{t.name}", t.name) for w, t in o.terms]
                values[o.name] = sum(w * values.pop(n) for w, n, _ in parts)
                per_item[o.name] = {f"{t}:{i}": v for _, n, t in parts for i, v in per_item.pop(n).items()}
            elif o.kind == "perplexity":
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
        if not isinstance(candidate, nn.Module):
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
        if isinstance(candidate, (str, Path)):
            weights: Any = read_weights(Path(candidate))
        elif isinstance(candidate, Mapping):
            weights = candidate
        elif isinstance(candidate, Iterator):
            bad: list[str] = []
            self.backend.load(_finite_checked(candidate, bad))  # the engine gets every tensor, then the verdict
            if bad:
                raise CandidateFailed(f"the candidate's weights hold NaN or inf (first: {bad[0]})")
            return
        else:
            raise TypeError(f"cannot evaluate a {type(candidate).__name__}: give a tensor mapping, a folder or a module "
                            "(a recipe is turned into weights by its scorer, evomerge.scoring)")
        bad = [n for n, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CandidateFailed(f"the candidate's weights hold NaN or inf (first: {bad[0]})")
        self.backend.load(weights)

    def close(self) -> None:
        self.backend.close()


def _finite_checked(pairs: Iterator[tuple[str, torch.Tensor]], bad: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The pairs passed on unchanged, the names of non-finite tensors noted in `bad` (a streamed candidate is
    judged after the push, so the engine never holds half of one)."""
    for name, tensor in pairs:
        if tensor.is_floating_point() and not bad and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
        yield name, tensor


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from evomerge.checkpoints import open_checkpoint

    ck = open_checkpoint(folder)
    return {n: ck.get(n) for n in ck.names()}
