"""`evomerge export`: one candidate of a job's store as our recipe YAML, a mergekit config, or a merged checkpoint.

Selection: `--candidate ID`; `--best OBJECTIVE` (the done candidate with the best value, direction-aware, lowest
id on ties); `--knee` (the front's knee, `evomerge.search.front.knee_index`: closest to the ideal point once each
objective's losses are scaled to [0, 1] over the front). Both by `evomerge.search.confirm.choose`, the rule the
report and the post-search confirmation share: a value still an IRT estimate counts at the worse end of its 2-sd
interval. Only evaluated (done, or cached copies of done) candidates
are exported: a failed one has no model worth writing, and the error says why it failed.

Writing: OUT must not exist unless `--force`, must not be a symbolic link (it could point anywhere), and its
folder must exist. Everything is written under a temporary name beside OUT and renamed into place, so OUT is
either absent or complete. File names inside a model folder are fixed by evomerge (config, shards, tokenizer
files, README.md, mergekit_config.yml): nothing in a recipe names a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.merge.export import (DEFAULT_SHARD_BYTES, FILE_MARKER, ExportError, check_not_an_input, check_output,
                                   write_file)
from evomerge.search.confirm import choose
from evomerge.search.spec import JobSpec
from evomerge.store import CandidateRow, Store

FORMATS = ("recipe", "mergekit", "model")
EXPORTABLE = ("done", "cached")


@dataclass
class ObjectiveColumn:
    """An objective as the store records it: its name, its place in a candidate's losses, its direction."""

    name: str
    index: int  # position in a candidate's losses
    direction: str  # maximise | minimise


@dataclass
class Selected:
    row: CandidateRow
    why: str  # how it was chosen, for messages and the model card


# ---------------------------------------------------------------- objectives and selection


def objectives_of(store: Store, job: str) -> list[ObjectiveColumn]:
    """The job's objectives as the store records them (names and directions), in the order of a candidate's
    losses."""
    table = store.directions(job)
    if not table:
        raise ExportError(f"{store.path}: job '{job}' has no evaluated candidates yet")
    return [ObjectiveColumn(name, k, direction) for k, (name, direction) in enumerate(table)]


def select(store: Store, job: str, candidate: int | None = None, best: str | None = None,
           knee: bool = False) -> Selected:
    """The candidate to export (exactly one of `candidate`, `best`, `knee`); refuses failed or unevaluated ones."""
    if sum(x is not None and x is not False for x in (candidate, best, knee)) != 1:
        raise ExportError("choose one candidate: --candidate ID, --best OBJECTIVE or --knee")
    if candidate is not None:
        row = store.candidate(job, candidate)
        if row is None:
            ids = [r.id for r in store.candidates(job)]
            span = f"ids {ids[0]}..{ids[-1]}" if ids else "no candidates yet"
            raise ExportError(f"{store.path}: job '{job}' has no candidate {candidate} ({span})")
        selected = Selected(row, f"candidate {candidate}")
    else:
        if not store.candidates(job, status="done"):
            raise ExportError(f"{store.path}: job '{job}' has no " + (
                "evaluated candidates yet" if best is not None else "front yet (no evaluated candidates)"))
        columns = objectives_of(store, job)
        names = [o.name for o in columns]
        if best is not None and best not in names:
            raise ExportError(f"--best {best}: job '{job}' has no such objective (objectives: {', '.join(names)})")
        front = store.front(job)
        chosen = choose(store, job, names, front)
        cid = chosen.best[best] if best is not None else chosen.knee
        row = store.candidate(job, cid) if cid is not None else None
        if row is None or row.values is None:
            raise ExportError(f"{store.path}: job '{job}' has no front yet (no evaluated candidates on it)")
        if best is not None:
            o = columns[names.index(best)]
            estimate = best in store.open_estimates(job).get(row.id, ())
            note = ", an estimate chosen at the worse end of its interval" if estimate else ""
            selected = Selected(row, f"best by {best} ({o.direction}d: {row.values[best]:.6g}{note})")
        else:
            size = len([c for c in front if (r := store.candidate(job, c)) and r.status == "done"])
            selected = Selected(row, f"knee of the front ({size} candidates)")
    row = selected.row
    if row.status == "failed":
        raise ExportError(f"candidate {row.id} failed ({row.reason}): there is no working model to export; pick an "
                          "evaluated one (--best OBJECTIVE, --knee, or --candidate ID of a done candidate)")
    if row.status not in EXPORTABLE:
        raise ExportError(f"candidate {row.id} is {row.status}, not evaluated yet; wait for it or pick another")
    return selected


# ---------------------------------------------------------------- formats


def mergekit_yaml(text: str) -> tuple[str, list[str]]:
    """(mergekit config, notes) for a stored recipe; ExportError saying why when mergekit cannot express it."""
    from evomerge.merge.api import NotMergekit, parse_stored, to_mergekit

    try:
        return to_mergekit(parse_stored(text, check_paths=False))
    except NotMergekit as e:
        raise ExportError(f"{e}. `--format model` writes it as a standard checkpoint (scales folded into the "
                          "weights), `--format recipe` as evomerge YAML") from None


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))


def card_sections(store: Store, job: str, spec: JobSpec, selected: Selected) -> str:
    """Objectives on the fitness and report splits, and the lineage, as Markdown for the model card."""
    row = selected.row
    split = spec.report_split
    scores = store.scores(job, split)
    subject = row.origin if row.origin.startswith("parent:") else f"candidate:{row.cached_from or row.id}"
    test = (scores.get(subject) or {}).get("values") or (scores.get(f"candidate:{row.id}") or {}).get("values")
    lines = ["## Objectives", "",
             f"Measured by evomerge on the fitness split (what the search optimised) and on the `{split}` split "
             "(held out; scored for the front and the parents only).", "",
             f"| objective | direction | fitness | {split} |", "|---|---|---|---|"]
    for o in objectives_of(store, job):
        lines.append(f"| {o.name} | {o.direction} | {_fmt((row.values or {}).get(o.name))} | "
                     f"{_fmt((test or {}).get(o.name))} |")
    if row.estimated:
        guessed = store.open_estimates(job).get(row.cached_from or row.id, [])
        some = guessed and len(guessed) < len(row.values or {})
        which = ("The fitness values of " + ", ".join(f"`{n}`" for n in guessed) + " are estimates from a subset of "
                 "the items (IRT-reduced fitness; the others are measured on every item)") if some else \
            "The fitness values are estimates from a subset of the items (IRT-reduced fitness)"
        lines += ["", f"{which}; the `{split}` values are measured on every item."]
    if test is None:
        lines += ["", f"Not scored on the `{split}` split (it was not on the front when the job's report was made)."]
    lines += ["", "## Lineage", "",
              f"- job `{job}`, candidate {row.id} ({selected.why}), generation {row.generation}, origin `{row.origin}`"]
    if row.cached_from is not None:
        lines.append(f"- same recipe as candidate {row.cached_from}, whose evaluation it reuses")
    if row.parents:
        parents = [store.candidate(job, p) for p in row.parents]
        lines.append("- bred from the population of candidates " + ", ".join(
            f"{p.id} (`{p.origin}`)" if p is not None else str(pid) for pid, p in zip(row.parents, parents)))
    lines.append("- models: " + ", ".join(f"`{k}` {v}" for k, v in spec.models.items()) + f" (base: `{spec.base}`)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- writing


def check_out(out: str | Path, force: bool, folder: bool) -> Path:
    """OUT as an absolute path, after the checks that keep an export from writing anywhere but OUT
    (`merge.export.check_output`)."""
    out = Path(out).expanduser().absolute()
    check_output(out, force, folder=folder)
    return out


def write_text(out: Path, text: str, force: bool) -> Path:
    """Write an export's file atomically, by the output rules (`merge.export.write_file`)."""
    return write_file(out, text, force)


def write_model(out: Path, recipe_text: str, card_extra: str, title: str, force: bool,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, device: str = "cpu", progress: bool = False,
                notes: list[str] | None = None) -> Path:
    """Merge the recipe into a checkpoint folder with our model card (`write_recipe` checks OUT against the output
    rules and the recipe's inputs, then writes it atomically)."""
    from evomerge.merge.api import parse_stored, write_recipe

    recipe = parse_stored(recipe_text)  # checks the model folders exist here
    return write_recipe(recipe, Path(out), force=force, max_shard_bytes=max_shard_bytes, device=device, progress=progress,
                        title=title, card_extra=card_extra, recipe_text=recipe_text,
                        extra_files={"recipe.yaml": recipe_text}, notes=notes)


def export(target: str | Path, out: str | Path, fmt: str = "recipe", name: str | None = None,
           candidate: int | None = None, best: str | None = None, knee: bool = False, force: bool = False,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, device: str = "cpu", progress: bool = False
           ) -> tuple[Path, Selected, list[str]]:
    """Export one candidate of the job at `target` (spec or store file): (path written, the selection, notes)."""
    from evomerge.search.jobs import find_job

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_not_an_input(Path(out), [target])  # the spec or the store named on the command line
    check_out(out, force, folder=fmt == "model")  # before opening anything: a refused OUT costs nothing
    store, spec = find_job(target, name, readonly=True)  # export never changes a store (nor upgrades one)
    try:
        selected = select(store, spec.name, candidate, best, knee)
        text, notes = selected.row.recipe, []
        check_not_an_input(Path(out), [store.path, *spec.models.values()], keep=[spec.report])
        about = f"job {spec.name}, candidate {selected.row.id} ({selected.why})"
        if fmt == "recipe":
            header = f"{FILE_MARKER}: {about}; `evomerge merge` builds it\n"
            return write_text(Path(out), header + text, force), selected, notes
        if fmt == "mergekit":
            config, notes = mergekit_yaml(text)
            header = f"{FILE_MARKER}: {about}, in mergekit's format; `mergekit-yaml` builds it\n"
            return write_text(Path(out), header + config, force), selected, notes
        title = f"{spec.name} candidate {selected.row.id}"
        path = write_model(Path(out), text, card_sections(store, spec.name, spec, selected), title, force,
                           max_shard_bytes, device, progress, notes)
        return path, selected, notes
    finally:
        store.close()
