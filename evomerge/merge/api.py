"""One interface over both recipe kinds: parameter-space (`Recipe`, recipe.py) and data-flow (`DataflowRecipe`,
dataflow.py).

Everything outside `merge/` that holds "a recipe" goes through these functions, so the question "which kind is
it?" is asked here and nowhere else: parse or load one (a mapping with `dataflow:` is a data-flow recipe), plan
it (every check before a tensor is read), stream its output tensors, write it as a checkpoint, describe it in a
line, list the model folders it reads, and express it in mergekit's format where mergekit can say it. A third
kind (a LoRA-delta recipe, say) is one more branch in each function of this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

import torch
import yaml

from evomerge.checkpoints.hf import check_loadable
from evomerge.merge.dataflow import (MERGEKIT_CONFIG, DataflowPlan, DataflowRecipe, iter_dataflow, parse_dataflow,
                                     passthrough_config, plan_dataflow, whole_source)
from evomerge.merge.engine import iter_merged
from evomerge.merge.export import (DEFAULT_SHARD_BYTES, check_output, missing_tokenizer_note, model_card,
                                   write_checkpoint)
from evomerge.merge.methods import METHODS
from evomerge.merge.plan import MergePlan, plan_merge
from evomerge.merge.recipe import Recipe, RecipeError, parse_recipe
from evomerge.config import read_yaml

AnyRecipe = Union[Recipe, DataflowRecipe]
AnyPlan = Union[MergePlan, DataflowPlan]


class NotMergekit(RecipeError):
    """The recipe has no mergekit equivalent; the message says why."""


def is_dataflow(data: Any) -> bool:
    """A recipe mapping is a data-flow recipe when it has a `dataflow:` section."""
    return isinstance(data, dict) and "dataflow" in data


def parse_any(data: Any, source_file: Path | None = None, check_paths: bool = True) -> AnyRecipe:
    """Validate a recipe mapping of either kind (see `parse_recipe` and `parse_dataflow`)."""
    if is_dataflow(data):
        return parse_dataflow(data, source_file=source_file, check_paths=check_paths)
    return parse_recipe(data, source_file=source_file, check_paths=check_paths)


def load_recipe(path: str | Path) -> AnyRecipe:
    """Read and validate a recipe file of either kind."""
    data, p = read_yaml(path, RecipeError, "recipe")
    return parse_any(data, source_file=p)


def parse_stored(text: str, check_paths: bool = True) -> AnyRecipe:
    """A recipe as the store keeps it (YAML text). `check_paths=False` where its model folders need not exist
    here (describing or converting a recipe written on another machine)."""
    return parse_any(yaml.safe_load(text), check_paths=check_paths)


def plan(recipe: AnyRecipe) -> AnyPlan:
    """Every check against the models' headers, and the list of output tensors; no tensor is read."""
    return plan_dataflow(recipe) if isinstance(recipe, DataflowRecipe) else plan_merge(recipe)


def model_folders(recipe: AnyRecipe) -> list[Path]:
    """Every model folder the recipe reads, each once, in the order the recipe names them."""
    if isinstance(recipe, DataflowRecipe):
        found = [f for s in recipe.sources.values() for f in s.model_folders()]
    else:
        found = [Path(recipe.paths.get(label, label)) for label in recipe.model_labels()]
    return list(dict.fromkeys(found))


def describe(recipe: AnyRecipe) -> str:
    """One line for tables and reports: the method and the leading weights, or the path's length and what it
    runs over."""
    if isinstance(recipe, DataflowRecipe):
        inner = [s.merge_recipe for s in recipe.sources.values() if s.merge_recipe is not None]
        return f"dataflow, {len(recipe.path)} layers" + (f" over a {inner[0].merge_method} merge" if inner else "")
    parts = []
    for src in recipe.all_sources()[:6]:
        w = src.parameters.get("weight")
        if isinstance(w, (int, float)):
            parts.append(f"{Path(src.model).name} {w:.2f}")
    layerwise = " layer-wise" if recipe.slices is not None else ""
    return f"{recipe.merge_method}{layerwise}" + (f" ({', '.join(parts)})" if parts else "")


@dataclass
class CheckpointParts:
    """What a recipe writes as a checkpoint: its tensors (a stream), config, tokenizer and side files."""

    tensors: Iterator[tuple[str, torch.Tensor]]
    config: dict[str, Any]
    tokenizer_dir: Path
    base_model: str | None  # named in the model card
    extra_files: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of every output tensor, from the plan


def checkpoint_parts(recipe: AnyRecipe, device: str | torch.device = "cpu", progress: bool = False) -> CheckpointParts:
    """Plan the recipe (all checks first), then the lazy stream of its output tensors."""
    if isinstance(recipe, DataflowRecipe):
        p = plan_dataflow(recipe)
        extra = {}
        mk = passthrough_config(recipe)
        if mk is not None:  # the same path in mergekit's words, beside the checkpoint
            extra[MERGEKIT_CONFIG] = yaml.safe_dump(mk, sort_keys=False, default_flow_style=None)
        shapes = {t.out_name: p.readers[t.source].shapes[t.name] for t in p.tensors}
        return CheckpointParts(iter_dataflow(p, device, progress), p.config, p.tokenizer_dir, None, extra, shapes)
    p = plan_merge(recipe)
    shapes = {j.out_name: p.checkpoints[(j.base or j.inputs[0]).model].info((j.base or j.inputs[0]).name).shape
              for j in p.jobs}
    return CheckpointParts(iter_merged(p, device, progress), p.config, p.tokenizer_dir, recipe.base_model,
                           shapes=shapes)


def finite(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream, refusing the first tensor with an inf or NaN (a merge whose weights overflow its dtype): an
    all-inf model must never be written as if it were one."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise RecipeError(f"merged tensor '{name}' has {bad} of {tensor.numel()} values inf or NaN ({tensor.dtype}): "
                              "the recipe's weights overflow; lower them, or merge to float32 (`dtype: float32`)")
        yield name, tensor


def write_recipe(recipe: AnyRecipe, out: Path, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 device: str | torch.device = "cpu", progress: bool = False, title: str | None = None,
                 card_extra: str = "", recipe_text: str | None = None,
                 extra_files: dict[str, str] | None = None, inputs: list[str | Path] | None = None,
                 notes: list[str] | None = None) -> Path:
    """`evomerge merge` and `evomerge export --format model`: the output folder is checked, the recipe planned
    (every error before a tensor is read), then merged tensors stream into a new checkpoint (atomic). The model
    card shows `recipe_text` (default: the recipe's YAML) and ends with `card_extra`. OUT may not be, hold or lie
    inside the model folders the recipe reads, nor any of `inputs` (the recipe file, a store). `notes` gets what the
    user should hear (an output without a tokenizer)."""
    inputs = [*model_folders(recipe), *(inputs or [])]
    check_output(Path(out).expanduser().absolute(), force, inputs)
    parts = checkpoint_parts(recipe, device, progress)
    check_loadable(parts.config, parts.shapes, str(out))  # an unloadable model is refused before a tensor is read
    if notes is not None and (note := missing_tokenizer_note(parts.tokenizer_dir)) is not None:
        notes.append(note)
    if title is None:
        title = recipe.name or ("Data-flow merged model" if isinstance(recipe, DataflowRecipe) else "Merged model")
    card = model_card(recipe_text or recipe.to_yaml(), parts.base_model, title=title)
    if card_extra:
        card = card.rstrip() + "\n\n" + card_extra
    return write_checkpoint(out, finite(parts.tensors), parts.config, parts.tokenizer_dir, card, force=force,
                            max_shard_bytes=max_shard_bytes, extra_files={**parts.extra_files, **(extra_files or {})},
                            inputs=inputs)


def to_mergekit(recipe: AnyRecipe) -> tuple[str, list[str]]:
    """(mergekit config, notes) for a recipe; `NotMergekit` saying why where mergekit cannot express it.

    A path that is every layer of one inline merge in order, unscaled, is that merge and is exported as it."""
    notes: list[str] = []
    if isinstance(recipe, DataflowRecipe) and (whole := whole_source(recipe)) is not None \
            and (inner := recipe.sources[whole].merge_recipe) is not None:
        notes.append(f"the layer path is every layer of '{whole}' in order, unscaled: the model is that "
                     "parameter-space merge, exported as such")
        recipe = inner
    if isinstance(recipe, Recipe):
        if recipe.evomerge_only_params():
            notes.append("stable_ties: true (equal magnitudes at a threshold kept by position) is evomerge's own; "
                         "mergekit picks among them by its sort, so its tensors differ where such ties fall on a "
                         "threshold; --format model reproduces ours")
        if recipe.dtype in ("float16", "bfloat16") and recipe.compute_dtype == "float32":
            notes.append(f"mergekit computes a {recipe.dtype} recipe in {recipe.dtype}; evomerge computed it in float32 "
                         "and rounded once, so mergekit's tensors differ by its rounding errors (a few units in the "
                         "last place); compute_dtype: recipe gives mergekit's numbers")
        if METHODS[recipe.merge_method].mergekit_note:
            notes.append(METHODS[recipe.merge_method].mergekit_note)
        if METHODS[recipe.merge_method].random:
            notes.append(f"{recipe.merge_method} draws random masks: mergekit draws its own, so its tensors differ "
                         f"from evomerge's (which seeds them with seed {recipe.seed}); --format model reproduces ours")
        return recipe.to_yaml(mergekit_only=True), notes
    config = passthrough_config(recipe)
    if config is not None:
        return yaml.safe_dump(config, sort_keys=False, default_flow_style=None), notes
    why = []
    scaled = [(i, h.scale) for i, h in enumerate(recipe.path) if h.scale != 1.0]
    if scaled:
        i, s = scaled[0]
        why.append(f"{len(scaled)} hop(s) scale the residual stream (hop {i}: {s:g}); mergekit's passthrough copies "
                   "layers unscaled")
    merged = sorted({h.model for h in recipe.path if recipe.sources[h.model].merge_recipe is not None})
    if merged:
        why.append(f"the path runs through the parameter-space merge(s) {', '.join(merged)}, which one mergekit config "
                   "cannot feed into a passthrough")
    if recipe.embed != recipe.path[0].model:
        why.append(f"the embeddings come from '{recipe.embed}', not from the first hop's model")
    if recipe.head != recipe.path[-1].model:
        why.append(f"the final norm and head come from '{recipe.head}', not from the last hop's model")
    raise NotMergekit("this data-flow recipe is not expressible in mergekit: " + "; ".join(why))


def parameter_recipes(recipe: AnyRecipe) -> list[tuple[str | None, Recipe]]:
    """The parameter-space merges inside a recipe, each with the source name it goes by: a PS recipe is its own
    (name None); a path holds one per inline merge source (none for a path over model folders alone)."""
    if isinstance(recipe, DataflowRecipe):
        return [(name, s.merge_recipe) for name, s in recipe.sources.items() if s.merge_recipe is not None]
    return [(None, recipe)]


def layer_path(recipe: AnyRecipe) -> DataflowRecipe | None:
    """The recipe as a layer path, or None for a parameter-space merge (whose layers are its models')."""
    return recipe if isinstance(recipe, DataflowRecipe) else None
