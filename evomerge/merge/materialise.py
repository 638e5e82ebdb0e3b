"""In-memory materialisation of candidates for the search: no disk I/O, no re-allocation per candidate.

A `Materialiser` is per-worker state (a Ray actor holds one): the anchor model's tensors and every other
source's task vector (source - anchor), resident on one device, computed once. `apply(recipe, module)`
plans the recipe against the cached headers and writes each merged tensor into the module's existing
parameter with `copy_`, one tensor at a time, so peak extra memory is a few tensors, not a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from evomerge.checkpoints import Checkpoint, check_compatible, open_checkpoint
from evomerge.checkpoints.targets import checkpoint_targets
from evomerge.merge.methods import METHODS, merge_task_vectors, merge_tensor
from evomerge.merge.plan import MergePlan, TensorRef, plan_merge
from evomerge.merge.recipe import Recipe, RecipeError
from evomerge.merge.sparsify import RANKED, RankCache


class Materialiser:
    def __init__(self, paths: Mapping[str, str | Path], anchor: str, device: str | torch.device = "cpu",
                 rank_cache: bool = True):
        """`paths`: label -> model folder for every source a candidate may use; `anchor`: the label whose
        tensors are kept whole (normally the base model); the others are kept as task vectors.
        `rank_cache`: keep each task vector's sorted magnitudes (built on first use by a magnitude method:
        TIES, breadcrumbs), so later candidates find their thresholds by look-up. Costs one more float32
        copy of each such task vector; turn it off where device memory is short. Results are identical."""
        if anchor not in paths:
            raise RecipeError(f"anchor '{anchor}' is not one of the models ({', '.join(paths)}); name one of them")
        self.device = torch.device(device)
        self.anchor = anchor
        self.checkpoints: dict[str, Checkpoint] = {k: open_checkpoint(p) for k, p in paths.items()}
        check_compatible(self.checkpoints)
        self._label_of = {ck.path.resolve(): label for label, ck in self.checkpoints.items()}
        anchor_ck = self.checkpoints[anchor]
        self.base: dict[str, torch.Tensor] = {
            n: anchor_ck.get(n, self.device).to(torch.float32) for n in anchor_ck.names()
        }
        self.deltas: dict[tuple[str, str], torch.Tensor] = {}
        self.rank_cache = rank_cache
        self.ranks: dict[tuple[str, str], RankCache] = {}
        for label, ck in self.checkpoints.items():
            if label != anchor:
                for n in ck.names():
                    self.deltas[(label, n)] = ck.get(n, self.device).to(torch.float32).sub_(self.base[n])

    @property
    def config(self) -> dict:
        return self.checkpoints[self.anchor].config

    def build_module(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A transformers model on this device holding the anchor's weights, ready for `apply`."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.checkpoints[self.anchor].path, trust_remote_code=False)
        with torch.device(self.device):
            module = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        module.eval()
        targets = self.targets(module)
        with torch.no_grad():
            for name, tensor in self.base.items():
                targets[name].copy_(tensor)
        return module

    def targets(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the module's parameter or buffer it loads into."""
        return checkpoint_targets(module, self.base)

    def worker_labels(self, recipe: Recipe) -> dict[str, str]:
        """Recipe model label -> this worker's label for the same folder (resolved once per candidate)."""
        out = {}
        for label in recipe.model_labels():
            path = recipe.paths[label].resolve()
            if path not in self._label_of:
                raise RecipeError(f"recipe model '{label}' ({path}) is not loaded in this worker")
            out[label] = self._label_of[path]
        return out

    def plan(self, recipe: Recipe, labels: Mapping[str, str] | None = None) -> MergePlan:
        labels = labels if labels is not None else self.worker_labels(recipe)
        return plan_merge(recipe, {k: self.checkpoints[v] for k, v in labels.items()}, check=False)

    def _full(self, labels: Mapping[str, str], ref: TensorRef) -> torch.Tensor:
        label = labels[ref.model]
        if label == self.anchor:
            return self.base[ref.name]
        return self.base[ref.name] + self.deltas[(label, ref.name)]

    def _delta(self, labels: Mapping[str, str], ref: TensorRef, base: TensorRef) -> torch.Tensor:
        """ref - base, from the resident task vectors (no subtraction when base is the anchor)."""
        label, base_label = labels[ref.model], labels[base.model]
        if base_label == self.anchor and ref.name == base.name:
            return self.deltas[(label, ref.name)] if label != self.anchor else torch.zeros_like(self.base[ref.name])
        return self._full(labels, ref) - self._full(labels, base)

    def _rank(self, labels: Mapping[str, str], ref: TensorRef, base: TensorRef) -> RankCache | None:
        """The cached ranks of a resident task vector (None for deltas made on the fly)."""
        label, base_label = labels[ref.model], labels[base.model]
        if not self.rank_cache or label == self.anchor or base_label != self.anchor or ref.name != base.name:
            return None
        key = (label, ref.name)
        if key not in self.ranks:
            self.ranks[key] = RankCache(self.deltas[key])
        return self.ranks[key]

    @torch.no_grad()
    def apply(self, recipe: Recipe, module: nn.Module, targets: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the recipe's merged tensors into `module` in place."""
        labels = self.worker_labels(recipe)
        plan = self.plan(recipe, labels)
        spec = METHODS[plan.method]
        targets = targets if targets is not None else self.targets(module)
        for job in plan.jobs:
            target = targets.get(job.out_name)
            if target is None:
                raise RecipeError(f"the merged tensor '{job.out_name}' has no place in this worker's model (data-flow recipes need their own module)")
            gen = torch.Generator().manual_seed(job.seed) if spec.random else None
            if spec.uses_task_vectors:
                assert job.base is not None
                deltas = [self._delta(labels, r, job.base) for r in job.inputs]
                ranks = [self._rank(labels, r, job.base) for r in job.inputs] if spec.sparsifier in RANKED else None
                merged = merge_task_vectors(plan.method, deltas, list(job.model_params), dict(job.global_params), gen,
                                            ranks=ranks)
                target.copy_(self._full(labels, job.base))
                target.add_(merged.to(target.dtype))
            else:
                base = self._full(labels, job.base) if job.base is not None else None
                tensors = [self._full(labels, r) for r in job.inputs]
                target.copy_(merge_tensor(plan.method, base, tensors, list(job.model_params), dict(job.global_params), gen))
