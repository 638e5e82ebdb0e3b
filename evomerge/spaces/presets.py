"""Search spaces from YAML: a preset file in `search_spaces/` or an inline mapping in a job spec.

    kind: ps | dfs | hybrid
    # ps: method (a name or a list: a `method` gene), layer_groups, modules, weight, density, parameters, seed
    # dfs: sources (model names, default all), repeats, min_layers, max_layers, pin_first, pin_last,
    #      embed, head, scales (slot | transition | none), scale_bounds, segments (0: keep genes; N: N runs of layers)
    # hybrid: ps: {...ps keys}, dfs: {...dfs keys}; the DFS sources get one more, `merge` (the PS merge)

Every space has `gene_names`, `num_genes`, `bounds`, `decode(genome, name)`, `seeds()` and `describe()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Union

import numpy as np

from evomerge.config import EXAMPLES, Where, check_keys, read_yaml, renamed_keys
from evomerge.merge.dataflow import DataflowRecipe
from evomerge.merge.methods import METHODS
from evomerge.merge.recipe import Recipe
from evomerge.merge.sources import as_source
from evomerge.spaces.dataflow import DataflowSpace, source_sizes
from evomerge.spaces.hybrid import MERGE, HybridSpace
from evomerge.spaces.ps import ParameterSpace, SpaceError

PRESET_DIR = EXAMPLES / "search_spaces"  # package data: installed with evomerge
PS_KEYS = ("kind", "method", "layer_groups", "modules", "weight_bounds", "density_bounds", "parameters", "seed")
# `weight: [a, b]` read like a recipe's layer gradient; the bounds of a gene say what they are
RENAMED_PS_KEYS = {"weight": "weight_bounds", "density": "density_bounds"}
DFS_KEYS = ("kind", "sources", "repeats", "min_layers", "max_layers", "pin_first", "pin_last", "embed", "head",
            "scales", "scale_bounds", "segments")
AnyRecipe = Union[Recipe, DataflowRecipe]


class Space(Protocol):
    gene_names: list[str]
    num_genes: int
    bounds: tuple[np.ndarray, np.ndarray]

    def decode(self, genome: np.ndarray, name: str | None = None) -> AnyRecipe: ...
    def seeds(self) -> list[tuple[str, np.ndarray]]: ...
    def describe(self) -> dict[str, Any]: ...


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_space_config(value: str | Mapping[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """A preset name (`sakana_ps`), a YAML path, or an inline mapping -> the space mapping."""
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str) or not value:
        raise SpaceError(f"search_space: give a preset name ({', '.join(preset_names())}), a YAML file or a mapping")
    candidates = [PRESET_DIR / f"{value}.yaml", Path(value)] + ([base_dir / value] if base_dir else [])
    for p in candidates:
        if p.is_file():
            data, _ = read_yaml(p, SpaceError, "search space")
            if not isinstance(data, dict):
                raise SpaceError(f"{p}: a search space is a YAML mapping with 'kind: ps | dfs | hybrid'")
            return data
    raise SpaceError(f"search_space: no preset or file '{value}'; presets: {', '.join(preset_names())}")


def pin_defaults(cfg: Mapping[str, Any], scales: str | None = None, stable_ties: bool | None = True) -> dict[str, Any]:
    """The space mapping with the defaults that shape its genome or its merges written in, so a stored job keeps
    decoding its genomes, and merging them, the same way when a default changes:

    - a dfs space's `scales` (default: the current default). A stored spec that lacks it was written before it was
      pinned, when the dfs default was `transition`: `JobSpec.from_dict` passes that.
    - a ps space's `parameters.stable_ties` where its methods rank magnitudes (TIES, breadcrumbs): `true` for a new
      job (equal magnitudes at a threshold kept by position: the one-pass CPU merge, `merge/fused.py`, instead of a
      full sort per tensor to reproduce mergekit's order). A stored spec that lacks it was merged in mergekit's
      order: `JobSpec.from_dict` passes None, which leaves it out (and its recipes' text as it was)."""
    out = dict(cfg)
    default = scales or DataflowSpace.__dataclass_fields__["scales"].default
    if out.get("kind") == "dfs":
        out.setdefault("scales", default)
    elif out.get("kind") == "hybrid" and isinstance(out.get("dfs") or {}, Mapping):
        out["dfs"] = {**(out.get("dfs") or {}), "scales": (out.get("dfs") or {}).get("scales", default)}
    if out.get("kind") == "ps":
        out = _pin_ties(out, stable_ties)
    elif out.get("kind") == "hybrid" and isinstance(out.get("ps") or {}, Mapping):
        out["ps"] = _pin_ties(dict(out.get("ps") or {}), stable_ties)
    return out


def _pin_ties(ps: dict[str, Any], stable_ties: bool | None) -> dict[str, Any]:
    method = ps.get("method", "ties")
    methods = [method] if isinstance(method, str) else list(method)
    params = ps.get("parameters") or {}
    if stable_ties is None or not isinstance(params, Mapping) or not any(
            m in METHODS and "stable_ties" in METHODS[m].global_params for m in methods):
        return ps
    return {**ps, "parameters": {**params, "stable_ties": params.get("stable_ties", stable_ties)}}


def _check_keys(cfg: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    check_keys(cfg, allowed, Where(None, SpaceError, default=""), f"{where}.")


def _ps(cfg: Mapping[str, Any], models: Mapping[str, Path], base: str, where: str) -> ParameterSpace:
    cfg = renamed_keys(cfg, RENAMED_PS_KEYS, Where(None, SpaceError, default=""), f"{where}.")
    _check_keys(cfg, PS_KEYS, where)
    method = cfg.get("method", "ties")
    try:
        return ParameterSpace(
            models=models, base=base, methods=[method] if isinstance(method, str) else list(method),
            layer_groups=int(cfg.get("layer_groups", 1)), modules=list(cfg.get("modules", ["*"])),
            weight_bounds=cfg.get("weight_bounds", (0.0, 1.0)), density_bounds=cfg.get("density_bounds", (0.1, 1.0)),
            parameters=dict(cfg.get("parameters") or {}), seed=int(cfg.get("seed", 0)))
    except SpaceError as e:
        raise SpaceError(f"{where}.{e}") from None


def _dfs(cfg: Mapping[str, Any], models: Mapping[str, Path], where: str, extra: Mapping[str, Path] | None = None) -> DataflowSpace:
    _check_keys(cfg, DFS_KEYS, where)
    names = cfg.get("sources") or list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        raise SpaceError(f"{where}.sources: {unknown} are not models of the job ({', '.join(models)})")
    sources: dict[str, Path] = {**{n: Path(models[n]) for n in names}, **dict(extra or {})}
    sizes = {n: source_sizes(n, p) for n, p in sources.items()}
    options = {k: cfg[k] for k in ("repeats", "min_layers", "max_layers", "pin_first", "pin_last", "embed", "head", "scales",
                                   "segments")
               if k in cfg}
    if "scale_bounds" in cfg:
        options["scale_bounds"] = tuple(cfg["scale_bounds"])
    try:
        return DataflowSpace(sources, sizes, **options)
    except (ValueError, TypeError) as e:
        raise SpaceError(f"{where}: {e}") from None


class DataflowSeeds:
    """A DataflowSpace with the search's `seeds()`: the identity path of each source (its own layers in order)."""

    def __init__(self, space: DataflowSpace):
        self.space = space
        self.gene_names, self.num_genes, self.bounds = space.gene_names, space.num_genes, space.bounds

    def decode(self, genome: np.ndarray, name: str | None = None) -> DataflowRecipe:
        return self.space.decode(genome, name)

    def seeds(self) -> list[tuple[str, np.ndarray]]:
        """The embed source's own path is that parent; other sources' paths keep the embed source's embeddings."""
        return [(f"{'parent' if n == self.space.embed else 'path'}:{n}", self.space.identity_genome(n))
                for n in self.space.sources]

    def describe(self) -> dict[str, Any]:
        sp = self.space
        encoding = {"segments": sp.segments} if sp.segments else {"repeats": sp.repeats}
        return {"kind": "dfs", "sources": list(sp.sources), **encoding, "scales": sp.scales, "num_genes": self.num_genes}


def build_space(cfg: Mapping[str, Any], models: Mapping[str, Path], base: str, where: str = "search_space") -> Space:
    """The space a mapping describes, over the job's models (name -> folder; `base` names the base model)."""
    kind = cfg.get("kind")
    if kind == "ps":
        return _ps(cfg, models, base, where)
    if kind == "dfs":
        return DataflowSeeds(_dfs(cfg, models, where))
    if kind == "hybrid":
        _check_keys(cfg, ("kind", "ps", "dfs"), where)
        ps = _ps({"kind": "ps", **(cfg.get("ps") or {})}, models, base, f"{where}.ps")
        dfs = _dfs({"kind": "dfs", **(cfg.get("dfs") or {})}, models, f"{where}.dfs", extra={MERGE: Path(models[base])})
        return HybridSpace(ps, dfs)
    raise SpaceError(f"{where}.kind: must be ps, dfs or hybrid, got {kind!r}")


def space_demands(space: Space) -> tuple[tuple[str, ...], int | None, int]:
    """What a space's candidates ask of a worker, for the memory plan: the merge methods they may use, the longest
    data-flow path (None: no paths) and how many model folders a path reads layers from."""
    if isinstance(space, HybridSpace):
        methods, _, _ = space_demands(space.ps)
        _, layers, folders = space_demands(DataflowSeeds(space.dfs))
        return methods, layers, folders
    if isinstance(space, DataflowSeeds):
        folders = sum(1 for s in space.space.sources.values() if as_source(s).merge_recipe is None)
        return (), space.space.max_layers, folders
    return tuple(getattr(space, "methods", ())), None, 0
