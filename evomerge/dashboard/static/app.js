// evomerge dashboard: reads the server's JSON API and draws it with Plotly (served locally, no CDN).
// Text from the store only ever goes into the page through textContent, never as HTML.
"use strict";

const POLL_MS = 2000, IDLE_TICKS = 5;
const FRONT = "#1f6feb", DOMINATED = "#c4c8cd", PARENT = "#d1242f", SELECTED = "#111", ESTIMATED = "#e36209";
const PALETTE = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#6e7781"];
const PLOT_CONFIG = { displaylogo: false, responsive: true };

const state = { jobs: [], job: null, detail: null, candidate: null, signature: null };

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
    tr.addEventListener("click", () => selectJob(j.name));
    return tr;
  });
  fillTable($("jobs"), ["job", "state", "progress", "candidates", "budget", "driver", "space", "updated"], rows);
  $("live").hidden = !payload.jobs.some(j => j.status === "running");
}

async function loadJobs() { renderJobs(await api("jobs")); }

// ------------------------------------------------------------------ one job

async function selectJob(name) {
  if (state.job !== name) state.candidate = null;
  state.job = name;
  setHash();
  try {
    renderJob(await api("job?name=" + encodeURIComponent(name)));
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
  renderCandidates(d);
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
  let traces, layout = { margin: { l: 60, r: 20, t: 30, b: 50 }, hovermode: "closest", uirevision: d.summary.name,
                         legend: { orientation: "h", y: 1.08 } };
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
    gd.dataset.bound = "1";
  }
  $("front-legend").textContent = objs.length > 3
    ? "Parallel coordinates, one line per candidate: blue the Pareto front, grey dominated. Click a line for its recipe."
    : "Blue: the Pareto front; grey: dominated candidates; red diamonds: the parent models. Click a point for its recipe.";
}

function renderProgress(d) {
  const box = $("progress-plots"), pr = d.progress;
  const plots = [];
  if (d.objectives.length > 1) plots.push({ name: "hypervolume", y: pr.hypervolume, title: "hypervolume of the front (losses vs. the worst of generation 0)" });
  d.objectives.forEach(o => plots.push({ name: o.name, y: pr.best[o.name], title: `best ${o.name} so far (${o.direction})` }));
  while (box.children.length > plots.length) { Plotly.purge(box.lastChild); box.lastChild.remove(); }
  plots.forEach((p, i) => {
    let div = box.children[i];
    if (!div) { div = el("div", null, "plot"); div.style.height = "200px"; box.appendChild(div); }
    div.dataset.series = p.name;
    Plotly.react(div, [{ type: "scatter", mode: "lines+markers", x: pr.evaluations, y: p.y, line: { shape: "hv" },
                         marker: { size: 4 }, name: p.name }],
                 { title: { text: p.title, font: { size: 13 } }, margin: { l: 60, r: 20, t: 30, b: 35 },
                   xaxis: { title: { text: "candidates" } } }, PLOT_CONFIG);
  });
}

function renderFrontTable(d) {
  const objs = d.objectives;
  const pts = d.points.filter(p => p.front);
  if (objs.length) pts.sort((a, b) => (a.values[objs[0].name] - b.values[objs[0].name]) * (objs[0].direction === "maximise" ? -1 : 1));
  const rows = pts.map(p => {
    const tr = row([`#${p.id}`, p.generation, p.summary, ...objs.map(o => valueText(p, o.name)),
                    ...objs.map(o => fmt((p[d.split] || {})[o.name]))], p.id === state.candidate ? "selected front" : "front");
    tr.dataset.id = p.id;
    tr.addEventListener("click", () => selectCandidate(p.id));
    return tr;
  });
  const parents = d.parents.map(p => {  // the parents beside the front, as the final report shows them
    const failed = p.status === "failed";
    const tr = row([`parent ${p.name}`, 0, p.candidate !== null ? `candidate #${p.candidate}` : "–",
                    ...objs.map(o => failed ? "failed" : fmt((p.fitness || {})[o.name])),
                    ...objs.map(o => p.reason ? "failed" : fmt((p[d.split] || {})[o.name]))], "parent");
    if (p.candidate !== null) tr.addEventListener("click", () => selectCandidate(p.candidate));
    return tr;
  });
  fillTable($("front-table"), ["id", "gen", "recipe", ...objs.map(o => o.name), ...objs.map(o => `${o.name} (${d.split})`)],
            [...rows, ...parents]);
}

function renderCandidates(d) {
  const objs = d.objectives;
  const rows = d.candidates.slice().reverse().map(c => {
    const what = c.status === "failed" ? (c.reason || "failed") : c.status === "cached" ? `same recipe as #${c.cached_from}` : "";
    const tr = row([`#${c.id}`, c.generation, c.origin, c.status, ...objs.map(o => valueText(c, o.name)), what],
                   [c.status === "failed" ? "failed" : "", c.front ? "front" : "", c.id === state.candidate ? "selected" : ""].join(" "));
    tr.dataset.id = c.id;
    tr.addEventListener("click", () => selectCandidate(c.id));
    return tr;
  });
  fillTable($("candidates"), ["id", "gen", "origin", "status", ...objs.map(o => o.name), "note"], rows);
  $("candidates-note").textContent = d.shown_from > 0 ? `(the latest, from #${d.shown_from})` : "";
}

// ------------------------------------------------------------------ one candidate

async function selectCandidate(id) {
  state.candidate = Number(id);
  setHash();
  try {
    renderCandidate(await api(`candidate?job=${encodeURIComponent(state.job)}&id=${state.candidate}`));
    if (state.detail) { renderFront(state.detail); renderFrontTable(state.detail); renderCandidates(state.detail); }
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
    title: { text: `${path.hops.length} layers; embeddings from ${path.embed}, head from ${path.head}`, font: { size: 13 } },
    height: 120 + 45 * path.sources.length, margin: { l: 80, r: 20, t: 40, b: 40 }, showlegend: false,
    xaxis: { title: { text: "layer of the merged model" }, dtick: 1 },
    yaxis: { type: "category", categoryorder: "array", categoryarray: path.sources, range: [-0.6, path.sources.length - 0.2] },
  }, PLOT_CONFIG);
}

function renderHeatmaps(maps) {
  const box = $("heatmaps");
  $("heatmap-section").hidden = !maps.length;
  while (box.children.length > maps.length) { Plotly.purge(box.lastChild); box.lastChild.remove(); }
  maps.forEach((m, i) => {
    let div = box.children[i];
    if (!div) { div = el("div", null, "plot"); box.appendChild(div); }
    const cells = m.rows.length * m.layers.length;
    Plotly.react(div, [{ type: "heatmap", z: m.z, x: m.layers, y: m.rows, colorscale: "Viridis", zmin: 0,
                         zmax: Math.max(1, ...m.z.flat().filter(v => v !== null)),
                         texttemplate: cells <= 160 ? "%{z:.2f}" : "", hovertemplate: "%{y}, layer %{x}: %{z:.4f}<extra></extra>" }],
                 { title: { text: m.title + (m.note ? ` (${m.note})` : ""), font: { size: 13 } },
                   height: 90 + 26 * m.rows.length, margin: { l: 130, r: 20, t: 30, b: 40 },
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
      renderJob(await api("job?name=" + encodeURIComponent(state.job)));
      if (state.candidate !== null) renderCandidate(await api(`candidate?job=${encodeURIComponent(state.job)}&id=${state.candidate}`));
    }
    showError(null);
  } catch (e) { showError(e); }
}

async function start() {
  $("copy-export").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("export").textContent));
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
