"""What the dashboard shows, as plain JSON-ready dicts built from a read-only store.

Why a module of its own: the server only routes and the page only draws, so everything a reader might check
(which points are on the front, how a recipe's weight resolves at layer 7, the export command) is computed
here, with evomerge's own code (the store, `add_to_front`/`hypervolume`, the merge planner's parameter
resolution), and can be tested without a browser.

Nothing here unpickles: the optimiser checkpoints are never read (a viewer must not run code from a store).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shlex
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from evomerge.config import changed_settings, settings
from evomerge.dashboard.cache import _LOADER, Cache, JobCache, _finite, clean, sample_step
from evomerge.search.front import add_to_front, hypervolume
from evomerge.search.spec import JobSpec
from evomerge.store import CandidateRow, Store

OTHER_TENSORS = ("input_layernorm.weight", "post_attention_layernorm.weight", "ln_1.weight", "norm.weight")
UNKNOWN_LAYERS = 8  # columns drawn when no model folder says how many layers there are




# ---------------------------------------------------------------- jobs

def objectives(store: Store, job: str) -> list[dict[str, str]]:
    """Objective names and directions as the store records them (`Store.directions`)."""
    return [{"name": n, "direction": d} for n, d in store.directions(job)]


def job_summary(store: Store, name: str, spec: JobSpec | None = None) -> dict[str, Any]:
    """One line of the jobs list: state, progress against the budget, counts."""
    job = store.job(name)
    assert job is not None
    spec = spec or stored_spec(job)
    counts = store.counts(name)
    asked = sum(counts.values())
    budget = {"evaluations": spec.driver.max_evaluations, "seconds": spec.driver.max_seconds}
    gen = store.db.execute("SELECT MAX(generation) FROM candidates WHERE job=?", (name,)).fetchone()[0]
    finished = counts.get("done", 0) + counts.get("failed", 0) + counts.get("cached", 0)
    progress = None
    if budget["evaluations"]:
        progress = min(1.0, finished / budget["evaluations"])
    return {"name": name, "status": job["status"], "reason": job["reason"], "created": job["created"],
            "updated": job["updated"], "algorithm": spec.driver.algorithm, "population": spec.driver.population,
            "budget": budget, "counts": counts, "asked": asked, "finished": finished, "progress": progress,
            "generations": 0 if gen is None else int(gen) + 1, "front_size": len(store.front(name)),
            "search_space": _space_name(spec.search_space)}


def _space_name(space: Any) -> str:
    if isinstance(space, dict):
        return str(space.get("kind", "?")) + (f" ({space['method']})" if space.get("method") else "")
    return str(space)


def jobs(store: Store) -> list[dict[str, Any]]:
    return [job_summary(store, n) for n in store.jobs()]


def signature(store: Store) -> list[dict[str, Any]]:
    """What changes while a job runs (cheap to read every 2 s): the page refetches when it does."""
    out = []
    for name in store.jobs():
        job = store.job(name)
        assert job is not None
        last = store.db.execute("SELECT MAX(finished), COUNT(*) FROM candidates WHERE job=?", (name,)).fetchone()
        out.append({"name": name, "status": job["status"], "updated": job["updated"], "counts": store.counts(name),
                    "last_finished": last[0], "asked": last[1]})
    return out


class RawList(list):
    """A list of JSON-encoded items (bytes), spliced into an answer as they are: points are encoded once, when
    they change, not once per request (`encode`)."""


def encode(obj: dict[str, Any]) -> bytes:
    """An answer as JSON bytes, its RawList values spliced in."""
    raw = {k: v for k, v in obj.items() if isinstance(v, RawList)}
    rest = json.dumps({k: v for k, v in obj.items() if k not in raw}, allow_nan=False, default=str).encode()
    parts = [json.dumps(k).encode() + b":[" + b",".join(v) + b"]" for k, v in raw.items()]
    if rest != b"{}":
        parts.append(rest[1:-1])
    return b"{" + b",".join(parts) + b"}"


def _refresh(store: Store, name: str, jc: JobCache) -> tuple[dict[str, Any], JobSpec] | None:
    """The job and its stored spec, with its cache refreshed from the store (the caller holds `jc.lock`: one
    refresh at a time per job, and no reader sees a cache half refreshed)."""
    job = store.job(name)
    if job is None:
        return None
    if jc.spec is None or jc.created != job["created"]:
        jc.spec = stored_spec(job)
    spec = jc.spec
    jc.refresh(store, model_labels(spec), spec.report_split, job["created"], estimated_values, _estimates_by_candidate)
    return job, spec


def job_detail(store: Store, name: str, cache: Cache | None = None, since: str | None = None) -> dict[str, Any] | None:
    """Everything the job view draws: points (front, dominated, parents), progress curves, the parents' scores.
    With `since` (the `cursor` of an earlier answer from this server): only the points changed since, `drop`
    the ids that are no longer points, and `full: false`; the page merges them into what it holds."""
    jc = (cache or Cache(str(store.path))).job(name)
    with jc.lock:
        found = _refresh(store, name, jc)
        if found is None:
            return None
        job, spec = found
        objs = objectives(store, name)
        split = spec.report_split
        after = jc.since(since)
        points, drop = jc.points(after)
        scores = store.scores(name, split)
        parents = []
        by_origin = {r.origin: r for r in jc.generation0()}
        pending = {u["origin"]: u for u in jc.unfinished if u["generation"] == 0}
        for label in spec.models:
            row = by_origin.get(f"parent:{label}")
            other = pending.get(f"parent:{label}")
            test = scores.get(f"parent:{label}") or {}
            parents.append({"name": label, "candidate": row.id if row else other["id"] if other else None,
                            "status": row.status if row else other["status"] if other else None,
                            "fitness": None if row is None else clean(row.values), split: clean(test.get("values")),
                            "reason": test.get("reason")})
        return {"summary": job_summary(store, name, spec), "objectives": objs, "split": split,
                "points": RawList(points), "drop": drop, "full": after is None, "cursor": jc.cursor,
                "front": sorted(jc.front), "parents": parents, "progress": jc.progress(objs), "store": str(store.path)}


def progress(rows: list[CandidateRow], objs: list[dict[str, str]]) -> dict[str, Any]:
    """Hypervolume of the front so far and the best value per objective, against the candidates asked for,
    computed from every row at once (the definition `JobCache.progress` carries forward; tests compare the two).
    The hypervolume's reference point is the worst loss of generation 0 per objective, as the search's own
    progress line uses, so both show the same numbers."""
    done = [r for r in rows if r.status == "done" and r.losses is not None and r.values is not None]
    out: dict[str, Any] = {"evaluations": [], "hypervolume": [], "best": {o["name"]: [] for o in objs},
                           "reference": None}
    if not done or not objs:
        return out
    k = len(objs)
    gen0 = [r.losses[:k] for r in done if r.generation == 0]
    ref = np.max(np.array(gen0 or [r.losses[:k] for r in done], dtype=float), axis=0)
    out["reference"] = [float(v) for v in ref]
    step = sample_step(len(done))
    front = np.empty((0, k))
    best = np.full(k, np.inf)
    for i, r in enumerate(done):
        loss = np.array(r.losses[:k], dtype=float)
        best = np.minimum(best, loss)
        front = add_to_front(front, loss)
        if i % step == 0 or i == len(done) - 1:
            out["evaluations"].append(r.id + 1)
            out["hypervolume"].append(_finite(hypervolume(front, ref)) if k > 1 else None)
            for j, o in enumerate(objs):
                out["best"][o["name"]].append(_finite(float(-best[j] if o["direction"] == "maximise" else best[j])))
    return out


# ---------------------------------------------------------------- the candidates table

SORT_COLUMNS = ("id", "generation", "origin", "status")
STATUSES = ("pending", "running", "done", "failed", "cached")
MAX_PAGE = 500


class QueryError(ValueError):
    """A candidates query the server cannot answer (the 400's message)."""


@dataclass
class CandidateQuery:
    """`/api/candidates`: which rows, in which order, which page. Objective ranges are on the values shown
    (fitness split), inclusive."""

    offset: int = 0
    limit: int = 100
    sort: str = "-id"
    status: tuple[str, ...] = ()
    origin: tuple[str, ...] = ()
    gen_min: int | None = None
    gen_max: int | None = None
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


def parse_query(query: dict[str, list[str]], objs: list[dict[str, str]]) -> CandidateQuery:
    """The query string, checked: every bad value is a QueryError naming the parameter and what it accepts."""
    names = [o["name"] for o in objs]
    q = CandidateQuery()

    def one(key: str) -> str | None:
        return query[key][0] if key in query else None

    def integer(key: str, lo: int, hi: int) -> int | None:
        v = one(key)
        if v is None or v == "":
            return None
        if not re.fullmatch(r"[0-9]{1,9}", v) or not lo <= int(v) <= hi:
            raise QueryError(f"{key}={v!r}: give a whole number from {lo} to {hi}")
        return int(v)

    q.offset = integer("offset", 0, 10**9) or 0
    limit = integer("limit", 1, MAX_PAGE)
    q.limit = 100 if limit is None else limit
    sort = one("sort") or "-id"
    if sort.lstrip("-") not in SORT_COLUMNS + tuple(names):
        raise QueryError(f"sort={sort!r}: sort by one of {', '.join(SORT_COLUMNS + tuple(names))} ('-' first: "
                         "descending)")
    q.sort = sort
    status = tuple(x for x in (one("status") or "").split(",") if x)
    bad = [x for x in status if x not in STATUSES]
    if bad:
        raise QueryError(f"status={bad[0]!r}: give statuses from {', '.join(STATUSES)}, comma-separated")
    q.status = status
    q.origin = tuple(x for x in (one("origin") or "").split(",") if x)
    q.gen_min, q.gen_max = integer("gen_min", 0, 10**9), integer("gen_max", 0, 10**9)
    for key in query:
        bound, _, name = key.partition(".")
        if bound not in ("min", "max") or not name:
            continue
        if name not in names:
            raise QueryError(f"{key}: no objective named {name!r} (objectives: {', '.join(names)})")
        v = one(key)
        if v in (None, ""):
            continue
        try:
            x = float(v)
        except ValueError:
            raise QueryError(f"{key}={v!r}: give a number") from None
        if not math.isfinite(x):
            raise QueryError(f"{key}={v!r}: give a finite number")
        lo, hi = q.ranges.get(name, (None, None))
        q.ranges[name] = (x, hi) if bound == "min" else (lo, x)
    return q


def select_rows(rows: list[dict[str, Any]], q: CandidateQuery) -> list[dict[str, Any]]:
    """Filter then sort (ties by id; rows without the sorted value last, either way)."""
    def keep(c: dict[str, Any]) -> bool:
        if q.status and c["status"] not in q.status:
            return False
        if q.origin and c["origin"] not in q.origin:
            return False
        if q.gen_min is not None and c["generation"] < q.gen_min:
            return False
        if q.gen_max is not None and c["generation"] > q.gen_max:
            return False
        for name, (lo, hi) in q.ranges.items():
            v = (c["values"] or {}).get(name)
            if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
                return False
        return True

    out = [c for c in rows if keep(c)]
    column, reverse = q.sort.lstrip("-"), q.sort.startswith("-")
    if column in SORT_COLUMNS:
        value = (lambda c: c[column])
    else:
        value = (lambda c: (c["values"] or {}).get(column))
    have = [c for c in out if value(c) is not None]
    have.sort(key=lambda c: c["id"])
    have.sort(key=value, reverse=reverse)
    return have + [c for c in out if value(c) is None]


def candidates_page(store: Store, name: str, query: dict[str, list[str]], cache: Cache | None = None
                    ) -> dict[str, Any] | None:
    """One page of the job's candidates, filtered and sorted on the server; with the totals, the statuses and
    origins there are (for the filters), and the cursor the job view had (so the page knows they match)."""
    jc = (cache or Cache(str(store.path))).job(name)
    with jc.lock:
        if _refresh(store, name, jc) is None:
            return None
        objs = objectives(store, name)
        q = parse_query(query, objs)
        rows = jc.rows()
        chosen = select_rows(rows, q)
        statuses: dict[str, int] = {}
        origins: dict[str, int] = {}
        for c in rows:
            statuses[c["status"]] = statuses.get(c["status"], 0) + 1
            origins[c["origin"]] = origins.get(c["origin"], 0) + 1
        page = chosen[q.offset:q.offset + q.limit]
        return {"job": name, "objectives": objs, "total": len(rows), "matched": len(chosen), "offset": q.offset,
                "limit": q.limit, "sort": q.sort, "rows": page, "statuses": statuses, "origins": origins,
                "generations": max((c["generation"] for c in rows), default=-1) + 1, "cursor": jc.cursor}


# ---------------------------------------------------------------- compare

def fronts(store: Store, names: list[str], cache: Cache | None = None) -> dict[str, Any] | None:
    """The fronts of several jobs of this store, for one plot: per job its objectives and front points."""
    out = []
    for name in names:
        jc = (cache or Cache(str(store.path))).job(name)
        with jc.lock:
            if _refresh(store, name, jc) is None:
                return None
            pts = [{"id": i, "generation": jc.entries[i].row.generation, "values": clean(jc.entries[i].row.values),
                    "summary": jc.entries[i].summary} for i in sorted(jc.front) if i in jc.entries]
            out.append({"name": name, "objectives": objectives(store, name), "front": pts,
                        "parents": [{"name": e.row.origin[len("parent:"):], "id": e.row.id, "values": clean(e.row.values)}
                                    for e in jc.entries.values() if e.row.generation == 0
                                    and e.row.origin.startswith("parent:") and e.row.status == "done"]})
    shared = [o["name"] for o in out[0]["objectives"]] if out else []
    for f in out[1:]:
        shared = [n for n in shared if n in {o["name"] for o in f["objectives"]}]
    return {"jobs": out, "shared_objectives": shared}


def recipe_diff(a_text: str, b_text: str) -> dict[str, Any]:
    """Two recipes side by side: aligned line pairs (difflib's opcodes: equal, replace, delete, insert) and the
    settings that differ, by their path in the recipe (`models[1].parameters.weight`)."""
    a_lines, b_lines = a_text.splitlines(), b_text.splitlines()
    lines = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a_lines, b_lines, autojunk=False).get_opcodes():
        for k in range(max(i2 - i1, j2 - j1)):
            a = a_lines[i1 + k] if i1 + k < i2 else None
            b = b_lines[j1 + k] if j1 + k < j2 else None
            lines.append({"tag": tag, "a": a, "b": b, "a_no": i1 + k + 1 if a is not None else None,
                          "b_no": j1 + k + 1 if b is not None else None})
    try:
        a, b = yaml.load(a_text, Loader=_LOADER), yaml.load(b_text, Loader=_LOADER)
    except yaml.YAMLError:
        a, b = {}, {}
    fa, fb = settings(a), settings(b)
    changes = [{"path": k, "a": fa.get(k), "b": fb.get(k)} for k in changed_settings(a, b)]
    return {"lines": lines, "changes": changes, "same": a_text == b_text}


def candidates_diff(store: Store, job_a: str, id_a: int, job_b: str, id_b: int) -> dict[str, Any] | None:
    """Two candidates (of one job or two) compared: their recipes line by line and setting by setting."""
    ra, rb = store.candidate(job_a, id_a), store.candidate(job_b, id_b)
    if ra is None or rb is None:
        return None

    def side(job: str, r: CandidateRow) -> dict[str, Any]:
        return {"job": job, "id": r.id, "status": r.status, "generation": r.generation, "origin": r.origin,
                "values": clean(r.values), "recipe_hash": r.recipe_hash}

    return {"a": side(job_a, ra), "b": side(job_b, rb), **recipe_diff(ra.recipe, rb.recipe)}


# ---------------------------------------------------------------- candidates

def stored_spec(job: dict[str, Any]) -> JobSpec:
    """The job's stored spec, parsed (its files need not exist here: the dashboard may run on another machine)."""
    return JobSpec.from_dict(job["spec"], source=f"the stored spec of job {job['name']}")


def model_labels(spec: JobSpec) -> dict[str, str]:
    """Model folder (as written in recipes) -> the job's name for it, so the page says `arith`, not a path."""
    return {str(folder): name for name, folder in spec.models.items()}


def _label(model: str, labels: dict[str, str]) -> str:
    return labels.get(model) or labels.get(str(Path(model))) or Path(model).name or model


def _parse(text: str) -> Any:
    """A stored recipe, parsed without touching the model folders (the dashboard may run on another machine)."""
    from evomerge.merge.api import parse_stored

    return parse_stored(text, check_paths=False)


def _num_layers(folder: str | None) -> int | None:
    from evomerge.merge.sources import FolderSource

    return FolderSource(Path(folder)).num_layers() if folder else None


def _settings(recipe: Any) -> Iterable[Any]:
    for params in [recipe.parameters] + [sl.parameters for sl in recipe.slices or ()] + \
            [s.parameters for s in recipe.all_sources()]:
        for key in ("weight", "density"):
            if key in params:
                yield params[key]


def _module_groups(recipe: Any) -> list[tuple[str, str]]:
    """(row label, a representative tensor name pattern with `{L}` for the layer) per module group: one group when
    no setting uses `{filter, value}` lists, else one per filter plus one for tensors no filter matches."""
    filters: list[str] = []
    for setting in _settings(recipe):
        entries = setting if isinstance(setting, list) else [setting]
        for e in entries:
            if isinstance(e, dict) and e.get("filter") not in (None, "*") and str(e["filter"]) not in filters:
                filters.append(str(e["filter"]))
    if not filters:
        return [("", "model.layers.{L}.mlp.down_proj.weight")]
    groups = [(f, "model.layers.{L}." + f + ".weight") for f in filters]
    other = next((t for t in OTHER_TENSORS if not any(f in t for f in filters)), None)
    if other:
        groups.append(("other", "model.layers.{L}." + other))
    return groups


def heatmaps(recipe: Any, labels: dict[str, str], title: str = "") -> list[dict[str, Any]]:
    """Per parameter (weight, density), a matrix: rows = model (x module group), columns = output layers.
    Each cell is what the merge itself would use there: the planner's resolver (model -> slice -> recipe ->
    method default) at the layer's gradient position, as `evomerge merge` resolves it."""
    from evomerge.merge.methods import METHODS
    from evomerge.merge.plan import ParameterResolver
    from evomerge.merge.recipe import Slice, ModelEntry
    from evomerge.merge.settings import layer_position

    spec = METHODS[recipe.merge_method]
    params = [p for p in ("weight", "density") if p in spec.model_params]
    note = None
    if recipe.slices is not None:
        slices = list(recipe.slices)
    else:
        n = _num_layers(recipe.base_model) or next(
            (x for x in (_num_layers(s.model) for s in recipe.models or ()) if x), None)
        if n is None:
            n, note = UNKNOWN_LAYERS, (f"no model folder readable here to count layers: {UNKNOWN_LAYERS} columns "
                                       "at evenly spaced gradient positions")
        slices = [Slice(tuple(ModelEntry(s.model, s.parameters, (0, n)) for s in recipe.models or ()))]
    resolver = ParameterResolver(recipe)
    groups = _module_groups(recipe)
    # rows keyed by (model, group); columns appended slice by slice (output layers)
    rows: dict[tuple[str, str], dict[str, list[Any]]] = {}
    columns: list[str] = []
    for sl in slices:
        base = sl.base_model or recipe.base_model
        first = sl.sources[0].layer_range
        assert first is not None
        length = first[1] - first[0]
        for offset in range(length):
            t = layer_position(offset, length)
            columns.append(str(len(columns)))
            for src in sl.sources:
                if src.model == base and spec.accepts_base:
                    continue  # the base is the reference the task vectors start from, not a weighted model
                assert src.layer_range is not None
                for group, pattern in groups:
                    tensor = pattern.replace("{L}", str(src.layer_range[0] + offset))
                    values = resolver.model_params(sl, src, tensor, t, is_base=False)
                    row = rows.setdefault((src.model, group), {p: [] for p in params})
                    pad = len(columns) - 1 - len(row[params[0]]) if params else 0
                    for p in params:
                        row[p].extend([None] * pad)  # a model absent from earlier slices
                        v = values.get(p)
                        row[p].append(None if v is None else _finite(float(v)))
    out = []
    for p in params:
        names, z = [], []
        for (model, group), row in rows.items():
            names.append(_label(model, labels) + (f" · {group}" if group else ""))
            z.append(row[p] + [None] * (len(columns) - len(row[p])))
        out.append({"parameter": p, "title": (f"{title}: " if title else "") + p, "rows": names, "layers": columns,
                    "z": z, "note": note})
    return out


def dataflow_path(recipe: Any, labels: dict[str, str]) -> dict[str, Any]:
    """The layer path: one cell per hop (source, layer, scale), sources named as in the job."""
    name = {s: (s if v.merge_recipe is not None else _label(v.to_yaml_value(), labels)) for s, v in recipe.sources.items()}
    hops = [{"index": i, "source": name.get(h.model, _label(h.model, labels)), "layer": h.layer, "scale": h.scale}
            for i, h in enumerate(recipe.path)]
    sources = list(dict.fromkeys(h["source"] for h in hops))
    return {"hops": hops, "sources": sources, "embed": name.get(recipe.embed, _label(recipe.embed, labels)),
            "head": name.get(recipe.head, _label(recipe.head, labels))}


def export_command(store: Path | str, job: str, cid: int) -> str:
    """The command that writes this candidate as a model folder (`evomerge export`)."""
    out = "out/" + re.sub(r"[^A-Za-z0-9_.-]+", "-", job).strip("-") + f"-candidate-{cid}"
    return (f"evomerge export {shlex.quote(str(store))} --job {shlex.quote(job)} --candidate {cid} "
            f"--format model -o {shlex.quote(out)}")


def _estimates(store: Store, job: str) -> list[dict[str, Any]] | None:
    """IRT estimates (value, sd, estimator, items scored) where the store keeps them (schema 2 and later; None for
    an older store, which only knows a candidate as a whole is estimated)."""
    reader = getattr(store, "estimates", None)
    if not callable(reader):
        return None
    try:
        return reader(job)
    except sqlite3.OperationalError:  # a schema-1 store opened read-only: no estimates table (not upgraded)
        return None


def _estimates_by_candidate(store: Store, job: str) -> dict[int, dict[str, dict[str, Any]]] | None:
    ests = _estimates(store, job)
    if ests is None:
        return None
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for e in ests:
        out.setdefault(int(e["candidate"]), {})[e["objective"]] = e
    return out


def estimated_values(row: CandidateRow, ests: dict[int, dict[str, dict[str, Any]]] | None
                     ) -> dict[str, dict[str, Any]]:
    """The objectives whose value in `row` is an IRT estimate, each with its sd, estimator and items scored
    (measured values are absent). A candidate scored in full while IRT was on also has an estimate row (what the
    estimator would have said): it is measured, not estimated. Older stores: every objective of an estimated row."""
    if not row.estimated or not row.values:
        return {}
    if ests is None:
        return {n: {"sd": None, "estimator": None, "scored": None, "total": None} for n in row.values}
    out = {}
    for name, e in (ests.get(row.id) or {}).items():
        if e["measured"] is None and name in row.values:
            out[name] = {"sd": _finite(e["sd"]), "estimator": e["estimator"], "scored": e["scored"], "total": e["total"]}
    return out


def _parent_score(row: CandidateRow | None, test: dict[str, Any] | None, name: str, split: str) -> dict[str, Any]:
    """A parent's value on one objective: fitness (its generation-0 row) and the report split; `failed` where
    either evaluation failed, so the page says so instead of showing a blank."""
    fitness = "failed" if row is not None and row.status == "failed" else _finite((row.values or {}).get(name)) if row else None
    if test is not None and test.get("reason"):
        held_out: Any = "failed"
    else:
        held_out = _finite(((test or {}).get("values") or {}).get(name))
    return {"fitness": fitness, split: held_out}


def candidate_detail(store: Store, name: str, cid: int, cache: Cache | None = None) -> dict[str, Any] | None:
    """One candidate: recipe, per-layer parameters or layer path, scores beside the parents, lineage, export.
    The job's other rows (parents' scores, children) come from the job's cache, not a read of every row."""
    row = store.candidate(name, cid)
    jc = (cache or Cache(str(store.path))).job(name)
    with jc.lock:
        found = None if row is None else _refresh(store, name, jc)
        if found is None:
            return None
        _, spec = found
        gen0 = jc.generation0()
        all_estimates = jc.estimate_map
        front = cid in jc.front
        children = sorted([e.row.id for e in jc.entries.values() if cid in e.row.parents])
        children += [u["id"] for u in jc.unfinished if cid in json.loads(u["parents"] or "[]")]
    children.sort()
    labels = model_labels(spec)
    split = spec.report_split
    objs = objectives(store, name)
    recipe_error, maps, path, summary = None, [], None, ""
    try:
        recipe = _parse(row.recipe)
        from evomerge.merge.api import describe, layer_path, parameter_recipes

        summary = describe(recipe)
        if (flow := layer_path(recipe)) is not None:
            path = dataflow_path(flow, labels)
        for src_name, ps in parameter_recipes(recipe):
            maps += heatmaps(ps, labels, title=f"source {src_name}" if src_name else "")
    except Exception as e:  # noqa: BLE001 - show the recipe text and the reason rather than a broken view
        recipe_error = f"{type(e).__name__}: {e}"
    scores = store.scores(name, split)
    test = scores.get(f"candidate:{cid}") or {}
    items = store.items(name, cid)
    parents_rows = {r.origin[len("parent:"):]: r for r in gen0 if r.origin.startswith("parent:")}
    estimates = (all_estimates or {}).get(cid, {})
    estimated = estimated_values(row, all_estimates)
    table = []
    for o in objs:
        n = o["name"]
        per_item = items.get(n) or {}
        e = estimates.get(n)
        table.append({
            "objective": n, "direction": o["direction"],
            "fitness": _finite((row.values or {}).get(n)), "estimated": n in estimated,
            split: _finite((test.get("values") or {}).get(n)),
            "items": len(per_item), "item_mean": _finite(float(np.mean(list(per_item.values())))) if per_item else None,
            # which items were scored: the anchors of an estimated value (every item otherwise, not listed)
            "scored_items": sorted(per_item) if n in estimated else None,
            # the IRT estimate (for a measured value scored while IRT was on: what the estimator would have said)
            "estimate": None if e is None else {k: _finite(v) for k, v in e.items() if k not in ("candidate", "objective")},
            "parents": {p: _parent_score(parents_rows.get(p), scores.get(f"parent:{p}"), n, split)
                        for p in spec.models},
        })
    return {
        "job": name, "id": row.id, "generation": row.generation, "idx": row.idx, "origin": row.origin,
        "status": row.status, "reason": row.reason, "values": clean(row.values), "estimated": row.estimated,
        "estimates": estimated,
        "worker": row.worker, "eval_seconds": row.eval_seconds, "genome": row.genome, "front": front,
        "recipe": row.recipe, "recipe_hash": row.recipe_hash, "summary": summary, "recipe_error": recipe_error,
        "heatmaps": maps, "path": path, "split": split, "scores": table, "test_reason": test.get("reason"),
        "lineage": {"origin": row.origin, "generation": row.generation, "parents": row.parents,
                    "cached_from": row.cached_from, "children": children[:50], "children_total": len(children)},
        "export": export_command(store.path, name, cid),
    }
