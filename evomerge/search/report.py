"""The end of a job: score the front's recipes and the parents on the report split (test, never fitness), print
the front as a table, write report.json, report.html (the front plotted) and each front recipe as YAML."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.merge.api import describe
from evomerge.search.context import SearchContext
from evomerge.search.irt_policy import irt_summary
from evomerge.search.recorder import internal_error
from evomerge.spaces.ps import parent_recipe


def score_report_split(search: SearchContext) -> dict[str, dict[str, Any]]:
    """Test-split values of every front candidate and every parent (stored; already-scored subjects are skipped)."""
    spec, store, job, split = search.spec, search.store, search.job, search.spec.report_split
    subjects: dict[str, Any] = {f"parent:{name}": parent_recipe(spec.models, name) for name in spec.models}
    for cid in store.front(job):
        row = store.candidate(job, cid)
        assert row is not None
        subjects[f"candidate:{cid}"] = search.space.decode(np.array(row.genome))
    done = store.scores(job, split)
    tokens = {}
    for k, (subject, recipe) in enumerate(subjects.items()):
        if subject not in done:
            tokens[k] = subject
            search.runtime.submit(k, recipe, split=split)
    for out in search.runtime.as_completed():
        if out.internal:  # a bug: never stored as if the subject had failed on the split
            raise internal_error(job, out, f"{tokens[out.cid]} on the {split} split")
        store.save_score(job, tokens[out.cid], split, out.values, out.items, out.reason)
    scores = store.scores(job, split)
    return {s: scores[s] for s in subjects if s in scores}


def runtime_summary(spec: Any, runtime: Any) -> dict[str, Any] | None:
    """Where the workers' time went during the search (utilisation, orchestration overhead, candidates per
    minute; see `evomerge/runtime/stats.py`), with the loop's mode, which decides how much of it barriers cost."""
    stats = getattr(runtime, "stats", None)
    if stats is None:
        return None
    s = stats()
    d = spec.driver
    mode = f"{d.mode}" + (f", lag {d.lag}" if d.mode == "steady" else "")
    return {**s.to_dict(), "mode": d.mode, "lag": d.lag if d.mode == "steady" else None,
            "summary": f"{s.summary()}; driver.mode {mode}"}


def build_report(search: SearchContext, runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    spec, store, job = search.spec, search.store, search.job
    split = spec.report_split
    scores = score_report_split(search)
    objectives = [{"name": o.name, "direction": o.direction} for o in search.objectives.objectives]
    front = []
    for cid in store.front(job):
        row = store.candidate(job, cid)
        assert row is not None
        recipe = search.space.decode(np.array(row.genome))
        front.append({"id": cid, "generation": row.generation, "origin": row.origin, "recipe": describe(recipe),
                      "recipe_yaml": row.recipe, "fitness": row.values,
                      "estimated": row.estimated,  # IRT: fitness estimated from anchor items (test split: measured)
                      "items_scored": {o: len(v) for o, v in store.items(job, row.cached_from or cid).items()},
                      split: (scores.get(f"candidate:{cid}") or {}).get("values"),
                      "failed_on_" + split: (scores.get(f"candidate:{cid}") or {}).get("reason")})
    parents = [{"name": name, split: (scores.get(f"parent:{name}") or {}).get("values"),
                "fitness": next((r.values for r in store.candidates(job, generation=0) if r.origin == f"parent:{name}"), None)}
               for name in spec.models]
    counts = store.counts(job)
    all_done = [{"id": r.id, "generation": r.generation, "values": r.values} for r in store.candidates(job, status="done")]
    return {"job": job, "store": str(store.path), "split": split, "objectives": objectives, "counts": counts,
            "front": front, "parents": parents, "candidates": all_done, "spec": spec.to_dict(),
            "irt": irt_summary(store, job), "runtime": runtime}


def front_table(report: dict[str, Any]) -> str:
    split = report["split"]
    names = [o["name"] for o in report["objectives"]]
    head = ["who", "recipe"] + [f"{n} (fitness)" for n in names] + [f"{n} ({split})" for n in names]
    rows = []
    for p in report["parents"]:
        rows.append([f"parent {p['name']}", "-"] + [_fmt((p["fitness"] or {}).get(n)) for n in names]
                    + [_fmt((p[split] or {}).get(n)) for n in names])
    for c in report["front"]:
        mark = lambda n: "~" if _is_estimate(report, c, n) else ""  # noqa: E731
        rows.append([f"#{c['id']} (gen {c['generation']})", c["recipe"][:48]]
                    + [mark(n) + _fmt((c["fitness"] or {}).get(n)) for n in names]
                    + [_fmt((c[split] or {}).get(n)) if c[split] else "failed" for n in names])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if any(c.get("estimated") for c in report["front"]):
        out.append("~ estimated from anchor items (IRT); every other value, and every test-split value, is measured")
    return "\n".join(out + irt_lines(report))


def _is_estimate(report: dict[str, Any], c: dict[str, Any], name: str) -> bool:
    """An IRT objective's value is an estimate when the candidate was scored on fewer items than a full split."""
    full = (report.get("irt") or {}).get(name, {}).get("items_per_candidate")
    return bool(full) and c.get("items_scored", {}).get(name, full) < full


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def _svg(report: dict[str, Any]) -> str:
    """The front (fitness split) over every evaluated candidate; with one objective, the value per evaluation."""
    names = [o["name"] for o in report["objectives"]]
    pts = [(c["values"] or {}) for c in report["candidates"]]
    front_ids = {c["id"] for c in report["front"]}
    W, H, P = 560, 380, 50
    if len(names) >= 2:
        xs, ys = [p.get(names[0]) for p in pts], [p.get(names[1]) for p in pts]
        xl, yl = names[0], names[1]
    else:
        xs, ys = list(range(len(pts))), [p.get(names[0]) for p in pts]
        xl, yl = "evaluation", names[0]
    good = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if not good:
        return "<p>No evaluated candidates.</p>"
    x0, x1 = min(x for x, _ in good), max(x for x, _ in good)
    y0, y1 = min(y for _, y in good), max(y for _, y in good)
    sx = lambda x: P + (x - x0) / ((x1 - x0) or 1) * (W - 2 * P)  # noqa: E731
    sy = lambda y: H - P - (y - y0) / ((y1 - y0) or 1) * (H - 2 * P)  # noqa: E731
    dots = []
    for c, x, y in zip(report["candidates"], xs, ys):
        if x is None or y is None:
            continue
        on = c["id"] in front_ids
        dots.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{5 if on else 3}" fill="{"#1f6feb" if on else "#bbb"}">'
                    f'<title>#{c["id"]}: {html.escape(json.dumps(c["values"]))}</title></circle>')
    axes = (f'<line x1="{P}" y1="{H - P}" x2="{W - P}" y2="{H - P}" stroke="#333"/>'
            f'<line x1="{P}" y1="{P}" x2="{P}" y2="{H - P}" stroke="#333"/>'
            f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">{html.escape(xl)} ({x0:.3g} .. {x1:.3g})</text>'
            f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">{html.escape(yl)} '
            f'({y0:.3g} .. {y1:.3g})</text>')
    return f'<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg">{axes}{"".join(dots)}</svg>'


def irt_lines(report: dict[str, Any]) -> list[str]:
    """One line per IRT objective: how much was estimated, at what measured error, for what share of the items."""
    out = []
    for name, e in (report.get("irt") or {}).items():
        fit = next((f for f in reversed(e["fits"]) if "estimator" in f), None)
        how = (f"estimator {fit['estimator']}, {fit['anchors']} anchors ({fit['anchor_method']}), cross-validated MAE "
               f"{fit['cv_mae'][fit['estimator']]:.3f}" if fit else "never fitted")
        mae = f"{e['measured_mae']:.3f} on {e['calibration_checks']}" if e["measured_mae"] is not None else "- on 0"
        frac = f"{100 * e['items_fraction']:.0f}%" if e["items_fraction"] is not None else "-"
        out.append(f"IRT {name}: {e['estimated']} candidates estimated ({how}); error measured against full "
                   f"scoring: {mae} calibration candidates; items scored: {frac} of full scoring"
                   + (f"; now scored in full: {e['fallback']}" if e.get("fallback") else ""))
    return out


def counts_in_words(counts: dict[str, int]) -> str:
    """{'done': 64, 'cached': 8} -> '72 in all: 64 done, 8 cached' (statuses in the order a search meets them)."""
    order = ["done", "cached", "failed", "running", "pending"]
    keys = sorted(counts, key=lambda k: order.index(k) if k in order else len(order))
    parts = [f"{counts[k]} {k}" for k in keys if counts[k]]
    return f"{sum(counts.values())} in all: {', '.join(parts)}" if parts else "none"


def write_report(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, html_path = folder / "report.json", folder / "report.html"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    recipes = folder / "front"
    recipes.mkdir(exist_ok=True)
    for c in report["front"]:
        (recipes / f"candidate-{c['id']}.yaml").write_text(c["recipe_yaml"])
    body = (f"<h1>evomerge job {html.escape(report['job'])}</h1>"
            f"<p>Candidates: {html.escape(counts_in_words(report['counts']))}. Store: {html.escape(report['store'])}.</p>"
            f"<h2>Front (fitness split), blue; every evaluated candidate, grey</h2>{_svg(report)}"
            f"<h2>Front and parents: fitness and {html.escape(report['split'])} split</h2>"
            f"<pre>{html.escape(front_table(report))}</pre>"
            f"<p>Each front recipe is in <code>front/candidate-ID.yaml</code>; "
            f"<code>evomerge merge front/candidate-ID.yaml -o OUT</code> builds it.</p>")
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report['job'])}"
                         f"</title><style>body{{font-family:sans-serif;margin:2em}}pre{{font-size:13px}}</style>"
                         f"</head><body>{body}</body></html>\n")
    return json_path, html_path
