"""A merge plan: one job per output tensor, with every parameter already resolved to a number.

Planning reads only config.json and safetensors headers, so every recipe error and every model mismatch
surfaces before the first tensor is read. The same plan drives the disk merge (`engine.py`) and the
in-memory materialisation of search candidates (`materialise.py`).

Semantics follow mergekit 0.1.5 (checked against its output in tests/golden): `models` is one slice
spanning all layers; inside a slice the interpolation position is t = i / (n - 1) (1 for a one-layer
slice); tensors before the layers (embeddings) use the first slice's sources and tensors after them
(final norm, head) the last slice's, both at t = 0. A base model not listed among the models is added as
a source only for methods that take a base. A per-model parameter is looked up in the source, then the slice, then the recipe's
`parameters`, then the method default.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from evomerge.checkpoints import Checkpoint, check_compatible, classify_tensor, open_checkpoint
from evomerge.checkpoints.arch import Architecture, rename_layer, set_layer_count
from evomerge.merge.methods import METHODS, required_model_params
from evomerge.merge.recipe import Recipe, RecipeError, Slice, ModelEntry
from evomerge.merge.settings import NON_LAYER_POSITION, layer_position, resolve_setting
from evomerge.merge.vocab import align


@dataclass(frozen=True)
class TensorRef:
    model: str  # recipe label of the model
    name: str  # tensor name inside that model


@dataclass(frozen=True)
class TensorJob:
    out_name: str
    base: TensorRef | None
    inputs: tuple[TensorRef, ...]  # contributors other than the base, in recipe order
    model_params: tuple[dict[str, Any], ...]
    global_params: dict[str, Any]
    seed: int


@dataclass
class MergePlan:
    recipe: Recipe
    jobs: list[TensorJob]
    config: dict[str, Any]  # config.json of the merged model
    tokenizer_dir: Path
    num_layers: int
    checkpoints: dict[str, Checkpoint] = field(repr=False, default_factory=dict)

    @property
    def method(self) -> str:
        return self.recipe.merge_method


def open_models(recipe: Recipe, cache: Mapping[Path, Checkpoint] | None = None) -> dict[str, Checkpoint]:
    """Open every model the recipe names (headers only), reusing `cache` entries keyed by folder."""
    out: dict[str, Checkpoint] = {}
    for label in recipe.model_labels():
        path = recipe.paths[label]
        out[label] = cache[path] if cache and path in cache else open_checkpoint(path)
    return out


def _normalised_slices(recipe: Recipe, cks: Mapping[str, Checkpoint]) -> list[Slice]:
    if recipe.slices is not None:
        return list(recipe.slices)
    assert recipe.models is not None
    def n_layers(label: str) -> int:
        return Architecture.from_config(cks[label].config).num_layers
    sources = [ModelEntry(m.model, m.parameters, (0, n_layers(m.model))) for m in recipe.models]
    # The base joins as a source only where the method takes one (or averages it in as one more input, as
    # mergekit's karcher does): for linear it is not a contributor.
    spec = METHODS[recipe.merge_method]
    if recipe.base_model and (spec.accepts_base or spec.base_is_input) and recipe.base_model not in {s.model for s in sources}:
        sources.append(ModelEntry(recipe.base_model, {}, (0, n_layers(recipe.base_model))))
    return [Slice(tuple(sources))]


def _tensor_seed(seed: int, name: str) -> int:
    # Independent of tensor order, so a partial or reordered merge draws the same masks.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class ParameterResolver:
    """Looks parameters up in source -> slice -> recipe -> default order, at one t and tensor name: what the merge
    uses for each tensor (public: the dashboard's heatmaps show the very values a merge would use)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.spec = METHODS[recipe.merge_method]
        self.required = set(required_model_params(recipe.merge_method))

    def model_params(self, sl: Slice, src: ModelEntry, tensor_name: str, t: float, is_base: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, default in self.spec.model_params.items():
            value = None
            for layer in (src.parameters, sl.parameters, self.recipe.parameters):
                if key in layer:
                    value = resolve_setting(layer[key], tensor_name, t)
                    if value is not None:
                        break
            if value is None:
                value = default
            if value is None and key in self.required and not is_base:
                raise RecipeError(
                    f"{self.recipe.source_file or '<recipe>'}: parameter '{key}' has no value for model "
                    f"'{src.model}' at tensor '{tensor_name}' (a filter list without a fallback entry?)"
                )
            out[key] = value
        return out

    def global_params(self, sl: Slice, tensor_name: str, t: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, default in self.spec.global_params.items():
            value = None
            for layer in (sl.parameters, self.recipe.parameters):
                if key in layer:
                    value = resolve_setting(layer[key], tensor_name, t)
                    if value is not None:
                        break
            out[key] = default if value is None else value
        return out


def plan_merge(recipe: Recipe, checkpoints: Mapping[str, Checkpoint] | None = None, check: bool = True) -> MergePlan:
    """Resolve a recipe into per-tensor jobs. Raises RecipeError / IncompatibleModelsError before heavy work.
    `check=False` skips the model compatibility check (a worker checks its models once, not per candidate)."""
    cks = dict(checkpoints) if checkpoints is not None else open_models(recipe)
    spec = METHODS[recipe.merge_method]
    slices = _normalised_slices(recipe, cks)
    where = recipe.source_file or "<recipe>"

    ref_label = recipe.base_model or slices[0].sources[0].model
    alignment = align(recipe, cks, ref_label) if recipe.tokenizer is not None or recipe.chat_template else None
    if alignment is not None:  # vocabularies moved into the output tokenizer's order (merge/vocab.py)
        cks = alignment.checkpoints
    if check:
        check_compatible(cks, same_layer_count=recipe.slices is None)
    for i, sl in enumerate(slices):
        for j, src in enumerate(sl.sources):
            n = Architecture.from_config(cks[src.model].config).num_layers
            assert src.layer_range is not None
            if src.layer_range[1] > n:
                raise RecipeError(f"{where}: slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} exceeds the {n} layers of '{src.model}'")
        if spec.name == "slerp" and len(sl.sources) != 2:
            raise RecipeError(f"{where}: slerp merges exactly two models (the base and one other), got {len(sl.sources)}")

    resolver = ParameterResolver(recipe)
    ref = cks[ref_label]
    jobs: list[TensorJob] = []

    def add_job(out_name: str, sl: Slice, in_names: list[str], t: float) -> None:
        base_label = sl.base_model or recipe.base_model
        base_ref, inputs, params = None, [], []
        for src, in_name in zip(sl.sources, in_names):
            if in_name not in cks[src.model]:
                raise RecipeError(f"{where}: model '{src.model}' has no tensor '{in_name}' needed for '{out_name}'")
            ref_ = TensorRef(src.model, in_name)
            if spec.accepts_base and src.model == base_label:
                base_ref = ref_
                continue
            inputs.append(ref_)
            params.append(resolver.model_params(sl, src, in_name, t, is_base=False))
        if spec.needs_base and base_ref is None:
            raise RecipeError(f"{where}: the base model '{base_label}' is not among the sources of a slice; add it with the same layer_range")
        jobs.append(TensorJob(out_name, base_ref, tuple(inputs), tuple(params),
                              resolver.global_params(sl, out_name, t), _tensor_seed(recipe.seed, out_name)))

    pre = [n for n in ref.names() if classify_tensor(n).kind in ("embed", "other")]
    post = [n for n in ref.names() if classify_tensor(n).kind in ("final_norm", "head")]
    for name in pre:
        add_job(name, slices[0], [name] * len(slices[0].sources), NON_LAYER_POSITION)
    out_layer = 0
    for sl in slices:
        first = sl.sources[0]
        assert first.layer_range is not None
        length = first.layer_range[1] - first.layer_range[0]
        for offset in range(length):
            t = layer_position(offset, length)
            template = [n for n in cks[first.model].names() if classify_tensor(n).layer == first.layer_range[0] + offset]
            for tmpl in template:
                in_names = [rename_layer(tmpl, s.layer_range[0] + offset) for s in sl.sources]  # type: ignore[index]
                add_job(rename_layer(tmpl, out_layer), sl, in_names, t)
            out_layer += 1
    for name in post:
        add_job(name, slices[-1], [name] * len(slices[-1].sources), NON_LAYER_POSITION)

    config = dict(ref.config)
    set_layer_count(config, out_layer)
    out_dtype = recipe.out_dtype or recipe.dtype
    if out_dtype:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = out_dtype
    if alignment is not None:
        tok = alignment.tokenizer_dir
    elif recipe.tokenizer is None or recipe.tokenizer.source in ("base", "union"):  # union of equal vocabularies
        tok = recipe.paths[ref_label]
    else:
        tok = recipe.paths[recipe.tokenizer.source]
    return MergePlan(recipe, jobs, config, tok, out_layer, cks)
