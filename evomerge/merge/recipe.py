"""Recipes: mergekit-format YAML, parsed into dataclasses and validated before any tensor is read.

A recipe names a merge method, an optional base model and either `models` (whole models) or `slices`
(layer ranges). Parameter values are mergekit "settings": a scalar, a gradient list interpolated across
layers, or a list of `{filter, value}` entries matched against tensor names (see settings.py).
Relative model paths resolve against the recipe file's folder first, then the working directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from evomerge.config import DTYPES, Where, check_keys, suggest
from evomerge.checkpoints.io import CheckpointError
from evomerge.checkpoints.refs import adapted_parts, reference_of, resolve_model_ref
from evomerge.errors import UserError
from evomerge.merge.methods import EVOMERGE_ONLY_PARAMS, METHODS, required_model_params, validate_params

Setting = Any  # float | int | bool | str | list[float] | list[{"filter": str, "value": ...}]

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "seed", "name", "compute_dtype",
)
# compute_dtype (evomerge's own): "float32" computes every merge in float32 and rounds once at the end (the
# default: the most accurate); "recipe" computes in the recipe's `dtype` with mergekit 0.1.5's roundings, for
# the same bits as mergekit from a half-precision recipe (see `methods.merge_tensor`).
COMPUTE_DTYPES = ("float32", "recipe")
UNSUPPORTED_KEYS = {
    "modules": "multi-module merges are not supported; merge each module separately",
}


class RecipeError(UserError, ValueError):
    """A recipe is malformed. The message names the file and the field, and says what to do."""


@dataclass(frozen=True)
class ModelEntry:
    """One model's entry in a recipe (`models[i]`, `slices[i].sources[j]`): a whole model (`layer_range` None) or a
    layer range of it, with its parameters. (A data-flow path's "source" is another idea: merge/sources.py.)"""

    model: str
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class Slice:
    sources: tuple[ModelEntry, ...]
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    base_model: str | None = None


@dataclass(frozen=True)
class TokenSource:
    """Where one token's row comes from for models that lack it (`tokenizer.tokens.TOKEN`, mergekit's semantics):
    a model's row for that token (`model`), zeros (`zero`), or a row of a model's own vocabulary (`model_token`:
    `token` or `token_id`). `force`: for every model, also those that have the token."""

    kind: str  # model | zero | model_token
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output tokenizer (`union`, `base` or a model's) and per-token sources (merge/vocab.py)."""

    source: str = "union"
    tokens: Mapping[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        if self.tokens:
            out["tokens"] = {t: _token_dict(ts) for t, ts in self.tokens.items()}
        if self.pad_to_multiple_of:
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        return out


def _token_dict(ts: TokenSource) -> dict[str, Any]:
    if ts.kind == "model":
        source: Any = ts.model
    elif ts.kind == "zero":
        source = {"kind": "zero"}
    else:
        source = {"kind": "model_token", "model": ts.model} | (
            {"token": ts.token} if ts.token is not None else {"token_id": ts.token_id})
    return {"source": source} | ({"force": True} if ts.force else {})


@dataclass
class Recipe:
    merge_method: str
    base_model: str | None = None
    models: tuple[ModelEntry, ...] | None = None
    slices: tuple[Slice, ...] | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # as written; `tokenizer` holds what it means
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None  # Jinja text, or "auto": the template most of the models use
    seed: int = 0  # evomerge extension: seeds the random sparsifiers (DARE, DELLA)
    compute_dtype: str = "float32"  # evomerge extension: see COMPUTE_DTYPES
    name: str | None = None
    paths: dict[str, Path] = field(default_factory=dict)  # model label -> resolved folder
    source_file: Path | None = None

    def model_labels(self) -> list[str]:
        """Every model the recipe names, base first, each once."""
        labels: list[str] = [self.base_model] if self.base_model else []
        for src in self.all_sources():
            if src.model not in labels:
                labels.append(src.model)
        return labels

    def all_sources(self) -> list[ModelEntry]:
        if self.models is not None:
            return list(self.models)
        return [s for sl in self.slices or () for s in sl.sources]

    def to_dict(self) -> dict[str, Any]:
        """The mergekit-format mapping (what `to_yaml` writes)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            out["base_model"] = self.base_model
        if self.models is not None:
            out["models"] = [_source_dict(s) for s in self.models]
        if self.slices is not None:
            out["slices"] = [
                {"sources": [_source_dict(s) for s in sl.sources]}
                | ({"parameters": _plain(sl.parameters)} if sl.parameters else {})
                | ({"base_model": sl.base_model} if sl.base_model else {})
                for sl in self.slices
            ]
        if self.parameters:
            out["parameters"] = _plain(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.tokenizer is not None and not self.tokenizer_source:
            out["tokenizer"] = self.tokenizer.to_dict()
        if self.chat_template:
            out["chat_template"] = self.chat_template
        return out

    def to_yaml(self, mergekit_only: bool = False) -> str:
        """The recipe as YAML; `mergekit_only`: what mergekit reads (no seed, compute_dtype nor evomerge-only
        parameter: mergekit always computes as `compute_dtype: recipe` says)."""
        data = self.to_dict()
        if not mergekit_only and self.seed:
            data["seed"] = self.seed
        if not mergekit_only and self.compute_dtype != "float32":
            data["compute_dtype"] = self.compute_dtype
        if mergekit_only:
            for holder in [data, *data.get("slices", [])]:
                params = holder.get("parameters")
                if params:
                    for key in EVOMERGE_ONLY_PARAMS:
                        params.pop(key, None)
                    if not params:
                        holder.pop("parameters")
            self._mergekit_names(data)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    def _mergekit_names(self, data: dict[str, Any]) -> None:
        """Models as mergekit names them: an adapted folder (evomerge's stand-in for MODEL+ADAPTER) as MODEL+ADAPTER."""
        def name(label: Any) -> Any:
            folder = self.paths.get(label, Path(label)) if isinstance(label, str) else None
            return reference_of(folder) if folder is not None and adapted_parts(folder) else label

        for holder in [data, *data.get("slices", [])]:
            if holder.get("base_model"):
                holder["base_model"] = name(holder["base_model"])
            for entry in holder.get("models", []) + holder.get("sources", []):
                entry["model"] = name(entry["model"])

    def compute_torch_dtype(self):
        """The dtype merges compute in: float32 (the default), or with `compute_dtype: recipe` the recipe's dtype."""
        return DTYPES[self.dtype] if self.compute_dtype == "recipe" and self.dtype else DTYPES["float32"]

    def evomerge_only_params(self) -> list[str]:
        """The evomerge-only parameters this recipe sets to a non-default value (mergekit would not apply them)."""
        found = []
        for params in [self.parameters, *(sl.parameters for sl in self.slices or ())]:
            found += [k for k in EVOMERGE_ONLY_PARAMS if params.get(k) not in (None, False, 0)]
        return sorted(set(found))


def _plain(params: Mapping[str, Setting]) -> dict[str, Setting]:
    return {k: v for k, v in params.items()}


def _source_dict(s: ModelEntry) -> dict[str, Any]:
    d: dict[str, Any] = {"model": s.model}
    if s.layer_range is not None:
        d["layer_range"] = list(s.layer_range)
    if s.parameters:
        d["parameters"] = _plain(s.parameters)
    return d


def recipe_where(source_file: Path | None) -> Where:
    """Errors of a recipe file (or of a recipe mapping, named `<recipe>`), as RecipeError."""
    return Where(source_file, RecipeError, default="<recipe>")


def _leaves(setting: Setting) -> list[Any]:
    """Every scalar a setting can evaluate to (for range checks)."""
    if isinstance(setting, list):
        out: list[Any] = []
        for e in setting:
            out.extend(_leaves(e["value"]) if isinstance(e, dict) else [e])
        return out
    return [setting]


def _check_setting(where: Where, field_path: str, setting: Setting) -> None:
    def scalar(v: Any) -> bool:
        return isinstance(v, (int, float, bool, str))

    if scalar(setting):
        return
    if isinstance(setting, list) and setting:
        if all(scalar(e) for e in setting):
            return
        if all(isinstance(e, dict) for e in setting):
            for i, e in enumerate(setting):
                unknown = set(e) - {"filter", "value"}
                if unknown or "value" not in e:
                    raise where.error(
                        f"{field_path}[{i}]",
                        "a filtered setting is {filter: <substring of tensor names>, value: <number or list>}",
                    )
                _check_setting(where, f"{field_path}[{i}].value", e["value"])
            return
    raise where.error(
        field_path,
        f"got {setting!r}; a parameter is a number, a list of numbers (a gradient across layers), "
        "or a list of {filter, value} entries",
    )


def resolve_model_folder(where: Where, field_path: str, label: str, base_dir: Path | None, hint: str = "") -> Path:
    """The model folder a file names at `field_path` (a folder, a Hub id[@revision], MODEL+ADAPTER:
    `checkpoints.refs`), or `where`'s error for that field, with `hint` after the reason."""
    if not isinstance(label, str) or not label:
        raise where.error(field_path, "must be a model folder path, a Hub id or MODEL+ADAPTER")
    try:
        return resolve_model_ref(label, base_dir)
    except CheckpointError as e:
        raise where.error(field_path, f"{e}{hint}") from None


def _parse_params(where: Where, field_path: str, raw: Any, allowed: tuple[str, ...]) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise where.error(field_path, "must be a mapping of parameter names to values")
    for key, value in raw.items():
        if key not in allowed:
            raise where.error(f"{field_path}.{key}", "this merge method takes no such parameter." + suggest(key, allowed))
        _check_setting(where, f"{field_path}.{key}", value)
    return dict(raw)


def _parse_source(where: Where, field_path: str, raw: Any, model_keys: tuple[str, ...], in_slice: bool) -> ModelEntry:
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict) or "model" not in raw:
        raise where.error(field_path, "each entry needs a 'model' (a model folder path)")
    allowed = ("model", "parameters", "layer_range") if in_slice else ("model", "parameters")
    check_keys(raw, allowed, where, f"{field_path}.")
    layer_range = None
    if in_slice:
        lr = raw.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr) and 0 <= lr[0] < lr[1]):
            raise where.error(f"{field_path}.layer_range", f"must be [start, end) with 0 <= start < end, got {lr!r}")
        layer_range = (lr[0], lr[1])
    params = _parse_params(where, f"{field_path}.parameters", raw.get("parameters"), model_keys)
    return ModelEntry(model=str(raw["model"]), parameters=params, layer_range=layer_range)


def _parse_tokenizer(where: Where, data: Mapping[str, Any]) -> TokenizerSpec | None:
    """`tokenizer_source: X` (mergekit's short form) or the `tokenizer:` block, as one TokenizerSpec."""
    short, block = data.get("tokenizer_source"), data.get("tokenizer")
    if short is not None and block is not None:
        raise where.error("tokenizer", "give 'tokenizer_source' or the 'tokenizer' block, not both")
    if short is not None:
        if not isinstance(short, str) or not short:
            raise where.error("tokenizer_source", "must be 'union', 'base' or a model of the recipe")
        return TokenizerSpec(short)
    if block is None:
        return None
    if not isinstance(block, dict):
        raise where.error("tokenizer", "must be a mapping: {source: union | base | MODEL, tokens: {...}, "
                          "pad_to_multiple_of: N}")
    check_keys(block, ("source", "tokens", "pad_to_multiple_of"), where, "tokenizer.")
    source = block.get("source", "union")
    if not isinstance(source, str) or not source:
        raise where.error("tokenizer.source", "must be 'union', 'base' or a model of the recipe")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise where.error("tokenizer.pad_to_multiple_of", f"must be a positive integer, got {pad!r}")
    tokens: dict[str, TokenSource] = {}
    raw_tokens = block.get("tokens") or {}
    if not isinstance(raw_tokens, dict):
        raise where.error("tokenizer.tokens", "must map each token to {source: ..., force: true|false}")
    for token, cfg in raw_tokens.items():
        here = f"tokenizer.tokens.{token}"
        cfg = cfg or {}
        if not isinstance(cfg, dict):
            raise where.error(here, "must be {source: MODEL | {kind: zero} | {kind: model_token, ...}, force: bool}")
        check_keys(cfg, ("source", "force"), where, f"{here}.")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise where.error(f"{here}.force", f"must be true or false, got {force!r}")
        src = cfg.get("source")
        if isinstance(src, str) and src:
            tokens[str(token)] = TokenSource("model", model=src, force=force)
        elif isinstance(src, dict) and src.get("kind") == "zero":
            check_keys(src, ("kind",), where, f"{here}.source.")
            tokens[str(token)] = TokenSource("zero", force=force)
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            check_keys(src, ("kind", "model", "token", "token_id"), where, f"{here}.source.")
            if not isinstance(src.get("model"), str) or (src.get("token") is None) == (src.get("token_id") is None):
                raise where.error(f"{here}.source", "model_token needs a 'model' and one of 'token' or 'token_id'")
            if src.get("token_id") is not None and (not isinstance(src["token_id"], int) or src["token_id"] < 0):
                raise where.error(f"{here}.source.token_id", f"must be a non-negative integer, got {src['token_id']!r}")
            tokens[str(token)] = TokenSource("model_token", model=src["model"], token=src.get("token"),
                                             token_id=src.get("token_id"), force=force)
        else:
            raise where.error(f"{here}.source", f"must be a model, {{kind: zero}} or {{kind: model_token, model, token}}, "
                              f"got {src!r}")
    return TokenizerSpec(source, tokens, pad)


def parse_recipe(data: Any, source_file: Path | None = None, check_paths: bool = True) -> Recipe:
    """Validate a recipe mapping and return a Recipe. Raises RecipeError naming file and field."""
    where = recipe_where(source_file)
    if not isinstance(data, dict):
        raise where.error("(top level)", "a recipe is a YAML mapping with at least 'merge_method' and 'models' or 'slices'")
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise where.error(key, UNSUPPORTED_KEYS[key])
        if key not in TOP_LEVEL_KEYS:
            raise where.error(key, "unknown field." + suggest(key, TOP_LEVEL_KEYS))
    method = data.get("merge_method")
    if method not in METHODS:
        raise where.error("merge_method", f"unknown method {method!r}." + suggest(str(method), sorted(METHODS)))
    spec = METHODS[method]
    model_keys = tuple(spec.model_params)
    all_keys = tuple(dict.fromkeys((*spec.model_params, *spec.global_params)))

    has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
    if has_models == has_slices:
        raise where.error("models", "give exactly one of 'models' (whole models) or 'slices' (layer ranges)")
    models = slices = None
    if has_models:
        if not isinstance(data["models"], list) or not data["models"]:
            raise where.error("models", "must be a non-empty list of {model: PATH, parameters: {...}}")
        models = tuple(_parse_source(where, f"models[{i}]", m, model_keys, False) for i, m in enumerate(data["models"]))
    else:
        if not isinstance(data["slices"], list) or not data["slices"]:
            raise where.error("slices", "must be a non-empty list of {sources: [...]}")
        parsed = []
        for i, sl in enumerate(data["slices"]):
            if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
                raise where.error(f"slices[{i}]", "each slice needs a non-empty 'sources' list")
            check_keys(sl, ("sources", "parameters", "base_model"), where, f"slices[{i}].")
            sources = tuple(
                _parse_source(where, f"slices[{i}].sources[{j}]", s, model_keys, True) for j, s in enumerate(sl["sources"])
            )
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}  # type: ignore[index]
            if len(lengths) > 1:
                raise where.error(f"slices[{i}].sources", f"every source of a slice must span the same number of layers, got {sorted(lengths)}")
            params = _parse_params(where, f"slices[{i}].parameters", sl.get("parameters"), all_keys)
            parsed.append(Slice(sources, params, sl.get("base_model")))
        slices = tuple(parsed)

    parameters = _parse_params(where, "parameters", data.get("parameters"), all_keys)
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPES:
            raise where.error(key, f"unknown dtype {data[key]!r}; use one of {', '.join(DTYPES)}")
    compute = data.get("compute_dtype", "float32")
    if compute not in COMPUTE_DTYPES:
        raise where.error("compute_dtype", f"got {compute!r}; use float32 (the default: compute in float32, round "
                          "once at the end) or recipe (compute in the recipe's dtype, as mergekit does)")
    if compute == "recipe" and not data.get("dtype"):
        raise where.error("compute_dtype", "'recipe' computes in the recipe's dtype: set dtype (e.g. dtype: bfloat16)")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise where.error("seed", f"must be a non-negative integer, got {seed!r}")

    tokenizer = _parse_tokenizer(where, data)
    template = data.get("chat_template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise where.error("chat_template", "must be a Jinja chat template (text), or 'auto' (the models' most common)")
    recipe = Recipe(
        merge_method=method,
        base_model=data.get("base_model"),
        models=models,
        slices=slices,
        parameters=parameters,
        dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
        tokenizer_source=data.get("tokenizer_source"),
        tokenizer=tokenizer,
        chat_template=template,
        seed=seed,
        compute_dtype=compute,
        name=data.get("name"),
        source_file=source_file,
    )
    if spec.needs_base and not recipe.base_model and not any(sl.base_model for sl in slices or ()):
        raise where.error("base_model", f"method '{method}' needs a base model (the common ancestor of the models)")
    _check_values(where, recipe)
    labels = recipe.model_labels()
    if tokenizer is not None:
        named = [("tokenizer_source" if recipe.tokenizer_source else "tokenizer.source", tokenizer.source)]
        named += [(f"tokenizer.tokens.{t}.source", ts.model) for t, ts in tokenizer.tokens.items() if ts.model]
        for field_path, label in named:
            if label not in labels and label not in ("union", "base"):
                raise where.error(field_path, f"'{label}' is not one of the recipe's models ({', '.join(labels)}); "
                                  "name it as the models list does, or use 'union' or 'base'")
    if check_paths:
        base_dir = source_file.parent if source_file else None
        for label, field_path in _label_fields(recipe):
            if label not in recipe.paths:
                recipe.paths[label] = resolve_model_folder(where, field_path, label, base_dir)
    return recipe


def _label_fields(recipe: Recipe) -> list[tuple[str, str]]:
    out = []
    if recipe.base_model:
        out.append((recipe.base_model, "base_model"))
    if recipe.models is not None:
        out += [(s.model, f"models[{i}].model") for i, s in enumerate(recipe.models)]
    for i, sl in enumerate(recipe.slices or ()):
        if sl.base_model:
            out.append((sl.base_model, f"slices[{i}].base_model"))
        out += [(s.model, f"slices[{i}].sources[{j}].model") for j, s in enumerate(sl.sources)]
    if recipe.tokenizer_source and recipe.tokenizer_source not in ("base", "union"):
        out.append((recipe.tokenizer_source, "tokenizer_source"))
    return out


def _check_values(where: Where, recipe: Recipe) -> None:
    """Run the method's own range checks on every value a setting can take, naming the field where the value
    is written, and check that every non-base model gets each required parameter from somewhere."""
    spec = METHODS[recipe.merge_method]

    def check(field_prefix: str, params: Mapping[str, Setting]) -> None:
        for key, setting in params.items():
            per_model = key in spec.model_params
            for leaf in _leaves(setting):
                _validate_one(where, f"{field_prefix}.{key}", recipe.merge_method,
                              {key: leaf} if per_model else {}, {} if per_model else {key: leaf})

    check("parameters", recipe.parameters)
    if recipe.models is not None:
        groups = [("models", {}, recipe.models)]
    else:
        groups = [(f"slices[{i}]", sl.parameters, sl.sources) for i, sl in enumerate(recipe.slices or ())]
    bases = {recipe.base_model} | {sl.base_model for sl in recipe.slices or ()}
    for prefix, slice_params, sources in groups:
        if prefix != "models":
            check(f"{prefix}.parameters", slice_params)
        for j, src in enumerate(sources):
            field_prefix = f"{prefix}[{j}]" if prefix == "models" else f"{prefix}.sources[{j}]"
            check(f"{field_prefix}.parameters", src.parameters)
            if src.model in bases:
                continue
            given = set(recipe.parameters) | set(slice_params) | set(src.parameters)
            missing = [k for k in required_model_params(recipe.merge_method) if k not in given]
            if missing:
                raise where.error(
                    f"{field_prefix}.parameters",
                    f"method '{recipe.merge_method}' needs {', '.join(repr(m) for m in missing)} for model '{src.model}'",
                )


def _validate_one(where: Where, field_path: str, method: str, model_params: dict, global_params: dict) -> None:
    """Check one value with the method's own validator, the other parameters at their defaults."""
    spec = METHODS[method]
    full_model = {k: (d if d is not None else 1.0) for k, d in spec.model_params.items()} | model_params
    full_global = {k: d for k, d in spec.global_params.items() if d is not None} | global_params
    try:
        validate_params(method, [full_model], full_global)
    except ValueError as e:
        raise where.error(field_path, str(e)) from None
