// Zarkov's dashboard: polls the JSON API of the service that served it and draws
// what it answers.  No framework; the charts are plotly.js, served by Zarkov too.
// Every value from the API is put in the page as text (textContent), never as HTML.
"use strict";

(function () {
  const cfg = JSON.parse(document.getElementById("zarkov-config").textContent);
  const problems = new Map(); // panel -> message
  const cards = new Map();    // collection name -> its card
  const PLOT = { displaylogo: false, responsive: true, displayModeBar: false };
  const DEFAULT_KEYS = 500;   // keys a time series shows until a range is chosen

  // -- helpers ---------------------------------------------------------------------
  async function api(path) {
    const r = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store",
                                  credentials: "same-origin" });
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
    return body;
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "text") node.textContent = v;
      else node[k] = v;
    }
    for (const c of children) node.append(c);
    return node;
  }

  const num = (n) => (typeof n === "number" ? n.toLocaleString("en-US", { maximumFractionDigits: 2 }) : String(n));
  const secs = (s) => (s == null ? "" : s < 10 ? `${s.toFixed(2)} s` : s < 600 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`);
  const utc = (ms) => new Date(ms).toISOString().replace("T", " ").slice(0, 19);
  // Plotly draws date strings as they are written: give it UTC wall-clock time.
  const plotDate = (ms) => new Date(ms).toISOString().replace("Z", "");

  const short = (s, n) => (s.length > n ? `${s.slice(0, n - 1)}…` : s);

  function ago(iso) {
    if (!iso) return "never";
    const s = (Date.now() - Date.parse(iso)) / 1000;
    if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return iso.slice(0, 16).replace("T", " ");
  }

  // The API writes datetimes as 2011-07-22T10:05:00.000Z: show them shorter.
  const ISO = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})(:\d{2})\.(\d{3})Z$/;
  function when(s) {
    const m = ISO.exec(s);
    if (!m) return s;
    if (m[2] === "00:00" && m[3] === ":00" && m[4] === "000") return m[1];
    return `${m[1]} ${m[2]}${m[3] === ":00" && m[4] === "000" ? "" : m[3]}`;
  }

  function show(x) {
    if (x === null || x === undefined) return "";
    if (typeof x === "number") return num(x);
    if (typeof x === "object") {
      return Object.entries(x).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : when(String(v))}`).join(" · ");
    }
    return when(String(x));
  }

  function problem(panel, err) {
    if (err) problems.set(panel, `${panel}: ${err.message || err}`); else problems.delete(panel);
    const box = document.getElementById("problems");
    box.hidden = problems.size === 0;
    box.textContent = [...problems.values()].join("\n");
  }

  async function guarded(panel, fn) {
    try { await fn(); problem(panel, null); } catch (e) { problem(panel, e); }
  }

  function fillBody(tbody, rows, key, build) {
    // Rebuild the rows, keeping their order; the table is small.
    tbody.replaceChildren(...rows.map((r) => { const tr = build(r); tr.dataset.key = key(r); return tr; }));
  }

  // -- event flow ------------------------------------------------------------------
  async function refreshRate() {
    const r = await api("/events/rate?minutes=5&step=5");
    const now = document.getElementById("rate-now");
    now.textContent = num(r.now);
    now.dataset.rate = String(r.now);
    const t = r.totals;
    document.getElementById("rate-totals").replaceChildren(
      ...[["stored", t.committed], ["accepted", t.accepted], ["rejected", t.rejected],
          ["journal backlog", `${t.backlog_files} file(s)`], ["database", t.db_ok ? "ok" : "unreachable"]]
        .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: typeof v === "number" ? num(v) : v })]));
    Plotly.react("rate-chart", [{
      x: r.series.map((p) => plotDate(p[0])), y: r.series.map((p) => p[1]), type: "bar",
      name: "events/s", marker: { color: "#3b7dd8" },
    }], {
      margin: { l: 40, r: 10, t: 10, b: 30 }, bargap: 0.1,
      yaxis: { title: { text: "events/s" }, rangemode: "tozero" }, xaxis: { type: "date" },
    }, PLOT);
  }

  // -- aggregations ----------------------------------------------------------------
  async function refreshAggdefs() {
    const { aggdefs } = await api("/aggdefs");
    document.getElementById("aggdefs-empty").hidden = aggdefs.length > 0;
    fillBody(document.querySelector("#aggdefs tbody"), aggdefs, (a) => a.name, (a) => {
      const run = a.running;
      const nowCell = el("td", { className: run ? "state running" : "state idle" });
      if (run) {
        const docs = run.docs != null ? `${num(run.docs)} docs` : run.marked != null ? `${num(run.marked)} marked` : "";
        nowCell.append(el("span", { className: "spinner" }),
          `running${run.full ? " (full)" : ""}${run.phase ? ` · ${run.phase}` : ""}${docs ? ` · ${docs}` : ""}`);
      } else {
        nowCell.textContent = a.pending ? `pending (${a.pending})` : "idle";
      }
      // The last run that took documents; a later one that found nothing is a "check".
      const last = a.last;
      const work = a.last_work || last;
      const lastCell = el("td", { className: "last", dataset: { docs: last ? String(last.docs) : "" } },
        work ? `${ago(work.ended)} · ${secs(work.seconds)} · ${num(work.docs)} docs${work.full ? " · full" : ""}` : "never");
      if (last && work && last.ended !== work.ended) {
        lastCell.append(el("div", { className: "muted", text: `checked ${ago(last.ended)}` }));
      }
      const err = a.last_error;
      const current = err && (!last || Date.parse(err.at) > Date.parse(last.ended));
      const errCell = el("td", { className: err ? (current ? "error" : "muted") : "" },
        err ? `${ago(err.at)}: ${err.message}` : "");
      // Lag: events stored and not yet counted, and how old the oldest of them is.
      const lag = a.lag || {};
      const lagCell = el("td", { className: lag.late ? "lag late" : "lag",
                                 dataset: { waiting: String(lag.waiting ?? "") } },
        lag.waiting ? `${num(lag.waiting)} · oldest ${secs(lag.oldest_age)}` : "none");
      if (lag.late) lagCell.title = "older than lag_warning_seconds";
      const tr = el("tr", { dataset: { name: a.name, state: run ? "running" : "idle" } },
        el("td", { text: a.name, className: "name" }), el("td", { text: a.task_name || "", className: "mono" }),
        el("td", { text: a.object }), el("td", { text: a.realtime ? "yes" : "no" }),
        nowCell, lagCell, lastCell, errCell);
      return tr;
    });
  }

  // -- jobs ------------------------------------------------------------------------
  function progressOf(j) {
    if (j.state === "complete") return [1, 1, "done"];
    if (j.phase === "map" || (j.chunks_total && !j.partitions_total)) {
      return [j.chunks_done || 0, j.chunks_total || 0, `${j.chunks_done || 0}/${j.chunks_total || 0} chunks`];
    }
    if (j.partitions_total) {
      return [j.partitions_done || 0, j.partitions_total, `${j.partitions_done || 0}/${j.partitions_total} partitions`];
    }
    return [0, 0, j.phase || ""];
  }

  async function refreshJobs() {
    const r = await api("/jobs?recent=6");
    const dask = r.dask && r.dask.jobs_running ? ` · Dask: ${r.dask.jobs_running} running` : "";
    document.getElementById("router").textContent = (r.router.ok
      ? `· router ${r.router.uri}: ${r.router.workers} worker process(es), ${r.router.jobs_running} running`
      : `· router ${r.router.uri} does not answer`) + dask;
    document.getElementById("jobs-empty").hidden = r.jobs.length > 0;
    fillBody(document.querySelector("#jobs tbody"), r.jobs, (j) => j.job_id, (j) => {
      const [done, totalN, label] = progressOf(j);
      const bar = el("progress", { max: totalN || 1 });
      if (totalN || j.state === "complete") bar.value = done; // no value: indeterminate
      const state = j.state === "error" || j.state === "lost" ? `${j.state}: ${j.error || ""}` : j.state;
      return el("tr", { dataset: { job: j.job_id, state: j.state }, className: `job ${j.state}` },
        el("td", { title: j.job_id, className: "mono nowrap" }, j.job_id.slice(0, 8),
          j.engine === "dask" ? el("small", { text: " dask", className: "engine" }) : ""),
        el("td", { text: j.aggdef || short(j.output || j.kind, 24), title: `${j.kind} → ${j.output || ""}`,
                   className: j.aggdef ? "for" : "for mono" }),
        el("td", { text: state, className: "jobstate" }),
        el("td", { className: "progress" }, bar, el("span", { text: ` ${label}` })),
        el("td", { text: num(j.docs_read || 0), className: "docs-read" }),
        // What the job produced: documents written, or handed back to its AggDef's
        // run (inline outputs, which the run applies itself).
        el("td", { className: "written", text: j.write_path === "inline"
          ? `${num(j.docs_inline || 0)} handed back` : num(j.docs_written || 0) }),
        el("td", { text: secs(j.elapsed), className: "nowrap" }));
    });
  }

  // -- aggregates ------------------------------------------------------------------
  function card(c) {
    let k = cards.get(c.name);
    if (k && k.kind === c.keys) return k;
    if (k) k.node.remove();
    const node = el("article", { className: "card", dataset: { collection: c.name, kind: c.keys } });
    const title = el("h3", {}, el("span", { text: c.name, className: "mono" }), el("small", { className: "count" }));
    node.append(title);
    k = { node, kind: c.keys, count: title.querySelector(".count") };
    if (c.keys === "time") {
      k.from = el("input", { type: "text", name: "b", placeholder: "from (ISO date or key)" });
      k.to = el("input", { type: "text", name: "e", placeholder: "to" });
      const go = el("button", { type: "button", text: "show" });
      go.addEventListener("click", () => guarded(c.name, () => drawSeries(k, c)));
      k.note = el("small", { className: "muted" });
      k.chart = el("div", { className: "chart" });
      node.append(el("div", { className: "range" }, k.from, k.to, go, k.note), k.chart);
    } else {
      k.table = el("table", { className: "ranked" },
        el("thead", {}, el("tr", {}, el("th", { text: "#" }), el("th", { text: "key" }), el("th", { text: "value" }))),
        el("tbody"));
      node.append(k.table);
    }
    cards.set(c.name, k);
    return k;
  }

  async function drawSeries(k, c) {
    const p = new URLSearchParams({ c: c.c });
    if (k.from.value.trim()) p.set("b", k.from.value.trim());
    if (k.to.value.trim()) p.set("e", k.to.value.trim());
    if (!p.has("b") && !p.has("e")) p.set("n", String(DEFAULT_KEYS));
    const data = await api(`/q?${p}`);
    const traces = Object.entries(data).map(([field, pts]) => ({
      name: field, type: "scatter", mode: "lines+markers",
      x: pts.map((q) => (typeof q[0] === "number" ? plotDate(q[0]) : String(q[0]))),
      y: pts.map((q) => q[1]),
    }));
    const keys = new Set(Object.values(data).flatMap((pts) => pts.map((q) => q[0])));
    k.chart.dataset.keys = String(keys.size);
    k.note.textContent = p.has("n") ? `last ${num(keys.size)} keys` : `${num(keys.size)} keys in range`;
    if (!k.watched) {
      // Cards appear one by one and the grid reflows: fit the chart to its card.
      new ResizeObserver(() => { if (k.chart.data) Plotly.Plots.resize(k.chart); }).observe(k.chart);
      k.watched = true;
    }
    Plotly.react(k.chart, traces, {
      margin: { l: 50, r: 10, t: 10, b: 40 }, xaxis: { type: "date" },
      legend: { orientation: "h", y: -0.2 }, showlegend: traces.length > 1,
    }, PLOT);
  }

  async function drawRanked(k, c) {
    const { rows } = await api(`/qr?${new URLSearchParams({ c: c.c, l: "10" })}`);
    k.table.tBodies[0].replaceChildren(...rows.map((r, i) => el("tr", {},
      el("td", { text: String(i + 1) }), el("td", { text: show(r._id) }), el("td", { text: show(r.value), className: "num" }))));
  }

  async function refreshCollections() {
    const { collections } = await api("/collections");
    const box = document.getElementById("collections");
    document.getElementById("collections-empty").hidden = collections.length > 0;
    // Time series first (the charts), then the rankings; by name within each.
    collections.sort((a, b) => (a.keys === "time" ? 0 : 1) - (b.keys === "time" ? 0 : 1));
    const names = new Set(collections.map((c) => c.name));
    for (const [name, k] of cards) if (!names.has(name)) { k.node.remove(); cards.delete(name); }
    for (const c of collections) {
      const k = card(c);
      box.append(k.node); // keeps them in that order
      k.count.textContent = ` ${num(c.count)} keys${c.keys === "time" && c.first_ms != null ? ` · ${utc(c.first_ms)} … ${utc(c.last_ms)} UTC` : ""}`;
      await guarded(c.name, () => (c.keys === "time" ? drawSeries(k, c) : drawRanked(k, c)));
    }
  }

  // -- the loops -------------------------------------------------------------------
  function every(seconds, fn) {
    const tick = async () => {
      await fn();
      document.getElementById("status").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
      setTimeout(tick, seconds * 1000);
    };
    tick();
  }

  every(cfg.fast, () => Promise.all([
    guarded("event rate", refreshRate), guarded("aggregations", refreshAggdefs), guarded("jobs", refreshJobs)]));
  every(cfg.slow, () => guarded("aggregates", refreshCollections));
})();
