"""Objectives: what a candidate is scored on, declared in YAML, held as plain picklable dataclasses.

An objectives file:

    include: [.]            # folders of lm-eval task YAMLs, relative to this file (optional)
    split: fitness          # split scored by task objectives (`--split test` for reports)
    objectives:
      - task: zoo_mix       # a registered lm-eval task name, or a path to a task YAML
        metric: exact_match # default: the task's first metric
        direction: maximise # maximise | minimise (default: the task's higher_is_better)
        limit: 200          # score only the first 200 items (optional)
        num_fewshot: 3      # lm-eval's prompt options (optional): examples before each item (default: the task's),
        apply_chat_template: false   # render the prompt with the model's chat template (its tokenizer must have one),
        fewshot_as_multiturn: null   # few-shot examples as chat turns (default: true when the template applies),
        system_instruction: null     # a system message (or a prefix without the template),
        gen_kwargs: {max_gen_toks: 32}  # generate_until tasks: until, max_gen_toks, do_sample, temperature, top_p,
                                     # top_k, min_p, repetition_penalty, over the task's generation_kwargs
        estimator: irt      # full (default) | irt: score new candidates on `anchors` items, estimate the rest
        anchors: 30         # IRT settings (see evomerge/search/irt_policy.py): anchors, anchor_method
                            # (irt | correct | random), seed_candidates, calibrate_every, calibrate_count,
                            # confirm_count, recheck_every, reestimate, irt_estimator (auto | pirt | gpirt |
                            # merge3 | mix | anchor), anchor_seed, max_error (more anchors, then full scoring,
                            # while the printed error is above it)
      - name: score         # a weighted sum of task objectives (mergekit-evolve's score): sum of weight x value
        sum: [{task: zoo_arith, weight: 0.7}, {task: zoo_cipher, weight: 0.3}]
        direction: maximise # default: the terms' common direction
      - builtin: perplexity # built-ins: perplexity (on `file`), params, layers, latency
        file: data/text.txt
      - builtin: params

Values are reported as measured (a perplexity stays a perplexity); `direction` says which way is
better, and `Objective.loss(value)` gives the number a minimising optimiser should see.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from evomerge.config import Where, check_keys, read_yaml, resolve_path, suggest
from evomerge.errors import CandidateError, UserError

BUILTINS = ("perplexity", "params", "layers", "latency")
_DIRECTIONS = {
    "maximise": "maximise", "maximize": "maximise", "max": "maximise", "higher": "maximise",
    "minimise": "minimise", "minimize": "minimise", "min": "minimise", "lower": "minimise",
}
_BUILTIN_DIRECTION = {"perplexity": "minimise", "params": "minimise", "layers": "minimise", "latency": "minimise"}
_IRT_KEYS = {"estimator", "anchors", "anchor_method", "seed_candidates", "calibrate_every", "calibrate_count",
             "confirm_count", "recheck_every", "reestimate", "irt_estimator", "anchor_seed", "max_error"}
_PROMPT_KEYS = {"num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "system_instruction", "gen_kwargs"}
_TASK_KEYS = {"name", "task", "metric", "direction", "split", "limit"} | _IRT_KEYS | _PROMPT_KEYS
ESTIMATOR_CHOICES = ("full", "irt")
ANCHOR_METHODS = ("irt", "correct", "random")  # the same as evomerge.fitness.irt (kept free of numpy imports here)
IRT_ESTIMATORS = ("auto", "pirt", "gpirt", "merge3", "mix", "anchor")
MIN_SEED_CANDIDATES = 8  # evomerge.fitness.irt.MIN_FIT
_BUILTIN_KEYS = {
    "perplexity": {"name", "builtin", "direction", "file", "limit"},
    "params": {"name", "builtin", "direction"},
    "layers": {"name", "builtin", "direction"},
    "latency": {"name", "builtin", "direction", "prompt", "max_new_tokens", "repeats"},
}
_RELATIVE = "relative paths resolve against"  # see config.resolve_path


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_num(v: Any, low: float, high: float | None = None) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


# gen_kwargs keys both backends take (lm-eval's HFLM hands the rest to `generate`, its VLLM to SamplingParams):
# name -> (check, what the value must be). Aliases lm-eval also reads (max_new_tokens, max_tokens) are refused so
# that one idea keeps one name: max_gen_toks.
GEN_KWARGS: dict[str, tuple[Any, str]] = {
    "until": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
              "a stop string or a list of them"),
    "max_gen_toks": (lambda v: _is_int(v, 1), "a whole number of tokens >= 1"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_num(v, 0.0), "a number >= 0"),
    "top_p": (lambda v: _is_num(v, 0.0, 1.0) and v > 0, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v, -1), "a whole number (-1 or 0: off)"),
    "min_p": (lambda v: _is_num(v, 0.0, 1.0), "a number in [0, 1]"),
    "repetition_penalty": (lambda v: _is_num(v, 0.0) and v > 0, "a number > 0"),
}
_GEN_ALIASES = {"max_new_tokens": "max_gen_toks", "max_tokens": "max_gen_toks", "max_completion_tokens": "max_gen_toks",
                "stop": "until"}


class FitnessConfigError(UserError, ValueError):
    """A user error in an objectives file or an evaluation request: says where and what to do."""


class CandidateFailed(CandidateError, RuntimeError):
    """A candidate could not be scored (NaN weights or outputs, ...). The search records it as failed."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Objective:
    """One objective. `kind` is "task" (an lm-eval task), "sum" (a weighted sum of task objectives) or a built-in."""

    name: str
    kind: str = "task"
    task: str | None = None  # lm-eval task name or YAML path (kind == "task")
    metric: str | None = None  # None: the task's first metric
    direction: str | None = None  # "maximise" | "minimise"; None: from the task's higher_is_better
    split: str | None = None  # None: the objective set's split
    limit: int | None = None  # score the first `limit` items (task) or documents (perplexity)
    file: str | None = None  # perplexity: text file (documents separated by blank lines)
    prompt: str = "Hello"  # latency
    max_new_tokens: int = 16  # latency
    repeats: int = 3  # latency: median of this many timed generations
    # IRT-reduced fitness (task objectives): see evomerge/search/irt_policy.py
    estimator: str = "full"  # "full": every item; "irt": anchors only once the IRT model is fitted
    anchors: int = 30  # items each new candidate is scored on
    anchor_method: str = "irt"  # irt (cluster item parameters) | correct (cluster correctness) | random (stratified)
    seed_candidates: int = 32  # candidates scored in full (parents first) before the first fit
    calibrate_every: int = 2  # refit every this many generations, ...
    calibrate_count: int = 2  # ... from this many candidates per period also scored in full
    confirm_count: int = 1  # per generation, up to this many estimated candidates whose interval on this objective
    # overlaps the front have it scored in full before the driver is told (evomerge/search/irt_policy.py `entrants`)
    recheck_every: int = 2  # every this many generations, the estimate of an earlier generation the front leans on
    # most is scored in full and the driver told anew (`rechecks`); 0: never
    reestimate: bool = False  # every generation, told estimates are estimated again with what has been measured
    # since (`reestimates`: no item scored) and the driver told the new values; off by default: its gain in the
    # bench is within noise (README, "Re-estimates")
    irt_estimator: str = "auto"  # auto: the least cross-validated error among pirt, gpirt, merge3
    anchor_seed: int = 0
    max_error: float | None = None  # a fit whose printed error is above it doubles its anchors (up to half the
    # items); none reaching it: this objective is scored in full until the next refit, and the search says so
    # lm-eval's prompt options (task objectives), applied as lm-eval's `simple_evaluate` applies its arguments
    num_fewshot: int | None = None  # None: the task's own num_fewshot (0 when it sets none)
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool | None = None  # None: as apply_chat_template (lm-eval's default)
    system_instruction: str | None = None
    gen_kwargs: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs, lists as tuples: the dataclass hashes
    terms: tuple[tuple[float, "Objective"], ...] = ()  # kind "sum": (weight, task objective) pairs

    def task_parts(self) -> list["Objective"]:
        """The task objectives scored for this one: itself (a task), its terms named `SUM/TERM` (a sum), none (a
        built-in)."""
        if self.kind == "task":
            return [self]
        return [replace(t, name=f"{self.name}/{t.name}") for _, t in self.terms]

    @property
    def generation_kwargs(self) -> dict[str, Any]:
        """`gen_kwargs` as the mapping lm-eval merges over a task's generation_kwargs."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.gen_kwargs}

    @property
    def multiturn(self) -> bool:
        return self.apply_chat_template if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn

    @property
    def prompt_key(self) -> tuple:
        """What decides the prompts of this objective's requests besides the task and split: objectives that differ
        here are scored on requests of their own."""
        return (self.num_fewshot, self.apply_chat_template, self.multiturn, self.system_instruction, self.gen_kwargs)

    @property
    def maximise(self) -> bool:
        return self.direction == "maximise"

    def loss(self, value: float) -> float:
        """The value to minimise: `value` for minimised objectives, `-value` for maximised ones."""
        if self.direction is None:
            raise FitnessConfigError(f"objective '{self.name}': direction not resolved yet (build an Evaluator first)")
        return -value if self.maximise else value

    def better(self, a: float, b: float) -> bool:
        """True when value `a` is strictly better than value `b`."""
        return self.loss(a) < self.loss(b)

    def to_dict(self) -> dict[str, Any]:
        """The objective as an objectives file writes it (paths absolute); only fields that differ from their
        defaults, so `parse_objectives` reads back this very objective."""
        out: dict[str, Any] = {"name": self.name}
        if self.kind == "sum":
            out["sum"] = [{**t.to_dict(), "weight": w} for w, t in self.terms]
            return out | ({"direction": self.direction} if self.direction else {})
        out |= {"task": self.task} if self.kind == "task" else {"builtin": self.kind}
        keep = _TASK_KEYS if self.kind == "task" else _BUILTIN_KEYS[self.kind]
        default = Objective(name=self.name, kind=self.kind)
        for f in fields(self):
            if f.name in keep and f.name not in out and getattr(self, f.name) != getattr(default, f.name):
                out[f.name] = self.generation_kwargs if f.name == "gen_kwargs" else getattr(self, f.name)
        return out


@dataclass(frozen=True)
class ObjectiveSet:
    """The parsed objectives file: objectives plus where their local tasks live."""

    objectives: tuple[Objective, ...]
    include: tuple[str, ...] = ()  # absolute folders of task YAMLs
    split: str = "fitness"
    source: str = "<dict>"  # the file it came from, for error messages
    base_dir: str = field(default=".")  # where relative paths in the file resolve

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def with_split(self, split: str | None) -> "ObjectiveSet":
        """The same objectives scored on `split` (every task objective, explicit per-objective splits too)."""
        if split is None:
            return self
        def unsplit(o: Objective) -> Objective:
            if o.kind == "sum":
                return replace(o, terms=tuple((w, replace(t, split=None)) for w, t in o.terms))
            return replace(o, split=None) if o.kind == "task" else o

        return replace(self, split=split, objectives=tuple(unsplit(o) for o in self.objectives))

    def split_of(self, obj: Objective) -> str:
        return obj.split or self.split

    def to_dict(self) -> dict[str, Any]:
        """The set as an objectives mapping (include folders and files absolute): what a stored job spec holds."""
        out: dict[str, Any] = {"objectives": [o.to_dict() for o in self.objectives]}
        if self.include:
            out["include"] = list(self.include)
        if self.split != "fitness":
            out["split"] = self.split
        return out

    def losses(self, values: dict[str, float]) -> list[float]:
        """Values to minimise, in objective order (failed candidates: give them +inf yourself)."""
        return [o.loss(values[o.name]) for o in self.objectives]


def load_objectives(path: str | Path, split: str | None = None) -> ObjectiveSet:
    """Read an objectives YAML file (see the module docstring). `split` overrides every task's split."""
    data, p = read_yaml(path, FitnessConfigError, "objectives")
    return parse_objectives(data, source=str(path), base_dir=p.parent).with_split(split)


def parse_objectives(data: Any, source: str = "<dict>", base_dir: str | Path = ".", check_paths: bool = True) -> ObjectiveSet:
    """Check an objectives mapping; relative paths resolve against `base_dir`. `check_paths=False` resolves them
    without requiring the folders and files to exist here (a spec bound for a cluster, a store read elsewhere)."""
    base_dir = Path(base_dir).resolve()
    if isinstance(data, list):
        data = {"objectives": data}
    if not isinstance(data, dict) or not isinstance(data.get("objectives"), list) or not data["objectives"]:
        raise FitnessConfigError(f"{source}: expected a mapping with a non-empty list under 'objectives'")
    check_keys(data, ("objectives", "include", "split"), Where(source, FitnessConfigError))
    include = data.get("include") or []
    include = [include] if isinstance(include, str) else include
    folders = []
    for i, folder in enumerate(include):
        p = resolve_path(folder, base_dir, accept=Path.is_dir).resolve()
        if check_paths and not p.is_dir():
            raise FitnessConfigError(f"{source}: include[{i}] '{folder}' is not a folder ({_RELATIVE} {base_dir}, then the working directory)")
        folders.append(str(p))
    split = data.get("split", "fitness")
    if not isinstance(split, str) or not split:
        raise FitnessConfigError(f"{source}: 'split' must be a split name such as fitness or test")
    objs = [_parse_one(o, f"{source}: objectives[{i}]", base_dir, check_paths) for i, o in enumerate(data["objectives"])]
    seen: set[str] = set()
    for i, o in enumerate(objs):
        if o.name in seen:
            raise FitnessConfigError(f"{source}: objectives[{i}]: duplicate objective name '{o.name}': give it a distinct 'name:'")
        seen.add(o.name)
    return ObjectiveSet(tuple(objs), tuple(folders), split, source, str(base_dir))


def _parse_one(raw: Any, where: str, base_dir: Path, check_paths: bool = True) -> Objective:
    if not isinstance(raw, dict):
        raise FitnessConfigError(f"{where}: expected a mapping such as {{task: zoo_mix, metric: exact_match}}")
    if sum(k in raw for k in ("task", "builtin", "sum")) != 1:
        raise FitnessConfigError(f"{where}: give exactly one of 'task' (an lm-eval task), 'sum' (a weighted sum of "
                                 f"tasks) or 'builtin' ({', '.join(BUILTINS)})")
    if "sum" in raw:
        return _parse_sum(raw, where, base_dir, check_paths)
    direction = raw.get("direction")
    if direction is not None:
        if str(direction).lower() not in _DIRECTIONS:
            raise FitnessConfigError(f"{where}.direction: '{direction}' is not maximise or minimise")
        direction = _DIRECTIONS[str(direction).lower()]
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise FitnessConfigError(f"{where}.limit: expected a positive whole number of items, got {limit!r}")
    if "task" in raw:
        _check_keys(raw, _TASK_KEYS, where)
        task = str(raw["task"])
        if task.endswith((".yaml", ".yml")):
            p = resolve_path(task, base_dir, accept=Path.is_file).resolve()
            if check_paths and not p.is_file():
                raise FitnessConfigError(f"{where}.task: task file '{task}' not found ({_RELATIVE} {base_dir}, then the working directory)")
            task = str(p)
        metric = raw.get("metric")
        name = raw.get("name") or (Path(task).stem if task.endswith((".yaml", ".yml")) else task)
        return Objective(name=str(name), kind="task", task=task, metric=None if metric is None else str(metric),
                         direction=direction, split=raw.get("split"), limit=limit, **_parse_irt(raw, where, limit),
                         **_parse_prompt(raw, where))
    kind = str(raw["builtin"])
    if kind not in BUILTINS:
        raise FitnessConfigError(f"{where}.builtin: unknown built-in '{kind}'; choose one of {', '.join(BUILTINS)}")
    _check_keys(raw, _BUILTIN_KEYS[kind], where)
    kw: dict[str, Any] = {}
    if kind == "perplexity":
        if "file" not in raw:
            raise FitnessConfigError(f"{where}: the perplexity objective needs 'file:' (a text file)")
        p = resolve_path(raw["file"], base_dir, accept=Path.is_file).resolve()
        if check_paths and not p.is_file():
            raise FitnessConfigError(f"{where}.file: '{raw['file']}' not found ({_RELATIVE} {base_dir}, then the working directory)")
        kw["file"], kw["limit"] = str(p), limit
    if kind == "latency":
        for key in ("max_new_tokens", "repeats"):
            if key in raw:
                if not isinstance(raw[key], int) or raw[key] < 1:
                    raise FitnessConfigError(f"{where}.{key}: expected a positive whole number, got {raw[key]!r}")
                kw[key] = raw[key]
        if "prompt" in raw:
            kw["prompt"] = str(raw["prompt"])
    return Objective(name=str(raw.get("name") or kind), kind=kind, direction=direction or _BUILTIN_DIRECTION[kind], **kw)


def _parse_sum(raw: dict, where: str, base_dir: Path, check_paths: bool) -> Objective:
    """A weighted sum of task objectives: one number to optimise from several tasks (mergekit-evolve's score).
    Its terms are task objectives scored in full (IRT estimates one task's items, not a sum)."""
    _check_keys(raw, {"name", "sum", "direction"}, where)
    items = raw["sum"]
    if not isinstance(items, list) or not items:
        raise FitnessConfigError(f"{where}.sum: expected a list of task objectives with weights, such as "
                                 "[{task: zoo_arith, weight: 0.5}, {task: zoo_cipher, weight: 0.5}]")
    terms: list[tuple[float, Objective]] = []
    for i, item in enumerate(items):
        here = f"{where}.sum[{i}]"
        if not isinstance(item, dict) or "task" not in item:
            raise FitnessConfigError(f"{here}: a term is a task objective with a weight, such as {{task: zoo_arith, weight: 0.5}}")
        weight = item.get("weight", 1.0)
        if not _is_num(weight, float("-inf")) or weight != weight:
            raise FitnessConfigError(f"{here}.weight: expected a number, got {weight!r}")
        if item.get("estimator", "full") != "full":
            raise FitnessConfigError(f"{here}.estimator: a sum's terms are scored in full; remove estimator")
        term = _parse_one({k: v for k, v in item.items() if k != "weight"}, here, base_dir, check_paths)
        if any(t.name == term.name for _, t in terms):
            raise FitnessConfigError(f"{here}: duplicate term name '{term.name}': give it a distinct 'name:'")
        terms.append((float(weight), term))
    direction = raw.get("direction")
    if direction is not None:
        if str(direction).lower() not in _DIRECTIONS:
            raise FitnessConfigError(f"{where}.direction: '{direction}' is not maximise or minimise")
        direction = _DIRECTIONS[str(direction).lower()]
    return Objective(name=str(raw.get("name") or "sum"), kind="sum", direction=direction, terms=tuple(terms))


def _parse_irt(raw: dict, where: str, limit: int | None) -> dict[str, Any]:
    """The IRT settings of a task objective, checked (they are ignored, but still checked, with `estimator: full`)."""
    kw: dict[str, Any] = {}
    est = str(raw.get("estimator", "full")).lower()
    if est not in ESTIMATOR_CHOICES:
        raise FitnessConfigError(f"{where}.estimator: '{raw['estimator']}' is not one of {', '.join(ESTIMATOR_CHOICES)} "
                                 "(full scores every item; irt scores anchors and estimates the rest)")
    kw["estimator"] = est
    lows = {"anchors": 1, "seed_candidates": MIN_SEED_CANDIDATES, "calibrate_every": 1, "calibrate_count": 0,
            "confirm_count": 0, "recheck_every": 0, "anchor_seed": 0}
    for key, low in lows.items():
        if key in raw:
            v = raw[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                hint = (f"; an IRT model cannot be fitted on fewer than {MIN_SEED_CANDIDATES} fully scored candidates "
                        "(the parents count): raise it, or use `estimator: full`" if key == "seed_candidates" else "")
                raise FitnessConfigError(f"{where}.{key}: expected a whole number >= {low}, got {v!r}{hint}")
            kw[key] = v
    if "reestimate" in raw:
        v = raw["reestimate"]
        if not isinstance(v, bool) and v not in (0, 1):
            raise FitnessConfigError(f"{where}.reestimate: expected true or false (estimate told candidates again "
                                     f"as measured candidates accrue), got {v!r}")
        kw["reestimate"] = bool(v)
    if "max_error" in raw:
        v = raw["max_error"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise FitnessConfigError(f"{where}.max_error: expected a number in (0, 1) (the largest mean absolute "
                                     f"error of an estimate you accept, in the metric's units), got {v!r}")
        kw["max_error"] = float(v)
    for key, choices in (("anchor_method", ANCHOR_METHODS), ("irt_estimator", IRT_ESTIMATORS)):
        if key in raw:
            if str(raw[key]) not in choices:
                raise FitnessConfigError(f"{where}.{key}: '{raw[key]}' is not one of {', '.join(choices)}")
            kw[key] = str(raw[key])
    if est == "full":
        given = sorted(set(raw) & (_IRT_KEYS - {"estimator"}))
        if given:
            raise FitnessConfigError(f"{where}: {', '.join(given)} only apply with `estimator: irt`; add it, or remove them")
    n = kw.get("anchors", 30)
    if est == "irt" and limit is not None and limit <= n:
        raise FitnessConfigError(f"{where}.anchors: {n} anchors but `limit: {limit}` items: IRT would score as many items "
                                 "as full scoring; lower anchors (about a tenth of the items) or use `estimator: full`")
    return kw


def _parse_prompt(raw: dict, where: str) -> dict[str, Any]:
    """lm-eval's prompt options of a task objective, checked here so that a typo stops the job before any model
    loads (that the task is generative, that the tokenizer has a chat template: checked when the task and model are)."""
    kw: dict[str, Any] = {}
    if raw.get("num_fewshot") is not None:
        if not _is_int(raw["num_fewshot"], 0):
            raise FitnessConfigError(f"{where}.num_fewshot: expected a whole number of examples >= 0, got {raw['num_fewshot']!r}")
        kw["num_fewshot"] = raw["num_fewshot"]
    for key in ("apply_chat_template", "fewshot_as_multiturn"):
        v = raw.get(key)
        if v is None:
            continue
        if not isinstance(v, bool):
            hint = (" (lm-eval 0.4 takes a template name too, but renders with the tokenizer's default template "
                    "either way: set the template on the tokenizer)" if key == "apply_chat_template" and isinstance(v, str) else "")
            raise FitnessConfigError(f"{where}.{key}: expected true or false, got {v!r}{hint}")
        kw[key] = v
    if kw.get("fewshot_as_multiturn") and not kw.get("apply_chat_template"):
        raise FitnessConfigError(f"{where}.fewshot_as_multiturn: few-shot turns need a chat template; "
                                 "add `apply_chat_template: true` or remove fewshot_as_multiturn")
    if raw.get("system_instruction") is not None:
        if not isinstance(raw["system_instruction"], str):
            raise FitnessConfigError(f"{where}.system_instruction: expected a string, got {raw['system_instruction']!r}")
        kw["system_instruction"] = raw["system_instruction"]
    gen = raw.get("gen_kwargs")
    if gen is not None:
        if not isinstance(gen, dict):
            raise FitnessConfigError(f"{where}.gen_kwargs: expected a mapping such as {{max_gen_toks: 64, temperature: 0}}, "
                                     f"got {gen!r}")
        pairs = []
        for key, value in gen.items():
            if key in _GEN_ALIASES:
                raise FitnessConfigError(f"{where}.gen_kwargs.{key}: write '{_GEN_ALIASES[key]}' (lm-eval's name, the one "
                                         "both backends read)")
            if key not in GEN_KWARGS:
                raise FitnessConfigError(f"{where}.gen_kwargs.{key}: unknown generation option."
                                         + suggest(key, GEN_KWARGS))
            check, what = GEN_KWARGS[key]
            if not check(value):
                raise FitnessConfigError(f"{where}.gen_kwargs.{key}: expected {what}, got {value!r}")
            pairs.append((str(key), tuple(value) if isinstance(value, list) else value))
        kw["gen_kwargs"] = tuple(sorted(pairs))
    return kw


def _check_keys(raw: dict, allowed: set[str], where: str) -> None:
    check_keys(raw, sorted(allowed), Where(None, FitnessConfigError, default=""), f"{where}.")

