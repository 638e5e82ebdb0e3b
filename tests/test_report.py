"""report.html is a file worth sending: self-contained, the front and parents plotted with titled axes, the front as a
real table with the export command per row, the best and knee picks with their commands, IRT in words; report.json
carries the same numbers; everything user-named is escaped."""

from __future__ import annotations

import json
import re
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from helpers import quiet, quiz_job

from evomerge.search.front import hypervolume
from evomerge.search.jobs import run_job
from evomerge.search.report import _fmt, render_html
from evomerge.store import Store


class Page(HTMLParser):
    """The parts of an HTML page a test asserts on: tags with attributes, tables as rows of cell texts, paragraph
    texts, script bodies."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: list[list[list[str]]] = []
        self.paragraphs: list[str] = []
        self.scripts: list[str] = []
        self.pres: list[str] = []
        self._cell: list[str] | None = None
        self._p: list[str] | None = None
        self._script: list[str] | None = None
        self._pre: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "p":
            self._p = []
        elif tag == "script":
            self._script = []
        elif tag == "pre":
            self._pre = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "p" and self._p is not None:
            self.paragraphs.append(" ".join("".join(self._p).split()))
            self._p = None
        elif tag == "script" and self._script is not None:
            self.scripts.append("".join(self._script))
            self._script = None
        elif tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data):
        for part in (self._cell, self._p, self._script, self._pre):
            if part is not None:
                part.append(data)


@pytest.fixture(scope="module")
def quiz(tmp_path_factory):
    """A two-objective IRT search (the quiz scorer: 200 items, 20 anchors) and its report."""
    folder = tmp_path_factory.mktemp("quiz")
    result = run_job(quiz_job(folder), **quiet())
    return result, json.loads(result.json_path.read_text()), result.html_path.read_text()


def test_the_report_is_one_file_that_needs_no_network(quiz):
    _, _, text = quiz
    page = Page(text)
    for tag, attrs in page.tags:
        for attr in ("src", "href"):
            assert not re.match(r"(https?:)?//", attrs.get(attr) or ""), (tag, attrs)  # nothing fetched
    assert not [a for t, a in page.tags if t == "link"]  # no stylesheet from elsewhere
    assert any("Plotly.newPlot" in s for s in page.scripts)  # the figures
    assert max(len(s) for s in page.scripts) > 1_000_000  # plotly.js itself, inlined (the figures are a few kB)


def test_the_front_is_a_table_with_one_row_per_member_and_the_same_numbers_as_report_json(quiz):
    result, report, text = quiz
    page = Page(text)
    front = next(t for t in page.tables if t[0][0] == "candidate")
    head, rows = front[0], front[1:]
    assert head == ["candidate", "generation", "origin", "recipe", "quiz (fitness)", "size (fitness)", "quiz (test)",
                    "size (test)", "export"]
    assert [r[0] for r in rows] == [f"#{c['id']}" for c in report["front"]] and len(rows) == len(Store(result.store).front("quiz"))
    for row, c in zip(rows, report["front"]):
        assert row[4].lstrip("~") == _fmt(c["fitness"]["quiz"]) and row[5] == _fmt(c["fitness"]["size"])
        assert row[4].startswith("~") == (c["items_scored"]["quiz"] < 200)  # estimated from anchors: marked
        assert row[6] == _fmt(c["test"]["quiz"]) and row[7] == _fmt(c["test"]["size"])
        assert row[8] == (f"evomerge export {result.store} --job quiz --candidate {c['id']} --format recipe "
                          f"-o candidate-{c['id']}.yaml") == c["export"]
    parents = next(t for t in page.tables if t[0][0] == "parent")
    assert [r[0] for r in parents[1:]] == ["base", "a", "b"]
    assert [r[3] for r in parents[1:]] == [_fmt(p["test"]["quiz"]) for p in report["parents"]]


def test_the_report_opens_in_words_with_the_stored_counts_and_hypervolume(quiz):
    result, report, text = quiz
    store = Store(result.store, readonly=True)
    counts = store.counts("quiz")
    first = Page(text).paragraphs[0]
    assert "{" not in first and first.startswith(f"This search asked for {sum(counts.values())} candidates over 8 ")
    assert f"{sum(counts.values())} in all: {counts['done']} done" in first
    rows = [store.candidate("quiz", cid) for cid in store.front("quiz")]
    ref = store.last_checkpoint("quiz")[1]["ref_point"]
    hv = hypervolume(np.array([r.losses for r in rows]), np.array(ref))
    assert report["summary"] == {"candidates": sum(counts.values()), "counts": counts, "front": len(rows),
                                 "in_words": f"{sum(counts.values())} in all: {counts['done']} done",
                                 "hypervolume": pytest.approx(hv), "reference": ref, "generations": 8}
    assert f"The Pareto front holds {len(rows)} recipe(s); its hypervolume is {hv:.4g}" in first


def test_the_plots_have_titled_axes_and_show_the_parents(quiz):
    _, report, text = quiz
    figures = "".join(s for s in Page(text).scripts if "Plotly.newPlot" in s)
    for title in ("quiz on the fitness split (higher is better)", "size on the fitness split (lower is better)",
                  "quiz on the test split (higher is better)", "size on the test split (lower is better)"):
        assert f'"text":"{title}"' in figures
    assert figures.count('"name":"parents"') == 2 and figures.count('"name":"front"') == 2
    assert '"showticklabels":true' in figures


def test_the_picks_are_what_export_selects_with_their_commands(quiz):
    from evomerge.service.export import select

    result, report, text = quiz
    store = Store(result.store, readonly=True)
    picks = report["picks"]
    for name in ("quiz", "size"):
        assert picks["best"][name]["id"] == select(store, "quiz", best=name).row.id
        assert picks["best"][name]["export"] == f"evomerge export {result.store} --job quiz --best {name} --format recipe -o best-{name}.yaml"
    assert picks["knee"]["id"] == select(store, "quiz", knee=True).row.id
    page = Page(text)
    for cmd in [picks["knee"]["export"], picks["knee"]["export_model"]] + [b["export"] for b in picks["best"].values()]:
        assert cmd in text  # in <pre>, escaped (no character here needs it)
    assert f"Knee of the front: candidate #{picks['knee']['id']}" in text
    recipes = page.pres
    assert store.candidate("quiz", picks["knee"]["id"]).recipe in recipes  # its recipe, as the store holds it
    assert store.candidate("quiz", picks["best"]["quiz"]["id"]).recipe in recipes


def test_the_irt_section_says_what_was_estimated_from_how_many_items_and_the_measured_error(quiz):
    _, report, text = quiz
    e = report["irt"]["quiz"]
    fit = [f for f in e["fits"] if "estimator" in f][-1]
    words = next(p for p in Page(text).paragraphs if "estimated instead of measured" in p)
    assert f"{e['estimated']} candidate(s) had quiz estimated instead of measured" in words
    assert f"scored on {fit['anchors']} anchor items" in words and "of the 200 items of the fitness split" in words
    assert (f"Measured against full scoring on {e['calibration_checks']} calibration candidate(s), the estimates were "
            f"off by {e['measured_mae']:.3f} on average") in words
    assert e["calibration_checks"] > 0 and e["estimated"] > 0 and fit["anchors"] == 20


def test_everything_user_named_is_escaped(quiz):
    _, report, clean = quiz
    evil = json.loads(json.dumps(report))
    evil["job"] = "<img src=x onerror=alert(1)>"
    evil["front"][0]["recipe"] = "</script><script>alert(2)</script>"
    evil["front"][0]["origin"] = "<b>bold</b>"
    evil["parents"][0]["name"] = "<iframe src=//evil.example>"
    evil["picks"]["knee"]["recipe_yaml"] = "</pre><script>alert(3)</script>"
    text = render_html(evil)
    page = Page(text)
    assert not [t for t, _ in page.tags if t in ("img", "iframe")] and not [a for _, a in page.tags if "onerror" in a]
    scripts = sum(t == "script" for t, _ in Page(clean).tags)  # plotly's own (its config, plotly.js, the figures)
    assert sum(t == "script" for t, _ in page.tags) == scripts  # none injected
    assert "</script><script>alert(2)" not in text and "<b>bold</b>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "&lt;/pre&gt;&lt;script&gt;alert(3)" in text
    assert "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in text  # the table shows it as text


def test_without_plotly_the_plots_are_svg_with_tick_labels(quiz, monkeypatch):
    _, report, _ = quiz
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)  # `import plotly.graph_objects` now fails
    page = Page(render_html(report))
    assert not page.scripts
    svgs = [a for t, a in page.tags if t == "svg"]
    assert len(svgs) == 2 and svgs[0]["aria-label"] == ("size on the fitness split (lower is better) against quiz on "
                                                        "the fitness split (higher is better)")
    texts = [t for t, _ in page.tags if t == "text"]
    assert len(texts) >= 2 * (5 + 5 + 2)  # five ticks per axis and the two titles, per plot
    assert sum(t == "rect" for t, _ in page.tags) == 2 * len(report["parents"])  # the parents, on both plots
