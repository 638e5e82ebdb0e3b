"""Data-flow-space (DFS) merges: a new model whose layers are a path through the layers of other models.

A recipe is a path: an ordered list of hops, each (source, layer index, scale). The scale multiplies the
residual stream entering the hop. Sources are input checkpoints or parameter-space merges defined in the
same recipe (PS-then-DFS hybrids). Layers may repeat. YAML form:

```yaml
sources:                      # optional: names for model folders and inline PS merges
  A: ./models/arith           # a model folder (relative paths: the recipe's folder, then the cwd)
  MIX:                        # an inline parameter-space recipe (mergekit format, see recipe.py)
    merge_method: task_arithmetic
    base_model: ./models/base
    models:
      - {model: ./models/arith, parameters: {weight: 0.5}}
      - {model: ./models/cipher, parameters: {weight: 0.5}}
dataflow:
  embed: A                    # source of the token (and position) embeddings; default: the first hop's
  head: MIX                   # source of the final norm and output head; default: the last hop's
  path:                       # one entry per layer of the new model, in order
    - {model: A, layer: 0}
    - {model: A, layer: 1, scale: 1.0}
    - {model: MIX, layer: 1, scale: 0.8}   # scale multiplies the residual stream entering this hop
    - {model: ./models/cipher, layer: 3}   # `model` may also be a model folder not named in `sources`
dtype: float32                # optional output dtype (float32, float16, bfloat16); default: the sources'
name: my-path-merge           # optional, for the model card
```

The export (`api.write_recipe`) is a standard checkpoint: `num_hidden_layers` = path length, scales folded
into the weights (see fold.py), loadable by transformers and vLLM with no custom code. When every scale is 1
and every source is a model folder, a mergekit `passthrough` config of the same path is written beside it.
The in-memory model for the search lives in pathmodel.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import yaml
from tqdm import tqdm

from evomerge.checkpoints import classify_tensor
from evomerge.checkpoints.arch import Architecture, rename_layer, set_layer_count
from evomerge.checkpoints.compat import tokenizer_vocab
from evomerge.merge.fold import FOLDABLE_FAMILIES, all_ones, fold_factors, fold_rule, fold_tensor
from evomerge.config import DTYPES, Where, check_keys
from evomerge.merge.recipe import RecipeError, parse_recipe, recipe_where, resolve_model_folder
from evomerge.merge.sources import FolderSource, MergeSource, Source, SourceReader, as_source

TOP_LEVEL_KEYS = ("sources", "dataflow", "dtype", "name")
DATAFLOW_KEYS = ("embed", "head", "path")
HOP_KEYS = ("model", "layer", "scale")
MERGEKIT_CONFIG = "mergekit_config.yml"


@dataclass(frozen=True)
class Hop:
    model: str  # a source name
    layer: int  # layer index inside that source
    scale: float = 1.0  # multiplies the residual stream entering this hop


@dataclass(frozen=True)
class DataflowRecipe:
    path: tuple[Hop, ...]
    sources: Mapping[str, Source]  # source name -> model folder or parameter-space merge (sources.py)
    embed: str
    head: str
    dtype: str | None = None
    name: str | None = None
    source_file: Path | None = None

    def __post_init__(self) -> None:  # callers may hand model folders (Path) or PS recipes: one source type inside
        object.__setattr__(self, "sources", {k: as_source(v) for k, v in self.sources.items()})

    @property
    def scales(self) -> list[float]:
        return [h.scale for h in self.path]

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping (what `to_yaml` writes); sources are written with their resolved paths."""
        sources = {k: v.to_yaml_value() for k, v in self.sources.items()}
        hops = [{"model": h.model, "layer": h.layer} | ({"scale": h.scale} if h.scale != 1.0 else {}) for h in self.path]
        out: dict[str, Any] = {"sources": sources, "dataflow": {"embed": self.embed, "head": self.head, "path": hops}}
        if self.dtype:
            out["dtype"] = self.dtype
        if self.name:
            out["name"] = self.name
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def path_runs(hops: Any) -> str:
    """A path in words, consecutive layers of one source as one run: "reader 0-1, arith 0-7" (hops: Hop objects or
    the YAML's {model, layer} mappings; a scale other than 1 shows as "x0.8" after the layer it enters)."""
    runs: list[list[Any]] = []  # [model, first, last, scales]
    for h in hops:
        model, layer, scale = (h.model, h.layer, h.scale) if isinstance(h, Hop) else (
            str(h["model"]), int(h["layer"]), float(h.get("scale", 1.0)))
        if runs and runs[-1][0] == model and runs[-1][2] == layer - 1 and scale == 1.0:
            runs[-1][2] = layer
        else:
            runs.append([model, layer, layer, "" if scale == 1.0 else f" x{scale:.2f}"])
    return ", ".join(f"{m} {a}{f'-{b}' if b != a else ''}{sc}" for m, a, b, sc in runs)


# ---------------------------------------------------------------- parsing

def parse_dataflow(data: Any, source_file: Path | None = None, check_paths: bool = True) -> DataflowRecipe:
    """Validate a DFS recipe mapping. With `check_paths`, also resolve model folders and check the path against
    the models' headers (layer ranges, sizes), so every error surfaces before a tensor is read."""
    where = recipe_where(source_file)
    base_dir = source_file.parent if source_file else None
    if not isinstance(data, dict) or not isinstance(data.get("dataflow"), dict):
        raise where.error("dataflow", "a data-flow recipe needs a 'dataflow' mapping with a 'path' list")
    check_keys(data, TOP_LEVEL_KEYS, where, what="unknown field in a data-flow recipe.")
    flow = data["dataflow"]
    check_keys(flow, DATAFLOW_KEYS, where, "dataflow.")

    sources: dict[str, Source] = {}
    raw_sources = data.get("sources") or {}
    if not isinstance(raw_sources, dict):
        raise where.error("sources", "must be a mapping of names to a model folder or an inline merge recipe")
    for name, spec in raw_sources.items():
        sources[str(name)] = _parse_source(where, f"sources.{name}", spec, source_file, base_dir, check_paths)

    path = flow.get("path")
    if not isinstance(path, list) or not path:
        raise where.error("dataflow.path", "must be a non-empty list of hops like {model: NAME, layer: 0, scale: 1.0}")
    hops = []
    for i, raw in enumerate(path):
        f = f"dataflow.path[{i}]"
        if not isinstance(raw, dict) or "model" not in raw or "layer" not in raw:
            raise where.error(f, f"each hop is {{model: SOURCE, layer: INDEX, scale: NUMBER}}, got {raw!r}")
        check_keys(raw, HOP_KEYS, where, f"{f}.")
        model = _source_name(where, f"{f}.model", raw["model"], sources, base_dir, check_paths)
        layer = raw["layer"]
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise where.error(f"{f}.layer", f"must be a layer index (an integer >= 0), got {layer!r}")
        scale = raw.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or scale == float("inf"):
            raise where.error(f"{f}.scale", f"must be a finite number > 0, got {scale!r} (scales are folded through "
                              "scale-invariant norms, which only a positive factor passes); use 1.0 for no scaling")
        hops.append(Hop(model, layer, float(scale)))

    embed = _source_name(where, "dataflow.embed", flow.get("embed", hops[0].model), sources, base_dir, check_paths)
    head = _source_name(where, "dataflow.head", flow.get("head", hops[-1].model), sources, base_dir, check_paths)
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise where.error("dtype", f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    recipe = DataflowRecipe(tuple(hops), sources, embed, head, dtype, data.get("name"), source_file)
    if check_paths:
        plan_dataflow(recipe)
    return recipe


def _parse_source(where: Where, field_path: str, spec: Any, source_file: Path | None, base_dir: Path | None,
                  check_paths: bool) -> Source:
    if isinstance(spec, str):
        return FolderSource(resolve_model_folder(where, field_path, spec, base_dir) if check_paths else Path(spec))
    if isinstance(spec, dict):
        try:
            return MergeSource(parse_recipe(spec, source_file, check_paths=check_paths))
        except RecipeError as e:  # re-anchor the PS recipe's field names under this source
            prefix = f"{where.source}: "
            msg = str(e)
            raise RecipeError(f"{prefix}{field_path}.{msg[len(prefix):]}" if msg.startswith(prefix) else msg) from None
    raise where.error(field_path, "must be a model folder path or an inline merge recipe mapping (merge_method, models, ...)")


def _source_name(where: Where, field_path: str, value: Any, sources: dict[str, Source],
                 base_dir: Path | None, check_paths: bool) -> str:
    """A hop's `model`: a source name, or a model folder that becomes a source named by the text as written."""
    if not isinstance(value, str) or not value:
        raise where.error(field_path, f"must name a source or a model folder, got {value!r}")
    if value in sources:
        return value
    if not check_paths:
        sources[value] = FolderSource(Path(value))
        return value
    try:
        sources[value] = FolderSource(resolve_model_folder(where, field_path, value, base_dir))
    except RecipeError:
        names = f" (sources: {', '.join(sources)})" if sources else ""
        raise where.error(field_path, f"'{value}' is neither a source name{names} nor a model folder with a config.json; "
                          "add it under 'sources:' or fix the path") from None
    return value


# ---------------------------------------------------------------- planning

@dataclass(frozen=True)
class PathTensor:
    out_name: str
    source: str
    name: str  # tensor name inside the source
    factor: float = 1.0  # stream factor folded into this tensor
    rule: str | None = None  # how the factor applies (fold.fold_rule)


@dataclass
class DataflowPlan:
    recipe: DataflowRecipe
    tensors: list[PathTensor]
    config: dict[str, Any]  # config.json of the exported model
    tokenizer_dir: Path
    readers: dict[str, SourceReader] = field(repr=False, default_factory=dict)
    tied: bool = False  # the export keeps the head tied to the embeddings


def token_embedding_name(names: list[str]) -> str:
    """The token-embedding tensor (what a tied head reuses), not the position embeddings."""
    found = [n for n in names if classify_tensor(n).kind == "embed" and "wpe" not in n and "position" not in n]
    if len(found) != 1:
        raise RecipeError(f"cannot tell which tensor is the token embedding among {found or 'no embedding tensors'}")
    return found[0]


def plan_dataflow(recipe: DataflowRecipe, readers: Mapping[str, SourceReader] | None = None) -> DataflowPlan:
    """Check the path against the sources' headers and list every output tensor with its folded factor.
    Raises RecipeError naming the field before any tensor is read."""
    where = recipe_where(recipe.source_file)
    rd = dict(readers) if readers is not None else {}
    for name, spec in recipe.sources.items():
        if name not in rd:
            rd[name] = spec.open(name)
    archs = {n: Architecture.from_config(r.config, r.names()) for n, r in rd.items()}
    ref, ref_arch = rd[recipe.embed], archs[recipe.embed]

    def field_of(source: str) -> str:
        hops = [i for i, h in enumerate(recipe.path) if h.model == source]
        return f"dataflow.path[{hops[0]}].model" if hops else "dataflow.head"

    used = list(dict.fromkeys([recipe.embed, *(h.model for h in recipe.path), recipe.head]))
    ref_vocab = tokenizer_vocab(ref.tokenizer_dir)
    for name in used:
        a = archs[name]
        for what, mine, theirs in (("model_type", a.model_type, ref_arch.model_type),
                                   ("hidden size", a.hidden_size, ref_arch.hidden_size),
                                   ("vocab_size", a.vocab_size, ref_arch.vocab_size)):
            if mine != theirs:
                raise where.error(field_of(name), f"source '{name}' has {what} {mine} but the embed source "
                                  f"'{recipe.embed}' has {theirs}; a path joins layers of one architecture "
                                  "(fine-tunes of one base model)")
        vocab = tokenizer_vocab(rd[name].tokenizer_dir)
        if ref_vocab is not None and vocab is not None and vocab != ref_vocab:
            raise where.error(field_of(name), f"source '{name}' has another tokenizer than '{recipe.embed}'; "
                              "a path needs sources that share one tokenizer")
    if ref.config.get("scale_attn_by_inverse_layer_idx"):
        raise where.error("dataflow.path", "this GPT-2 config scales attention by 1/layer index, so a layer moved to "
                          "another position computes something else; data-flow merges do not support it")
    scales = recipe.scales
    if not all_ones(scales) and ref_arch.family not in FOLDABLE_FAMILIES:
        raise where.error("dataflow.path", f"scales other than 1 cannot be folded into a standard "
                          f"'{ref_arch.model_type}' checkpoint (supported: {', '.join(FOLDABLE_FAMILIES)} families); "
                          "set every scale to 1")

    template = {rename_layer(n, 0): s for n, s in ref.shapes.items() if classify_tensor(n).kind == "layer"
                and classify_tensor(n).layer == 0}
    embed_factor, block_factors = fold_factors(scales)
    model_type = ref_arch.model_type
    tied = recipe.embed == recipe.head and ref_arch.tied_embeddings and embed_factor == 1.0
    pre, post, layers = [], [], []
    for n in ref.names():
        kind = classify_tensor(n).kind
        if kind == "embed":
            pre.append(PathTensor(n, recipe.embed, n, embed_factor, "multiply"))
        elif kind == "other":
            pre.append(PathTensor(n, recipe.embed, n))
    for t, hop in enumerate(recipe.path):
        f = f"dataflow.path[{t}]"
        n_layers = archs[hop.model].num_layers
        if hop.layer >= n_layers:
            raise where.error(f"{f}.layer", f"layer {hop.layer} is out of range: source '{hop.model}' has layers "
                              f"0..{n_layers - 1}")
        names = [n for n in rd[hop.model].names() if classify_tensor(n).layer == hop.layer]
        got = {rename_layer(n, 0): rd[hop.model].shapes[n] for n in names}
        if got != template:
            diff = sorted(set(got.items()) ^ set(template.items()))[:3]
            raise where.error(f"{f}.model", f"layer {hop.layer} of '{hop.model}' does not have the tensors and shapes "
                              f"of the embed source's layers (differs in {diff}); hops must come from one architecture")
        for n in names:
            out = rename_layer(n, t)
            rule = fold_rule(model_type, out)
            layers.append(PathTensor(out, hop.model, n, block_factors[t] if rule else 1.0, rule))
    head = rd[recipe.head]
    head_tensor = None
    for n in head.names():
        kind = classify_tensor(n).kind
        if kind == "final_norm":
            post.append(PathTensor(n, recipe.head, n))
        elif kind == "head":
            head_tensor = n
    if not tied:
        post.append(PathTensor("lm_head.weight", recipe.head, head_tensor or token_embedding_name(head.names())))

    config = json.loads(json.dumps(ref.config))
    set_layer_count(config, len(recipe.path))
    types = config.get("layer_types")
    if isinstance(types, list):  # each layer keeps the attention type it was trained with
        config["layer_types"] = [(rd[h.model].config.get("layer_types") or types)[h.layer] for h in recipe.path]
    config["tie_word_embeddings"] = tied
    if recipe.dtype:
        config["dtype"] = recipe.dtype
        config.pop("torch_dtype", None)
    return DataflowPlan(recipe, pre + layers + post, config, ref.tokenizer_dir, rd, tied)


# ---------------------------------------------------------------- export

def iter_dataflow(plan: DataflowPlan, device: str | torch.device = "cpu", progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor on CPU) of the exported checkpoint, scales folded in."""
    dtype = DTYPES.get(plan.recipe.dtype or "")
    seen: set[tuple[str, str]] = set()
    for job in tqdm(plan.tensors, desc="exporting path", unit="tensor", disable=not progress):
        tensor = plan.readers[job.source].get(job.name, device)
        if (job.source, job.name) in seen:  # a repeated layer: memory-mapped reads share storage, which
            tensor = tensor.clone()          # safetensors refuses to write twice
        seen.add((job.source, job.name))
        tensor = fold_tensor(tensor, job.factor, job.rule)  # type: ignore[arg-type]
        yield job.out_name, (tensor.to(dtype) if dtype else tensor).cpu()


def dataflow_to_dict(recipe: DataflowRecipe) -> dict[str, torch.Tensor]:
    """The exported model's tensors in memory (tests, small models)."""
    return dict(iter_dataflow(plan_dataflow(recipe)))


def whole_source(recipe: DataflowRecipe) -> str | None:
    """The source this path merely reproduces (its every layer in order, unit scales, its own embeddings and head),
    or None. Such a path is that source: a hybrid whose path is the identity over its merge is the merge."""
    first = recipe.path[0].model
    if recipe.embed != first or recipe.head != first or not all_ones(recipe.scales):
        return None
    if [(h.model, h.layer) for h in recipe.path] != [(first, i) for i in range(len(recipe.path))]:
        return None
    return first if recipe.sources[first].num_layers() == len(recipe.path) else None


def passthrough_config(recipe: DataflowRecipe) -> dict[str, Any] | None:
    """The same path as a mergekit `passthrough` recipe, or None where mergekit cannot say it: scales other than
    1, parameter-space sources, or embeddings / head taken from other models than the first / last hop's."""
    if not all_ones(recipe.scales) or recipe.embed != recipe.path[0].model or recipe.head != recipe.path[-1].model:
        return None
    if any(recipe.sources[h.model].merge_recipe is not None for h in recipe.path):
        return None
    slices: list[dict[str, Any]] = []
    run_model, start, end = recipe.path[0].model, recipe.path[0].layer, recipe.path[0].layer + 1
    for hop in recipe.path[1:]:
        if hop.model == run_model and hop.layer == end:
            end += 1
            continue
        slices.append({"sources": [{"model": recipe.sources[run_model].to_yaml_value(), "layer_range": [start, end]}]})
        run_model, start, end = hop.model, hop.layer, hop.layer + 1
    slices.append({"sources": [{"model": recipe.sources[run_model].to_yaml_value(), "layer_range": [start, end]}]})
    out: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if recipe.dtype:
        out["dtype"] = recipe.dtype
    return out
