"""The parameter-space (PS) search space: a genome of named weights and densities decoded to a mergekit recipe.

Two shapes, one class:

- Sakana-style (`layer_groups: 1`, `modules: ["*"]`): per source model a `weight` and a `density` gene for
  one TIES/DARE-family method; the recipe is a `models:` list.
- layer-wise, mergekit-evolve style: the layers are cut into `layer_groups` contiguous groups, and per group,
  per module filter (substrings of tensor names such as `self_attn`, `mlp`) and per source model there is a
  weight and a density gene; the recipe is a `slices:` list, one slice per group, with `{filter, value}`
  settings. Tensors no filter matches (norms; embeddings and head take the first/last slice's values) get the
  mean of the group's filter values, unless `"*"` is one of the modules.

With several `methods`, a `method` gene in [0, 1] picks one (equal-width bins, in the listed order).
Any method of the table can be searched whose required values the space can give: per-model `weight` is a
gene, `density` a gene where the method sparsifies, and anything else the method requires (nearswap's and
slerp's `t`) comes from the space's fixed `parameters`; it must also accept the space's number of models
(nearswap, arcee_fusion and slerp take exactly one besides the base, nuslerp two). A method without a weight
or density (karcher, sce, ram, ramplus_tl, nearswap, arcee_fusion) ignores those genes: it is one more choice
of the method gene, and a space of such methods alone has nothing to search and is refused.

Decoding is deterministic (genes clipped to their bounds, values rounded to 6 decimals so that equal recipes
hash equal) and always valid (DELLA densities are kept inside (epsilon, 1 - epsilon)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from evomerge.config import Where, bounds_field
from evomerge.merge.methods import METHODS
from evomerge.merge.recipe import Recipe, parse_recipe
from evomerge.errors import UserError

DIGITS = 6  # decoded values are rounded: recipes that differ below this are the same recipe


class SpaceError(UserError, ValueError):
    """A search space is malformed: the message says which field and what to do."""


def _bounds_pair(value: Any, field_name: str) -> tuple[float, float]:
    return bounds_field(Where(None, SpaceError, default=""), field_name, value)  # the caller adds the file


@dataclass
class ParameterSpace:
    """Genome <-> parameter-space recipe. `models`: name -> model folder; `base`: the name of the base model."""

    models: Mapping[str, Path]
    base: str
    methods: Sequence[str] = ("ties",)
    layer_groups: int = 1
    modules: Sequence[str] = ("*",)
    num_layers: int | None = None  # read from the base's config.json when None (needed for layer groups)
    weight_bounds: tuple[float, float] = (0.0, 1.0)
    density_bounds: tuple[float, float] = (0.1, 1.0)
    parameters: Mapping[str, Any] = field(default_factory=dict)  # fixed method-wide parameters (normalize, lambda)
    seed: int = 0  # the recipe seed: random sparsifiers (DARE, DELLA) are deterministic per recipe
    dtype: str | None = "float32"
    sources: list[str] = field(init=False)
    groups: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.models = {k: Path(v) for k, v in self.models.items()}
        self.methods = list(self.methods)
        self.modules = list(self.modules)
        if self.base not in self.models:
            raise SpaceError(f"base: '{self.base}' is not one of the models ({', '.join(self.models)})")
        self.sources = [m for m in self.models if m != self.base]
        if not self.sources:
            raise SpaceError("models: a parameter-space search needs at least one model besides the base")
        if not self.methods:
            raise SpaceError("method: give a merge method or a list of them")
        for m in self.methods:
            self._check_searchable(m)
        if not any({"weight", "density"} & set(METHODS[m].model_params) for m in self.methods):
            raise SpaceError(f"method: no weight or density to search ({', '.join(self.methods)} take none); "
                             "add a method that does (ties, task_arithmetic, multislerp, ...)")
        if not self.modules or len(set(self.modules)) != len(self.modules):
            raise SpaceError(f"modules: give distinct tensor-name filters (or [\"*\"]), got {self.modules!r}")
        if self.num_layers is None:
            self.num_layers = _num_layers(self.models[self.base])
        if not 1 <= self.layer_groups <= self.num_layers:
            raise SpaceError(f"layer_groups: must be between 1 and the model's {self.num_layers} layers, got {self.layer_groups}")
        edges = np.linspace(0, self.num_layers, self.layer_groups + 1).round().astype(int)
        self.groups = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self.weight_bounds = _bounds_pair(self.weight_bounds, "weight_bounds")
        self.density_bounds = _bounds_pair(self.density_bounds, "density_bounds")
        if not 0 <= self.density_bounds[0] <= self.density_bounds[1] <= 1:
            raise SpaceError(f"density_bounds: bounds must lie in [0, 1], got {list(self.density_bounds)}")
        self.parameters = dict(sorted(dict(self.parameters).items()))  # one order: equal recipes, equal text
        allowed = set().union(*(METHODS[m].global_params for m in self.methods))
        for key in self.parameters:
            if key not in allowed:
                raise SpaceError(f"parameters.{key}: not a method-wide parameter of {', '.join(self.methods)} "
                                 f"(allowed: {', '.join(sorted(allowed))})")

    def _check_searchable(self, method: str) -> None:
        """Refuse a method no genome could decode to a valid recipe of, saying why."""
        if method not in METHODS:
            raise SpaceError(f"method: '{method}' cannot be searched here: no such method "
                             f"(methods: {', '.join(sorted(METHODS))})")
        spec = METHODS[method]
        missing = [k for k, d in spec.global_params.items() if d is None and k not in self.parameters]
        if missing:
            raise SpaceError(f"method: '{method}' cannot be searched here without {', '.join(missing)}: "
                             f"give it in the space's parameters (e.g. parameters: {{{missing[0]}: 0.5}})")
        genes = {"weight", "density"}
        ungiven = [k for k, d in spec.model_params.items() if d is None and k not in genes and k != "scale"]
        if ungiven:
            raise SpaceError(f"method: '{method}' cannot be searched here: it needs {', '.join(ungiven)} per model")
        n = len(self.sources) + (1 if spec.base_is_input else 0)
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            want = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                    else f"{spec.min_models} to {spec.max_models if spec.max_models is not None else 'any number of'}")
            raise SpaceError(f"method: '{method}' cannot be searched here: it merges {want} model(s) besides the "
                             f"base and the space has {len(self.sources)} ({', '.join(self.sources)})")

    # ------------------------------------------------------------ genes

    @property
    def layerwise(self) -> bool:
        return self.layer_groups > 1 or self.modules != ["*"]

    def _cells(self) -> list[tuple[int, str]]:
        return [(g, m) for g in range(len(self.groups)) for m in self.modules]

    def _cell_name(self, g: int, module: str) -> str:
        return "" if not self.layerwise else f"g{g}.{'all' if module == '*' else module}."

    @property
    def gene_names(self) -> list[str]:
        names = ["method"] if len(self.methods) > 1 else []
        for kind in ("weight", "density"):
            names += [f"{kind}.{self._cell_name(g, m)}{s}" for g, m in self._cells() for s in self.sources]
        return names

    @property
    def num_genes(self) -> int:
        return len(self.gene_names)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        n_cells = len(self._cells()) * len(self.sources)
        lower = [0.0] * (len(self.methods) > 1) + [self.weight_bounds[0]] * n_cells + [self.density_bounds[0]] * n_cells
        upper = [1.0] * (len(self.methods) > 1) + [self.weight_bounds[1]] * n_cells + [self.density_bounds[1]] * n_cells
        return np.array(lower), np.array(upper)

    def genome(self, weights: Mapping[str, float], density: float = 1.0, method: str | None = None) -> np.ndarray:
        """The genome giving every cell the same per-source `weights` (missing sources: 0) and `density`."""
        lower, upper = self.bounds
        g: list[float] = []
        if len(self.methods) > 1:
            i = self.methods.index(method) if method in self.methods else 0
            g.append((i + 0.5) / len(self.methods))
        cells = len(self._cells())
        g += [float(weights.get(s, 0.0)) for _ in range(cells) for s in self.sources]
        g += [float(density)] * (cells * len(self.sources))
        return np.clip(np.array(g), lower, upper)

    def seeds(self) -> list[tuple[str, np.ndarray]]:
        """Genomes worth putting into the first population: each parent, and the plain average of the sources.
        A parent is weight 1 on its own task vector (0 elsewhere, the base: all 0) at density 1."""
        method = "task_arithmetic" if "task_arithmetic" in self.methods else None
        out = [(f"parent:{self.base}", self.genome({}, 1.0, method))]
        out += [(f"parent:{s}", self.genome({s: 1.0}, 1.0, method)) for s in self.sources]
        n = len(self.sources)
        out.append(("average", self.genome({s: 1.0 / n for s in self.sources}, 1.0, method)))
        return out

    # ------------------------------------------------------------ decoding

    def decode(self, genome: np.ndarray, name: str | None = None) -> Recipe:
        """The recipe a genome encodes: always valid, same genome -> same recipe."""
        g = np.asarray(genome, dtype=np.float64)
        if g.shape != (self.num_genes,):
            raise ValueError(f"genome has shape {g.shape}; this space has {self.num_genes} genes")
        g = np.clip(np.nan_to_num(g, nan=0.0), *self.bounds)
        k = 0
        method = self.methods[0]
        if len(self.methods) > 1:
            method = self.methods[min(int(g[0] * len(self.methods)), len(self.methods) - 1)]
            k = 1
        n = len(self._cells()) * len(self.sources)
        weights = np.round(g[k:k + n], DIGITS).reshape(len(self.groups), len(self.modules), len(self.sources))
        density = np.round(g[k + n:k + 2 * n], DIGITS).reshape(weights.shape)
        spec = METHODS[method]
        if spec.sparsifier == "rank_sampling":  # DELLA: density +/- epsilon must stay inside (0, 1)
            eps = float(self.parameters.get("epsilon", 0.15))
            density = np.clip(density, round(eps + 1e-6, DIGITS), round(1 - eps - 1e-6, DIGITS))
        label = {m: str(p) for m, p in self.models.items()}

        def params(cell_w: np.ndarray, cell_d: np.ndarray, j: int) -> dict[str, Any]:
            """Source j's parameters in one group: scalars, or {filter, value} lists per module."""
            out: dict[str, Any] = {}
            for key, arr in (("weight", cell_w), ("density", cell_d)):
                if key not in spec.model_params or (key == "density" and spec.sparsifier is None):
                    continue  # the method takes no such value (task arithmetic's density would be ignored)
                values = [float(v) for v in arr[:, j]]
                if self.modules == ["*"]:
                    out[key] = values[0]
                    continue
                entries = [{"filter": m, "value": v} for m, v in zip(self.modules, values) if m != "*"]
                rest = values[self.modules.index("*")] if "*" in self.modules else round(float(np.mean(values)), DIGITS)
                out[key] = entries + [{"value": rest}]
            return out

        # Linear (and passthrough) take no base: the base is left out rather than made a model without a weight.
        takes_base = spec.accepts_base or spec.base_is_input
        data: dict[str, Any] = {"merge_method": method}
        if takes_base:
            data["base_model"] = label[self.base]
        base_source = [{"model": label[self.base], "layer_range": [a, b]} for a, b in self.groups]
        if not self.layerwise:
            data["models"] = [{"model": label[s], "parameters": params(weights[0], density[0], j)}
                              for j, s in enumerate(self.sources)]
        else:
            data["slices"] = [
                {"sources": base_source[gi:gi + 1] * takes_base
                 + [{"model": label[s], "layer_range": [a, b], "parameters": params(weights[gi], density[gi], j)}
                    for j, s in enumerate(self.sources)]}
                for gi, (a, b) in enumerate(self.groups)]
        if self.parameters:
            data["parameters"] = {k: v for k, v in self.parameters.items() if k in spec.global_params}
            if not data["parameters"]:
                del data["parameters"]
        if self.dtype:
            data["dtype"] = self.dtype
        if spec.random:
            data["seed"] = int(self.seed)
        if name:
            data["name"] = name
        recipe = parse_recipe(data, check_paths=False)
        recipe.paths.update({label[m]: p for m, p in self.models.items()})
        return recipe

    def describe(self) -> dict[str, Any]:
        return {"kind": "ps", "methods": list(self.methods), "layer_groups": self.layer_groups, "groups": self.groups,
                "modules": list(self.modules), "num_genes": self.num_genes}


def _num_layers(folder: Path) -> int:
    import json

    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        raise SpaceError(f"{folder}: no config.json (is it a model folder?)")
    from evomerge.checkpoints.arch import Architecture

    cfg = json.loads(cfg_file.read_text())
    try:
        return Architecture.from_config(cfg).num_layers
    except ValueError:
        raise SpaceError(f"{cfg_file}: no layer count (num_hidden_layers)") from None


def parent_recipe(models: Mapping[str, Path], name: str) -> Recipe:
    """A parent as a recipe (linear, weight 1 on itself): how the report scores a parent through the same path."""
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(models[name]), "parameters": {"weight": 1.0}}],
                           "dtype": "float32", "name": f"parent {name}"}, check_paths=False)
    recipe.paths[str(models[name])] = Path(models[name])
    return recipe
