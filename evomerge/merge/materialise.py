"""In-memory materialisation of candidates for the search: no disk I/O, no re-allocation per candidate.

A `Materialiser` is per-worker state (a Ray actor holds one): every source a candidate may use, kept resident
once, and the code that turns a recipe into merged tensors one at a time. Where the sources live and in which
dtype is the memory plan's choice (`evomerge.memory`):

- `sources="device"`: resident on the compute device (fastest; costs the sources' bytes there).
- `sources="host"`: resident in CPU memory (pinned when the device is a GPU, so copies are DMA), each tensor
  copied to the device when a merge reads it. On a CPU device this is the same as `device`.
- `sources="disk"`: nothing resident; each tensor is read from its memory-mapped checkpoint when needed (the
  page cache keeps hot shards).

`sources_dtype="native"` (default) keeps every source in its checkpoint's own dtype (bf16 stays bf16: resident
memory is the sum of the checkpoints' sizes) and computes each task vector in float32 per tensor, as it is
merged. `sources_dtype="float32"` keeps the anchor in float32 and every other source as its float32 task
vector (source - anchor), computed once: today's exact-parity layout, twice the memory of bf16 sources.

Either way a candidate never exists as a whole: `apply` writes each merged tensor into the module's existing
parameter (`copy_`) and `iter_merged` yields them one by one (the vLLM engine's weight reload consumes that
iterator), so the transient beyond the resident state is a few tensors in float32, not a model.
"""

from __future__ import annotations

import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from evomerge.checkpoints import Checkpoint, check_compatible, open_checkpoint
from evomerge.checkpoints.lora import AdaptedCheckpoint, apply_lora
from evomerge.checkpoints.targets import checkpoint_targets
from evomerge.merge import fused
from evomerge.merge.methods import METHODS, _with_defaults, merge_task_vectors, merge_tensor
from evomerge.merge.plan import MergePlan, TensorJob, TensorRef, plan_merge
from evomerge.merge.recipe import Recipe, RecipeError
from evomerge.merge.sparsify import RANKED, RankCache

PLACEMENTS = ("device", "host", "disk")
SOURCE_DTYPES = ("native", "float32")


class Materialiser:
    def __init__(self, paths: Mapping[str, str | Path], anchor: str, device: str | torch.device = "cpu",
                 rank_cache: bool = True, sources: str = "device", sources_dtype: str = "native"):
        """`paths`: label -> model folder for every source a candidate may use; `anchor`: the label merges are
        taken relative to (normally the base model). `sources`, `sources_dtype`: where and how the sources are
        kept (see the module docstring). `rank_cache`: keep each task vector's sorted magnitudes (built on first
        use by a magnitude method: TIES, breadcrumbs), so later candidates find their thresholds by look-up;
        costs one float32 copy of each such task vector on the device, so the memory plan turns it off where
        the device has no room. Results are identical either way."""
        if anchor not in paths:
            raise RecipeError(f"anchor '{anchor}' is not one of the models ({', '.join(paths)}); name one of them")
        if sources not in PLACEMENTS:
            raise ValueError(f"sources must be one of {', '.join(PLACEMENTS)}, got {sources!r}")
        if sources_dtype not in SOURCE_DTYPES:
            raise ValueError(f"sources_dtype must be one of {', '.join(SOURCE_DTYPES)}, got {sources_dtype!r}")
        self.device = torch.device(device)
        self.anchor = anchor
        self.placement = sources
        self.sources_dtype = sources_dtype
        self.checkpoints: dict[str, Checkpoint] = {k: open_checkpoint(p) for k, p in paths.items()}
        check_compatible(self.checkpoints)
        self._label_of = {ck.path.resolve(): label for label, ck in self.checkpoints.items()}
        self.rank_cache = rank_cache
        self.ranks: dict[tuple[str, str], RankCache] = {}
        # fused.Sketch per (source label, tensor, base label, base tensor): the one-pass CPU merge's thresholds
        self.sketches: dict[tuple[str, str, str, str], fused.Sketch | None] = {}
        self._pinned = False  # some source is in pinned memory (copies to the GPU may be non-blocking)
        self._pin_warned = False  # the host refused to pin more: the rest stays pageable, said once
        # Resident state: `native` keeps tensors[label][name] in their own dtype; `float32` keeps the anchor as
        # tensors[anchor] and every other source as deltas[(label, name)]; `disk` keeps nothing.
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.deltas: dict[tuple[str, str], torch.Tensor] = {}
        # MODEL+ADAPTER sources whose MODEL is another resident source (native layout): label -> (that label,
        # target -> (A, B, scale, transposed), tensors saved whole); their other tensors are MODEL's own.
        self.lora: dict[str, tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]],
                                   dict[str, torch.Tensor]]] = {}
        if sources == "disk":
            return
        home = self.device if sources == "device" else torch.device("cpu")
        pin = sources == "host" and self.device.type == "cuda"
        anchor_ck = self.checkpoints[anchor]
        if sources_dtype == "float32":
            base = self.tensors[anchor] = {n: self._keep(anchor_ck.get(n), home, pin, torch.float32)
                                           for n in anchor_ck.names()}
            for label, ck in self.checkpoints.items():
                if label != anchor:
                    for n in ck.names():  # source - anchor in float32 (type promotion: no float32 copy of the source)
                        delta = torch.sub(ck.get(n).to(home), base[n])
                        self.deltas[(label, n)] = self._keep(delta, home, pin, owned=True)
        else:
            for label, ck in self.checkpoints.items():
                if self._adapter_base(ck) is None:
                    self.tensors[label] = {n: self._keep(ck.get(n), home, pin) for n in ck.names()}
            for label, ck in self.checkpoints.items():
                base_label = self._adapter_base(ck)
                if base_label is not None:  # MODEL+ADAPTER over a resident model: its factors, not a dense copy
                    assert isinstance(ck, AdaptedCheckpoint) and ck.adapter is not None
                    lora = ck.adapter
                    self.lora[label] = (base_label, {
                        n: (self._keep(lora.tensor(f.a), home, pin), self._keep(lora.tensor(f.b), home, pin), f.scale,
                            f.transpose) for n, f in lora.factors.items()},
                        {n: self._keep(ck.get(n), home, pin) for n in lora.replaced})

    def _keep(self, tensor: torch.Tensor, home: torch.device, pin: bool, dtype: torch.dtype | None = None,
              owned: bool = False) -> torch.Tensor:
        """A tensor as it stays resident: at `home` in `dtype` (default its own), pinned if asked and the host can
        (else pageable, said once). One allocation of the final size, unless `owned` (made here, kept as it is):
        a tensor read from a checkpoint may be a view of its memory-mapped file, which is the page cache
        (`disk`), not resident memory, and a temporary per tensor fragments the heap (RSS then exceeds the plan)."""
        if owned and tensor.device == home and not pin:
            return tensor
        pin_now = pin and not self._pin_warned
        try:
            out = torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=home, pin_memory=pin_now)
            self._pinned = self._pinned or pin_now
        except RuntimeError as e:  # the host refuses more page-locked memory
            warnings.warn(f"cannot pin more host memory ({e}); the remaining sources stay in pageable memory "
                          "(copies to the GPU are slower)", stacklevel=3)
            self._pin_warned = True
            out = torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=home)
        return out.copy_(tensor)

    def _adapter_base(self, ck: Checkpoint) -> str | None:
        """For an adapted checkpoint whose model is another source of this worker (a plain folder), that
        source's label; else None (then the checkpoint is kept as any other, dense)."""
        if not isinstance(ck, AdaptedCheckpoint) or ck.base is None or self.placement == "disk":
            return None
        label = self._label_of.get(Path(ck.base.path).resolve())
        return label if label is not None and not isinstance(self.checkpoints[label], AdaptedCheckpoint) else None

    def _adapted(self, label: str, name: str) -> torch.Tensor:
        """An adapted source's tensor, made now from its model's resident tensor and the adapter's resident factors
        (`lora.apply_lora`, as `AdaptedCheckpoint.get` makes it: the same numbers as reading the adapted folder)."""
        base_label, factors, whole = self.lora[label]
        if name in whole:
            tensor = whole[name]
        else:
            tensor = self.tensors[base_label][name]
        if name in factors:
            tensor = apply_lora(tensor, *factors[name])
        return tensor

    @property
    def config(self) -> dict:
        return self.checkpoints[self.anchor].config

    @property
    def resident_bytes(self) -> int:
        """Bytes of the sources kept resident (0 for `disk`), rank caches excluded."""
        tensors = [t for d in self.tensors.values() for t in d.values()] + list(self.deltas.values())
        tensors += [t for _, factors, _ in self.lora.values() for a, b, _, _ in factors.values() for t in (a, b)]
        tensors += [t for _, _, whole in self.lora.values() for t in whole.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---------------------------------------------------------------- reading one tensor
    def _read(self, label: str, name: str) -> torch.Tensor:
        """Source `label`'s tensor `name` on the compute device, in its resident dtype (may be the resident tensor
        itself: never modify it)."""
        if self.placement == "disk":
            return self.checkpoints[label].get(name, self.device)
        if label in self.lora:
            tensor = self._adapted(label, name)
        elif label == self.anchor or self.sources_dtype == "native":
            tensor = self.tensors[label][name]
        else:
            raise AssertionError("float32 sources keep task vectors; read them with _delta")
        return tensor if tensor.device == self.device else tensor.to(self.device, non_blocking=self._pinned)

    def _stored_delta(self, label: str, name: str) -> torch.Tensor:
        delta = self.deltas[(label, name)]
        return delta if delta.device == self.device else delta.to(self.device, non_blocking=self._pinned)

    def _float32_layout(self) -> bool:
        return self.sources_dtype == "float32" and self.placement != "disk"

    def _full(self, labels: Mapping[str, str], ref: TensorRef) -> torch.Tensor:
        """A source tensor in float32 on the device (for float32 sources, anchor + task vector)."""
        label = labels[ref.model]
        if self._float32_layout() and label != self.anchor:
            return self._read(self.anchor, ref.name) + self._stored_delta(label, ref.name)
        return self._read(label, ref.name).to(torch.float32)

    def _delta(self, labels: Mapping[str, str], ref: TensorRef, base: TensorRef) -> torch.Tensor:
        """ref - base in float32 (from the resident task vector when base is the anchor and sources are float32)."""
        label, base_label = labels[ref.model], labels[base.model]
        if base_label == self.anchor and ref.name == base.name and label == self.anchor:
            return torch.zeros_like(self._full(labels, base))
        if self._float32_layout() and base_label == self.anchor and ref.name == base.name:
            return self._stored_delta(label, ref.name)
        return self._full(labels, ref) - self._full(labels, base)

    def _shape(self, labels: Mapping[str, str], job: TensorJob) -> torch.Size:
        """A task-vector merge's shape: its base tensor's."""
        assert job.base is not None
        return torch.Size(self.checkpoints[labels[job.base.model]].info(job.base.name).shape)

    def _rank(self, labels: Mapping[str, str], ref: TensorRef, base: TensorRef, delta: torch.Tensor) -> RankCache | None:
        """The cached ranks of a source's task vector against the anchor (built from `delta` on first use)."""
        label, base_label = labels[ref.model], labels[base.model]
        if not self.rank_cache or label == self.anchor or base_label != self.anchor or ref.name != base.name:
            return None
        key = (label, ref.name)
        if key not in self.ranks:
            self.ranks[key] = RankCache(delta)
        return self.ranks[key]

    # ---------------------------------------------------------------- modules
    def build_module(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A transformers model on this device holding the anchor's weights in `dtype`, ready for `apply`: the
        scoring engine's own copy of the weights."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.checkpoints[self.anchor].path, trust_remote_code=False)
        with torch.device(self.device):
            module = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        module.eval()
        targets = self.targets(module)
        anchor = {label: label for label in self.checkpoints}
        with torch.no_grad():
            for name in self.checkpoints[self.anchor].names():
                targets[name].copy_(self._full(anchor, TensorRef(self.anchor, name)))
        return module

    def shared_module(self, label: str, like: nn.Module) -> nn.Module | None:
        """Source `label` as a module whose parameters are its resident tensors themselves (nothing copied), its
        buffers (rotary tables) those of `like`, a module of the same architecture. What a data-flow path reads
        its layers from at size. None unless the sources are resident on the device, in their own dtype, and
        that dtype is `like`'s (the caller then loads the folder as a module of its own)."""
        from transformers import AutoModelForCausalLM

        dtype = next(like.parameters()).dtype
        own = self.tensors.get(label) if self.placement != "disk" and self.sources_dtype == "native" else None
        if own is None or any(t.device != self.device or t.dtype != dtype for t in own.values() if t.is_floating_point()):
            return None
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(like.config, dtype=dtype, trust_remote_code=False)
        names = checkpoint_targets(like, own)  # checkpoint name -> like's tensor: gives the module-side name
        by_id = {id(t): n for n, t in like.state_dict(keep_vars=True).items()}
        for ck_name, tensor in own.items():
            owner_name, _, attr = by_id[id(names[ck_name])].rpartition(".")
            owner = module.get_submodule(owner_name)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                owner._buffers[attr] = tensor
        for name, buf in like.named_buffers():
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if owner._buffers.get(attr) is None or owner._buffers[attr].is_meta:
                owner._buffers[attr] = buf
        if getattr(module.config, "tie_word_embeddings", False):
            module.tie_weights()
        still_meta = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
        if still_meta:
            raise RecipeError(f"source '{label}': the module has tensors the checkpoint lacks ({still_meta[0]}, ...)")
        return module.eval()

    def targets(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the module's parameter or buffer it loads into."""
        return checkpoint_targets(module, self.checkpoints[self.anchor].names())

    def label_of(self, folder: str | Path) -> str | None:
        """This worker's label for a model folder, or None if it does not hold that folder."""
        return self._label_of.get(Path(folder).resolve())

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

    # ---------------------------------------------------------------- merging
    def _one_pass(self, plan: MergePlan) -> bool:
        """Whether this plan's merges may go through the one-pass CPU kernel (`fused`); each tensor's own inputs
        may still make `_fused` decline."""
        return (self.device.type == "cpu" and METHODS[plan.method].uses_task_vectors
                and plan.recipe.compute_torch_dtype() == torch.float32 and fused.library() is not None)

    def _fused(self, plan: MergePlan, labels: Mapping[str, str], job: TensorJob, out: torch.Tensor,
               threads: int | None = None) -> bool:
        """Merge `job` of a `_one_pass` plan into `out` with the kernel: the same bits as the torch path. False
        where the kernel does not compute this merge (then `out` may hold part of one: merge it the torch way)."""
        spec = METHODS[plan.method]
        if job.base is None:
            return False
        models, globals_ = _with_defaults(spec, job.model_params, job.global_params)
        if not fused.supports(spec, globals_, len(job.inputs)):
            return False
        base_label = labels[job.base.model]
        base = self._read(base_label, job.base.name)
        sources: list[tuple[torch.Tensor, bool]] = []
        keys = []
        for ref in job.inputs:
            label = labels[ref.model]
            if label == base_label and ref.name == job.base.name:
                return False  # the base among the inputs: a zero task vector (rare; the torch path has it)
            if self._float32_layout():
                if base_label != self.anchor or ref.name != job.base.name:
                    return False
                sources.append((self._stored_delta(label, ref.name), True))
            else:
                sources.append((self._read(label, ref.name), False))
            keys.append((label, ref.name, base_label, job.base.name))

        def sketch_of(i: int) -> fused.Sketch | None:
            if keys[i] not in self.sketches:
                self.sketches[keys[i]] = fused.sketch(base, *sources[i])
            return self.sketches[keys[i]]

        if not fused.merge(out, base, sources, spec, models, globals_, sketch_of, threads=threads):
            return False
        try:  # written through its pointer: tell autograd, as copy_ would
            torch.autograd.graph.increment_version(out)
        except RuntimeError:  # an inference tensor has no version counter
            pass
        return True

    def _merge(self, plan: MergePlan, labels: Mapping[str, str], job: TensorJob,
               out: torch.Tensor | None = None, dtype: torch.dtype | None = None, one_pass: bool = True) -> torch.Tensor:
        """One merged tensor on the device. Where the one-pass kernel computes it, written into `out` (or a fresh
        tensor of `dtype`) and returned; else a fresh float32 tensor. The caller may keep or modify it.
        `one_pass=False`: the kernel declined this job already."""
        spec = METHODS[plan.method]
        compute = plan.recipe.compute_torch_dtype()
        if one_pass and self._one_pass(plan):
            target = out if out is not None else torch.empty(self._shape(labels, job), dtype=dtype or torch.float32)
            if self._fused(plan, labels, job, target):
                return target
        gen = torch.Generator().manual_seed(job.seed) if spec.random else None
        if compute != torch.float32:  # compute_dtype: recipe, mergekit's half-precision numbers (not the hot path)
            base = self._full(labels, job.base) if job.base is not None else None
            tensors = [self._full(labels, r) for r in job.inputs]
            return merge_tensor(plan.method, base, tensors, list(job.model_params), dict(job.global_params), gen,
                                compute=compute).to(torch.float32)
        if spec.uses_task_vectors:
            assert job.base is not None
            deltas = [self._delta(labels, r, job.base) for r in job.inputs]
            ranks = ([self._rank(labels, r, job.base, d) for r, d in zip(job.inputs, deltas)]
                     if spec.sparsifier in RANKED else None)
            merged = merge_task_vectors(plan.method, deltas, list(job.model_params), dict(job.global_params), gen,
                                        ranks=ranks)
            return torch.add(self._full(labels, job.base), merged)  # never in place: merged may be a resident delta
        base = self._full(labels, job.base) if job.base is not None else None
        tensors = [self._full(labels, r) for r in job.inputs]
        merged = merge_tensor(plan.method, base, tensors, list(job.model_params), dict(job.global_params), gen)
        return merged.clone() if any(merged is t for t in [base, *tensors]) else merged

    @torch.no_grad()
    def iter_merged(self, recipe: Recipe, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, merged tensor on the device) one at a time, in `dtype` (default float32): what a
        weight-reload API consumes. Only the tensor in hand is alive; nothing of the model is staged."""
        labels = self.worker_labels(recipe)
        plan = self.plan(recipe, labels)
        for job in plan.jobs:
            merged = self._merge(plan, labels, job, dtype=dtype)
            yield job.out_name, merged if dtype is None else merged.to(dtype)

    @torch.no_grad()
    def apply(self, recipe: Recipe, module: nn.Module | None, targets: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the recipe's merged tensors into `module` (or `targets`: name -> tensor) in place."""
        labels = self.worker_labels(recipe)
        plan = self.plan(recipe, labels)
        if targets is None:
            assert module is not None
            targets = self.targets(module)
        jobs = []
        for job in plan.jobs:
            target = targets.get(job.out_name)
            if target is None:
                raise RecipeError(f"the merged tensor '{job.out_name}' has no place in this worker's model (data-flow recipes need their own module)")
            jobs.append((job, target))
        threads = torch.get_num_threads()
        later: list[tuple[TensorJob, torch.Tensor, bool]] = [(job, target, True) for job, target in jobs]
        if threads > 1 and len(jobs) > 1 and self.placement != "disk" and self._one_pass(plan):
            # One-pass merges, several tensors at once (one thread each: the kernel lets go of the GIL). A target
            # that two checkpoint tensors share (tied weights) is left to the loop below, which keeps their order.
            # What the kernel declines is merged the torch way afterwards, with torch's own threads.
            uses = Counter(target.data_ptr() for _, target in jobs)
            alone = [(job, target) for job, target in jobs if uses[target.data_ptr()] == 1]
            with ThreadPoolExecutor(threads) as pool:
                done = dict(zip((id(t) for _, t in alone),
                                pool.map(lambda jt: self._fused(plan, labels, jt[0], jt[1], threads=1), alone)))
            later = [(job, target, id(target) not in done) for job, target in jobs if not done.get(id(target), False)]
        for job, target, one_pass in later:
            merged = self._merge(plan, labels, job, target, one_pass=one_pass)
            if merged is not target:
                target.copy_(merged)
