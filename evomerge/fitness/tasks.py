"""lm-eval tasks for a set of objectives: loaded once per worker, requests built once, reused per candidate.

`lm_eval.evaluator.evaluate` rebuilds every request (prompt rendering, fewshot sampling) and aggregates
with sample logging on each call; on small models that is about a third of the time. `TaskRun` keeps
the built requests and, per candidate, only clears the responses, runs the model, applies the task's
filters and calls its `process_results`: the same steps lm-eval takes, in the same order.

Items have stable ids: a document's `id` field when it has one, else its index in the split (as a string).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from evomerge.compat import lm_eval as lm_eval_compat
from evomerge.config import suggest
from evomerge.fitness.objectives import FitnessConfigError, Objective, ObjectiveSet

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task


class TaskLoader:
    """Finds task configs by name in the objective set's include folders, then in lm-eval's registry.

    lm-eval's built-in registry is indexed only when a name is not found locally (indexing takes 6-10 s).
    """

    def __init__(self, include: Iterable[str] = (), source: str = "<objectives>"):
        from lm_eval.tasks import TaskManager

        self.source = source
        self.include = [str(p) for p in include]
        self._local = TaskManager(include_path=self.include, include_defaults=False) if self.include else None
        self._all = None

    def _registry(self):
        if self._all is None:
            from lm_eval.tasks import TaskManager

            self._all = TaskManager(include_path=self.include or None, include_defaults=True)
        return self._all

    def config(self, obj: Objective) -> tuple[dict, Path | None]:
        """The task's full config dict (includes resolved) and the YAML it came from."""
        name = obj.task
        assert name is not None
        where = f"{self.source}: objective '{obj.name}'.task"
        if name.endswith((".yaml", ".yml")):
            entry = lm_eval_compat.entry_from_path(Path(name))
            if entry is None:
                raise FitnessConfigError(f"{where}: '{name}' is not an lm-eval task YAML")
            manager = self._local or self._registry_light()
        else:
            manager = self._local if self._local is not None and name in self._local.task_index else None
            if manager is None:
                manager = self._registry()
                if name not in manager.task_index:
                    hint = suggest(name, manager.all_tasks, n=5, list_known=False)
                    folders = f" (searched {', '.join(self.include)} and lm-eval's registry)" if self.include else " (searched lm-eval's registry; add `include: [folder]` for local tasks)"
                    raise FitnessConfigError(f"{where}: unknown task '{name}'{folders}.{hint}")
            entry = manager.task_index[name]
        if getattr(entry, "kind", None) is not None and entry.kind.name not in ("TASK", "PY_TASK"):
            raise FitnessConfigError(f"{where}: '{name}' is a task group or tag; name one task per objective")
        # lm-eval 0.4.10+: the factory merges `include:` chains and resolves `!function` tags
        cfg = lm_eval_compat.load_full_config(manager, entry)
        return cfg, entry.yaml_path

    def _registry_light(self):
        from lm_eval.tasks import TaskManager

        if self._local is None:
            self._local = TaskManager(include_path=None, include_defaults=False)
        return self._local


def _absolute_data_files(cfg: dict, yaml_path: Path | None) -> None:
    """Relative data_files resolve against the working directory in `datasets`: make them absolute,
    trying the working directory, then the YAML's folder and its parents (tasks in a repo's subfolder
    often name files relative to the repo root)."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        return
    roots = [Path.cwd()]
    if yaml_path is not None:
        roots += [Path(yaml_path).resolve().parent, *Path(yaml_path).resolve().parents]

    def fix(p: str) -> str:
        if "://" in p or Path(p).is_absolute():
            return p
        for root in roots:
            if (root / p).exists():
                return str((root / p).resolve())
        return p

    if isinstance(files, str):
        new: Any = fix(files)
    elif isinstance(files, list):
        new = [fix(f) for f in files]
    else:
        new = {k: ([fix(x) for x in v] if isinstance(v, list) else fix(v)) for k, v in files.items()}
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": new}


FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


def load_task(loader: TaskLoader, obj: Objective, split: str) -> "Task":
    """Build the lm-eval task of `obj` scoring `split`, its prompt options applied (as lm-eval's `simple_evaluate`
    applies its arguments), with clear errors for a missing split or a dataset that is not here."""
    from lm_eval.api.task import ConfigurableTask

    cfg, yaml_path = loader.config(obj)
    cfg = dict(cfg)
    where = f"{loader.source}: objective '{obj.name}'"
    _absolute_data_files(cfg, yaml_path)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict) and split not in files:
        raise FitnessConfigError(f"{where}.split: task '{cfg['task']}' has no split '{split}' (it has: {', '.join(files)}); "
                                 f"set `split:` to one of those")
    if isinstance(files, dict):
        for k, v in files.items():
            for f in v if isinstance(v, list) else [v]:
                if "://" not in f and not Path(f).exists():
                    raise FitnessConfigError(f"{where}: data file '{f}' of task '{cfg['task']}' (split {k}) not found")
    cfg["test_split"] = split
    for key in ("validation_split", "training_split"):
        if cfg.get(key) == split:
            cfg[key] = None
    _apply_prompt_options(cfg, obj, split, where)
    try:
        task = ConfigurableTask(config=cfg)
    except ConnectionError as e:
        raise FitnessConfigError(_dataset_missing(cfg, where, e)) from None
    except (ValueError, KeyError) as e:
        raise FitnessConfigError(f"{where}: cannot load split '{split}' of task '{cfg['task']}': {e}") from None
    if getattr(task, "dataset", None) is not None and hasattr(task.dataset, "keys") and split not in task.dataset:
        raise FitnessConfigError(f"{where}.split: task '{cfg['task']}' has no split '{split}' "
                                 f"(it has: {', '.join(task.dataset.keys())}); set `split:` to one of those")
    fewshot = cfg.get("fewshot_split") or (cfg.get("fewshot_config") or {}).get("split")
    if (cfg.get("num_fewshot") or 0) > 0 and fewshot and fewshot not in task.dataset:
        raise FitnessConfigError(f"{where}.num_fewshot: task '{cfg['task']}' takes its examples from split '{fewshot}', "
                                 f"which it does not have (it has: {', '.join(task.dataset.keys())})")
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    _seed_fewshot_per_doc(task)
    return task


def _apply_prompt_options(cfg: dict, obj: Objective, split: str, where: str) -> None:
    """The objective's num_fewshot and gen_kwargs written into the task config.

    An objective names one task, so its num_fewshot applies even where the task's YAML says 0 (lm-eval's global
    `--num_fewshot` skips those tasks, as it cannot tell which tasks the user meant). A task without a split of its
    own for examples takes them from the scored split: named as the few-shot split here, so that lm-eval leaves
    each item out of its own examples (its fallback to the test docs would not)."""
    if obj.num_fewshot is not None:
        cfg["num_fewshot"] = obj.num_fewshot
    elif cfg.get("num_fewshot") is None:
        cfg["num_fewshot"] = 0
    if cfg["num_fewshot"] > 0 and not (cfg.get("fewshot_split") or (cfg.get("fewshot_config") or {}).get("samples")):
        if not (cfg.get("training_split") or cfg.get("validation_split")):
            cfg["fewshot_split"] = split
    if obj.gen_kwargs:
        if cfg.get("output_type", "generate_until") != "generate_until":
            raise FitnessConfigError(f"{where}.gen_kwargs: task '{cfg['task']}' is a {cfg['output_type']} task (it scores "
                                     "log-likelihoods, it generates nothing); remove gen_kwargs")
        cfg["generation_kwargs"] = {**(cfg.get("generation_kwargs") or {}), **obj.generation_kwargs}


def _dataset_missing(cfg: dict, where: str, error: Exception) -> str:
    """The message for a task whose Hub dataset is neither cached nor reachable: which dataset, where the cache is,
    and the command that fetches it."""
    import datasets

    path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    args = f"'{path}'" + (f", '{name}'" if name else "")
    why = ("offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)" if offline else f"the Hub is unreachable ({error})")
    return (f"{where}: task '{cfg['task']}' needs the dataset {path}" + (f" (config {name})" if name else "")
            + f", which is not in the Hugging Face datasets cache ({datasets.config.HF_DATASETS_CACHE}) and {why}. "
            f"Fetch it once with internet and the same HF_HOME: python -c \"import datasets; datasets.load_dataset({args})\"")


def _seed_fewshot_per_doc(task: "Task") -> None:
    """Each document's few-shot examples drawn from a generator seeded by the document itself, not by its place in
    the build: an item keeps its prompt whether all items, the first `limit` or an IRT anchor subset are built."""
    import hashlib
    import json

    if (task.config.num_fewshot or 0) <= 0 or not hasattr(task, "sampler"):
        return

    def make(inner):
        def fewshot_context(doc, *args, **kw):
            text = json.dumps(doc, sort_keys=True, default=str)
            task.sampler.set_rnd(FEWSHOT_SEED ^ int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))
            return inner(doc, *args, **kw)

        return fewshot_context

    lm_eval_compat.wrap_method(task, "fewshot_context", make)


def item_id(doc: Any, index: int) -> str:
    if isinstance(doc, Mapping) and "id" in doc:
        return str(doc["id"])
    return str(index)


def _memoise_per_doc(task: "Task") -> None:
    """`process_results` renders the target (a jinja template compiled on every call in lm-eval 0.4) for
    every document of every candidate; targets and choices depend only on the document, so keep them."""
    for attr in ("doc_to_target", "doc_to_choice"):
        if getattr(task, attr, None) is not None:
            lm_eval_compat.wrap_method(task, attr, _per_doc_memo)


def _per_doc_memo(inner):
    cache: dict[int, tuple[Any, Any]] = {}

    def memo(doc, *args, **kw):
        if args or kw:
            return inner(doc, *args, **kw)
        hit = cache.get(id(doc))
        if hit is None or hit[0] is not doc:  # the doc object itself is kept, so its id stays unique
            hit = (doc, inner(doc))
            cache[id(doc)] = hit
        return hit[1]

    return memo


@dataclass
class MetricRef:
    """Where an objective's value comes from in a task's results."""

    metric: str
    filter: str
    higher_is_better: bool | None


class TaskRun:
    """One task on one split: documents, ids, metrics and built requests, reused for every candidate."""

    def __init__(self, task: "Task", name: str, obj: Objective | None = None):
        self.task = task
        self.name = name
        self.system_instruction = obj.system_instruction if obj else None
        self.chat = bool(obj and obj.apply_chat_template)
        self.multiturn = bool(obj and obj.multiturn)
        self.docs: list = list(task.eval_docs)
        self.ids = [item_id(d, i) for i, d in enumerate(self.docs)]
        index: dict[str, int] = {}
        for i, key in enumerate(self.ids):
            if key in index:
                raise FitnessConfigError(f"task '{name}': item id '{key}' appears twice: ids must be unique")
            index[key] = i
        self.index = index
        _memoise_per_doc(task)
        self._built_for: tuple[int, ...] | None = None
        self._by_doc: dict[int, list] = {}

    def metric_names(self) -> list[str]:
        return list(self.task.higher_is_better().keys())

    def resolve_metric(self, obj: Objective, source: str) -> MetricRef:
        name, _, filt = (obj.metric or "").partition(",")
        metrics = self.metric_names()
        if not name:
            if not metrics:
                raise FitnessConfigError(f"{source}: objective '{obj.name}': task '{self.name}' declares no metrics")
            name = metrics[0]
        if name not in metrics:
            raise FitnessConfigError(f"{source}: objective '{obj.name}'.metric: task '{self.name}' does not produce "
                                     f"'{name}'; it produces: {', '.join(metrics)}."
                                     + suggest(name, metrics, cutoff=0.5, list_known=False))
        filters = [f.name for f in getattr(self.task, "_filters", [])] or ["none"]
        if not filt:
            filt = "none" if "none" in filters else filters[0]
        elif filt not in filters:
            raise FitnessConfigError(f"{source}: objective '{obj.name}'.metric: task '{self.name}' has no filter '{filt}' "
                                     f"(filters: {', '.join(filters)})")
        return MetricRef(name, filt, self.task.higher_is_better().get(name))

    def select(self, limit: int | None, items: Iterable[str] | None) -> tuple[int, ...]:
        """Document indices to score, sorted: an explicit id subset, else the first `limit`, else all."""
        if items is not None:
            missing = [i for i in items if str(i) not in self.index]
            if missing:
                raise FitnessConfigError(f"items for task '{self.name}': unknown item id(s) {missing[:5]}"
                                         f"{' ...' if len(missing) > 5 else ''} (ids come from each document's `id` field)")
            return tuple(sorted({self.index[str(i)] for i in items}))
        n = len(self.docs) if limit is None else min(limit, len(self.docs))
        return tuple(range(n))

    def requests(self, indices: tuple[int, ...], lm: "LM | None" = None) -> list:
        """The task's Instances for these documents, built on first use and reused (responses cleared). With
        `apply_chat_template`, prompts are rendered by `lm`'s tokenizer (one tokenizer per worker: kept as built)."""
        if indices != self._built_for:
            full = indices == tuple(range(len(indices)))
            if self.chat and lm is None:
                raise FitnessConfigError(f"task '{self.name}': the chat template needs the model's tokenizer (pass `lm`)")
            opts = dict(system_instruction=self.system_instruction, apply_chat_template=self.chat,
                        fewshot_as_multiturn=self.multiturn,
                        chat_template=lm.apply_chat_template if self.chat else None)
            if full:
                self.task.build_all_requests(limit=len(indices), **opts)
            else:
                self.task.build_all_requests(samples=list(indices), **opts)
            by_doc: dict[int, list] = defaultdict(list)
            for inst in self.task.instances:
                # with `samples`, lm-eval numbers documents by position in the (sorted) subset
                by_doc[inst.doc_id if full else indices[inst.doc_id]].append(inst)
            for insts in by_doc.values():
                insts.sort(key=lambda x: x.idx)
            self._by_doc, self._built_for = dict(by_doc), indices
        insts = self.task.instances
        for inst in insts:
            inst.resps = []
            inst.filtered_resps = {}
        return insts

    def score(self, indices: tuple[int, ...], refs: list[MetricRef]) -> list[tuple[float, dict[str, float]]]:
        """After the model answered: apply filters, score each document; per metric ref the aggregate and
        the per-item values keyed by item id."""
        self.task.apply_filters()
        agg = self.task.aggregation()
        per_filter: dict[str, list[dict]] = {}
        for filt in {r.filter for r in refs}:
            per_filter[filt] = [
                self.task.process_results(self.docs[i], [inst.filtered_resps[filt] for inst in self._by_doc[i]])
                for i in indices
            ]
        out = []
        for ref in refs:
            rows = per_filter[ref.filter]
            values = [row[ref.metric] for row in rows]
            total = agg[ref.metric](values) if values else math.nan
            items = {}
            for i, v in zip(indices, values):
                try:
                    items[self.ids[i]] = float(v)
                except (TypeError, ValueError):
                    pass  # corpus-level metrics (bleu, ...) have no per-item number
            out.append((float(total), items))
        return out


def run_requests(lm: "LM", insts_by_type: dict[str, list]) -> None:
    """Send every request type to the model once (all tasks together, as lm-eval does)."""
    for reqtype, reqs in insts_by_type.items():
        cloned = [r for r in reqs for _ in range(r.repeats or 1)]
        resps = getattr(lm, reqtype)(cloned, disable_tqdm=True)
        for x, req in zip(resps, cloned, strict=True):
            req.resps.append(x)


class TaskSuite:
    """Every lm-eval task an objective set needs, loaded once; `run(lm, items)` scores the current model."""

    def __init__(self, objectives: ObjectiveSet):
        self.objectives = objectives
        self.source = objectives.source
        task_objs = [p for o in objectives.objectives for p in o.task_parts()]  # a sum's terms as `SUM/TERM`
        self.runs: dict[tuple, TaskRun] = {}  # (task, split, prompt options)
        self.refs: dict[str, MetricRef] = {}
        self.key_of: dict[str, tuple] = {}
        if not task_objs:
            return
        loader = TaskLoader(objectives.include, objectives.source)
        for obj in task_objs:
            split = objectives.split_of(obj)
            key = (obj.task, split, obj.prompt_key)  # other prompt options: other requests
            if key not in self.runs:
                task = load_task(loader, obj, split)
                self.runs[key] = TaskRun(task, task.config.task, obj)
            self.key_of[obj.name] = key
            self.refs[obj.name] = self.runs[key].resolve_metric(obj, self.source)

    def task_name(self, obj_name: str) -> str:
        return self.runs[self.key_of[obj_name]].name

    def directions(self) -> dict[str, str | None]:
        return {n: (None if r.higher_is_better is None else ("maximise" if r.higher_is_better else "minimise"))
                for n, r in self.refs.items()}

    def plan(self, objs: list[Objective], items: Mapping[str, Iterable[str]] | None) -> dict[tuple, tuple[int, ...]]:
        """Document indices per task run. `items` maps task name (or objective name) to item ids."""
        items = dict(items or {})
        known = {self.task_name(o.name) for o in objs} | {o.name for o in objs}
        unknown = set(items) - known
        if unknown:
            raise FitnessConfigError(f"items: no task objective named {sorted(unknown)} (known: {', '.join(sorted(known))})")
        out: dict[tuple, tuple[int, ...]] = {}
        for o in objs:
            key, run = self.key_of[o.name], self.runs[self.key_of[o.name]]
            subset = items.get(o.name, items.get(run.name))
            idx = run.select(o.limit, subset)
            out[key] = tuple(sorted(set(out.get(key, ())) | set(idx)))  # objectives sharing a task: union
        return out

    def build(self, lm: "LM", objs: list[Objective], items: Mapping[str, Iterable[str]] | None = None
              ) -> tuple[dict, dict[str, list]]:
        """The plan and the requests the model is sent, by request type (built once, responses cleared)."""
        plan = self.plan(objs, items)
        by_type: dict[str, list] = defaultdict(list)
        for key, idx in plan.items():
            for inst in self.runs[key].requests(idx, lm):
                by_type[inst.request_type].append(inst)
        return plan, dict(by_type)

    def chat_runs(self) -> list[str]:
        """Names of the tasks whose prompts go through the model's chat template."""
        return sorted({run.name for run in self.runs.values() if run.chat})

    def run(self, lm: "LM", objs: list[Objective], items: Mapping[str, Iterable[str]] | None = None
            ) -> dict[str, tuple[float, dict[str, float]]]:
        plan, by_type = self.build(lm, objs, items)
        run_requests(lm, by_type)
        out: dict[str, tuple[float, dict[str, float]]] = {}
        for key, idx in plan.items():
            names = [o.name for o in objs if self.key_of[o.name] == key]
            run = self.runs[key]
            for name, res in zip(names, run.score(idx, [self.refs[n] for n in names])):
                o = next(x for x in objs if x.name == name)
                sub = self._own(run, o, items, idx)
                out[name] = res if sub is None else self._restrict(run, res, sub, self.refs[name])
        return out

    def _own(self, run: TaskRun, o: Objective, items, idx) -> tuple[int, ...] | None:
        own = run.select(o.limit, (items or {}).get(o.name, (items or {}).get(run.name)))
        return None if own == idx else own

    def _restrict(self, run: TaskRun, res, own, ref: MetricRef):
        """An objective whose item set is smaller than its task's union: re-aggregate over its own items."""
        values = [res[1][run.ids[i]] for i in own if run.ids[i] in res[1]]
        agg = run.task.aggregation()[ref.metric]
        return float(agg(values)), {run.ids[i]: res[1][run.ids[i]] for i in own if run.ids[i] in res[1]}
