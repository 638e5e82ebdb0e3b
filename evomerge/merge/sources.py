"""Sources: the models a data-flow path reads its layers from.

A source is either a model folder (`FolderSource`) or a parameter-space merge defined inline in the recipe
(`MergeSource`, the PS half of a PS-then-DFS hybrid). Both answer the same questions, so nothing outside this
module asks which kind it holds: how many layers it has (from config files only), which model folders it reads,
how it is written in YAML, and a `SourceReader` that yields its tensors by name (a checkpoint's, or a merge's
computed tensor by tensor). Code that must treat a merge differently (mergekit cannot feed a merge into a
passthrough, say) reads `merge_recipe`, which is None for a folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from evomerge.checkpoints import Checkpoint, open_checkpoint
from evomerge.checkpoints.arch import Architecture
from evomerge.merge.engine import merge_job, out_dtype
from evomerge.merge.plan import MergePlan, TensorJob, plan_merge
from evomerge.merge.recipe import Recipe


@dataclass
class SourceReader:
    """One source's tensors by name, read lazily: a checkpoint, or a PS merge computed tensor by tensor."""

    name: str
    config: dict[str, Any]
    tokenizer_dir: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    checkpoint: Checkpoint | None = None
    ps_plan: MergePlan | None = None
    _jobs: dict[str, TensorJob] = field(default_factory=dict, repr=False)

    def names(self) -> list[str]:
        return list(self.shapes)

    def get(self, tensor: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if self.checkpoint is not None:
            return self.checkpoint.get(tensor, device)
        assert self.ps_plan is not None
        return merge_job(self.ps_plan, self._jobs[tensor], device)


def _folder_layers(folder: Path) -> int | None:
    try:
        return Architecture.from_config(json.loads((Path(folder) / "config.json").read_text())).num_layers
    except (OSError, ValueError, TypeError):  # no folder, no JSON, no layer count
        return None


@dataclass(frozen=True)
class FolderSource:
    """A model folder (a safetensors checkpoint with its config)."""

    path: Path
    merge_recipe = None  # a folder is no merge

    def to_yaml_value(self) -> str:
        return str(self.path)

    def model_folders(self) -> list[Path]:
        return [Path(self.path)]

    def num_layers(self) -> int | None:
        """From config.json alone (no tensor read); None when the folder cannot say."""
        return _folder_layers(self.path)

    def open(self, name: str) -> SourceReader:
        """Headers only: the checkpoint's safetensors headers."""
        ck = open_checkpoint(self.path)
        return SourceReader(name, ck.config, ck.path, {n: ck.info(n).shape for n in ck.names()},
                            {n: ck.info(n).dtype for n in ck.names()}, checkpoint=ck)

    def describe(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class MergeSource:
    """A parameter-space merge used as a source: its tensors are computed when read, never stored."""

    recipe: Recipe

    @property
    def merge_recipe(self) -> Recipe:
        return self.recipe

    def to_yaml_value(self) -> dict[str, Any]:
        return self.recipe.to_dict()

    def model_folders(self) -> list[Path]:
        return [Path(self.recipe.paths.get(label, label)) for label in self.recipe.model_labels()]

    def num_layers(self) -> int | None:
        """From config files alone: a sliced recipe's total of slice lengths, a whole-model recipe's models'
        count; None when that cannot be told."""
        if self.recipe.slices is not None:
            return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in self.recipe.slices
                       if s.sources[0].layer_range is not None)
        label = self.recipe.model_labels()[0]
        return _folder_layers(self.recipe.paths.get(label, Path(label)))

    def open(self, name: str) -> SourceReader:
        """Headers only: the merge's plan (which reads the inputs' headers)."""
        plan = plan_merge(self.recipe)
        jobs = {j.out_name: j for j in plan.jobs}
        shapes, dtypes = {}, {}
        for out_name, job in jobs.items():
            ref = job.base or job.inputs[0]
            shapes[out_name] = plan.checkpoints[ref.model].info(ref.name).shape
            dtypes[out_name] = out_dtype(plan, job)
        return SourceReader(name, plan.config, plan.tokenizer_dir, shapes, dtypes, ps_plan=plan, _jobs=jobs)

    def describe(self) -> str:
        return f"{self.recipe.merge_method} merge"


Source = Union[FolderSource, MergeSource]


def as_source(spec: "Source | Path | str | Recipe") -> Source:
    """A source from what callers hold: a model folder path or a PS recipe (sources pass through)."""
    if isinstance(spec, (FolderSource, MergeSource)):
        return spec
    if isinstance(spec, Recipe):
        return MergeSource(spec)
    return FolderSource(Path(spec))
