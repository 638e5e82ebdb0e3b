"""A mergekit-evolve config (`mergekit-evolve EVOLVE.yml`) as an evomerge job spec (`evomerge import-evolve`).

mergekit-evolve (deprecated, no successor) searches one genome with CMA-ES: per layer group (`layer_granularity`
layers each), per tensor-name filter (`filters`, plus one set for the remaining tensors) and per model, the merge
method's weight (and density) genes; the score is the weighted sum of its lm-eval tasks. The same search here is a
parameter-space space (evomerge/spaces/ps.py) with `layer_groups`, `modules: [filters..., "*"]`, the method, its
bounds and its `normalize`; the score becomes one `sum` objective (cmaes driver), or with `pareto` each task its
own objective (nsga2). What does not carry over exactly is returned as notes, never dropped silently.

    genome:
      models: [PATH, ...]            # local model folders (relative: the evolve file's folder, then the cwd)
      merge_method: ties             # task_arithmetic | ties | dare_ties | linear (as task_arithmetic, normalized)
      base_model: PATH
      layer_granularity: 4           # 0: one group over all layers
      normalize: null                # mergekit's default: true for ties, dare_ties, linear
      allow_negative_weights: false  # -> weight_bounds [-1, 1] when true, else [0, 1]
      smooth: false                  # not mapped: layer groups are piecewise constant here
      filters: [self_attn, mlp]      # -> modules
    tasks: [{name: TASK, weight: 1.0, metric: "acc,none"}]
    limit: null, num_fewshot: null, apply_chat_template: true, fewshot_as_multiturn: true, shuffle, random_init
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from evomerge.config import Where, check_keys, read_yaml, resolve_path, suggest
from evomerge.errors import UserError

TOP_KEYS = ("genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
            "fewshot_as_multiturn")
GENOME_KEYS = ("models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
               "allow_negative_weights", "filters", "smooth")
TASK_KEYS = ("name", "weight", "metric")
# mergekit-evolve's methods -> ours (a method is a row of evomerge.merge.methods; the space takes task-vector rows)
METHODS = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare_ties": "dare_ties", "linear": "task_arithmetic"}
NORMALIZED_BY_DEFAULT = ("ties", "dare_ties", "linear")  # mergekit-evolve's `normalize: null`
MERGEKIT_METRIC = "acc,none"  # mergekit-evolve's default task metric
MERGEKIT_SIGMA0 = round(1 / 6, 6)  # mergekit-evolve's default --sigma0
MERGEKIT_MAX_FEVALS = 100  # mergekit-evolve's default --max-fevals


class EvolveImportError(UserError, ValueError):
    """An evolve config that cannot become a job spec: `FILE: field: what is wrong; what to do`."""


@dataclass
class Imported:
    """The job spec mapping (what `evomerge.search.spec.parse_job` reads) and the notes on what maps differently."""

    job: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _model_folder(value: Any, base_dir: Path, where: Where, field_path: str) -> Path:
    """A model reference of the evolve file (a folder, a Hub id[@revision], MODEL+ADAPTER) as the folder the job
    names (`checkpoints.refs`: a Hub snapshot, or an adapted folder)."""
    from evomerge.merge.recipe import resolve_model_folder

    if not isinstance(value, str) or not value:
        raise where.error(field_path, f"expected a model reference, got {value!r}")
    return resolve_model_folder(where, field_path, value, base_dir, hint=" (relative paths resolve against the "
                                "evolve file's folder, then the working directory)")


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    cfg = folder / "tokenizer_config.json"
    try:
        return bool(cfg.is_file() and json.loads(cfg.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _names(folders: Sequence[Path]) -> list[str]:
    """A readable, distinct name per model: its folder's name, then its parent's (llama/arith vs qwen2/arith)."""
    names: list[str] = []
    for f in folders:
        name = f.name
        if name in names:
            name = f"{f.parent.name}_{f.name}"
        while name in names:
            name += "_"
        names.append(name)
    return names


def convert_evolve(path: str | Path, *, pareto: bool = False, name: str | None = None, store: str | None = None,
                   include: Sequence[str] = (), split: str = "fitness", report_split: str = "test",
                   budget: int = MERGEKIT_MAX_FEVALS, population: int | None = None, output_dir: str | Path | None = None,
                   ) -> Imported:
    """The job spec equivalent to the mergekit-evolve config at `path`, with notes. Paths in the result are absolute
    (models, `include` folders; `store` against the working directory, by default OUTPUT_DIR/out/NAME/store.sqlite)."""
    data, p = read_yaml(path, EvolveImportError, "mergekit-evolve config")
    where = Where(str(path), EvolveImportError)
    base_dir = p.parent
    if not isinstance(data, dict):
        raise where.error("(top level)", "a mergekit-evolve config is a mapping with `genome:` and `tasks:`")
    check_keys(data, TOP_KEYS, where, "")
    notes: list[str] = []
    genome = data.get("genome")
    if not isinstance(genome, dict):
        raise where.error("genome", "required: a mapping with models, merge_method and base_model")
    check_keys(genome, GENOME_KEYS, where, "genome.")

    method = genome.get("merge_method")
    if method == "slerp":
        raise where.error("genome.merge_method", "slerp is not searched here (mergekit-evolve's slerp keeps the two "
                          "heaviest models per layer group); use task_arithmetic, ties or dare_ties")
    if method not in METHODS:
        raise where.error("genome.merge_method", f"unknown method {method!r}." + suggest(method, METHODS, list_known=False)
                          + f" mergekit-evolve's methods that map here: {', '.join(METHODS)}")
    ours = METHODS[method]

    models = genome.get("models")
    if not isinstance(models, list) or not models:
        raise where.error("genome.models", "required: a list of model folders")
    folders = [_model_folder(m, base_dir, where, f"genome.models[{i}]") for i, m in enumerate(models)]
    if genome.get("base_model") is None:
        raise where.error("genome.base_model", f"required here: {method} is searched as task vectors against a base "
                          "model; give the base the fine-tunes share")
    base = _model_folder(genome["base_model"], base_dir, where, "genome.base_model")
    sources = [f for f in folders if f != base]
    if len(sources) != len(folders):
        notes.append("genome.models lists the base model: its genes did nothing in mergekit-evolve (its task vector is "
                     "zero); the space has none for it")
    if not sources:
        raise where.error("genome.models", "no model besides the base: nothing to merge")
    if len(set(sources)) != len(sources):
        raise where.error("genome.models", "a model is listed twice; list each once")
    labels = _names([base, *sources])

    if method == "linear":
        notes.append("merge_method linear: searched as task_arithmetic with normalize (the weighted mean of the "
                     "models, written as the base plus normalized task vectors); the base's own weight is not a gene")
    normalize = genome.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise where.error("genome.normalize", f"must be true, false or null, got {normalize!r}")
    if normalize is None:
        normalize = method in NORMALIZED_BY_DEFAULT
    if method == "linear" and normalize is False:
        notes.append("linear with normalize: false is the plain weighted sum of the models; as task_arithmetic it is "
                     "the base plus the weighted task vectors (equal only when the weights sum to 1)")

    granularity = genome.get("layer_granularity", 0)
    if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 0:
        raise where.error("genome.layer_granularity", f"must be a whole number >= 0, got {granularity!r}")
    from evomerge.checkpoints.arch import Architecture

    try:
        num_layers = Architecture.from_config(json.loads((base / "config.json").read_text())).num_layers
    except ValueError as e:
        raise where.error("genome.base_model", f"{base}/config.json: no layer count ({e})") from None
    if granularity and num_layers % granularity:
        raise where.error("genome.layer_granularity", f"{num_layers} layers are not a multiple of {granularity}")
    groups = num_layers // granularity if granularity else 1

    filters = genome.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
        raise where.error("genome.filters", f"must be a list of tensor-name substrings, got {filters!r}")
    modules = [*filters, "*"] if filters else ["*"]
    if filters:
        notes.append(f"filters -> modules {modules}: the same tensor-name substrings; '*' is mergekit-evolve's set for "
                     "the tensors no filter matches")
    if granularity:
        notes.append(f"layer_granularity {granularity} -> layer_groups {groups} ({num_layers} layers)")

    negative = genome.get("allow_negative_weights", False)
    if not isinstance(negative, bool):
        raise where.error("genome.allow_negative_weights", f"must be true or false, got {negative!r}")
    weight_bounds = [-1.0, 1.0] if negative else [0.0, 1.0]
    notes.append(f"weights: mergekit-evolve's genes are unbounded ({'signed' if negative else 'their absolute value taken'}"
                 f"); here they lie in weight_bounds {weight_bounds}, densities in [0, 1] as mergekit clamps them")
    if genome.get("smooth"):
        notes.append("smooth: true is not mapped: mergekit interpolates each parameter across the layers as a "
                     "gradient; here each layer group has its own constant value")
    if genome.get("tokenizer_source") is not None:
        notes.append(f"tokenizer_source: {genome['tokenizer_source']!r} is not mapped: the models must share one "
                     "vocabulary (the job is refused otherwise)")
    notes.append("dtype: mergekit-evolve merges in bfloat16 with int8 masks; evomerge computes in float32")

    space: dict[str, Any] = {"kind": "ps", "method": ours, "layer_groups": groups, "modules": modules,
                             "weight_bounds": weight_bounds, "density_bounds": [0.0, 1.0],
                             "parameters": {"normalize": bool(normalize)}, "seed": 0}

    objectives = _objectives(data, where, include, base_dir, split, pareto, base, notes)
    for key, why in (("shuffle", "objectives score the first `limit` items of the split, in its order"),
                     ("random_init", "the first population holds the parents and their average, the rest drawn "
                                     "at random")):
        if data.get(key):
            notes.append(f"{key}: true is not mapped: {why}")

    n_obj = len(objectives["objectives"])
    pop = population or (8 if not pareto else 12)
    driver: dict[str, Any] = {"algorithm": "nsga2" if pareto else "cmaes", "population": pop,
                              "budget": {"evaluations": budget}, "seed": 0}
    if not pareto:
        driver["options"] = {"sigma0": MERGEKIT_SIGMA0}
        notes.append(f"driver: cmaes with sigma0 {MERGEKIT_SIGMA0} (mergekit-evolve's default) over genes scaled to their "
                     f"bounds; budget {budget} evaluations (mergekit-evolve's --max-fevals default is "
                     f"{MERGEKIT_MAX_FEVALS}), population {pop}")
    else:
        notes.append(f"--pareto: {n_obj} objectives, one per task (the weights are dropped), searched with nsga2")
    job_name = name or Path(path).stem
    out_dir = Path(output_dir) if output_dir is not None else Path.cwd()
    store_path = Path(store).resolve() if store else (out_dir / "out" / job_name / "store.sqlite").resolve()
    job = {
        "name": job_name,
        "models": {"base": str(base), "base_name": labels[0],
                   "sources": {label: str(f) for label, f in zip(labels[1:], sources)}},
        "search_space": space,
        "objectives": objectives,
        "report_split": report_split,
        "driver": driver,
        "runtime": {"device": "cpu", "backend": "hf"},
        "store": str(store_path),
    }
    return Imported(job, notes)


def _objectives(data: dict, where: Where, include: Sequence[str], base_dir: Path, split: str, pareto: bool,
                base: Path, notes: list[str]) -> dict[str, Any]:
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise where.error("tasks", "required: a list of lm-eval tasks ({name, weight, metric} or a task name)")
    common: dict[str, Any] = {}
    limit = data.get("limit")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise where.error("limit", f"must be a positive whole number of items, got {limit!r}")
        common["limit"] = limit
    if data.get("num_fewshot") is not None:
        common["num_fewshot"] = data["num_fewshot"]
    chat = data.get("apply_chat_template")
    if chat is None:  # mergekit-evolve's default is true
        chat = _has_chat_template(base)
        if not chat:
            notes.append("apply_chat_template: mergekit-evolve's default is true, but the base model's tokenizer has no "
                         "chat template: set to false (give the tokenizer a template and set it true to match)")
    if chat:
        common["apply_chat_template"] = True
        multiturn = data.get("fewshot_as_multiturn", True)
        if multiturn is not True:
            common["fewshot_as_multiturn"] = multiturn
    terms = []
    seen: set[str] = set()
    for i, t in enumerate(tasks):
        if isinstance(t, str):
            t = {"name": t}
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise where.error(f"tasks[{i}]", "a task is a name or {name: TASK, weight: 1.0, metric: 'acc,none'}")
        check_keys(t, TASK_KEYS, where, f"tasks[{i}].")
        weight = t.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise where.error(f"tasks[{i}].weight", f"must be a number, got {weight!r}")
        label = t["name"] if t["name"] not in seen else f"{t['name']}_{i}"
        seen.add(label)
        terms.append({"name": label, "task": t["name"], "metric": str(t.get("metric", MERGEKIT_METRIC)),
                      "weight": float(weight), **common})
    folders = [str(resolve_path(f, Path.cwd(), accept=Path.is_dir).resolve()) for f in include]
    for f in folders:
        if not Path(f).is_dir():
            raise EvolveImportError(f"--include: '{f}' is not a folder of lm-eval task YAMLs")
    out: dict[str, Any] = {"split": split}
    if folders:
        out["include"] = folders
    if pareto:
        out["objectives"] = [{k: v for k, v in term.items() if k != "weight"} | {"direction": "maximise"}
                             for term in terms]
    else:
        out["objectives"] = [{"name": "score", "sum": terms, "direction": "maximise"}]
    notes.append(f"tasks: scored on split '{split}' (mergekit-evolve scores each task's configured test split); "
                 "mergekit-evolve maximises its score, so does this job")
    return out


def write_job(imported: Imported, output: str | Path, source: str | Path, force: bool = False) -> Path:
    """Check the spec as `evomerge run` will (`parse_job`: models, space, objectives, driver), then write it with the
    notes as a comment at its top. Nothing is written when the check fails."""
    import yaml

    from evomerge.merge.export import FILE_MARKER, ExportError, check_output, write_file
    from evomerge.search.spec import parse_job

    out = Path(output).expanduser().absolute()
    models = imported.job.get("models", {})
    inputs = [i for i in (source, models.get("base", ""), *models.get("sources", {}).values()) if i]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # the rules of every evomerge writer, checked before the job is: never an input, --force over our own
        check_output(out, force, inputs, folder=False)
        parse_job(imported.job, source=str(out), base_dir=out.parent)
        head = [f"{FILE_MARKER} (import-evolve): a job spec imported from the mergekit-evolve config "
                f"{Path(source).resolve()}."]
        head += [f"# note: {n}" for n in imported.notes]
        return write_file(out, "\n".join(head) + "\n" + yaml.safe_dump(imported.job, sort_keys=False), force, inputs)
    except ExportError as e:
        raise EvolveImportError(str(e)) from None
