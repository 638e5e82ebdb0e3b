"""`evomerge dashboard`: the JSON API reads a real search's store, the server stays read-only and guarded (token
off loopback, Host check, no path out of its static files), a store that is not ours fails clearly, and the page
works in a real browser (Debian chromium driven by Playwright): the jobs list, the front with exactly the store's
points, a click on a point showing that candidate's recipe, and live updates while a job runs."""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from evomerge.dashboard import DashboardError, make_server
from evomerge.dashboard.data import heatmaps
from evomerge.dashboard.server import find_store, is_loopback, resolve_token
from evomerge.scoring import toy
from evomerge.search.jobs import run_job
from evomerge.service.cli import main
from evomerge.store import Store, StoreError
from helpers import quiet, quiz_job, write_job

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "out" / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TOY = {"scorer": "evomerge.scoring.toy:scorer", "scorer_options": {"fail_above": 0.9}}  # a parent fails


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A real (toy-scored) two-objective search: a front, a failed candidate, parents scored on the test split."""
    folder = tmp_path_factory.mktemp("dashboard")
    result = run_job(write_job(folder, runtime=TOY), **quiet())
    s = Store(result.store, readonly=True)
    assert s.counts("toy").get("failed") and len(s.front("toy")) >= 2 and s.scores("toy", "test")
    s.close()
    return result.store


def start(store_path: Path, **kw):
    server, generated = make_server(store_path, port=0, **kw)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return server, generated


@pytest.fixture(scope="module")
def server(store):
    srv, _ = start(store)
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, path: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None):
    """A raw request (the path goes out exactly as written: no client-side normalisation of '..')."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def api(srv, path: str):
    status, _, body = request(srv, "/api/" + path)
    assert status == 200, body
    return json.loads(body)


# ---------------------------------------------------------------- the API

def test_the_api_shows_jobs_front_failures_and_candidates(server, store):
    s = Store(store, readonly=True)
    jobs = api(server, "jobs")["jobs"]
    assert [j["name"] for j in jobs] == ["toy"]
    job = jobs[0]
    assert job["status"] == "done" and job["budget"]["evaluations"] == 24 and job["progress"] == 1.0
    assert job["counts"] == s.counts("toy")

    d = api(server, "job?name=toy")
    assert d["objectives"] == [{"name": "fit", "direction": "maximise"}, {"name": "size", "direction": "minimise"}]
    assert d["front"] == s.front("toy")
    assert sorted(p["id"] for p in d["points"] if p["front"]) == s.front("toy")
    assert len(d["points"]) == s.counts("toy")["done"]
    failed = api(server, "candidates?job=toy&status=failed")["rows"]
    assert [c["id"] for c in failed] == sorted((r.id for r in s.candidates("toy", status="failed")), reverse=True)
    assert failed and all("fail_above" in c["reason"] for c in failed)
    assert len(d["progress"]["hypervolume"]) == len(d["progress"]["evaluations"]) > 0
    assert d["progress"]["hypervolume"] == sorted(d["progress"]["hypervolume"])  # the front only ever grows
    assert {p["name"] for p in d["parents"]} == {"base", "a", "b"}

    cid = d["front"][0]
    c = api(server, f"candidate?job=toy&id={cid}")
    assert c["recipe"] == s.candidate("toy", cid).recipe
    assert c["export"] == f"evomerge export {store} --job toy --candidate {cid} --format model -o out/toy-candidate-{cid}"
    weight = next(m for m in c["heatmaps"] if m["parameter"] == "weight")
    assert weight["rows"] == ["a", "b"] and len(weight["layers"]) == 4  # the golden models have 4 layers
    assert [s["objective"] for s in c["scores"]] == ["fit", "size"]
    assert c["scores"][0]["test"] == pytest.approx(c["scores"][0]["fitness"] - 0.01)  # the toy's test split
    assert request(server, "/api/candidate?job=toy&id=9999")[0] == 404
    for odd in ("%C2%B2", "99999999999999999999", "-1", "1.0", "%00"):  # a superscript digit, beyond int64, ...
        assert request(server, f"/api/candidate?job=toy&id={odd}")[0] == 400, odd
    assert request(server, "/api/candidate?job=%00&id=1")[0] == 404
    assert request(server, "/api/job?name=nope")[0] == 404


def test_the_heatmap_resolves_gradients_and_filters_per_layer():
    from evomerge.merge.recipe import parse_recipe

    recipe = parse_recipe({
        "merge_method": "ties", "base_model": "/m/base",
        "models": [{"model": "/m/a", "parameters": {"weight": [0.0, 1.0], "density": 0.5}},
                   {"model": "/m/b", "parameters": {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.7}],
                                                    "density": 0.9}}]}, check_paths=False)
    maps = {m["parameter"]: m for m in heatmaps(recipe, {"/m/a": "a", "/m/b": "b"})}
    w = maps["weight"]
    assert w["note"] and len(w["layers"]) == 8  # no model folder to count layers: gradient positions
    rows = dict(zip(w["rows"], w["z"]))
    assert rows["a · self_attn"][0] == 0.0 and rows["a · self_attn"][-1] == 1.0  # the gradient, first to last
    assert rows["b · self_attn"] == [0.2] * 8 and rows["b · other"] == [0.7] * 8  # first matching filter wins
    assert maps["density"]["z"][0] == [0.5] * 8


def test_the_dashboard_is_read_only(server, store):
    before = Path(store).read_bytes()
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = request(server, "/api/jobs", method=method, body=b"{}")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert Path(store).read_bytes() == before


def test_static_files_cannot_reach_outside_the_package(server):
    assert request(server, "/static/app.js")[0] == 200
    status, headers, body = request(server, "/static/plotly.min.js")  # Plotly from the installed package
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and b"plotly" in body[:2000].lower()
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py", "/static//etc/passwd",
                 "/static/%2fetc%2fpasswd", "/static/../../../../etc/passwd", "/static/", "/../../etc/passwd"):
        status, _, body = request(server, path)
        assert status == 404, path
        assert b"root:" not in body and b"import" not in body


def test_a_token_file_keeps_the_token_out_of_the_process_list(tmp_path):
    from evomerge.dashboard.server import read_token_file

    path = tmp_path / "token"
    path.write_text("a-token-of-some-length-0123\n")
    assert read_token_file(path) == "a-token-of-some-length-0123"
    path.write_text("\n")
    with pytest.raises(DashboardError, match="the file is empty"):
        read_token_file(path)
    with pytest.raises(DashboardError, match="cannot read it"):
        read_token_file(tmp_path / "missing")


def test_a_token_is_required_off_loopback(store):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    assert resolve_token("127.0.0.1", None, env={}) == (None, False)
    token, generated = resolve_token("0.0.0.0", None, env={})
    assert generated and len(token) >= 24
    assert resolve_token("0.0.0.0", None, env={"EVOMERGE_DASHBOARD_TOKEN": "from-the-environment"}) == (
        "from-the-environment", False)
    with pytest.raises(DashboardError, match="shorter than 16"):
        resolve_token("0.0.0.0", "fifteen-chars-x", env={})
    with pytest.raises(DashboardError, match="shorter than 16"):
        resolve_token("0.0.0.0", "short", env={})
    with pytest.raises(DashboardError, match="only letters, digits"):  # it goes into a cookie: no ; , or spaces
        resolve_token("0.0.0.0", "a-long-secret; Path=/x", env={})

    srv, generated = start(store, host="0.0.0.0", env={})  # off loopback, no token given: one is generated
    try:
        assert generated and srv.token
        assert request(srv, "/api/jobs")[0] == 401
        assert request(srv, "/")[0] == 401
        assert request(srv, "/static/plotly.min.js")[0] == 401
        assert request(srv, "/api/jobs", headers={"Authorization": "Bearer wrong-token"})[0] == 401
        assert request(srv, "/api/jobs", headers={"Authorization": f"Bearer {srv.token}"})[0] == 200
        status, headers, _ = request(srv, f"/?token={srv.token}")  # the printed URL: the token moves to a cookie
        assert status == 200 and "HttpOnly" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert request(srv, "/api/jobs", headers={"Cookie": cookie})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_on_loopback_only_local_host_names_are_answered(server):
    assert request(server, "/api/jobs", headers={"Host": "localhost:8000"})[0] == 200
    assert request(server, "/api/jobs", headers={"Host": "attacker.example:8000"})[0] == 403  # DNS rebinding


def test_a_store_that_is_not_ours_is_a_clear_error(tmp_path, capsys):
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE people (name TEXT)")
    db.commit()
    db.close()
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database at all, just some words " * 100)
    for path, message in ((other, "not an evomerge store"), (text, "not an evomerge store"),
                          (tmp_path / "missing.sqlite", "no such store")):
        assert main(["dashboard", "--store", str(path), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and str(path) in err
    with pytest.raises(DashboardError, match="--store"):
        find_store(None, root=tmp_path)  # nothing under ./out to default to


# ---------------------------------------------------------------- the page, in a real browser

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium: `sudo apt-get install -y chromium` "
                    "(or `make browser`) installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1500, "height": 1100})
    problems: list[str] = []  # script errors and CSP violations (Plotly must work under script-src 'self')
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    pg.problems = problems
    yield pg
    pg.close()


FRONT_POINTS = """() => {
  const gd = document.getElementById('front-plot'), fl = gd._fullLayout, box = gd.getBoundingClientRect();
  const screen = [];
  gd.data.filter(t => t.name === 'front' || t.name === 'dominated').forEach(t => t.x.forEach((x, i) => screen.push({
    id: t.customdata[i], front: t.name === 'front',
    x: box.left + fl._size.l + fl.xaxis.l2p(x), y: box.top + fl._size.t + fl.yaxis.l2p(t.y[i])})));
  return screen;
}"""


def test_the_page_shows_the_front_and_a_click_shows_the_recipe(page, server, store):
    s = Store(store, readonly=True)
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert page.locator("#jobs tbody tr").first.inner_text().startswith("toy")
    assert page.locator("#job-name").inner_text() == "toy"

    traces = page.evaluate("() => document.getElementById('front-plot').data.map(t => [t.name, t.x.length])")
    assert dict(traces)["front"] == len(s.front("toy"))
    assert dict(traces)["dominated"] == s.counts("toy")["done"] - len(s.front("toy"))

    # a real click on the front point farthest from every other point (so the click cannot land on a neighbour)
    points = page.evaluate(FRONT_POINTS)
    def room(p):
        return min(((p["x"] - q["x"]) ** 2 + (p["y"] - q["y"]) ** 2 for q in points if q is not p), default=1e9)
    target = max((p for p in points if p["front"]), key=room)
    page.mouse.move(target["x"], target["y"])
    page.wait_for_timeout(150)
    page.mouse.click(target["x"], target["y"])
    page.wait_for_function("id => document.getElementById('cand-id').textContent === '#' + id", arg=target["id"],
                           timeout=10_000)
    assert page.locator("#recipe").inner_text().strip() == s.candidate("toy", target["id"]).recipe.strip()
    assert page.locator("#export").inner_text().startswith(f"evomerge export {store} --job toy --candidate {target['id']}")
    assert page.evaluate("() => document.querySelector('#heatmaps .plot').data[0].type") == "heatmap"
    assert "fit (maximise)" in page.locator("#scores").inner_text()
    assert not page.problems, page.problems

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


class GatedScorer(toy.ToyScorer):
    """The toy scorer, held after the first generation until the test opens the gate: the page is sure to see the
    job running, and then to follow it to its end."""

    gate = threading.Event()
    calls = 0

    def evaluate(self, recipe):
        GatedScorer.calls += 1
        if GatedScorer.calls > 6:
            GatedScorer.gate.wait(60)
        return super().evaluate(recipe)


def gated(spec, split=None):
    return GatedScorer(dict(spec.runtime.scorer_options), split)


def test_the_page_follows_a_running_job(page, tmp_path):
    """A search writes while the page watches: the front grows and the job turns from running to done, with no
    reload (the page polls while a job runs)."""
    GatedScorer.calls = 0
    GatedScorer.gate.clear()
    spec = write_job(tmp_path, name="live", runtime={"scorer": f"{__name__}:gated"})
    search = threading.Thread(target=run_job, args=(spec,), kwargs=quiet(), daemon=True)
    search.start()
    store = tmp_path / "out" / "store.sqlite"

    def front_size() -> int | None:
        try:
            reader = Store(store, readonly=True)
        except StoreError:
            return None  # not created yet
        try:
            job = reader.job("live")
            return None if job is None or reader.last_checkpoint("live") is None else len(reader.front("live"))
        finally:
            reader.close()

    deadline = time.monotonic() + 30
    while front_size() is None and time.monotonic() < deadline:  # generation 0 scored, the rest held
        time.sleep(0.05)
    srv, _ = start(store)
    try:
        page.goto(srv.url)
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert page.locator("#job-state").inner_text() == "running"
        shown = page.evaluate("() => document.getElementById('front-plot').data.find(t => t.name === 'front').x.length")
        assert shown == front_size()
        GatedScorer.gate.set()
        page.wait_for_function("() => document.getElementById('job-state').textContent === 'done'", timeout=60_000)
        search.join(30)
        s = Store(store, readonly=True)
        assert s.job("live")["status"] == "done" and s.counts("live")["done"] > 6
        page.wait_for_function("n => document.getElementById('front-plot').data.find(t => t.name === 'front')"
                               ".x.length === n", arg=len(s.front("live")), timeout=10_000)
        assert "24/24" in page.locator("#jobs tbody tr").first.inner_text()
        assert not page.problems, page.problems
    finally:
        GatedScorer.gate.set()
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- IRT-reduced fitness

@pytest.fixture(scope="module")
def irt_store(tmp_path_factory) -> Path:
    """A real IRT search (test_irt's quiz task: 200 items, 20 anchors, a second objective measured in full)."""

    return run_job(quiz_job(tmp_path_factory.mktemp("irt")), **quiet()).store


def test_the_api_says_which_values_are_estimated_with_sd_estimator_and_items(irt_store):
    """Each estimated value comes with its sd, estimator and the anchor items scored; measured values (the other
    objective, candidates scored in full while IRT was on) do not."""
    s = Store(irt_store, readonly=True)
    ests = {(e["candidate"], e["objective"]): e for e in s.estimates("quiz")}
    rows = {r.id: r for r in s.candidates("quiz")}
    estimated = [c for c, r in rows.items() if r.estimated]
    checked = [c for c, r in rows.items() if not r.estimated and (c, "quiz") in ests]  # scored in full, IRT on
    assert estimated and checked
    srv, _ = start(irt_store)
    try:
        d = api(srv, "job?name=quiz")
        points = {p["id"]: p for p in d["points"]}
        for c in estimated:
            e = ests[(c, "quiz")]
            assert points[c]["estimates"] == {"quiz": {"sd": e["sd"], "estimator": e["estimator"], "scored": 20,
                                                       "total": 200}}
            assert points[c]["values"]["quiz"] == e["value"]
        assert all(points[c]["estimates"] == {} for c in checked)
        assert any(p["front"] and p["estimates"] for p in d["points"])  # the plot has estimated front points to mark
        cands = {c["id"]: c for c in api(srv, "candidates?job=quiz&limit=500")["rows"]}
        assert all(cands[c]["estimates"].keys() == {"quiz"} for c in estimated if c in cands)

        c = estimated[-1]
        detail = api(srv, f"candidate?job=quiz&id={c}")
        quiz, size = detail["scores"]
        assert quiz["objective"] == "quiz" and quiz["estimated"] and not size["estimated"]
        assert quiz["estimate"]["sd"] == ests[(c, "quiz")]["sd"] > 0 and quiz["estimate"]["measured"] is None
        anchors = sorted(s.items("quiz", c)["quiz"])
        assert quiz["scored_items"] == anchors and len(anchors) == 20 and quiz["items"] == 20
        calibration = s.irt("quiz", "quiz", ests[(c, "quiz")]["fit_generation"])[0]
        ids = calibration["item_ids"]
        assert anchors == sorted(ids[i] for i in calibration["calibration"]["anchors"]["items"])  # the fit's anchors
        assert size["estimate"] is None and size["scored_items"] is None

        m = api(srv, f"candidate?job=quiz&id={checked[-1]}")["scores"][0]
        assert not m["estimated"] and m["items"] == 200 and m["scored_items"] is None
        assert m["estimate"]["measured"] == m["fitness"]  # what IRT would have said, beside the measured value
    finally:
        srv.shutdown()
        srv.server_close()
        s.close()


def test_the_front_plot_marks_estimated_points(page, irt_store):
    s = Store(irt_store, readonly=True)
    estimated = {r.id for r in s.candidates("quiz") if r.estimated}
    srv, _ = start(irt_store)
    try:
        page.goto(srv.url)
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        traces = page.evaluate("() => document.getElementById('front-plot').data.map(t => "
                               "({name: t.name, ids: t.customdata, outline: (t.marker.line || {}).color}))")
        by_name = {t["name"]: t for t in traces}
        assert "estimated (IRT)" in by_name  # the legend says what the outline means
        for name in ("front", "dominated"):
            t = by_name[name]
            marked = {i for i, c in zip(t["ids"], t["outline"]) if c == "#e36209"}
            assert marked == estimated & set(t["ids"]), name
        assert estimated & set(by_name["front"]["ids"])
        assert page.problems == []
    finally:
        srv.shutdown()
        srv.server_close()
        s.close()


def test_the_incremental_front_and_the_sweep_match_the_definitions():
    """The job view's progress builds the front one point at a time (add_to_front) and measures it by a sorted sweep:
    both equal the brute-force definitions on random integer losses (ties and duplicates included)."""
    import itertools

    import numpy as np

    from evomerge.search.front import add_to_front, hypervolume, pareto_mask

    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(2, 4))
        F = rng.integers(0, 5, size=(int(rng.integers(1, 25)), k)).astype(float)
        front = np.empty((0, k))
        for row in F:
            front = add_to_front(front, row)
        want = F[pareto_mask(F)]
        assert sorted(map(tuple, front)) == sorted(map(tuple, want))
        if k == 2:  # the area under the staircase, counted cell by cell
            ref = np.array([5.0, 5.0])
            cells = sum(1 for x, y in itertools.product(range(5), range(5))
                        if any(p[0] <= x and p[1] <= y for p in F))
            assert hypervolume(F, ref) == cells


# ---------------------------------------------------------------- big stores: pages, filters, deltas, compare

@pytest.fixture(scope="module")
def pair_store(tmp_path_factory) -> Path:
    """Two real toy searches in one store (`toy`, and `other` with another seed): the compare view's input."""
    folder = tmp_path_factory.mktemp("pair")
    run_job(write_job(folder, runtime=TOY), **quiet())
    return run_job(write_job(folder, name="other", runtime=TOY, driver={"seed": 7}), **quiet()).store


@pytest.fixture(scope="module")
def pair_server(pair_store):
    srv, _ = start(pair_store)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_candidates_are_paged_sorted_and_filtered_as_the_store_says(pair_server, pair_store):
    s = Store(pair_store, readonly=True)
    rows = s.candidates("toy")
    page = api(pair_server, "candidates?job=toy&limit=7")
    assert page["total"] == page["matched"] == len(rows) and page["statuses"] == s.counts("toy")
    ids = []
    for offset in range(0, len(rows), 7):  # the pages, end to end: every id once, newest first
        ids += [c["id"] for c in api(pair_server, f"candidates?job=toy&limit=7&offset={offset}")["rows"]]
    assert ids == sorted((r.id for r in rows), reverse=True)

    with_fit = [r for r in rows if r.values]
    want = [r.id for r in sorted(sorted(with_fit, key=lambda r: r.id), key=lambda r: -r.values["fit"])]
    want += [r.id for r in rows if not r.values]  # no value: last, either way
    assert [c["id"] for c in api(pair_server, "candidates?job=toy&sort=-fit&limit=500")["rows"]] == want
    assert [c["id"] for c in api(pair_server, "candidates?job=toy&sort=size&limit=500")["rows"]][:len(with_fit)] == \
        [r.id for r in sorted(sorted(with_fit, key=lambda r: r.id), key=lambda r: r.values["size"])]

    lo = sorted(r.values["fit"] for r in with_fit)[len(with_fit) // 3]
    got = api(pair_server, f"candidates?job=toy&status=done,cached&gen_min=1&gen_max=2&min.fit={lo}&sort=id&limit=500")
    want = [r.id for r in rows if r.status in ("done", "cached") and 1 <= r.generation <= 2 and r.values["fit"] >= lo]
    assert want and [c["id"] for c in got["rows"]] == want and got["matched"] == len(want)
    parent = api(pair_server, "candidates?job=toy&origin=parent:a")["rows"]
    assert [c["id"] for c in parent] == [r.id for r in rows if r.origin == "parent:a"]
    assert {c["id"]: c["front"] for c in api(pair_server, "candidates?job=toy&limit=500")["rows"]} == \
        {r.id: r.id in s.front("toy") for r in rows}

    for bad, says in (("sort=nope", "sort by one of"), ("status=bogus", "give statuses"), ("limit=0", "limit="),
                      ("limit=501", "limit="), ("min.nope=1", "no objective named"), ("min.fit=abc", "give a number"),
                      ("gen_min=-1", "gen_min="), ("min.fit=nan", "finite")):
        status, _, body = request(pair_server, f"/api/candidates?job=toy&{bad}")
        assert status == 400 and says in json.loads(body)["error"], bad
    assert request(pair_server, "/api/candidates?job=nope")[0] == 404


def test_since_sends_only_what_changed_and_progress_carries_forward(pair_store, tmp_path):
    """A copy of the store, written through the Store API while one cache reads it: the answer `since` the last
    cursor holds exactly the rows finished meanwhile, and the carried-forward progress equals the definition."""
    import shutil

    from evomerge.dashboard.cache import Cache
    from evomerge.dashboard.data import job_detail, objectives, progress
    from evomerge.store import CandidateRow

    path = tmp_path / "copy.sqlite"
    shutil.copyfile(pair_store, path)
    cache = Cache(str(path))
    reader = Store(path, readonly=True)
    full = job_detail(reader, "toy", cache)
    objs = objectives(reader, "toy")
    assert full["full"] and [json.loads(p)["id"] for p in full["points"]] == \
        [r.id for r in reader.candidates("toy", status="done")]
    assert full["progress"] == progress(reader.candidates("toy"), objs)
    again = job_detail(reader, "toy", cache, since=full["cursor"])
    assert not again["full"] and list(again["points"]) == [] and again["drop"] == [] and again["cursor"] == full["cursor"]

    writer = Store(path)
    template = writer.candidate("toy", full["front"][0])
    n = max(r.id for r in writer.candidates("toy")) + 1
    new = [CandidateRow(id=n + i, generation=99, idx=i, genome=template.genome, recipe=template.recipe,
                        recipe_hash=template.recipe_hash, origin="driver", status="pending") for i in range(3)]
    writer.add_candidates("toy", new)
    writer.finish("toy", n, "done", values={"fit": 2.0, "size": 0.1}, losses=[-2.0, 0.1])  # dominates everything
    writer.finish("toy", n + 2, "failed", reason="toy: broke")
    writer.set_front("toy", [n])
    delta = job_detail(reader, "toy", cache, since=full["cursor"])
    changed = [json.loads(p) for p in delta["points"]]
    old_front = set(full["front"])
    assert not delta["full"] and delta["front"] == [n]
    assert [p["id"] for p in changed] == sorted({n} | old_front)  # the new point, and the ones that left the front
    assert [p["front"] for p in changed if p["id"] != n] == [False] * len(old_front)
    assert changed[-1]["values"] == {"fit": 2.0, "size": 0.1} and delta["drop"] == [n + 2]  # failed: no point
    assert delta["progress"] == progress(reader.candidates("toy"), objs)  # n + 1 still pending: the tail
    writer.finish("toy", n + 1, "done", values={"fit": 0.0, "size": 0.9}, losses=[0.0, 0.9])
    later = job_detail(reader, "toy", cache, since=delta["cursor"])
    assert [json.loads(p)["id"] for p in later["points"]] == [n + 1]
    assert later["progress"] == progress(reader.candidates("toy"), objs)
    page = api_page = None  # the table sees the same rows
    from evomerge.dashboard.data import candidates_page
    api_page = candidates_page(reader, "toy", {"status": ["failed"], "gen_min": ["99"]}, cache)
    assert [c["id"] for c in api_page["rows"]] == [n + 2] and page is None
    assert job_detail(reader, "toy", cache, since="not-a-cursor")["full"]  # another server's cursor: everything
    writer.close()
    reader.close()


def test_two_candidates_recipes_are_compared_and_two_fronts_drawn(pair_server, pair_store):
    import yaml

    s = Store(pair_store, readonly=True)
    a, b = s.front("toy")[0], s.front("other")[-1]
    d = api(pair_server, f"diff?a=toy:{a}&b=other:{b}")
    ra, rb = s.candidate("toy", a).recipe, s.candidate("other", b).recipe
    assert [x["a"] for x in d["lines"] if x["a"] is not None] == ra.splitlines()  # both sides whole, in order
    assert [x["b"] for x in d["lines"] if x["b"] is not None] == rb.splitlines()
    assert {x["tag"] for x in d["lines"]} >= {"equal", "replace"}
    ya, yb = yaml.safe_load(ra), yaml.safe_load(rb)
    changes = {c["path"]: (c["a"], c["b"]) for c in d["changes"]}
    assert changes["models[0].parameters.weight"] == (ya["models"][0]["parameters"]["weight"],
                                                      yb["models"][0]["parameters"]["weight"])
    assert all(v[0] != v[1] for v in changes.values()) and "merge_method" not in changes
    assert api(pair_server, f"diff?a=toy:{a}&b=toy:{a}")["same"]
    for bad in ("a=toy&b=toy:1", "a=toy:x&b=toy:1", "a=toy:%C2%B2&b=toy:1", "a=:1&b=toy:1"):
        assert request(pair_server, f"/api/diff?{bad}")[0] == 400, bad
    assert request(pair_server, "/api/diff?a=toy:9999&b=toy:1")[0] == 404

    f = api(pair_server, "fronts?job=toy&job=other")
    assert f["shared_objectives"] == ["fit", "size"]
    assert [[p["id"] for p in j["front"]] for j in f["jobs"]] == [s.front("toy"), s.front("other")]
    assert request(pair_server, "/api/fronts")[0] == 400 and request(pair_server, "/api/fronts?job=nope")[0] == 404


def boxes(page, *selectors):
    return [page.locator(sel).first.bounding_box() for sel in selectors]


def overlap(a, b) -> bool:
    return a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"] and \
        a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"]


@pytest.mark.parametrize("width", [1600, 800])
def test_the_layout_uses_the_screen_and_titles_stay_clear_of_the_toolbars(browser, pair_server, width, tmp_path):
    page = browser.new_page(viewport={"width": width, "height": 1000})
    try:
        page.goto(pair_server.url)
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        page.locator("#front-table tbody tr").first.click()
        page.wait_for_selector("#candidate:not([hidden])")
        page.wait_for_function("() => document.querySelectorAll('#progress-plots .plot .main-svg').length > 0")
        front, progress, job, cand = boxes(page, "#front-box", "#progress-box", "#job-view", "#candidate")
        if width == 1600:  # front | progress, and the candidate panel beside the job
            assert front["x"] + front["width"] <= progress["x"] + 1 and abs(front["y"] - progress["y"]) < 5
            assert cand["x"] >= job["x"] + job["width"] - 1 and cand["y"] < front["y"] + front["height"]
        else:  # stacked: progress under the front, the candidate under the job
            assert progress["y"] >= front["y"] + front["height"] - 1 and abs(front["x"] - progress["x"]) < 5
            assert cand["y"] >= job["y"] + job["height"] - 1
        assert front["width"] > 300 and progress["width"] > 300
        titles = page.locator(".plot-title")
        bars = page.locator(".modebar")
        assert bars.count() >= 2 and titles.count() >= 3
        for i in range(titles.count()):
            t = titles.nth(i).bounding_box()
            for j in range(bars.count()):
                m = bars.nth(j).bounding_box()
                assert t is None or m is None or not overlap(t, m), (titles.nth(i).inner_text(), j)
        legend = page.locator("#front-plot .legend").bounding_box()
        assert not overlap(legend, page.locator("#front-plot .modebar").bounding_box())
        for folder in (tmp_path, ARTIFACTS):
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(folder / f"dashboard-{width}.png"), full_page=True)
        assert (tmp_path / f"dashboard-{width}.png").stat().st_size > 10_000
    finally:
        page.close()


def table_ids(page) -> list[int]:
    return page.evaluate("() => [...document.querySelectorAll('#candidates tbody tr')].map(r => Number(r.dataset.id))")


def test_the_table_sorts_and_filters_on_the_server(page, pair_server, pair_store):
    s = Store(pair_store, readonly=True)
    rows = s.candidates("toy")
    page.goto(pair_server.url + "#job=toy")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert table_ids(page) == sorted((r.id for r in rows), reverse=True)
    page.locator("#candidates th button[data-sort='fit']").click()  # first click: ascending
    with_fit = sorted(sorted((r for r in rows if r.values), key=lambda r: r.id), key=lambda r: r.values["fit"])
    page.wait_for_function("ids => [...document.querySelectorAll('#candidates tbody tr')].slice(0, ids.length)"
                           ".map(r => Number(r.dataset.id)).join() === ids.join()", arg=[r.id for r in with_fit])
    page.locator("#candidates th button[data-sort='fit']").click()  # again: descending
    want = [r.id for r in sorted(sorted((r for r in rows if r.values), key=lambda r: r.id), key=lambda r: -r.values["fit"])]
    page.wait_for_function("id => Number(document.querySelector('#candidates tbody tr').dataset.id) === id", arg=want[0])
    assert table_ids(page)[:len(want)] == want
    page.select_option("#f-status", "failed")
    failed = [r.id for r in rows if r.status == "failed"]
    page.wait_for_function("n => document.querySelectorAll('#candidates tbody tr').length === n", arg=len(failed))
    assert sorted(table_ids(page)) == failed and f"of {len(failed)} (filtered from {len(rows)})" in \
        page.locator("#page-note").inner_text()
    page.select_option("#f-status", "")
    page.fill("#f-gen-min", "2")
    page.dispatch_event("#f-gen-min", "change")
    page.fill("#f-min-size", "0.5")
    page.dispatch_event("#f-min-size", "change")
    want = [r.id for r in sorted(sorted((r for r in rows if r.values and r.generation >= 2 and r.values["size"] >= 0.5),
                                        key=lambda r: r.id), key=lambda r: -r.values["fit"])]
    page.wait_for_function("ids => [...document.querySelectorAll('#candidates tbody tr')].map(r => Number(r.dataset.id))"
                           ".join() === ids.join()", arg=want)
    assert want and not page.problems, page.problems


def test_keyboard_reaches_rows_and_points_and_the_compare_view_works(page, pair_server, pair_store):
    s = Store(pair_store, readonly=True)
    page.goto(pair_server.url + "#job=toy")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    for _ in range(300):  # Tab, as a keyboard user does, until a row of the candidates table has the focus
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.closest('#candidates tbody') !== null"):
            break
    focused = page.evaluate("() => Number(document.activeElement.dataset.id)")
    page.keyboard.press("Enter")
    page.wait_for_function("id => document.getElementById('cand-id').textContent === '#' + id", arg=focused)

    page.focus("#front-plot")  # the front's points: arrows step through them (best fit first), Enter opens one
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    front = sorted(s.front("toy"), key=lambda i: (-s.candidate("toy", i).values["fit"], i))
    assert page.locator("#front-focus").get_attribute("data-id") == str(front[1])
    page.keyboard.press("Enter")
    page.wait_for_function("id => document.getElementById('cand-id').textContent === '#' + id", arg=front[1])

    page.click("#pin")  # pin this one, open another: the recipes side by side, differences marked
    assert f"pinned: toy #{front[1]}" in page.locator("#pin-note").inner_text()
    page.locator(f"#front-table tbody tr[data-id='{front[0]}']").click()
    page.wait_for_selector("#diff-section:not([hidden])")
    d = api(pair_server, f"diff?a=toy:{front[1]}&b=toy:{front[0]}")
    assert page.locator("#diff tbody tr").count() == len(d["lines"])
    assert page.locator("#diff tbody tr.replace").count() == sum(x["tag"] == "replace" for x in d["lines"]) > 0
    assert page.locator("#diff-changes li").count() == len(d["changes"])

    page.select_option("#compare-job", "other")  # two jobs' fronts on one plot
    page.wait_for_selector("#compare-plot:not([hidden]) .main-svg")
    traces = page.evaluate("() => document.getElementById('compare-plot').data.map(t => t.customdata)")
    assert traces == [[f"toy:{i}" for i in sorted(s.front("toy"), key=lambda i: (s.candidate("toy", i).values["fit"]))],
                      [f"other:{i}" for i in sorted(s.front("other"), key=lambda i: s.candidate("other", i).values["fit"])]]
    assert not page.problems, page.problems


def test_a_stalled_client_is_let_go_and_others_are_served_meanwhile(server, monkeypatch):
    """Clients that open a connection and send nothing (or half a request) hold a thread each only until the
    handler's timeout; the server answers others all along."""
    import socket
    import time

    from evomerge.dashboard.server import Handler

    monkeypatch.setattr(Handler, "timeout", 1)
    host, port = server.server_address[:2]
    stalled = [socket.create_connection((host, port), timeout=10) for _ in range(20)]
    stalled[0].sendall(b"GET /api/jobs HTTP/1.1\r\nHost: 127.0.0.1")  # half a request, never finished
    assert request(server, "/api/jobs")[0] == 200  # served while 20 clients stall
    start = time.monotonic()
    for s in stalled:
        while s.recv(1024):  # whatever the server says (nothing, or an error page), then EOF: it let go
            pass  # without the handler's timeout this blocks until the socket's own 10 s timeout raises
        s.close()
    assert time.monotonic() - start < 8
