"""The memory plan of one search worker, from configs and safetensors headers only.

A worker holds, on its device (a GPU, or the CPU's memory when it scores on CPU) and in host memory:

- sources: every model a candidate may read, resident where the placement says (`device`, `host` or `disk`, the
  last one leaving them to the page cache), in their checkpoints' dtype (`native`) or as the float32 anchor plus
  float32 task vectors (`float32`, exact parity with a float32 merge, twice the bytes of bf16 sources);
- rank caches: one float32 copy of each task vector, kept on the device only when the plan has room and the
  space can pick a magnitude method (TIES, breadcrumbs, della): they turn each candidate's threshold search into
  a look-up, with identical results;
- the scoring engine's weights: one copy of the model in the engine's dtype, split over `gpus` GPUs;
- the KV cache and activations for `batch_size` sequences of `max_length` tokens (a data-flow path runs up to
  `path_layers` layers, so its KV cache grows with the path), logits included (lm-eval takes a float32
  log-softmax of them);
- the per-candidate transient: the merge of the largest tensor in float32 (its task vectors, the method's
  masks, the merged tensor and its cast), plus the tensors fetched from the host or the disk;
- the runtime's fixed cost (a CUDA context; on a CPU worker, the interpreter with torch and lm-eval imported).

Each placement is tried in order of speed (device, host, disk); `auto` takes the first that fits. The expected
materialisation time is the bound of the placement: the bytes a candidate must move (its inputs read once from
where they live, the merged model written once into the engine) over the bandwidth of the slowest link, with
the figures measured on this machine where it has the device, and stated as nominal otherwise.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from evomerge.errors import UserError

GiB = 1024**3
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
PLACEMENTS = ("device", "host", "disk")
# Methods evomerge.merge.fused computes in one pass on a CPU worker: no float32 copies of task vectors, no masks,
# no rank caches; per source tensor a threshold sketch (tail counts and heavy bins' values, 30-40 KiB on average
# measured at 0.17-1B parameters), and while a sketch is built, its table of heavy bins (bins of more than 1/2048
# of a tensor). Whether the kernel builds is read on the planning machine: its compiler stands for the workers'.
FUSED_METHODS = ("task_arithmetic", "ties")
SKETCH_BYTES = 128 * 1024
SKETCH_SLOT = 64 * 1024  # one heavy bin's value counts while a sketch is built; at most 512 at once
# Methods whose sparsifier ranks magnitudes (rank caches help them); the others never build a cache.
RANKED_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "magnitude_prune")
# Nominal bandwidths (bytes/s) where this machine cannot measure them: an H100 SXM's HBM3, PCIe 5.0 x16 from
# pinned (and pageable) host memory, and one NVMe drive. Measured figures replace them where the device is here.
NOMINAL = {"cuda": 3.35e12, "h2d_pinned": 50e9, "h2d_pageable": 20e9, "disk": 3e9}
VLLM_BATCHED_TOKENS = 8192  # tokens per vLLM engine step (its max_num_batched_tokens with chunked prefill)
CUDA_CONTEXT = int(0.75 * GiB)  # CUDA context, cuBLAS workspace and the allocator's rounding, per GPU
CPU_RUNTIME = int(0.6 * GiB)  # a CPU worker's interpreter with torch, transformers and lm-eval imported


class PlanError(UserError, ValueError):
    """A job that fits no placement, or a machine or model the plan cannot read."""


def parse_size(text: str | float | int | None, what: str = "size") -> int | None:
    """'80GiB', '80GB', '512 GiB', '80' (GiB) -> bytes; None stays None."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(float(text) * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|G|TiB|TB|T|MiB|MB|M)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise PlanError(f"{what}: {text!r} is not a size; write e.g. 80GiB, 512GB or 80 (GiB)")
    unit = (m[2] or "GiB").lower()
    scale = {"gib": GiB, "g": GiB, "gb": 1e9, "tib": 1024 * GiB, "t": 1024 * GiB, "tb": 1e12,
             "mib": 1024**2, "m": 1024**2, "mb": 1e6}[unit]
    return int(float(m[1]) * scale)


def gib(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB (a zoo model is a few MiB)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB or n == 0 else f"{n / 1024**2:.1f} MiB"


def count(n: float) -> str:
    """A number of parameters or elements: 7.24B, 131M, 0.6M."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one model, read from its config.json and safetensors headers."""

    folder: Path
    params: int  # elements of every tensor
    bytes: int  # of the checkpoint's tensors (native dtypes)
    dtype: str  # the floating dtype most of its bytes are in
    largest: int  # elements of the largest tensor
    layers: int
    hidden: int
    kv_dim: int  # key/value heads x head size: one layer's K (or V) per token
    vocab: int
    intermediate: int
    model_type: str
    tensors: int = 0  # how many tensors (0: unknown, estimated from the layers)


def read_shape(folder: str | Path) -> ModelShape:
    """A model's shape from its headers (no weights read). Raises PlanError for a config the reader cannot use."""
    from evomerge.checkpoints import open_checkpoint
    from evomerge.checkpoints.arch import KNOWN_FAMILIES, Architecture

    ck = open_checkpoint(folder)
    cfg = ck.config.get("text_config") if isinstance(ck.config.get("text_config"), dict) else ck.config
    try:
        arch = Architecture.from_config(ck.config, ck.names())
    except ValueError as e:
        raise PlanError(f"{Path(folder) / 'config.json'}: {e}") from None
    hidden = arch.hidden_size
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    if not hidden or not heads:
        raise PlanError(f"{Path(folder) / 'config.json'}: model_type '{arch.model_type}' gives no hidden_size and "
                        "num_attention_heads; the memory plan reads those (known families: "
                        f"{', '.join(sorted(KNOWN_FAMILIES))})")
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    return ModelShape(
        folder=Path(folder), params=int(ck.num_params), bytes=int(ck.num_bytes), dtype=ck.float_dtype,
        largest=max(t.numel for t in ck.tensors.values()), layers=arch.num_layers, hidden=int(hidden),
        kv_dim=int(kv_heads) * int(head_dim), vocab=int(arch.vocab_size or 0),
        intermediate=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden),
        model_type=arch.model_type, tensors=len(ck.tensors))


@dataclass(frozen=True)
class Workload:
    """What the worker does with the models: which merges, which engine, how many tokens at once."""

    backend: str = "hf"  # hf | vllm
    engine_dtype: str = "auto"  # auto: the base checkpoint's dtype
    sources_dtype: str = "native"  # native | float32
    batch_size: int = 64
    max_length: int | None = None  # tokens per sequence; None: min(2048, the model's context)
    methods: tuple[str, ...] = ("ties",)  # merge methods a candidate may use (none for a pure data-flow space)
    path_layers: int | None = None  # the longest data-flow path (None: no data-flow candidates)
    path_sources: int = 0  # model folders a data-flow path reads layers from
    fused: bool = False  # the one-pass CPU merge kernel is built or buildable here (merge.fused.available())
    stable_ties: bool = False  # the space's magnitude methods break ties by position (parameters.stable_ties)
    threads: int = 1  # torch threads per worker (a CPU worker's one-pass merges run that many tensors at once)


@dataclass(frozen=True)
class Machine:
    """Where one worker runs. `gpu_memory` None: a CPU worker, whose device memory is the host's."""

    device: str = "cpu"  # cpu | cuda
    gpu_memory: int | None = None  # bytes per GPU
    gpus: int = 1
    host_memory: int = 0  # bytes this worker may use
    workers_per_host: int = 1  # workers sharing the host (a private Ray starts them all on this machine)
    bandwidth: dict[str, float] = field(default_factory=dict)  # device, h2d_pinned, disk (bytes/s)
    measured: tuple[str, ...] = ()  # which bandwidth figures were measured here (the rest are NOMINAL)

    @classmethod
    def detect(cls, device: str = "cpu", gpu_memory: int | None = None, host_memory: int | None = None,
               gpus: int = 1, workers_per_host: int = 1, measure: bool = True) -> "Machine":
        """This machine (or the one given by the sizes): its memory, and bandwidths measured where it can."""
        is_cuda = device.startswith("cuda")
        bw, measured = {"h2d_pinned": NOMINAL["h2d_pinned"], "disk": NOMINAL["disk"]}, []
        if is_cuda:
            bw["device"] = NOMINAL["cuda"]
            try:
                import torch

                if torch.cuda.is_available():
                    if gpu_memory is None:
                        gpu_memory = torch.cuda.mem_get_info()[1]
                    if measure:
                        bw["device"], bw["h2d_pinned"] = _cuda_bandwidths()
                        measured += ["device", "h2d_pinned"]
            except (ImportError, RuntimeError):
                pass
            if gpu_memory is None:
                raise PlanError("runtime.device is cuda but no GPU is visible here: give its memory "
                                "(`--gpu-memory 80GiB`, or runtime.gpu_memory in the job) to plan for it")
        else:
            bw["device"] = _cpu_bandwidth() if measure else 10e9
            if measure:
                measured.append("device")
            bw["h2d_pinned"] = bw["device"]  # host and device are one memory
        if host_memory is None:
            host_memory = available_host_memory()
        return cls(device="cuda" if is_cuda else "cpu", gpu_memory=gpu_memory, gpus=max(1, int(gpus)),
                   host_memory=int(host_memory), workers_per_host=max(1, workers_per_host), bandwidth=bw,
                   measured=tuple(measured))


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else total physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cpu_bandwidth(nbytes: int = 256 * 1024**2) -> float:
    """One thread's copy bandwidth (bytes read + written per second), best of three 256 MiB copies."""
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _cuda_bandwidths(nbytes: int = 1024**3) -> tuple[float, float]:
    import torch

    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    host = torch.ones(nbytes // 4).pin_memory()
    times = []
    for a, b in ((dst, src), (src, host)):
        a.copy_(b)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            a.copy_(b, non_blocking=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / 3)
    return 2 * nbytes / times[0], nbytes / times[1]


# ---------------------------------------------------------------------------------------------------- output
@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    where: str  # device | host | page cache
    note: str = ""


@dataclass
class Option:
    """One placement of the sources, with everything the worker then holds and what a candidate then costs."""

    placement: str
    parts: list[Part]
    device_capacity: int
    host_capacity: int
    rank_cache: bool
    materialise_seconds: float
    bound_note: str

    def total(self, where: str) -> int:
        return sum(p.bytes for p in self.parts if p.where == where)

    @property
    def device_short(self) -> int:
        return max(0, self.total("device") - self.device_capacity)

    @property
    def host_short(self) -> int:
        return max(0, self.total("host") - self.host_capacity)

    @property
    def fits(self) -> bool:
        return self.device_short == 0 and self.host_short == 0


@dataclass
class MemoryPlan:
    shapes: list[ModelShape]
    workload: Workload
    machine: Machine
    options: list[Option]
    chosen: Option | None
    engine_dtype: str
    max_length: int
    notes: list[str]
    requested: str = "auto"

    @property
    def engine_memory(self) -> int:
        """Bytes per GPU the scoring engine (weights, KV cache, activations) takes: vLLM's memory budget."""
        assert self.chosen is not None
        return sum(p.bytes for p in self.chosen.parts if p.name in ("engine weights", "KV cache", "activations"))

    def to_dict(self) -> dict:
        """The plan as plain data (`evomerge plan --json`): bytes per part, per placement."""
        return {
            "models": [{"folder": str(s.folder), "params": s.params, "bytes": s.bytes, "dtype": s.dtype} for s in self.shapes],
            "engine_dtype": self.engine_dtype, "max_length": self.max_length,
            "machine": {"device": self.machine.device, "gpu_memory": self.machine.gpu_memory, "gpus": self.machine.gpus,
                        "host_memory": self.machine.host_memory, "workers_per_host": self.machine.workers_per_host,
                        "bandwidth": self.machine.bandwidth, "measured": list(self.machine.measured)},
            "options": [{"placement": o.placement, "fits": o.fits, "device_bytes": o.total("device"),
                         "host_bytes": o.total("host"), "device_capacity": o.device_capacity,
                         "host_capacity": o.host_capacity, "rank_cache": o.rank_cache,
                         "materialise_seconds": o.materialise_seconds,
                         "parts": [{"name": p.name, "bytes": p.bytes, "where": p.where, "note": p.note} for p in o.parts]}
                        for o in self.options],
            "chosen": None if self.chosen is None else self.chosen.placement,
            "notes": list(self.notes),
        }

    def render(self, source: str = "the job") -> str:
        m, w = self.machine, self.workload
        lines = [f"memory plan for {source}: {len(self.shapes)} models ({self.shapes[0].model_type}, "
                 f"{count(self.shapes[0].params)} parameters, {self.shapes[0].layers} layers, "
                 f"{self.shapes[0].dtype}), backend {w.backend} in {self.engine_dtype}, batch {w.batch_size} x "
                 f"{self.max_length} tokens, sources {w.sources_dtype}"]
        if m.device == "cuda":
            lines.append(f"worker: {m.gpus} x GPU of {gib(m.gpu_memory or 0)}, host memory {gib(m.host_memory)}"
                         + (f" shared by {m.workers_per_host} workers" if m.workers_per_host > 1 else ""))
        else:
            lines.append(f"worker: CPU, memory {gib(m.host_memory)}"
                         + (f" shared by {m.workers_per_host} workers" if m.workers_per_host > 1 else ""))
        for opt in self.options:
            mark = "->" if opt is self.chosen else "  "
            verdict = "fits" if opt.fits else (
                f"does not fit: device short by {gib(opt.device_short)}" if opt.device_short
                else f"does not fit: host short by {gib(opt.host_short)}")
            lines.append(f"{mark} sources: {opt.placement:<6} {verdict}; device {gib(opt.total('device'))} of "
                         f"{gib(opt.device_capacity)}" + (f", host {gib(opt.total('host'))} of {gib(opt.host_capacity)}"
                                                           if m.device == "cuda" else "")
                         + f"; materialise >= {opt.materialise_seconds:.2f} s per candidate ({opt.bound_note})")
            for p in opt.parts:
                lines.append(f"     {p.name:<22} {gib(p.bytes):>11}  on {p.where:<10} {p.note}")
        if self.chosen is not None:
            why = ("the fastest placement that fits" if self.requested == "auto"
                   else f"runtime.sources: {self.requested}")
            lines.append(f"picked: sources on {self.chosen.placement} ({why}); rank caches "
                         f"{'on' if self.chosen.rank_cache else 'off'}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def require_fit(self, source: str = "the job") -> "MemoryPlan":
        """This plan, if a placement was picked; else PlanError with the refusal."""
        if self.chosen is None:
            raise PlanError(self.refusal(source))
        return self

    def refusal(self, source: str = "the job") -> str:
        """One line: which part does not fit, by how much, and the changes that would make it fit."""
        pool = [o for o in self.options if self.requested in ("auto", o.placement)] or self.options
        best = min(pool, key=lambda o: (o.device_short + o.host_short))
        where = "device" if best.device_short else "host"
        short = best.device_short or best.host_short
        biggest = max((p for p in best.parts if p.where == where), key=lambda p: p.bytes)
        fixes = _fixes(self, best)
        return (f"{source}: runtime: the worker does not fit: with sources on {best.placement} it needs "
                f"{gib(best.total(where))} on the {'GPU' if where == 'device' and self.machine.device == 'cuda' else where}"
                f" and has {gib(best.device_capacity if where == 'device' else best.host_capacity)} (short by "
                f"{gib(short)}; the largest part is {biggest.name}, {gib(biggest.bytes)}). " + "; or ".join(fixes))


def _fixes(plan: MemoryPlan, best: Option) -> list[str]:
    out = []
    if plan.requested != "auto":
        fitting = [o.placement for o in plan.options if o.fits]
        if fitting:
            out.append(f"set runtime.sources: {fitting[0]} (fits)")
    m, w = plan.machine, plan.workload
    per_seq = sum(p.bytes for p in best.parts if p.name in ("KV cache", "activations")) / max(1, w.batch_size)
    if best.device_short and per_seq > 0:
        fit_batch = int(w.batch_size - math.ceil(best.device_short / per_seq))
        if fit_batch >= 1:
            out.append(f"lower runtime.batch_size to {fit_batch}")
    if m.device == "cuda" and best.device_short:
        shardable = sum(p.bytes for p in best.parts if p.name in ("engine weights", "KV cache"))
        need = best.total("device") - best.device_capacity
        gpus = m.gpus
        while gpus < 64 and need > 0:
            gpus *= 2
            need = best.total("device") - shardable * (1 - m.gpus / gpus) - best.device_capacity
        if need <= 0 and w.backend == "vllm":
            out.append(f"set runtime.gpus: {gpus} (the engine split over {gpus} GPUs)")
        elif w.backend != "vllm":
            out.append("use backend vllm with runtime.gpus > 1 (transformers runs on one GPU)")
    if w.sources_dtype == "float32":
        out.append("set runtime.sources_dtype: native (bf16/fp16 sources take half the memory)")
    if (best.host_short or (m.device == "cpu" and best.device_short)) and m.workers_per_host > 1:
        out.append(f"lower runtime.workers (now {m.workers_per_host} on this host, sharing its memory)")
    return out or ["use a machine with more memory"]


# ---------------------------------------------------------------------------------------------------- arithmetic
def plan_worker(models: Sequence[str | Path | ModelShape], workload: Workload, machine: Machine,
                sources: str = "auto", rank_cache: str | bool = "auto") -> MemoryPlan:
    """The plan for one worker holding `models` (the base first). `sources`: auto (the fastest placement that
    fits) or one of PLACEMENTS. `rank_cache`: auto (where the device has room), True or False."""
    if sources not in ("auto", *PLACEMENTS):
        raise PlanError(f"runtime.sources: must be auto, {', '.join(PLACEMENTS)}; got {sources!r}")
    shapes = [m if isinstance(m, ModelShape) else read_shape(m) for m in models]
    ref = shapes[0]
    notes: list[str] = []
    from evomerge.checkpoints.arch import KNOWN_FAMILIES

    unknown = sorted({s.model_type for s in shapes if s.model_type not in KNOWN_FAMILIES})
    if unknown:
        notes.append(f"model_type {', '.join(unknown)} is not a family the architecture reader knows "
                     f"({', '.join(sorted(KNOWN_FAMILIES))}): the KV cache and activations assume a Llama-like "
                     "decoder (hidden_size, num_key_value_heads, head_dim, intermediate_size as in its config)")
    dtypes = sorted({s.dtype for s in shapes})
    if len(dtypes) > 1:
        notes.append(f"the sources come in {', '.join(dtypes)}: each delta is computed in float32 either way")
    engine_dtype = ref.dtype if workload.engine_dtype in ("auto", None) else workload.engine_dtype
    e_bytes = _BYTES.get(engine_dtype, 4)
    max_length = workload.max_length or 2048
    if workload.max_length is None:
        notes.append(f"max_length assumed {max_length} tokens per sequence (set runtime.max_length to your tasks' "
                     "longest prompt + answer)")
    cuda = machine.device == "cuda"
    gpus = machine.gpus if cuda else 1
    if cuda and gpus > 1 and workload.backend != "vllm":
        notes.append("runtime.gpus > 1 splits only a vLLM engine (tensor parallel); transformers uses one GPU")
        gpus_engine = 1
    else:
        gpus_engine = gpus
    n_models = len(shapes)
    k = max(1, n_models - 1)  # inputs of one merge besides the base
    params = max(s.params for s in shapes)
    tv_methods = bool(workload.methods)
    ranked = any(m in RANKED_METHODS for m in workload.methods)

    # the parts every placement shares
    engine = Part("engine weights", math.ceil(params * e_bytes / gpus_engine), "device",
                  f"{engine_dtype}" + (f", split over {gpus_engine} GPUs" if gpus_engine > 1 else ""))
    layers = max(ref.layers, workload.path_layers or 0)
    kv = Part("KV cache", math.ceil(2 * layers * ref.kv_dim * e_bytes * workload.batch_size * max_length / gpus_engine),
              "device", f"{workload.batch_size} x {max_length} tokens x {layers} layers")
    tokens = workload.batch_size * max_length
    act_note = f"logits of {tokens} tokens (and their float32 log-softmax) + one layer's"
    if workload.backend == "vllm":  # vLLM's scheduler runs at most VLLM_BATCHED_TOKENS tokens per step
        tokens = min(tokens, VLLM_BATCHED_TOKENS)
        act_note = f"logits of {tokens} tokens per vLLM step (and their float32 log-probabilities) + one layer's"
    act = Part("activations", math.ceil(tokens * (ref.vocab * (e_bytes + 8) + (4 * ref.hidden + 3 * ref.intermediate)
                                                  * e_bytes) / gpus_engine), "device", act_note)
    if workload.backend == "vllm":
        kv = replace(kv, note=kv.note + "; vLLM takes this budget up front")
    fixed = Part("runtime", CUDA_CONTEXT if cuda else CPU_RUNTIME, "device",
                 "CUDA context and allocator slack" if cuda else "interpreter, torch, transformers, lm-eval")
    if workload.backend == "vllm" and not cuda:
        fixed = replace(fixed, bytes=fixed.bytes + int(0.4 * GiB), note=fixed.note + ", vLLM")

    if workload.sources_dtype == "float32":
        resident = sum(s.params for s in shapes) * 4
        res_note = f"float32: the base + {n_models - 1} task vectors"
        res_elem = 4
    else:
        resident = sum(s.bytes for s in shapes)
        res_note = f"{', '.join(dtypes)} as in the checkpoints"
        res_elem = resident / max(1, sum(s.params for s in shapes))
    # a rank cache: sorted float32 magnitudes, plus an int64 order where ties straddle a threshold: the rule for
    # 16-bit task vectors (a coarse grid), rare in float32
    per_elem = 4 + (8 if ref.dtype in ("bfloat16", "float16") else 0)
    rank_bytes = (n_models - 1) * params * per_elem if (tv_methods and ranked) else 0
    transient_dev = (k + 4) * ref.largest * 4 + ref.largest * e_bytes if tv_methods else 0
    transient_note = f"largest tensor ({count(ref.largest)}) x {k} task vectors in float32, masks, merged"
    # A CPU worker merges these methods in one pass (merge.fused), unless TIES must follow mergekit's tie order on
    # 16-bit sources (their ties straddle thresholds: only the sort has that order, and the torch path runs).
    # (float32 sources too: their ties straddle rarely, but they may, and such a tensor takes the torch path.)
    kernel_methods = not cuda and workload.fused and tv_methods and set(workload.methods) <= set(FUSED_METHODS)
    mergekit_order = "ties" in workload.methods and not workload.stable_ties
    fused = kernel_methods and not mergekit_order
    sketch_part = None
    if fused:
        rank_bytes = 0
        tensors = ref.tensors or ref.layers * 9 + 3
        # the undecided entries of a pass (at most ~1% of the largest tensor per source: index, base, deltas, bits)
        # and the merged tensor when it is not written into the engine's own parameter (a vLLM reload)
        build = min(512, max(1, ref.largest // 1024)) * SKETCH_SLOT + 3 * (1 << 19)
        at_once = max(1, workload.threads)  # a worker merges `threads` tensors at once
        transient_dev = at_once * (build + math.ceil(k * ref.largest * (20 + 4 * k) / 100)) + ref.largest * e_bytes
        transient_note = (f"one-pass CPU merge: {at_once} x (a sketch's build table, undecided entries), one merged "
                          "tensor")
        sketch_part = Part("threshold sketches", k * tensors * SKETCH_BYTES, "device",
                           f"{k} x {tensors} source tensors' magnitude sketches (one-pass merge)")
    elif kernel_methods:  # and mergekit's order
        notes.append(f"TIES on {ref.dtype} sources in mergekit's tie order: each tensor's threshold ties are ordered by "
                     "a full sort, the slow path; set search_space.parameters.stable_ties: true for the one-pass "
                     "merge (ties kept by position; export --format mergekit says so)")
    path_part = None
    if workload.path_layers:
        extra = max(0, workload.path_sources) * params * e_bytes
        path_part = (extra, f"{workload.path_sources} source modules for data-flow paths")

    host_cap = machine.host_memory // machine.workers_per_host
    dev_cap = machine.gpu_memory if cuda else host_cap
    bw = machine.bandwidth or {"device": 10e9, "h2d_pinned": NOMINAL["h2d_pinned"], "disk": NOMINAL["disk"]}
    options = []
    for placement in PLACEMENTS:
        if not cuda and placement == "host":
            continue  # on a CPU worker the host is the device
        parts = [engine, kv, act]
        where = {"device": "device", "host": "host", "disk": "page cache"}[placement]
        home = "device" if not cuda and placement == "device" else where
        parts.append(Part("sources", resident, home, res_note + ("; the page cache keeps what fits" if placement == "disk" else "")))
        # tensors copied in from the host or read from disk; the one-pass merge reads the page cache in place
        fetched = 0 if fused and placement == "disk" else (
            (k + 1) * ref.largest * (4 if workload.sources_dtype == "float32" else _BYTES.get(ref.dtype, 4)))
        if tv_methods:
            parts.append(Part("candidate transient", transient_dev + (fetched if placement != "device" else 0),
                              "device", transient_note))
        if sketch_part is not None:
            parts.append(sketch_part)
        if path_part is not None:
            shared = placement == "device" and workload.sources_dtype == "native" and engine_dtype == ref.dtype
            if not shared:
                parts.append(Part("path source modules", path_part[0], "device", path_part[1]))
        parts.append(fixed)
        if cuda:
            parts.append(Part("host runtime", CPU_RUNTIME, "host", "the worker process"))
        if workload.backend == "vllm" and (gpus_engine > 1):
            parts.append(Part("weight hand-off", min(params * e_bytes, 2 * GiB), "host",
                              "shards in /dev/shm for a multi-process engine"))
        # rank caches go on the device when the rest leaves room for them
        base_dev = sum(p.bytes for p in parts if p.where == "device")
        use_ranks = bool(rank_bytes) and (rank_cache is True or (rank_cache == "auto" and base_dev + rank_bytes <= dev_cap))
        if use_ranks:
            parts.append(Part("rank caches", rank_bytes, "device", f"{n_models - 1} task vectors' sorted magnitudes"
                              + (" and tie orders" if per_elem > 4 else "")))
        seconds, note = _bound(placement, params, k, res_elem, e_bytes, cuda, bw, machine.measured)
        options.append(Option(placement, parts, int(dev_cap or 0), int(host_cap), use_ranks, seconds, note))
    if sources == "auto":
        chosen = next((o for o in options if o.fits), None)
    else:
        chosen = next((o for o in options if o.placement == sources or (not cuda and sources == "host"
                                                                          and o.placement == "device")), None)
        if chosen is not None and not chosen.fits:
            chosen = None
    if rank_bytes and chosen is not None and not chosen.rank_cache:
        notes.append(f"rank caches off: they would need {gib(rank_bytes)} more on the device (results are the same; "
                     "magnitude thresholds are then selected per candidate)")
    return MemoryPlan(shapes, workload, machine, options, chosen, engine_dtype, max_length, notes, sources)


def _bound(placement: str, params: int, k: int, res_elem: float, e_bytes: int, cuda: bool, bw: dict[str, float],
           measured: Iterable[str]) -> tuple[float, str]:
    """Seconds a candidate needs at least: its k + 1 inputs read once over the link from where they live (device
    memory, the host-to-device copy, the disk), the merged model written once into the engine in device memory."""
    key = {"device": "device", "host": "h2d_pinned" if cuda else "device", "disk": "disk"}[placement]
    name = {"device": "device memory", "h2d_pinned": "host-to-device copy", "disk": "disk"}[key]
    read = (k + 1) * params * res_elem
    write = params * e_bytes
    seconds = read / bw[key] + write / bw["device"]
    src = "measured" if key in set(measured) else "nominal"
    return seconds, f"{name} at {bw[key] / 1e9:.0f} GB/s, {src}"
