"""Execute a merge plan tensor by tensor, reading inputs lazily, so memory stays flat. Writing a recipe of
either kind to disk is `api.write_recipe`."""

from __future__ import annotations

from typing import Iterator

import torch
from tqdm import tqdm

from evomerge.merge.methods import METHODS, merge_tensor
from evomerge.merge.plan import MergePlan, TensorJob, plan_merge
from evomerge.merge.recipe import DTYPES, Recipe


def out_dtype(plan: MergePlan, job: TensorJob) -> torch.dtype:
    name = plan.recipe.out_dtype or plan.recipe.dtype
    if name:
        return DTYPES[name]
    ref = job.base or job.inputs[0]
    return plan.checkpoints[ref.model].info(ref.name).dtype


def merge_job(plan: MergePlan, job: TensorJob, device: str | torch.device = "cpu") -> torch.Tensor:
    cks = plan.checkpoints
    # float32, or the recipe's dtype with compute_dtype: recipe (inputs rounded to it as mergekit reads them)
    compute = plan.recipe.compute_torch_dtype()
    load = lambda r: cks[r.model].get(r.name, device=device).to(compute)  # noqa: E731
    base = load(job.base) if job.base is not None else None
    tensors = [load(r) for r in job.inputs]
    gen = torch.Generator().manual_seed(job.seed) if METHODS[plan.method].random else None
    merged = merge_tensor(plan.method, base, tensors, list(job.model_params), dict(job.global_params), gen,
                          compute=compute)
    return merged.to(out_dtype(plan, job))


def iter_merged(plan: MergePlan, device: str | torch.device = "cpu", progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor on CPU) in checkpoint order."""
    jobs = tqdm(plan.jobs, desc="merging", unit="tensor", disable=not progress)
    for job in jobs:
        yield job.out_name, merge_job(plan, job, device).cpu()


def merge_to_dict(recipe: Recipe, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The merged model's tensors in memory (small models and tests; the CLI streams to disk instead)."""
    return dict(iter_merged(plan_merge(recipe), device))
