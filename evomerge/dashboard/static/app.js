// evomerge dashboard: reads the server's JSON API and draws it with Plotly (served locally, no CDN).
// Text from the store only ever goes into the page through textContent, never as HTML.
"use strict";

const POLL_MS = 2000, IDLE_TICKS = 5;
const FRONT = "#1f6feb", DOMINATED = "#c4c8cd", PARENT = "#d1242f", SELECTED = "#111", ESTIMATED = "#e36209";
const PALETTE = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#6e7781"];
const PLOT_CONFIG = { displaylogo: false, responsive: true };

const state = { jobs: [], job: null, detail: null, candidate: null, signature: null, points: new Map(), cursor: null,
                table: { sort: "-id", offset: 0, limit: 100, status: "", origin: "", gen_min: "", gen_max: "", ranges: {} },
                page: null, pinned: null, compareJob: "", focus: -1 };

// ------------------------------------------------------------------ helpers

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  return String(v);
}

function ago(t) {
  if (!t) return "–";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return new Date(t * 1000).toLocaleString();
}

async function api(path) {
  const r = await fetch("/api/" + path, { credentials: "same-origin", cache: "no-store" });
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function showError(e) {
  const box = $("error");
  box.hidden = !e;
  box.textContent = e ? String(e.message || e) : "";
}

function fillTable(table, head, rows) {
  const thead = table.querySelector("thead"), tbody = table.querySelector("tbody");
  thead.replaceChildren();
  const tr = el("tr");
  head.forEach(h => tr.appendChild(el("th", h)));
  thead.appendChild(tr);
  tbody.replaceChildren(...rows);
}

function row(cells, cls) {
  const tr = el("tr", null, cls);
  cells.forEach(c => tr.appendChild(c instanceof Node ? wrap(c) : el("td", c)));
  return tr;
}

// A row that opens something: reachable with Tab, opened with Enter (or Space) as with a click.
function actionRow(tr, action) {
  tr.tabIndex = 0;
  tr.addEventListener("click", action);
  tr.addEventListener("keydown", ev => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); action(); }
  });
  return tr;
}

function wrap(node) { const td = el("td"); td.appendChild(node); return td; }

function setHash() {
  const p = new URLSearchParams();
  if (state.job) p.set("job", state.job);
  if (state.candidate !== null) p.set("candidate", state.candidate);
  history.replaceState(null, "", "#" + p.toString());
}

function candidateLink(id) {
  const a = el("a", `#${id}`);
  a.addEventListener("click", () => selectCandidate(id));
  return a;
}

// ------------------------------------------------------------------ jobs

function renderJobs(payload) {
  $("store").textContent = `store: ${payload.store}`;
  state.jobs = payload.jobs;
  const rows = payload.jobs.map(j => {
    const bar = el("span", null, "bar"), fill = el("span");
    fill.style.width = `${Math.round(100 * (j.progress || 0))}%`;
    bar.appendChild(fill);
    const prog = el("span");
    prog.append(bar, ` ${j.finished}${j.budget.evaluations ? "/" + j.budget.evaluations : ""}`);
    const counts = Object.entries(j.counts).map(([k, v]) => `${v} ${k}`).join(", ") || "none";
    const budget = [j.budget.evaluations ? `${j.budget.evaluations} evaluations` : null,
                    j.budget.seconds ? `${j.budget.seconds} s` : null].filter(Boolean).join(" or ");
    const st = el("span", j.status, "badge " + j.status);
    if (j.reason) st.title = j.reason;
    const tr = row([j.name, st, prog, `${counts}; front ${j.front_size}; generation ${j.generations}`, budget || "–",
                    `${j.algorithm} (population ${j.population})`, j.search_space, ago(j.updated)],
                   j.name === state.job ? "selected" : "");
    tr.dataset.job = j.name;
    return actionRow(tr, () => selectJob(j.name));
  });
  fillTable($("jobs"), ["job", "state", "progress", "candidates", "budget", "driver", "space", "updated"], rows);
  $("live").hidden = !payload.jobs.some(j => j.status === "running");
  const sel = $("compare-job"), keep = state.compareJob;
  sel.replaceChildren(el("option", "none"), ...payload.jobs.filter(j => j.name !== state.job).map(j => {
    const o = el("option", j.name); o.value = j.name; return o;
  }));
  sel.firstChild.value = "";
  sel.value = payload.jobs.some(j => j.name === keep && keep !== state.job) ? keep : "";
  state.compareJob = sel.value;
}

async function loadJobs() { renderJobs(await api("jobs")); }

// ------------------------------------------------------------------ one job

// The job view's points: the full answer replaces them; an answer `since` the last cursor is merged in.
function mergeJob(d) {
  if (d.full) state.points = new Map();
  (d.drop || []).forEach(id => state.points.delete(id));
  d.points.forEach(p => state.points.set(p.id, p));
  state.cursor = d.cursor;
  d.points = Array.from(state.points.values()).sort((a, b) => a.id - b.id);
  return d;
}

async function fetchJob(incremental) {
  const since = incremental && state.cursor ? "&since=" + encodeURIComponent(state.cursor) : "";
  return mergeJob(await api("job?name=" + encodeURIComponent(state.job) + since));
}

async function selectJob(name) {
  if (state.job !== name) {
    state.candidate = null;
    state.cursor = null;
    state.focus = -1;
    state.table = { sort: "-id", offset: 0, limit: 100, status: "", origin: "", gen_min: "", gen_max: "", ranges: {} };
    document.querySelectorAll("#filters input").forEach(i => { i.value = ""; });
  }
  state.job = name;
  setHash();
  try {
    renderJob(await fetchJob(false));
    await loadCandidates();
    await renderCompare();
    document.querySelectorAll("#jobs tbody tr").forEach(tr => tr.classList.toggle("selected", tr.dataset.job === name));
    if (state.candidate === null) $("candidate").hidden = true;
    showError(null);
  } catch (e) { showError(e); }
}

function axisTitle(o) { return `${o.name} ${o.direction === "maximise" ? "↑ (maximise)" : "↓ (minimise)"}`; }

// An objective's value as text: "~0.612 ±0.021" where it is an IRT estimate (sd: one standard deviation).
function valueText(p, name) {
  const e = (p.estimates || {})[name];
  if (!e) return fmt((p.values || {})[name]);
  return `~${fmt((p.values || {})[name])}` + (e.sd !== null && e.sd !== undefined ? ` ±${fmt(e.sd)}` : "");
}

function isEstimated(p) { return Object.keys(p.estimates || {}).length > 0; }

function hoverText(p, d) {
  const vals = d.objectives.map(o => `${o.name} ${valueText(p, o.name)}`).join(", ");
  const est = Object.entries(p.estimates || {}).map(([n, e]) =>
    `${n} estimated` + (e.estimator ? ` (${e.estimator}, ${e.scored}/${e.total} items)` : "")).join(", ");
  return `#${p.id} (generation ${p.generation}, ${p.origin})<br>${p.summary}<br>${vals}` + (est ? `<br>${est}` : "");
}

function renderJob(d) {
  state.detail = d;
  $("job").hidden = false;
  $("job-name").textContent = d.summary.name;
  const st = $("job-state");
  st.textContent = d.summary.status;
  st.className = "badge " + d.summary.status;
  $("job-line").textContent = (d.summary.reason ? d.summary.reason + " " : "") +
    `${d.points.length} evaluated candidates, front of ${d.front.length}; report split: ${d.split}`;
  renderFront(d);
  renderProgress(d);
  renderFrontTable(d);
}

function frontTraces(d) {
  const objs = d.objectives, sel = state.candidate;
  const groups = { dominated: d.points.filter(p => !p.front), front: d.points.filter(p => p.front) };
  const parents = d.points.filter(p => p.parent);
  const selected = d.points.filter(p => p.id === sel);
  const coords = pts => {
    if (objs.length === 1) return { x: pts.map(p => p.id), y: pts.map(p => p.values[objs[0].name]) };
    const c = { x: pts.map(p => p.values[objs[0].name]), y: pts.map(p => p.values[objs[1].name]) };
    if (objs.length === 3) c.z = pts.map(p => p.values[objs[2].name]);
    return c;
  };
  const type = objs.length === 3 ? "scatter3d" : "scatter";
  const size = objs.length === 3 ? 4 : 9;
  const base = (pts, name, marker, extra) => Object.assign({
    type, mode: "markers", name, ...coords(pts), customdata: pts.map(p => p.id),
    hovertext: pts.map(p => hoverText(p, d)), hoverinfo: "text", marker,
  }, extra || {});
  // estimated points (an IRT estimate on some objective): an orange outline; 3-D markers take one outline width
  const outline = (pts, colour, width) => ({
    color: pts.map(p => isEstimated(p) ? ESTIMATED : colour),
    width: type === "scatter3d" ? width : pts.map(p => isEstimated(p) ? 2.5 : width),
  });
  const anyEstimated = d.points.some(isEstimated);
  const legend = anyEstimated ? [{ type, mode: "markers", name: "estimated (IRT)", x: [null], y: [null],
    ...(type === "scatter3d" ? { z: [null] } : {}), hoverinfo: "skip",
    marker: { color: "#fff", size, line: { color: ESTIMATED, width: 2.5 } } }] : [];
  return [
    base(groups.dominated, "dominated", { color: DOMINATED, size: size - 2, line: outline(groups.dominated, DOMINATED, 0) }),
    base(groups.front, "front", { color: FRONT, size, line: outline(groups.front, "#0b3d91", 1) }),
    // open symbols draw their outline in marker.color
    base(parents, "parents", { color: PARENT, size: size + 8, symbol: "diamond-open", line: { width: 2 } },
         { hoverinfo: "skip" }),
    base(selected, "selected", { color: SELECTED, size: size + 10, symbol: "circle-open", line: { width: 2 } },
         { hoverinfo: "skip", showlegend: false }),
    ...legend,
  ];
}

function parallelTraces(d) {
  const objs = d.objectives;
  const span = objs.map(o => {
    const v = d.points.map(p => p.values[o.name]).filter(x => x !== null);
    return [Math.min(...v), Math.max(...v)];
  });
  const scaled = (p, j) => {
    const [lo, hi] = span[j], v = p.values[objs[j].name];
    if (v === null) return null;
    const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
    return objs[j].direction === "maximise" ? t : 1 - t;
  };
  const lines = (pts, name, colour, width) => {
    const t = { type: "scatter", mode: "lines+markers", name, x: [], y: [], customdata: [], hovertext: [],
                hoverinfo: "text", line: { color: colour, width }, marker: { color: colour, size: width + 3 } };
    pts.forEach(p => {
      objs.forEach((o, j) => { t.x.push(j); t.y.push(scaled(p, j)); t.customdata.push(p.id); t.hovertext.push(hoverText(p, d)); });
      t.x.push(null); t.y.push(null); t.customdata.push(null); t.hovertext.push("");
    });
    return t;
  };
  return [lines(d.points.filter(p => !p.front), "dominated", DOMINATED, 1),
          lines(d.points.filter(p => p.front), "front", FRONT, 2),
          lines(d.points.filter(p => p.id === state.candidate), "selected", SELECTED, 3)];
}

function renderFront(d) {
  const gd = $("front-plot"), objs = d.objectives;
  $("front-empty").hidden = objs.length > 0;
  gd.hidden = !objs.length;
  if (!objs.length) {
    Plotly.purge(gd);
    $("front-legend").textContent = "";
    return;
  }
  // no Plotly title, and the legend under the axis: Plotly's toolbar (top right) covers neither
  let traces, layout = { margin: { l: 60, r: 20, t: 30, b: 90 }, hovermode: "closest", uirevision: d.summary.name,
                         legend: { orientation: "h", y: -0.22, yanchor: "top" } };
  if (objs.length <= 3) {
    traces = frontTraces(d);
    if (objs.length === 1) {
      layout.xaxis = { title: { text: "candidate" } };
      layout.yaxis = { title: { text: axisTitle(objs[0]) } };
    } else if (objs.length === 2) {
      layout.xaxis = { title: { text: axisTitle(objs[0]) } };
      layout.yaxis = { title: { text: axisTitle(objs[1]) } };
    } else {
      layout.scene = { xaxis: { title: { text: axisTitle(objs[0]) } }, yaxis: { title: { text: axisTitle(objs[1]) } },
                       zaxis: { title: { text: axisTitle(objs[2]) } } };
    }
  } else {  // more objectives: parallel coordinates (drawn as SVG lines, so no WebGL is needed and points click)
    traces = parallelTraces(d);
    layout.xaxis = { tickvals: objs.map((o, i) => i), ticktext: objs.map(axisTitle), zeroline: false };
    layout.yaxis = { title: { text: "scaled per objective (up is better)" }, range: [-0.05, 1.05], zeroline: false };
  }
  Plotly.react(gd, traces, layout, PLOT_CONFIG);
  if (!gd.dataset.bound) {
    gd.on("plotly_click", ev => {
      const p = ev.points && ev.points.find(q => q.customdata !== undefined && q.customdata !== null);
      if (p) selectCandidate(p.customdata);
    });
    gd.addEventListener("keydown", ev => frontKey(ev));
    gd.dataset.bound = "1";
  }
  $("front-legend").textContent = objs.length > 3
    ? "Parallel coordinates, one line per candidate: blue the Pareto front, grey dominated. Click a line for its recipe."
    : "Blue: the Pareto front; grey: dominated candidates; red diamonds: the parent models. Click a point for its recipe.";
}

// The front's points in keyboard order (by the first objective, best first).
function frontOrder(d) {
  const objs = d.objectives, pts = d.points.filter(p => p.front);
  if (objs.length) pts.sort((a, b) => (a.values[objs[0].name] - b.values[objs[0].name]) * (objs[0].direction === "maximise" ? -1 : 1) || a.id - b.id);
  return pts;
}

function frontKey(ev) {
  const d = state.detail;
  if (!d) return;
  const pts = frontOrder(d);
  if (!pts.length) return;
  if (ev.key === "ArrowRight" || ev.key === "ArrowDown") state.focus = (state.focus + 1) % pts.length;
  else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") state.focus = (state.focus - 1 + pts.length) % pts.length;
  else if (ev.key === "Home") state.focus = 0;
  else if (ev.key === "End") state.focus = pts.length - 1;
  else if ((ev.key === "Enter" || ev.key === " ") && state.focus >= 0) { ev.preventDefault(); selectCandidate(pts[state.focus].id); return; }
  else return;
  ev.preventDefault();
  const p = pts[Math.min(state.focus, pts.length - 1)];
  $("front-focus").textContent = `point ${state.focus + 1} of ${pts.length} on the front: #${p.id}, ` +
    d.objectives.map(o => `${o.name} ${valueText(p, o.name)}`).join(", ") + ". Enter opens it.";
  $("front-focus").dataset.id = p.id;
  if (d.objectives.length === 2 && window.Plotly && Plotly.Fx) {
    const t = $("front-plot").data.findIndex(tr => tr.name === "front");
    const i = $("front-plot").data[t].customdata.indexOf(p.id);
    if (i >= 0) Plotly.Fx.hover("front-plot", [{ curveNumber: t, pointNumber: i }]);
  }
}

function renderProgress(d) {
  const box = $("progress-plots"), pr = d.progress;
  const plots = [];
  if (d.objectives.length > 1) plots.push({ name: "hypervolume", y: pr.hypervolume, title: "hypervolume of the front (losses vs. the worst of generation 0)" });
  d.objectives.forEach(o => plots.push({ name: o.name, y: pr.best[o.name], title: `best ${o.name} so far (${o.direction})` }));
  while (box.children.length > plots.length) { Plotly.purge(box.lastChild.lastChild); box.lastChild.remove(); }
  plots.forEach((p, i) => {
    let fig = box.children[i];
    if (!fig) {  // a caption above each plot (not a Plotly title: the toolbar would sit on it)
      fig = el("div", null, "figure");
      const div = el("div", null, "plot"); div.style.height = "200px";
      fig.append(el("div", "", "plot-title"), div);
      box.appendChild(fig);
    }
    fig.firstChild.textContent = p.title;
    const div = fig.lastChild;
    div.dataset.series = p.name;
    Plotly.react(div, [{ type: "scatter", mode: "lines+markers", x: pr.evaluations, y: p.y, line: { shape: "hv" },
                         marker: { size: 4 }, name: p.name }],
                 { margin: { l: 60, r: 20, t: 30, b: 35 }, xaxis: { title: { text: "candidates" } } }, PLOT_CONFIG);
  });
}

function renderFrontTable(d) {
  const objs = d.objectives;
  const pts = frontOrder(d);
  const rows = pts.map(p => {
    const tr = row([`#${p.id}`, p.generation, p.summary, ...objs.map(o => valueText(p, o.name)),
                    ...objs.map(o => fmt((p[d.split] || {})[o.name]))], p.id === state.candidate ? "selected front" : "front");
    tr.dataset.id = p.id;
    return actionRow(tr, () => selectCandidate(p.id));
  });
  const parents = d.parents.map(p => {  // the parents beside the front, as the final report shows them
    const failed = p.status === "failed";
    const tr = row([`parent ${p.name}`, 0, p.candidate !== null ? `candidate #${p.candidate}` : "–",
                    ...objs.map(o => failed ? "failed" : fmt((p.fitness || {})[o.name])),
                    ...objs.map(o => p.reason ? "failed" : fmt((p[d.split] || {})[o.name]))], "parent");
    if (p.candidate !== null) actionRow(tr, () => selectCandidate(p.candidate));
    return tr;
  });
  fillTable($("front-table"), ["id", "gen", "recipe", ...objs.map(o => o.name), ...objs.map(o => `${o.name} (${d.split})`)],
            [...rows, ...parents]);
}

// ------------------------------------------------------------------ the candidates table (paged, sorted, filtered by the server)

function tableQuery() {
  const t = state.table, p = new URLSearchParams({ job: state.job, sort: t.sort, offset: t.offset, limit: t.limit });
  ["status", "origin", "gen_min", "gen_max"].forEach(k => { if (t[k] !== "") p.set(k, t[k]); });
  Object.entries(t.ranges).forEach(([k, v]) => { if (v !== "") p.set(k, v); });
  return "candidates?" + p.toString();
}

async function loadCandidates() {
  if (!state.job) return;
  renderCandidates(await api(tableQuery()));
}

function setOptions(select, counts, current) {
  const opts = [el("option", "any")];
  opts[0].value = "";
  Object.keys(counts).sort().forEach(k => { const o = el("option", `${k} (${counts[k]})`); o.value = k; opts.push(o); });
  select.replaceChildren(...opts);
  select.value = current;
}

function renderFilters(pg) {
  setOptions($("f-status"), pg.statuses, state.table.status);
  setOptions($("f-origin"), pg.origins, state.table.origin);
  const box = $("f-ranges");
  if (box.dataset.job !== state.job) {  // one min/max pair per objective
    box.replaceChildren(...pg.objectives.map(o => {
      const lab = el("label", `${o.name} `);
      ["min", "max"].forEach(b => {
        const inp = el("input"); inp.type = "number"; inp.step = "any"; inp.placeholder = b;
        inp.id = `f-${b}-${o.name}`; inp.dataset.key = `${b}.${o.name}`;
        inp.addEventListener("change", () => { state.table.ranges[inp.dataset.key] = inp.value; state.table.offset = 0; loadCandidates().catch(showError); });
        lab.append(inp, b === "min" ? " – " : "");
      });
      return lab;
    }));
    box.dataset.job = state.job;
  }
}

function sortHeader(label, key) {
  const t = state.table, b = el("button", label);
  b.type = "button";
  b.dataset.sort = key;
  const now = t.sort.replace(/^-/, "") === key ? (t.sort.startsWith("-") ? " ▼" : " ▲") : "";
  b.textContent = label + now;
  b.setAttribute("aria-label", `sort by ${label}` + (now ? (t.sort.startsWith("-") ? ", descending" : ", ascending") : ""));
  b.addEventListener("click", () => {
    t.sort = t.sort === key ? "-" + key : t.sort === "-" + key ? key : (key === "id" || key === "generation" ? "-" + key : key);
    t.offset = 0;
    loadCandidates().catch(showError);
  });
  return b;
}

function renderCandidates(pg) {
  state.page = pg;
  renderFilters(pg);
  const objs = pg.objectives;
  const rows = pg.rows.map(c => {
    const what = c.status === "failed" ? (c.reason || "failed") : c.status === "cached" ? `same recipe as #${c.cached_from}` : "";
    const tr = row([`#${c.id}`, c.generation, c.origin, c.status, ...objs.map(o => valueText(c, o.name)), what],
                   [c.status === "failed" ? "failed" : "", c.front ? "front" : "", c.id === state.candidate ? "selected" : ""].join(" "));
    tr.dataset.id = c.id;
    return actionRow(tr, () => selectCandidate(c.id));
  });
  const table = $("candidates"), thead = table.querySelector("thead"), tr = el("tr");
  [["id", "id"], ["gen", "generation"], ["origin", "origin"], ["status", "status"], ...objs.map(o => [o.name, o.name])]
    .forEach(([label, key]) => { const th = el("th"); th.appendChild(sortHeader(label, key)); tr.appendChild(th); });
  tr.appendChild(el("th", "note"));
  thead.replaceChildren(tr);
  table.querySelector("tbody").replaceChildren(...rows);
  const last = Math.min(pg.offset + pg.limit, pg.matched);
  $("page-note").textContent = pg.matched ? `${pg.offset + 1}–${last} of ${pg.matched}` + (pg.matched < pg.total ? ` (filtered from ${pg.total})` : "") : `none of ${pg.total} match`;
  $("page-prev").disabled = pg.offset === 0;
  $("page-next").disabled = last >= pg.matched;
  $("candidates-note").textContent = `${pg.total} in the job`;
}

function bindTable() {  // state.table is replaced when another job is chosen: read it at event time
  const reload = () => { state.table.offset = 0; loadCandidates().catch(showError); };
  const bind = (id, key) => $(id).addEventListener("change", ev => { state.table[key] = ev.target.value; reload(); });
  bind("f-status", "status");
  bind("f-origin", "origin");
  bind("f-gen-min", "gen_min");
  bind("f-gen-max", "gen_max");
  $("f-clear").addEventListener("click", () => {
    Object.assign(state.table, { status: "", origin: "", gen_min: "", gen_max: "", ranges: {} });
    document.querySelectorAll("#filters input").forEach(i => { i.value = ""; });
    reload();
  });
  $("page-prev").addEventListener("click", () => { const t = state.table; t.offset = Math.max(0, t.offset - t.limit); loadCandidates().catch(showError); });
  $("page-next").addEventListener("click", () => { state.table.offset += state.table.limit; loadCandidates().catch(showError); });
}

// ------------------------------------------------------------------ compare: two jobs' fronts, two recipes

async function renderCompare() {
  const other = state.compareJob, gd = $("compare-plot"), note = $("compare-note");
  gd.hidden = note.hidden = !other;
  if (!other) { Plotly.purge(gd); return; }
  const f = await api(`fronts?job=${encodeURIComponent(state.job)}&job=${encodeURIComponent(other)}`);
  const shared = f.shared_objectives;
  if (shared.length < 1) {
    note.textContent = `${f.jobs[0].name} and ${f.jobs[1].name} share no objective: their fronts cannot be drawn on one plot.`;
    gd.hidden = true;
    return;
  }
  const [xo, yo] = shared.length >= 2 ? shared : [null, shared[0]];
  const traces = f.jobs.map((j, k) => {
    const pts = j.front.slice().sort((a, b) => xo ? a.values[xo] - b.values[xo] : a.id - b.id);
    return { type: "scatter", mode: "lines+markers", name: `${j.name} (front of ${pts.length})`,
             x: pts.map(p => xo ? p.values[xo] : p.id), y: pts.map(p => p.values[yo]), customdata: pts.map(p => `${j.name}:${p.id}`),
             hovertext: pts.map(p => `${j.name} #${p.id}: ${p.summary}`), hoverinfo: "text",
             line: { shape: "hv", color: PALETTE[k % PALETTE.length] }, marker: { size: 8, color: PALETTE[k % PALETTE.length] } };
  });
  const dir = n => (f.jobs[0].objectives.find(o => o.name === n) || {});
  Plotly.react(gd, traces, { margin: { l: 60, r: 20, t: 30, b: 90 }, hovermode: "closest",
    legend: { orientation: "h", y: -0.22, yanchor: "top" },
    xaxis: { title: { text: xo ? axisTitle(dir(xo)) : "candidate" } }, yaxis: { title: { text: axisTitle(dir(yo)) } } }, PLOT_CONFIG);
  note.textContent = shared.length > 2 ? `On ${xo} and ${yo} (the first two objectives the jobs share).` : "";
  note.hidden = !note.textContent;
}

function renderPin() {
  const p = state.pinned;
  $("pin-note").textContent = p ? `pinned: ${p.job} #${p.id}; select another candidate to compare their recipes` : "";
  $("pin").textContent = p && p.job === state.job && p.id === state.candidate ? "unpin" : "pin for comparison";
}

async function renderDiff() {
  const p = state.pinned, box = $("diff-section");
  renderPin();
  if (!p || state.candidate === null || (p.job === state.job && p.id === state.candidate)) { box.hidden = true; return; }
  const d = await api(`diff?a=${encodeURIComponent(p.job + ":" + p.id)}&b=${encodeURIComponent(state.job + ":" + state.candidate)}`);
  box.hidden = false;
  $("diff-head").textContent = d.same ? `${d.a.job} #${d.a.id} and ${d.b.job} #${d.b.id}: the same recipe.`
    : `${d.a.job} #${d.a.id} (left) against ${d.b.job} #${d.b.id} (right): ${d.changes.length} settings differ, marked below.`;
  $("diff-changes").replaceChildren(...d.changes.map(c => el("li", `${c.path}: ${fmt(c.a)} → ${fmt(c.b)}`)));
  const rows = d.lines.map(l => {
    const tr = el("tr", null, l.tag);
    tr.append(el("td", l.a_no, "no"), el("td", l.a === null ? "" : l.a, "text a"), el("td", l.b_no, "no"), el("td", l.b === null ? "" : l.b, "text b"));
    return tr;
  });
  fillTable($("diff"), ["", `${d.a.job} #${d.a.id}`, "", `${d.b.job} #${d.b.id}`], rows);
}

// ------------------------------------------------------------------ one candidate

async function selectCandidate(id) {
  state.candidate = Number(id);
  setHash();
  try {
    renderCandidate(await api(`candidate?job=${encodeURIComponent(state.job)}&id=${state.candidate}`));
    if (state.detail) { renderFront(state.detail); renderFrontTable(state.detail); }
    if (state.page) renderCandidates(state.page);
    await renderDiff();
    showError(null);
  } catch (e) { showError(e); }
}

// Items scored: their count and mean; for an estimated value, the anchor items themselves (folded).
function itemsCell(s) {
  if (!s.items) return "–";
  const text = `${s.items} (mean ${fmt(s.item_mean)})`;
  if (!s.scored_items) return text;
  const det = el("details", null, "scored-items"), sum = el("summary", `${text}: which`);
  det.append(sum, el("div", s.scored_items.join(", ")));
  return det;
}

function renderCandidate(c) {
  $("candidate").hidden = false;
  $("cand-id").textContent = `#${c.id}`;
  const st = $("cand-status");
  st.textContent = c.status + (c.front ? ", on the front" : "") + (c.estimated ? ", estimated" : "");
  st.className = "badge " + c.status;
  $("cand-line").textContent = `${c.summary || "recipe"}; generation ${c.generation}, origin ${c.origin}` +
    (c.worker ? `, worker ${c.worker}` : "") + (c.eval_seconds !== null ? `, ${fmt(c.eval_seconds)} s` : "");
  const reason = c.reason || c.recipe_error || (c.test_reason ? `${c.split} split: ${c.test_reason}` : null);
  $("cand-reason").hidden = !reason;
  $("cand-reason").textContent = reason || "";

  const parents = c.scores.length ? Object.keys(c.scores[0].parents) : [];
  // estimated: the estimator, its sd and the items scored; measured while IRT was on: what IRT would have said
  const estimate = s => {
    const e = s.estimate;
    if (!e) return "";
    if (s.estimated) return ` (IRT ${e.estimator}: ±${fmt(e.sd)}, from ${e.scored} of ${e.total} items)`;
    return ` (IRT ${e.estimator} would say ${fmt(e.value)} ±${fmt(e.sd)} from ${e.scored} of ${e.total} items)`;
  };
  const rows = c.scores.map(s => row([
    `${s.objective} (${s.direction})`,
    fmt(s.fitness) + (s.fitness !== null ? (s.estimated ? " estimated" : " measured") : "") + estimate(s),
    fmt(s[c.split]), itemsCell(s),
    ...parents.map(p => `${fmt(s.parents[p].fitness)} / ${fmt(s.parents[p][c.split])}`),
  ]));
  fillTable($("scores"), ["objective", "fitness", c.split, "items", ...parents.map(p => `${p} (fitness / ${c.split})`)], rows);

  const lin = $("lineage"), l = c.lineage;
  lin.replaceChildren(`origin ${l.origin}, generation ${l.generation}. `);
  if (l.cached_from !== null) { lin.append("Same recipe as ", candidateLink(l.cached_from), " (not evaluated again). "); }
  lin.append(l.parents.length ? "Bred from the population: " : "No parent population (a seed or random). ");
  l.parents.forEach((p, i) => lin.append(i ? ", " : "", candidateLink(p)));
  if (l.children_total) {
    lin.append(l.parents.length ? ". " : "", `In the population of ${l.children_total} later candidates: `);
    l.children.forEach((p, i) => lin.append(i ? ", " : "", candidateLink(p)));
    if (l.children_total > l.children.length) lin.append(", …");
  }

  $("export").textContent = c.export;
  $("recipe").textContent = c.recipe;
  renderPath(c.path);
  renderHeatmaps(c.heatmaps);
}

function renderPath(path) {
  const gd = $("path-plot");
  $("path-section").hidden = !path;
  if (!path) { Plotly.purge(gd); return; }
  $("path-title").textContent = `Layer path: ${path.hops.length} layers; embeddings from ${path.embed}, head from ${path.head}`;
  const colour = s => PALETTE[path.sources.indexOf(s) % PALETTE.length];
  const traces = path.sources.map(s => {
    const hops = path.hops.filter(h => h.source === s);
    return { type: "scatter", mode: "markers+text", name: s, x: hops.map(h => h.index), y: hops.map(h => h.source),
             text: hops.map(h => `L${h.layer}` + (h.scale !== 1 ? ` ×${fmt(h.scale)}` : "")),
             textposition: "top center", hovertext: hops.map(h => `hop ${h.index}: ${h.source} layer ${h.layer}, scale ${fmt(h.scale)}`),
             hoverinfo: "text", marker: { symbol: "square", size: 18, color: colour(s), opacity: 0.85 } };
  });
  traces.unshift({ type: "scatter", mode: "lines", x: path.hops.map(h => h.index), y: path.hops.map(h => h.source),
                   line: { color: "#d0d7de", width: 1 }, hoverinfo: "skip", showlegend: false });
  Plotly.react(gd, traces, {
    height: 120 + 45 * path.sources.length, margin: { l: 80, r: 20, t: 30, b: 40 }, showlegend: false,
    xaxis: { title: { text: "layer of the merged model" }, dtick: 1 },
    yaxis: { type: "category", categoryorder: "array", categoryarray: path.sources, range: [-0.6, path.sources.length - 0.2] },
  }, PLOT_CONFIG);
}

function renderHeatmaps(maps) {
  const box = $("heatmaps");
  $("heatmap-section").hidden = !maps.length;
  while (box.children.length > maps.length) { Plotly.purge(box.lastChild.lastChild); box.lastChild.remove(); }
  maps.forEach((m, i) => {
    let fig = box.children[i];
    if (!fig) { fig = el("div", null, "figure"); fig.append(el("div", "", "plot-title"), el("div", null, "plot")); box.appendChild(fig); }
    fig.firstChild.textContent = m.title + (m.note ? ` (${m.note})` : "");
    const div = fig.lastChild;
    const cells = m.rows.length * m.layers.length;
    Plotly.react(div, [{ type: "heatmap", z: m.z, x: m.layers, y: m.rows, colorscale: "Viridis", zmin: 0,
                         zmax: Math.max(1, ...m.z.flat().filter(v => v !== null)),
                         texttemplate: cells <= 160 ? "%{z:.2f}" : "", hovertemplate: "%{y}, layer %{x}: %{z:.4f}<extra></extra>" }],
                 { height: 90 + 26 * m.rows.length, margin: { l: 130, r: 20, t: 30, b: 40 },
                   xaxis: { title: { text: "layer" }, type: "category" }, yaxis: { autorange: "reversed" } }, PLOT_CONFIG);
  });
}

// ------------------------------------------------------------------ live updates

let idleTicks = 0;

async function poll() {
  // every tick while a job runs; otherwise every IDLE_TICKS-th tick, to notice a job started or resumed later
  if (!state.jobs.some(j => j.status === "running") && state.signature !== null && ++idleTicks % IDLE_TICKS) return;
  try {
    const sig = JSON.stringify((await api("poll")).jobs);
    if (sig === state.signature) return;
    const first = state.signature === null;
    state.signature = sig;
    if (first) return;
    await loadJobs();
    if (state.job) {
      renderJob(await fetchJob(true));  // only what changed since the last answer
      await loadCandidates();
      if (state.compareJob) await renderCompare();
      if (state.candidate !== null) renderCandidate(await api(`candidate?job=${encodeURIComponent(state.job)}&id=${state.candidate}`));
    }
    showError(null);
  } catch (e) { showError(e); }
}

async function start() {
  $("copy-export").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("export").textContent));
  bindTable();
  $("compare-job").addEventListener("change", ev => { state.compareJob = ev.target.value; renderCompare().catch(showError); });
  $("pin").addEventListener("click", () => {
    const here = state.pinned && state.pinned.job === state.job && state.pinned.id === state.candidate;
    state.pinned = here || state.candidate === null ? null : { job: state.job, id: state.candidate };
    renderDiff().catch(showError);
  });
  if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname + location.hash);  // the cookie holds it now
  const h = new URLSearchParams(location.hash.slice(1));
  try {
    await loadJobs();
    const job = h.get("job") && state.jobs.some(j => j.name === h.get("job")) ? h.get("job") : (state.jobs[0] || {}).name;
    if (job) {
      await selectJob(job);
      if (h.get("candidate") !== null) await selectCandidate(Number(h.get("candidate")));
    }
    await poll();
  } catch (e) { showError(e); }
  setInterval(poll, POLL_MS);
  document.body.dataset.ready = "1";
}

start();
