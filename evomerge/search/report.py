"""The end of a job: score the front's recipes and the parents on the report split (test, never fitness), print
the front as a table, write report.json, report.html and each front recipe as YAML.

report.html is one self-contained file, meant to be sent: Plotly inlined from the installed package (a static SVG
when plotly is not importable), nothing fetched from a network. It holds the counts in words, the front and the
parents plotted on the fitness and the report split, the front as a table (one row per front member, with the
`evomerge export` command that writes it), the best candidate per objective and the knee with their recipes and
commands, and the IRT section in words. Every number in it comes from report.json (`summary`, `picks`, each
front member's `export`), so the two never disagree; everything a user named (job, models, recipes) is escaped.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.merge.api import describe
from evomerge.search.confirm import choose
from evomerge.search.context import SearchContext
from evomerge.search.front import hypervolume
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
    done = store.candidates(job, status="done")
    all_done = [{"id": r.id, "generation": r.generation, "values": r.values, "origin": r.origin,
                 "estimated": r.estimated} for r in done]
    for c in front:
        c["export"] = export_command(store.path, job, f"--candidate {c['id']}", "recipe", f"candidate-{c['id']}.yaml")
    return {"job": job, "store": str(store.path), "split": split, "objectives": objectives, "counts": counts,
            "summary": summary(store, job, counts, front), "picks": pick_summary(store, job, search.objectives, done),
            "front": front, "parents": parents, "candidates": all_done, "spec": spec.to_dict(),
            "irt": irt_summary(store, job), "runtime": runtime}


def export_command(store: Any, job: str, which: str, fmt: str, out: str) -> str:
    """The exact `evomerge export` command that writes one candidate (paths and names shell-quoted)."""
    return (f"evomerge export {shlex.quote(str(store))} --job {shlex.quote(job)} {which} --format {fmt} "
            f"-o {shlex.quote(out)}")


def summary(store: Any, job: str, counts: dict[str, int], front: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's opening numbers: candidates by status, the front's size and hypervolume (against the
    reference the search used: the worst losses of generation 0, from its last checkpoint)."""
    last = store.last_checkpoint(job)
    ref = (last[1] or {}).get("ref_point") if last else None
    hv = None
    rows = [store.candidate(job, c["id"]) for c in front]
    if ref is not None and rows:
        hv = hypervolume(np.array([r.losses for r in rows if r is not None]), np.array(ref))
    return {"candidates": sum(counts.values()), "counts": counts, "in_words": counts_in_words(counts),
            "front": len(front), "hypervolume": hv, "reference": ref, "generations": last[0] if last else 0}


def pick_summary(store: Any, job: str, objectives: Any, done: list[Any]) -> dict[str, Any]:
    """What `evomerge export --best OBJECTIVE` and `--knee` select, by the same rule (`confirm.choose`: best over
    the done candidates, knee over the stored front, an estimate counted at the worse end of its interval), with the
    commands that export them as our recipe YAML and as a merged checkpoint."""
    out: dict[str, Any] = {"best": {}, "knee": None}
    if not done:
        return out
    names = [o.name for o in objectives.objectives]
    chosen = choose(store, job, names, store.front(job))
    rows = {r.id: r for r in done}
    for o in objectives.objectives:
        row = rows[chosen.best[o.name]]
        out["best"][o.name] = {"id": row.id, "value": row.values[o.name], "direction": o.direction,
                               "estimated": row.estimated, "recipe_yaml": row.recipe,
                               "export": export_command(store.path, job, f"--best {shlex.quote(o.name)}", "recipe",
                                                        f"best-{o.name}.yaml"),
                               "export_model": export_command(store.path, job, f"--best {shlex.quote(o.name)}",
                                                              "model", f"best-{o.name}-model")}
    if chosen.knee is not None:
        row = rows[chosen.knee]
        out["knee"] = {"id": row.id, "values": row.values, "estimated": row.estimated, "recipe_yaml": row.recipe,
                       "export": export_command(store.path, job, "--knee", "recipe", "knee.yaml"),
                       "export_model": export_command(store.path, job, "--knee", "model", "knee-model")}
    return out


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


def irt_lines(report: dict[str, Any]) -> list[str]:
    """One line per IRT objective: how much was estimated, at what measured error, for what share of the items."""
    out = []
    for name, e in (report.get("irt") or {}).items():
        fit = next((f for f in reversed(e["fits"]) if "estimator" in f), None)
        how = (f"estimator {fit['estimator']}, {fit['anchors']} anchors ({fit['anchor_method']})" if fit
               else "never fitted")
        mae = f"{e['measured_mae']:.3f} on {e['calibration_checks']}" if e["measured_mae"] is not None else "- on 0"
        cover = (f", within 2 sd: {100 * e['within_2sd']:.0f}% (2 sd: {e['mean_2sd']:.3f})"
                 if e.get("within_2sd") is not None else "")
        printed = f"; expected error {e['printed_error']:.3f}" if e.get("printed_error") is not None else ""
        frac = f"{100 * e['items_fraction']:.0f}%" if e["items_fraction"] is not None else "-"
        confirmed = f"; {e['confirmed']} confirmed in full" if e.get("confirmed") else ""
        out.append(f"IRT {name}: {e['estimated']} candidates estimated ({how}{printed}); error measured against full "
                   f"scoring: {mae} calibration candidates{cover}{confirmed}; items scored: {frac} of full scoring"
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
    html_path.write_text(render_html(report))
    return json_path, html_path


# ------------------------------------------------------------------------------------------------ report.html

def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def better(direction: str) -> str:
    return "higher is better" if direction == "maximise" else "lower is better"


def render_html(report: dict[str, Any]) -> str:
    """report.html from report.json's content: one file, no network."""
    job, split, s = report["job"], report["split"], report["summary"]
    objs = report["objectives"]
    hv = (f"; its hypervolume is {s['hypervolume']:.4g} (against the worst losses of generation 0)"
          if s.get("hypervolume") is not None else "")
    names = ", ".join(f"{o['name']} ({better(o['direction'])})" for o in objs)
    parts = [f"<h1>evomerge report: job {esc(job)}</h1>",
             f"<p>This search asked for {s['candidates']} candidates over {s['generations']} generation(s): "
             f"{esc(s['in_words'])}. Objectives: {esc(names)}. The Pareto front holds {s['front']} recipe(s){hv}. "
             f"Front members and parents were scored again on the held-out <b>{esc(split)}</b> split, never used "
             f"to choose them. Store: <code>{esc(report['store'])}</code>.</p>"]
    if report.get("runtime"):
        parts.append(f"<p>Runtime: {esc(report['runtime']['summary'])}.</p>")
    parts.append("<h2>The front and the parents</h2>")
    parts.append(plots(report))
    parts.append(f"<h2>Front members ({len(report['front'])})</h2>")
    parts.append(front_html(report))
    parts.append("<h2>Parents</h2>")
    parts.append(parents_html(report))
    parts.append("<h2>Best per objective, and the knee</h2>")
    parts.append(picks_html(report))
    irt = irt_html(report)
    if irt:
        parts.append("<h2>IRT-reduced fitness</h2>" + irt)
    parts.append("<h2>Reproducing</h2><p>Every front recipe is also in <code>front/candidate-ID.yaml</code> beside "
                 "this file; <code>evomerge merge front/candidate-ID.yaml -o OUT</code> builds it. The commands above "
                 "export from the store (<code>--format mergekit</code> writes a mergekit config where the recipe has "
                 f"one). The search itself: <code>evomerge resume {esc(shlex.quote(report['store']))} --job "
                 f"{esc(shlex.quote(job))}</code> continues it; report.json beside this file holds every number here."
                 "</p>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#1b1f24}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:14px}"
             "th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}"
             "th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}"
             "code,pre{font-size:13px}pre{background:#f6f8fa;padding:.6em;overflow-x:auto}"
             ".plots>div{margin-bottom:1em}"
             ".note{color:#57606a;font-size:13px}")
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>evomerge report: {esc(job)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def _value(v: Any, estimated: bool = False) -> str:
    if v is None:
        return "<td class='num'>-</td>"
    mark = "<span title='estimated from anchor items (IRT)'>~</span>" if estimated else ""
    return f"<td class='num'>{mark}{esc(_fmt(v))}</td>"


def front_html(report: dict[str, Any]) -> str:
    split, names = report["split"], [o["name"] for o in report["objectives"]]
    head = (["candidate", "generation", "origin", "recipe"] + [f"{n} (fitness)" for n in names]
            + [f"{n} ({split})" for n in names] + ["export"])
    rows = []
    for c in report["front"]:
        test = c.get(split)
        cells = [f"<td>#{c['id']}</td>", f"<td class='num'>{c['generation']}</td>", f"<td>{esc(c['origin'])}</td>",
                 f"<td>{esc(c['recipe'])}</td>"]
        cells += [_value((c["fitness"] or {}).get(n), _is_estimate(report, c, n)) for n in names]
        cells += ([_value(test.get(n)) for n in names] if test else
                  [f"<td title='{esc(c.get('failed_on_' + split) or '')}'>failed</td>" for _ in names])
        cells.append(f"<td><code>{esc(c['export'])}</code></td>")
        rows.append(f"<tr id='candidate-{c['id']}'>{''.join(cells)}</tr>")
    note = ("<p class='note'>~ estimated from anchor items (IRT); every other value, and every "
            f"{esc(split)}-split value, is measured.</p>" if any(c.get("estimated") for c in report["front"]) else "")
    return _table(head, rows) + note


def parents_html(report: dict[str, Any]) -> str:
    split, names = report["split"], [o["name"] for o in report["objectives"]]
    head = ["parent"] + [f"{n} (fitness)" for n in names] + [f"{n} ({split})" for n in names]
    rows = [f"<tr><td>{esc(p['name'])}</td>" + "".join(_value((p["fitness"] or {}).get(n)) for n in names)
            + "".join(_value((p[split] or {}).get(n)) for n in names) + "</tr>" for p in report["parents"]]
    return _table(head, rows)


def _table(head: list[str], rows: list[str]) -> str:
    return ("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def picks_html(report: dict[str, Any]) -> str:
    picks, out = report.get("picks") or {}, []
    for name, b in (picks.get("best") or {}).items():
        est = " (an estimate: IRT)" if b["estimated"] else ""
        out.append(f"<h3>Best {esc(name)}: candidate #{b['id']}</h3><p>{esc(name)} {esc(_fmt(b['value']))}{est} on "
                   f"the fitness split, {better(b['direction'])}.</p>" + _pick(b))
    k = picks.get("knee")
    if k:
        vals = ", ".join(f"{n} {_fmt(v)}" for n, v in (k["values"] or {}).items())
        out.append(f"<h3>Knee of the front: candidate #{k['id']}</h3><p>The front member nearest the ideal point once "
                   f"each objective is scaled to [0, 1] over the front: {esc(vals)}.</p>" + _pick(k))
    return "".join(out) or "<p>No evaluated candidates.</p>"


def _pick(p: dict[str, Any]) -> str:
    return (f"<p>Export it as our recipe YAML, or as a merged checkpoint:</p><pre>{esc(p['export'])}\n"
            f"{esc(p['export_model'])}</pre><details><summary>recipe</summary><pre>{esc(p['recipe_yaml'])}</pre>"
            "</details>")


def irt_html(report: dict[str, Any]) -> str:
    """Per IRT objective, in words: what was estimated, from how many items, and the error measured."""
    out = []
    for name, e in (report.get("irt") or {}).items():
        fits = [f for f in e["fits"] if "estimator" in f]
        total = e["items_per_candidate"]
        if fits:
            fit = fits[-1]
            cv = e.get("printed_error")
            text = (f"{e['estimated']} candidate(s) had <b>{esc(name)}</b> estimated instead of measured: each was "
                    f"scored on {fit['anchors']} anchor items (chosen by {esc(fit['anchor_method'])}) of the "
                    f"{total} items of the fitness split, and the rest was predicted by the {esc(fit['estimator'])} "
                    f"estimator, fitted on {fit['fitted_on']} fully scored candidates ({len(fits)} fit(s) in all; "
                    f"the last at generation {fit['generation']}"
                    + (f"; its expected mean absolute error {cv:.3f}, {esc(e.get('printed_basis') or '')}"
                       if cv is not None else "") + "). ")
        else:
            text = f"<b>{esc(name)}</b> was never estimated (no calibration could be fitted). "
        if e["measured_mae"] is not None:
            text += (f"Measured against full scoring on {e['calibration_checks']} calibration candidate(s), the "
                     f"estimates were off by {e['measured_mae']:.3f} on average (mean absolute error)"
                     + (f"; {100 * e['within_2sd']:.0f}% of them within two standard deviations (a band "
                        f"{e['mean_2sd']:.3f} wide on average)" if e.get("within_2sd") is not None else "") + ". ")
        else:
            text += "No estimate was checked against full scoring. "
        if e.get("confirmed") and e.get("confirmed_mae") is not None:
            text += (f"{e['confirmed']} estimated candidate(s) were then scored on every item, because their "
                     "interval overlapped the front before the driver was told of them, "
                     + (f"because the front leant on them most once told ({e['rechecked']}, the driver told anew), "
                        if e.get("rechecked") else "")
                     + f"or as the front's picks ({e.get('confirmed_items', '?')} item scorings); off by "
                     f"{e['confirmed_mae']:.3f} on average (chosen for high estimates, they show the winner's curse "
                     "that measuring them removes). ")
        if e["items_fraction"] is not None:
            text += (f"In all, {e['items_scored']} of {e['items_full']} item scorings were run "
                     f"({100 * e['items_fraction']:.0f}% of full scoring). ")
        if e.get("fallback"):
            text += f"Now scored in full: {esc(e['fallback'])}. "
        out.append(f"<p>{text}The picks (best per objective and the knee) are chosen with each estimate at the worse "
                   "end of its two-standard-deviation interval; those still estimated were then scored on every item "
                   "of the objectives that make them picks, before this report. Every value on the report split is "
                   "measured.</p>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------ the plots

def _series(report: dict[str, Any], split: str | None) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """What one plot shows: its axes (objective names, or 'candidate' and the objective) and its point groups
    (`evaluated` grey, `front` blue, `parents`), each point with x, y and a hover text. `split` None: fitness."""
    names = [o["name"] for o in report["objectives"]]
    front_ids = {c["id"] for c in report["front"]}
    key = "fitness" if split is None else split
    groups: dict[str, list[dict[str, Any]]] = {"evaluated": [], "front": [], "parents": []}

    def point(label: str, values: dict[str, Any] | None, x_id: Any) -> dict[str, Any] | None:
        if not values or any(values.get(n) is None for n in names[:2]):
            return None
        x, y = (values[names[0]], values[names[1]]) if len(names) >= 2 else (x_id, values[names[0]])
        text = label + "<br>" + "<br>".join(f"{html.escape(n)} {_fmt(values.get(n))}" for n in names)
        return {"x": x, "y": y, "text": text}

    if split is None:
        for c in report["candidates"]:
            if c["id"] not in front_ids and (pt := point(f"#{c['id']} (gen {c['generation']})", c["values"], c["id"])):
                groups["evaluated"].append(pt)
    for c in report["front"]:
        label = f"#{c['id']} (gen {c['generation']}): {html.escape(c['recipe'])}"
        if pt := point(label, c.get(key), c["id"] if split is None else f"#{c['id']}"):
            groups["front"].append(pt)
    parent_ids = {c["origin"]: c["id"] for c in report["candidates"]}
    for p in report["parents"]:
        x_id = parent_ids.get(f"parent:{p['name']}", -1) if split is None else f"parent {p['name']}"
        if pt := point(f"parent {html.escape(p['name'])}", p.get(key), x_id):
            groups["parents"].append(pt)
    axes = names[:2] if len(names) >= 2 else ["candidate (in the order asked)" if split is None else "who", names[0]]
    return axes, groups


def _axis_title(report: dict[str, Any], name: str, split: str) -> str:
    d = next((o["direction"] for o in report["objectives"] if o["name"] == name), None)
    return f"{name} on the {split} split ({better(d)})" if d else name


COLOURS = {"evaluated": "#afb8c1", "front": "#0969da", "parents": "#cf222e"}
SYMBOLS = {"evaluated": "circle", "front": "circle", "parents": "diamond"}


def plots(report: dict[str, Any]) -> str:
    """The fitness-split plot (every evaluated candidate, the front, the parents) and the report-split plot (front
    and parents), with Plotly inlined once; SVG when plotly is not importable."""
    split, names = report["split"], [o["name"] for o in report["objectives"]]
    specs = [(None, "Fitness split: the front (blue), every other evaluated candidate (grey), the parents (red)"),
             (split, f"{split.capitalize()} split, held out: the front (blue) and the parents (red)")]
    note = (f"<p class='note'>The plots show the first two of {len(names)} objectives; the tables have all.</p>"
            if len(names) > 2 else "")
    try:
        import plotly.graph_objects as go
    except ImportError:
        go = None
    out = []
    for i, (which, title) in enumerate(specs):
        axes, groups = _series(report, which)
        shown = which or "fitness"
        xt = _axis_title(report, axes[0], shown) if axes[0] in names else axes[0]
        yt = _axis_title(report, axes[1], shown)
        if go is None:
            out.append(f"<div><h3>{esc(title)}</h3>{_svg(groups, xt, yt)}</div>")
            continue
        fig = go.Figure()
        for g, pts in groups.items():
            if pts:
                fig.add_trace(go.Scatter(x=[p["x"] for p in pts], y=[p["y"] for p in pts], mode="markers",
                                         name=g, text=[p["text"] for p in pts], hoverinfo="text",
                                         marker={"color": COLOURS[g], "symbol": SYMBOLS[g],
                                                 "size": 7 if g == "evaluated" else 11,
                                                 "line": {"width": 1, "color": "#1b1f24"} if g != "evaluated" else None}))
        fig.update_layout(title={"text": html.escape(title), "x": 0, "xanchor": "left", "font": {"size": 14}},
                          margin={"t": 70, "l": 70, "r": 20, "b": 60}, height=460, template="plotly_white",
                          legend={"orientation": "h", "y": -0.18}, hovermode="closest")
        fig.update_xaxes(title={"text": html.escape(xt)}, showticklabels=True, ticks="outside", showline=True,
                         linecolor="#57606a", automargin=True)
        fig.update_yaxes(title={"text": html.escape(yt)}, showticklabels=True, ticks="outside", showline=True,
                         linecolor="#57606a", automargin=True)
        out.append("<div>" + fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%",
                                         config={"displaylogo": False, "responsive": True}) + "</div>")
    return f"<div class='plots'>{''.join(out)}</div>{note}"


def _svg(groups: dict[str, list[dict[str, Any]]], xt: str, yt: str) -> str:
    """A scatter plot as static SVG with ticks and tick labels (no plotly): the same groups and colours."""
    pts = [p for g in groups.values() for p in g]
    if not pts:
        return "<p>Nothing to plot.</p>"
    cats = sorted({p["x"] for p in pts if isinstance(p["x"], str)})
    xs = [cats.index(p["x"]) if isinstance(p["x"], str) else p["x"] for p in pts]
    ys = [p["y"] for p in pts]
    W, H, L, B, T = 560, 400, 70, 60, 20
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x0 == x1 or cats else (x0, x1)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y0 == y1 else (y0, y1)
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - T)  # noqa: E731
    sy = lambda y: H - B - (y - y0) / (y1 - y0) * (H - B - T)  # noqa: E731
    out = [f'<line x1="{L}" y1="{H - B}" x2="{W - T}" y2="{H - B}" stroke="#57606a"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="#57606a"/>']
    xticks = [(i, c) for i, c in enumerate(cats)] if cats else [(v, f"{v:.3g}") for v in np.linspace(x0, x1, 5)]
    for v, label in xticks:
        out.append(f'<line x1="{sx(v):.1f}" y1="{H - B}" x2="{sx(v):.1f}" y2="{H - B + 5}" stroke="#57606a"/>'
                   f'<text x="{sx(v):.1f}" y="{H - B + 18}" font-size="11" text-anchor="middle">{esc(label)}</text>')
    for v in np.linspace(y0, y1, 5):
        out.append(f'<line x1="{L - 5}" y1="{sy(v):.1f}" x2="{L}" y2="{sy(v):.1f}" stroke="#57606a"/>'
                   f'<text x="{L - 8}" y="{sy(v) + 4:.1f}" font-size="11" text-anchor="end">{v:.3g}</text>')
    out.append(f'<text x="{(L + W - T) / 2}" y="{H - 12}" font-size="13" text-anchor="middle">{esc(xt)}</text>'
               f'<text x="16" y="{(H - B) / 2}" font-size="13" transform="rotate(-90 16 {(H - B) / 2})" '
               f'text-anchor="middle">{esc(yt)}</text>')
    for g, group in groups.items():
        for p in group:
            x = cats.index(p["x"]) if isinstance(p["x"], str) else p["x"]
            title = esc(html.unescape(p["text"].replace("<br>", "; ")))  # the hover text, as plain text
            r = 3 if g == "evaluated" else 5
            shape = (f'<rect x="{sx(x) - r:.1f}" y="{sy(p["y"]) - r:.1f}" width="{2 * r}" height="{2 * r}"'
                     if g == "parents" else f'<circle cx="{sx(x):.1f}" cy="{sy(p["y"]):.1f}" r="{r}"')
            out.append(f'{shape} fill="{COLOURS[g]}"><title>{title}</title></{"rect" if g == "parents" else "circle"}>')
    return (f'<svg viewBox="0 0 {W} {H}" width="100%" style="max-width:{W}px" xmlns="http://www.w3.org/2000/svg" '
            f'role="img" aria-label="{esc(yt)} against {esc(xt)}">{"".join(out)}</svg>')
