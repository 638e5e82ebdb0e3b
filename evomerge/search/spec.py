"""The job spec: one YAML file saying what to merge, how to search, where to run and where to keep results.

    name: zoo-mix                    # the job's name in the store (unique there)
    models:
      base: ../../.cache/zoo/llama/base        # relative paths: this file's folder, then the working directory
      sources: {arith: ..., cipher: ...}       # name -> model folder
    search_space: sakana_ps          # a preset of search_spaces/, a YAML file, or an inline mapping (kind: ps|dfs|hybrid)
    objectives:                      # a fitness objectives file, or the same mapping inline
      include: [../../fitness]
      objectives: [{task: zoo_mix, limit: 200}]
    report_split: test               # the final report scores the front here (never the fitness split)
    driver:
      algorithm: nsga2               # random | cmaes | nsga2 | nsga3 | smsemoa
      population: 12
      budget: {evaluations: 120, seconds: null}   # stop after either (at a generation's end)
      seed: 0
      options: {}                    # passed to the algorithm (cmaes: sigma0)
      max_failures_in_a_row: 10      # then the job stops with a diagnosis
      mode: generational             # generational (ask, evaluate all, tell) | steady (no generation barrier)
      lag: 1                         # steady: batches asked ahead of the oldest one not yet told
      duplicates: skip               # skip (nsga2/nsga3/smsemoa never ask a recipe asked before) | cache
    runtime:
      kind: auto                     # auto | local | ray. auto: Ray when workers > 1 or an address is given
                                     # (`evomerge run --address`, RAY_ADDRESS), else in-process
      workers: 1                     # Ray worker actors (each loads the models once)
      threads: 1                     # torch threads (= Ray CPU slots) per worker
      gpus: 0                        # GPUs per Ray worker (default 1 with device cuda)
      max_retries: 2                 # a candidate whose worker died is sent again this many times, then failed
      candidate_timeout: null        # seconds a candidate may take before its Ray worker is killed and replaced;
                                     # null: 10x the median of the first candidates' times, within [60 s, 4 h]
      device: cpu
      backend: hf                    # hf | vllm | auto
      batch_size: 64
      max_length: null               # tokens per sequence the memory plan budgets for; null: 2048 (say yours)
      dtype: auto                    # the scoring engine's weights: auto (the base checkpoint's) | bfloat16 | float32
      sources: auto                  # where each worker keeps the models: auto (the fastest that fits) | device
                                     # | host (CPU memory, streamed to the GPU) | disk (memory-mapped checkpoints)
      sources_dtype: native          # native (the checkpoints' own dtype) | float32 (exact float32 task vectors)
      rank_cache: auto               # magnitude rank caches: auto (where the device has room) | true | false
      gpu_memory: null               # GiB per GPU the plan may fill; null: what the GPU here reports
      host_memory: null              # GiB of host memory; null: what this machine has available
      engine_memory: null            # GiB per GPU the scoring engine may take (vLLM's budget); null: the plan's
                                     # (vLLM's gpu_memory_utilization = engine_memory / the GPU's total memory;
                                     # vLLM's max_model_len is max_length)
      enforce_eager: null            # vLLM: true skips CUDA graph capture (faster start, slower steps); null:
                                     # vLLM's default on a GPU, eager on the CPU build
      scorer: null                   # "package.module:factory": a custom scorer (plug-ins, tests); was `evaluator`
      scorer_options: {}             # handed to that factory (spec.runtime.scorer_options); was `evaluator_options`
    store: ../../out/zoo-mix/store.sqlite
    report: ../../out/zoo-mix        # report.html and report.json go here (default: the store's folder)

`load_job` checks all of it before anything runs (models' headers, the space, the objectives file, the
driver) and raises `JobSpecError` naming the file, the field and what to do.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from evomerge.config import DTYPES, Where, check_keys, float_field, int_field, read_yaml, renamed_keys, resolve_path, suggest
from evomerge.errors import UserError
from evomerge.search.drivers import DRIVERS, SINGLE_OBJECTIVE, DriverError, check_options

if TYPE_CHECKING:
    from evomerge.fitness.objectives import ObjectiveSet

VLLM_MISSING = ("vllm is not installed in this Python environment; install it (`pip install vllm` on a GPU machine, "
                "`make venv-vllm` for the CPU build), or use backend hf or auto (vLLM when installed, else "
                "transformers)")
# The dfs `scales` default of every evomerge that stored a spec without it (the default became `slot` when specs
# began to store it, 2026-12-01): a stored spec lacking it decodes its genomes with this.
SCALES_BEFORE_PINNING = "transition"
TOP_KEYS = ("name", "models", "search_space", "objectives", "report_split", "driver", "runtime", "store", "report")
DRIVER_KEYS = ("algorithm", "population", "budget", "seed", "options", "max_failures_in_a_row", "mode", "lag",
               "duplicates")
DRIVER_MODES = ("generational", "steady")
DUPLICATES = ("skip", "cache")  # driver.duplicates; see evomerge/search/drivers.py
# What a stored spec without `driver.duplicates` searched with (every evomerge before 2026-12-03): its asks are
# replayed as they were made.
DUPLICATES_BEFORE = "cache"
RUNTIME_KEYS = ("kind", "workers", "threads", "gpus", "max_retries", "device", "backend", "batch_size", "scorer",
                "scorer_options", "candidate_timeout", "max_length", "dtype", "sources", "sources_dtype", "rank_cache",
                "gpu_memory", "host_memory", "engine_memory", "enforce_eager")
# vLLM's names for ideas the runtime already names: refused with the runtime's name and how the two relate
VLLM_NAMES = {"max_model_len": "runtime.max_length: tokens per sequence, passed to vLLM as max_model_len",
              "gpu_memory_utilization": "runtime.engine_memory: GiB per GPU the engine may take (vLLM's "
                                        "gpu_memory_utilization is engine_memory / the GPU's total memory)",
              "tensor_parallel_size": "runtime.gpus: GPUs per worker (vLLM's tensor_parallel_size when more than 1)"}
RENAMED_RUNTIME_KEYS = {"evaluator": "scorer", "evaluator_options": "scorer_options"}  # old name -> new name
RUNTIME_KINDS = ("auto", "local", "ray")


def _memory_fields(rt: Mapping[str, Any], where: Where) -> dict[str, Any]:
    """The memory plan's fields of `runtime`, checked (evomerge.memory reads them)."""
    out: dict[str, Any] = {}
    if rt.get("max_length") is not None:
        out["max_length"] = int_field(where, "runtime.max_length", rt["max_length"])
    dtype = str(rt.get("dtype", "auto"))
    if dtype != "auto" and dtype not in DTYPES:
        raise where.error("runtime.dtype", f"must be auto or one of {', '.join(DTYPES)}, got {dtype!r}"
                          + suggest(dtype, list(DTYPES), list_known=False))
    out["dtype"] = dtype
    for key, allowed in (("sources", ("auto", "device", "host", "disk")), ("sources_dtype", ("native", "float32"))):
        value = str(rt.get(key, allowed[0]))
        if value not in allowed:
            raise where.error(f"runtime.{key}", f"must be {', '.join(allowed)}; got {value!r}"
                              + suggest(value, allowed, list_known=False))
        out[key] = value
    rc = rt.get("rank_cache", "auto")
    if rc not in ("auto", True, False):
        raise where.error("runtime.rank_cache", f"must be auto, true or false, got {rc!r}")
    out["rank_cache"] = rc
    for key in ("gpu_memory", "host_memory", "engine_memory"):
        if rt.get(key) is not None:
            out[key] = float_field(where, f"runtime.{key}", rt[key], low=1e-3)
    return out


class JobSpecError(UserError, ValueError):
    """A job spec is invalid: `FILE: field: what is wrong. What to do.`"""


class SearchStopped(UserError, RuntimeError):
    """A job stopped itself (too many candidates failed in a row); the message is the diagnosis."""


@dataclass
class DriverSpec:
    algorithm: str = "nsga2"
    population: int = 12
    max_evaluations: int | None = None
    max_seconds: float | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    max_failures_in_a_row: int = 10
    mode: str = "generational"  # steady: no barrier, see evomerge/search/steady.py
    lag: int = 1  # steady: batches asked ahead of the oldest untold one (part of the search's identity)
    # skip: the pymoo drivers breed again an offspring whose recipe was asked before (part of the search's
    # identity); cache: they ask it, and the archive answers it (status `cached`, one unit of the budget)
    duplicates: str = "skip"


@dataclass
class RuntimeSpec:
    kind: str = "auto"  # auto: Ray when workers > 1 or a cluster address is given, else in-process
    workers: int = 1
    threads: int = 1
    gpus: float = 0.0  # per Ray worker (default 1 when device is cuda)
    max_retries: int = 2  # times a candidate is sent again after its worker died
    device: str = "cpu"
    backend: str = "hf"
    batch_size: int = 64
    candidate_timeout: float | None = None  # seconds; None: 10x the median candidate time (Ray workers only)
    scorer: str | None = None  # "package.module:factory"; None: the default scorer (the objectives on the models)
    scorer_options: dict[str, Any] = field(default_factory=dict)
    # the memory plan's inputs and choices (evomerge.memory; `evomerge plan JOB.yaml` prints them)
    max_length: int | None = None  # tokens per sequence; None: the plan assumes 2048
    dtype: str = "auto"  # the scoring engine's weights; auto: the base checkpoint's dtype
    sources: str = "auto"  # auto | device | host | disk; a worker is handed the placement the plan picked
    sources_dtype: str = "native"  # native | float32
    rank_cache: Any = "auto"  # auto | True | False; a worker is handed the plan's choice
    gpu_memory: float | None = None  # GiB per GPU; None: what the GPU reports
    host_memory: float | None = None  # GiB; None: what this machine has available
    engine_memory: float | None = None  # GiB per GPU the scoring engine may take (set by the plan, for vLLM)
    enforce_eager: bool | None = None  # vLLM's enforce_eager; None: vLLM's default


@dataclass
class JobSpec:
    """A checked job spec, its parts parsed. `to_dict()` is the spec in its YAML form with every path absolute:
    what the store keeps and what travels to a cluster, read back by `from_dict`."""

    name: str
    base: str  # the base model's name
    models: dict[str, Path]  # name -> folder, base first
    search_space: dict[str, Any]  # the space's mapping (a preset or file read in); built against `models`
    objectives: "ObjectiveSet | None"  # parsed; None with a custom scorer
    driver: DriverSpec
    runtime: RuntimeSpec
    store: Path
    report: Path
    report_split: str = "test"
    source: str = "<job>"  # the file it came from, for error messages

    def to_dict(self) -> dict[str, Any]:
        """The job spec mapping `parse_job` reads, every path absolute, so it means the same from anywhere."""
        d = self.driver
        return {
            "name": self.name,
            "models": {"base": str(self.models[self.base]), "base_name": self.base,
                       "sources": {k: str(v) for k, v in self.models.items() if k != self.base}},
            "search_space": self.search_space,
            "objectives": None if self.objectives is None else self.objectives.to_dict(),
            "report_split": self.report_split,
            "driver": {"algorithm": d.algorithm, "population": d.population,
                       "budget": {"evaluations": d.max_evaluations, "seconds": d.max_seconds}, "seed": d.seed,
                       "options": dict(d.options), "max_failures_in_a_row": d.max_failures_in_a_row, "mode": d.mode,
                       "lag": d.lag, "duplicates": d.duplicates},
            "runtime": asdict(self.runtime),
            "store": str(self.store),
            "report": str(self.report),
        }

    def to_yaml(self) -> str:
        """`to_dict` as a job file: `evomerge run` on it starts this very job (under its name and store)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<stored job spec>", check_paths: bool = False) -> "JobSpec":
        """A stored spec back: the YAML form (`to_dict`), or the field dump stores of schema 1-2 kept."""
        if "objectives_dir" in d:
            d = _from_field_dump(d)
        d = dict(d)
        if isinstance(d.get("search_space"), Mapping):  # stored before the genome-shaping defaults were pinned
            from evomerge.spaces.presets import pin_defaults

            d["search_space"] = pin_defaults(d["search_space"], scales=SCALES_BEFORE_PINNING, stable_ties=None)
        if isinstance(d.get("driver"), Mapping) and "duplicates" not in d["driver"]:
            d["driver"] = {**d["driver"], "duplicates": DUPLICATES_BEFORE}
        return parse_job(d, source=source, check_paths=check_paths, pin=False)


def _from_field_dump(d: Mapping[str, Any]) -> dict[str, Any]:
    """Stores of schema 1-2 kept the dataclass fields (`asdict`), objectives unparsed beside their folder: the
    same spec in its YAML form."""
    from evomerge.fitness.objectives import parse_objectives

    base = d["base"]
    dr = d["driver"]
    objectives = None
    if d.get("objectives") is not None:
        objectives = parse_objectives(d["objectives"], base_dir=d["objectives_dir"], check_paths=False).to_dict()
    return {
        "name": d["name"],
        "models": {"base": d["models"][base], "base_name": base,
                   "sources": {k: v for k, v in d["models"].items() if k != base}},
        "search_space": d["search_space"], "objectives": objectives, "report_split": d["report_split"],
        "driver": {k: v for k, v in dr.items() if k not in ("max_evaluations", "max_seconds")}
                  | {"budget": {"evaluations": dr.get("max_evaluations"), "seconds": dr.get("max_seconds")}},
        "runtime": {RENAMED_RUNTIME_KEYS.get(k, k): v for k, v in d["runtime"].items()},
        "store": d["store"], "report": d["report"],
    }


def load_job(path: str | Path) -> JobSpec:
    """Read and check a job spec file; every relative path resolves against the file's folder."""
    data, p = read_yaml(path, JobSpecError, "job spec")
    return parse_job(data, source=str(path), base_dir=p.parent)


def parse_job(data: Any, source: str = "<job>", base_dir: str | Path = ".", check_paths: bool = True,
              pin: bool = True) -> JobSpec:
    """Check a job spec mapping. `check_paths=False` checks its structure and values but not what it needs of this
    machine (the models and objectives' files, an installed vLLM, the installed optimisers' option names): a stored
    spec read on another machine, a spec bound for a cluster. `pin=False`: a stored spec, whose space keeps the
    merge defaults it was searched with (`pin_defaults(stable_ties=None)`: no stable_ties added)."""
    base_dir = Path(base_dir).resolve()
    where = Where(source, JobSpecError)
    if not isinstance(data, dict):
        raise where.error("(top level)", "a job spec is a YAML mapping with name, models, search_space, objectives, driver, store")
    check_keys(data, TOP_KEYS, where, "")
    for key in ("name", "models", "search_space", "store"):
        if data.get(key) in (None, ""):
            raise where.error(key, "required." + {"name": " Give the job a name (unique in its store).",
                                                   "models": " Give `base:` and `sources:` (name -> model folder).",
                                                   "search_space": " Name a preset (sakana_ps, layerwise_ps, dfs, "
                                                                   "ps_then_dfs) or give a mapping.",
                                                   "store": " Give the path of the SQLite store file."}[key])
    name = str(data["name"])

    # models
    raw = data["models"]
    if not isinstance(raw, dict) or "base" not in raw or not isinstance(raw.get("sources"), dict) or not raw["sources"]:
        raise where.error("models", "give `base: FOLDER` and `sources: {name: FOLDER, ...}` (at least one source)")
    check_keys(raw, ("base", "base_name", "sources"), where, "models.")
    base = str(raw.get("base_name", "base"))
    from evomerge.checkpoints import CheckpointError, IncompatibleModelsError, check_compatible, open_checkpoint
    from evomerge.merge.recipe import resolve_model_folder

    def model(field_path: str, value: Any) -> Path:
        """A folder, Hub id[@revision] or MODEL+ADAPTER (checkpoints.refs); stored resolved (a Hub snapshot's path
        names its commit), so a resumed job reads the same files."""
        if not check_paths:
            return resolve_path(value, base_dir)
        return resolve_model_folder(where, field_path, value, base_dir,
                                    hint="; relative paths resolve against the job file's folder")

    models: dict[str, Path] = {base: model("models.base", raw["base"])}
    for k, v in raw["sources"].items():
        if str(k) in models:
            raise where.error(f"models.sources.{k}", f"the name '{k}' is taken (the base is '{base}'); rename it")
        models[str(k)] = model(f"models.sources.{k}", v)
    try:
        if check_paths:
            check_compatible({k: open_checkpoint(v) for k, v in models.items()})
    except (CheckpointError, IncompatibleModelsError) as e:
        raise where.error("models", f"{e}") from None

    # search space (built once here so that its errors surface now)
    from evomerge.spaces.presets import build_space, load_space_config, pin_defaults
    from evomerge.spaces.ps import SpaceError

    space = None
    try:
        space_cfg = pin_defaults(load_space_config(data["search_space"], base_dir), stable_ties=True if pin else None)
        if check_paths:  # the space reads the models' headers
            space = build_space(space_cfg, models, base)
            for _, genome in space.seeds()[:1]:
                space.decode(genome)
    except (SpaceError, ValueError) as e:  # the message names its field (search_space.X) or gets the section's
        raise where.error("" if str(e).startswith("search_space") else "search_space", str(e)) from None

    # runtime
    rt = data.get("runtime") or {}
    if not isinstance(rt, dict):
        raise where.error("runtime", "must be a mapping (workers, threads, device, backend, batch_size, scorer)")
    rt = renamed_keys(rt, RENAMED_RUNTIME_KEYS, where, "runtime.")
    for key, ours in VLLM_NAMES.items():
        if key in rt:
            raise where.error(f"runtime.{key}", f"vLLM's name; evomerge's is {ours}")
    check_keys(rt, RUNTIME_KEYS, where, "runtime.")
    if rt.get("enforce_eager") not in (None, True, False):
        raise where.error("runtime.enforce_eager", f"must be true, false or null (vLLM's default), got {rt['enforce_eager']!r}")
    kind = str(rt.get("kind", "auto"))
    if kind not in RUNTIME_KINDS:
        raise where.error("runtime.kind", f"must be auto, local or ray, got {kind!r}")
    device = str(rt.get("device", "cpu"))
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise where.error("runtime.device", f"must be cpu, cuda, cuda:N or mps, got {device!r}."
                          + suggest(device, ("cpu", "cuda", "mps"), list_known=False))
    gpus = rt.get("gpus", 1 if device.startswith("cuda") else 0)
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0:
        raise where.error("runtime.gpus", f"must be a number of GPUs per worker >= 0 (e.g. 1, or 0.5 to share one), "
                          f"got {gpus!r}")
    runtime = RuntimeSpec(
        kind=kind, workers=int_field(where, "runtime.workers", rt.get("workers", 1)),
        threads=int_field(where, "runtime.threads", rt.get("threads", 1)), gpus=float(gpus),
        max_retries=int_field(where, "runtime.max_retries", rt.get("max_retries", 2), 0),
        device=device, backend=str(rt.get("backend", "hf")),
        batch_size=int_field(where, "runtime.batch_size", rt.get("batch_size", 64)), scorer=rt.get("scorer"),
        scorer_options=dict(rt.get("scorer_options") or {}),
        candidate_timeout=None if rt.get("candidate_timeout") is None else float_field(
            where, "runtime.candidate_timeout", rt["candidate_timeout"], low=1e-3))
    mem = _memory_fields(rt, where)
    runtime = replace(runtime, **mem, enforce_eager=rt.get("enforce_eager"))
    if runtime.backend not in ("hf", "vllm", "auto"):
        raise where.error("runtime.backend", f"must be hf, vllm or auto, got {runtime.backend!r}")
    if check_paths and runtime.backend == "vllm" and runtime.kind == "local" and importlib.util.find_spec("vllm") is None:
        raise where.error("runtime.backend", VLLM_MISSING)
    if runtime.scorer is not None and (not isinstance(runtime.scorer, str) or ":" not in runtime.scorer):
        raise where.error("runtime.scorer", f"must be 'package.module:factory', got {runtime.scorer!r}")

    # objectives
    objectives, objectives_dir, parsed = None, base_dir, None
    obj = data.get("objectives")
    if obj is None and runtime.scorer is None:
        raise where.error("objectives", "required: an objectives file (see fitness/README.md) or an inline mapping "
                          "{include: [...], objectives: [{task: ...}]}")
    if obj is not None:
        from evomerge.fitness.objectives import FitnessConfigError, parse_objectives

        if isinstance(obj, str):
            try:  # a syntax error in the objectives file is reported too, not only a missing one
                objectives, f = read_yaml(resolve_path(obj, base_dir), FitnessConfigError, "objectives")
            except FitnessConfigError as e:
                raise where.error("objectives", str(e)) from None
            objectives_dir, obj_source = f.parent, str(f)
        else:
            objectives, obj_source = obj, f"{source}: objectives"
        try:
            parsed = parse_objectives(objectives, source=obj_source, base_dir=objectives_dir, check_paths=check_paths)
        except FitnessConfigError as e:
            if str(e).startswith(obj_source):  # inline: the message names this file and section already
                raise where.error_class(str(e)) from None
            raise where.error("objectives", str(e)) from None
        n_obj = len(parsed.objectives)
    else:
        n_obj = None

    # driver
    dr = data.get("driver") or {}
    if not isinstance(dr, dict):
        raise where.error("driver", "must be a mapping (algorithm, population, budget, seed, options)")
    check_keys(dr, DRIVER_KEYS, where, "driver.")
    algorithm = str(dr.get("algorithm", "nsga2"))
    if algorithm not in DRIVERS:
        raise where.error("driver.algorithm", f"unknown algorithm '{algorithm}'."
                          + suggest(algorithm, DRIVERS, list_known=False) + f" Choose one of {', '.join(DRIVERS)}")
    if algorithm in SINGLE_OBJECTIVE and n_obj is not None and n_obj != 1:
        raise where.error("driver.algorithm", f"{algorithm} optimises one objective and the job has {n_obj}; use nsga2, "
                          "nsga3 or smsemoa, or keep one objective")
    budget = dr.get("budget") or {}
    if isinstance(budget, int) and not isinstance(budget, bool):
        budget = {"evaluations": budget}
    if not isinstance(budget, dict) or set(budget) - {"evaluations", "seconds"}:
        raise where.error("driver.budget", "must be {evaluations: N} and/or {seconds: S}")
    evals, secs = budget.get("evaluations"), budget.get("seconds")
    if evals is None and secs is None:
        raise where.error("driver.budget", "give a budget: {evaluations: N} and/or {seconds: S}, or the search never ends")
    if evals is not None:
        int_field(where, "driver.budget.evaluations", evals)
    if secs is not None and (isinstance(secs, bool) or not isinstance(secs, (int, float)) or secs <= 0):
        raise where.error("driver.budget.seconds", f"must be a number of seconds > 0, got {secs!r}")
    options = dr.get("options") or {}
    if not isinstance(options, dict):
        raise where.error("driver.options", "must be a mapping of algorithm options")
    try:
        if check_paths:  # against the installed optimisers: a stored spec is read as it was accepted
            check_options(algorithm, options)
    except DriverError as e:
        raise where.error("driver.options", str(e)) from None
    seed = dr.get("seed", 0)
    mode = str(dr.get("mode", "generational"))
    if mode not in DRIVER_MODES:
        raise where.error("driver.mode", f"must be generational or steady, got {mode!r}")
    duplicates = dr.get("duplicates", "skip")
    if duplicates not in DUPLICATES:
        raise where.error("driver.duplicates", f"must be skip (never ask a recipe asked before) or cache (ask it; "
                          f"the archive answers it), got {duplicates!r}")
    driver = DriverSpec(algorithm=algorithm, population=int_field(where, "driver.population", dr.get("population", 12), 2),
                        max_evaluations=evals, max_seconds=None if secs is None else float(secs),
                        seed=int_field(where, "driver.seed", seed, 0), options=dict(options),
                        max_failures_in_a_row=int_field(where, "driver.max_failures_in_a_row", dr.get("max_failures_in_a_row", 10)),
                        mode=mode, lag=int_field(where, "driver.lag", dr.get("lag", 1), 0), duplicates=duplicates)
    if algorithm == "cmaes" and space is not None and space.num_genes < 2:
        raise where.error("driver.algorithm", "cmaes needs a space of at least 2 genes; use random or nsga2")

    store = resolve_path(data["store"], base_dir)
    if store.exists() and store.is_dir():
        raise where.error("store", f"{store} is a folder; give the path of a file (e.g. {store}/store.sqlite)")
    report = resolve_path(data["report"], base_dir) if data.get("report") else store.parent
    split = str(data.get("report_split", "test"))
    if parsed is not None and split == parsed.split:
        raise where.error("report_split", f"the report must score a held-out split, not the fitness split '{split}'")
    return JobSpec(name=name, base=base, models=models, search_space=space_cfg, objectives=parsed,
                   driver=driver, runtime=runtime, store=store, report=report, report_split=split, source=source)
