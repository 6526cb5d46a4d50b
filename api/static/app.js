/* metaserve dashboard: a static page over the REST API (see api/routes/dashboard.py).
 * The API key lives in sessionStorage and goes out only as an Authorization header; every
 * text from the server is put in the page with textContent, never as HTML. */
"use strict";
(() => {
  const KEY = "metaserve.apiKey";
  const COLUMNS_KEY = "metaserve.columns";         // the run table's added columns (localStorage)
  const CHART_OPTIONS_KEY = "metaserve.chartOptions";
  const PAGE = 25;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled", "stopped"]);
  const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled", "stopped"];
  const COLORS = ["#2f5fd0", "#d0602f", "#1f8a4c", "#8e44ad", "#c0392b", "#16a085", "#b7791f",
                  "#34495e", "#e84393", "#6c5ce7"];
  const MAX_LOG_LINES = 3000;
  const SVG = "http://www.w3.org/2000/svg";
  const main = document.getElementById("main");
  const bench = { startedAt: performance.now(), points: 0, renders: 0, lastRenderAt: 0,
                  lastRenderMs: 0, maxRenderMs: 0, longestTaskMs: 0 };
  window.metaserveDashboard = bench;
  try {
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) bench.longestTaskMs = Math.max(bench.longestTaskMs, entry.duration);
    }).observe({ type: "longtask", buffered: true });
  } catch (_) { /* no long-task timing in this browser */ }

  let pageAbort = new AbortController();

  // ------------------------------------------------------------------ helpers

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null) continue;
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    for (const child of children.flat()) if (child) node.append(child);
    return node;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const apiKey = () => sessionStorage.getItem(KEY);
  const shortId = (id) => id.slice(-8);

  function stored(key, fallback) {
    try { const value = JSON.parse(localStorage.getItem(key)); return value === null ? fallback : value; }
    catch (_) { return fallback; }
  }
  const store = (key, value) => localStorage.setItem(key, JSON.stringify(value));

  class ApiError extends Error {
    constructor(status, message, details) { super(message); this.status = status; this.details = details || []; }
  }

  async function api(path, { method = "GET", json, signal } = {}) {
    const headers = { Authorization: `Bearer ${apiKey()}` };
    let body;
    if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
    const response = await fetch(path, { method, headers, body, signal: signal || pageAbort.signal });
    if (response.status === 401) { logout(); throw new ApiError(401, "your API key was refused"); }
    if (!response.ok) {
      let error = {};
      try { error = (await response.json()).error || {}; } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, error.message || response.statusText, error.details);
    }
    if (response.status === 204) return null;
    const type = response.headers.get("content-type") || "";
    return type.includes("json") ? response.json() : response;
  }

  function errorText(error) {
    if (!(error instanceof ApiError)) return String(error && error.message || error);
    const details = (error.details || []).map((d) => `${d.field || d.loc || ""}: ${d.message || d.msg || ""}`);
    return [error.message, ...details].join("\n");
  }

  /* A Server-Sent Events stream read with fetch (EventSource cannot send the key in a header).
   * Reconnects with Last-Event-ID when the connection drops; ends when the server closes the
   * stream after ``isLast(kind, data)`` said so, or when the page changes. */
  async function follow(path, { onEvent, onState, isLast, signal }) {
    let lastId = null;
    let finished = false;
    while (!signal.aborted && !finished) {
      try {
        const headers = { Authorization: `Bearer ${apiKey()}` };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const response = await fetch(path, { headers, signal });
        if (response.status === 401) { logout(); return; }
        if (!response.ok) throw new ApiError(response.status, response.statusText);
        onState("on");
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let kind = "message", data = "", id = null;
            for (const line of block.split("\n")) {
              if (line.startsWith("id:")) id = line.slice(3).trim();
              else if (line.startsWith("event:")) kind = line.slice(6).trim();
              else if (line.startsWith("data:")) data += line.slice(5).trim();
            }
            if (id) lastId = id;
            if (!data) continue;
            const parsed = JSON.parse(data);
            onEvent(kind, parsed);
            if (isLast(kind, parsed)) finished = true;
          }
        }
        if (finished) { onState("done"); return; }
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError && error.status >= 400 && error.status < 500 && error.status !== 429) {
          onState("done"); return;
        }
      }
      onState("reconnecting");
      await sleep(1000);
    }
  }

  function when(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return date.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  function whenExact(iso) {
    if (!iso) return "";
    return new Date(iso).toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit",
                                                     minute: "2-digit", second: "2-digit" });
  }

  function seconds(value) {
    if (value === null || value === undefined) return "";
    if (value < 60) return `${value.toFixed(0)} s`;
    if (value < 3600) return `${(value / 60).toFixed(1)} min`;
    return `${(value / 3600).toFixed(1)} h`;
  }

  function duration(job) {
    if (job.duration_s !== undefined && job.duration_s !== null) return seconds(job.duration_s);
    if (!job.started_at) return "";
    const end = job.finished_at ? new Date(job.finished_at) : new Date();
    return seconds(Math.max(0, (end - new Date(job.started_at)) / 1000));
  }

  function bytes(size) {
    if (size === null || size === undefined) return "";
    if (size < 1024) return `${size} B`;
    if (size < 1024 ** 2) return `${(size / 1024).toFixed(1)} KiB`;
    if (size < 1024 ** 3) return `${(size / 1024 ** 2).toFixed(1)} MiB`;
    return `${(size / 1024 ** 3).toFixed(2)} GiB`;
  }

  function fmt(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    if (typeof value !== "number") return typeof value === "string" ? value : JSON.stringify(value);
    const magnitude = Math.abs(value);
    if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)) return value.toExponential(3);
    return Number(value.toPrecision(4)).toString();
  }

  const badge = (status) => el("span", { class: `badge ${status}`, text: status });

  function progressBar(progress) {
    const total = progress && progress.total;
    const fraction = total ? Math.min(1, (progress.iteration || 0) / total) : 0;
    const bar = el("div", { class: "bar", title: total ? `${progress.iteration} / ${total}` : "" });
    const fill = el("span");
    fill.style.width = `${(fraction * 100).toFixed(1)}%`;
    bar.append(fill);
    return bar;
  }

  function progressText(progress) {
    if (!progress || !progress.total) return "";
    const parts = [`${progress.iteration || 0} / ${progress.total}`];
    if (progress.tasks_per_s) parts.push(`${fmt(progress.tasks_per_s)} tasks/s`);
    if (progress.env_steps_per_s) parts.push(`${fmt(progress.env_steps_per_s)} env steps/s`);
    if (progress.latest_return !== undefined && progress.latest_return !== null) parts.push(`return ${fmt(progress.latest_return)}`);
    if (progress.eta_s) parts.push(`ETA ${Math.round(progress.eta_s)} s`);
    return parts.join(" · ");
  }

  /* A spec as {dotted.path: leaf}; lists are leaves (shown as JSON). */
  function flatten(node, prefix = "", out = {}) {
    if (node && typeof node === "object" && !Array.isArray(node)) {
      for (const [key, value] of Object.entries(node)) flatten(value, prefix ? `${prefix}.${key}` : key, out);
    } else if (prefix) {
      out[prefix] = node;
    }
    return out;
  }

  function specValue(spec, path) {
    let node = spec;
    for (const part of path.split(".")) {
      if (node === null || typeof node !== "object" || !(part in node)) return undefined;
      node = node[part];
    }
    return node;
  }

  async function allPages(path, limit = 100) {
    const rows = [];
    let cursor = null;
    do {
      const sep = path.includes("?") ? "&" : "?";
      const page = await api(`${path}${sep}limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
      rows.push(...(page.data || []));
      cursor = page.next_cursor;
    } while (cursor && rows.length < 1000);
    return rows;
  }

  // ------------------------------------------------------------------ charts

  /* Which chart a series goes on; null: not plotted (counters, CI half-widths). Loss,
   * accuracy and returns never share an axis. */
  function chartOf(name) {
    if (name.endsWith("_ci95")) return null;
    const slash = name.indexOf("/");
    const split = slash >= 0 ? name.slice(0, slash) : "";
    const metric = slash >= 0 ? name.slice(slash + 1) : name;
    if (/_per_s(econd)?$/.test(metric)) return "throughput";
    if (/^(tasks|env_steps|steps|episodes|line_search_steps|workers)$/.test(metric)) return null;
    if (/return/.test(metric)) return "returns";
    if (/accuracy/.test(metric)) return "accuracy";
    if (/loss|mse/.test(metric)) return split === "train" ? "train_loss" : "eval_loss";
    return split === "train" ? "train_other" : "eval_other";
  }
  const CHART_TITLES = {
    train_loss: "Training loss", eval_loss: "Evaluation loss (band: 95% CI)",
    accuracy: "Evaluation accuracy (band: 95% CI)", returns: "Returns (before / after adaptation)",
    train_other: "Training: other", eval_other: "Evaluation: other",
    throughput: "Throughput (per second of wall clock)",
  };
  const CHART_ORDER = Object.keys(CHART_TITLES);
  const RATE_WINDOW_S = 1.0;

  /* An axis tick: short enough for the axis (1.2k, 3.4M), never cut. */
  function tick(value) {
    const magnitude = Math.abs(value);
    if (magnitude >= 1e9) return `${Number((value / 1e9).toPrecision(3))}G`;
    if (magnitude >= 1e6) return `${Number((value / 1e6).toPrecision(3))}M`;
    if (magnitude >= 1e4) return `${Number((value / 1e3).toPrecision(3))}k`;
    return fmt(value);
  }

  /* The work done by ``step`` for a throughput series ``name`` (train/<unit>_per_second): the
   * counter train/<unit> logged with it, or for tasks the iterations × meta-batch size. The
   * chart plots the change of work over the change of wall-clock time between two logged
   * steps: a rate over real time, evaluation pauses included (the reported per-window rate
   * counts only the training time of its window, and spikes after an evaluation). */
  function throughputWork(name, step, values, spec) {
    const match = name.match(/^(.*\/)?(\w+?)_per_s(econd)?$/);
    if (!match) return null;
    const unit = match[2];
    const counter = `${match[1] || ""}${unit}`;
    if (values && values[counter] !== undefined && values[counter] !== null) return [`${unit} / s`, Number(values[counter])];
    if (unit === "tasks") {
      const batch = spec && Number(spec.meta_batch_size);
      return batch ? ["tasks / s", step * batch] : ["iterations / s", step];
    }
    return null;
  }

  /* Smoothing, log scale and the x-axis of every chart on the page, remembered per browser. */
  const chartOptions = Object.assign({ ema: 0, log: false, x: "step" }, stored(CHART_OPTIONS_KEY, {}));
  const chartListeners = new Set();
  function chartControls() {
    const value = el("span", { class: "muted", id: "chart-smoothing-value", text: chartOptions.ema.toFixed(2) });
    const changed = () => { store(CHART_OPTIONS_KEY, chartOptions); for (const listener of chartListeners) listener(); };
    return el("div", { class: "toolbar chart-controls", id: "chart-controls" },
      el("label", { for: "chart-smoothing" }, "Smoothing (EMA)"),
      el("input", { type: "range", id: "chart-smoothing", min: "0", max: "0.99", step: "0.01", value: String(chartOptions.ema),
        oninput: (e) => { chartOptions.ema = Number(e.target.value); value.textContent = chartOptions.ema.toFixed(2); changed(); } }),
      value,
      el("label", {}, el("input", { type: "checkbox", id: "chart-log", checked: chartOptions.log,
        onchange: (e) => { chartOptions.log = e.target.checked; changed(); } }), " log scale"),
      el("label", { for: "chart-x" }, "x-axis"),
      el("select", { id: "chart-x", onchange: (e) => { chartOptions.x = e.target.value; changed(); } },
        el("option", { value: "step", selected: chartOptions.x === "step" }, "step"),
        el("option", { value: "time", selected: chartOptions.x === "time" }, "wall clock (s since start)")));
  }

  /* TensorBoard's smoothing: an exponential moving average, debiased at the start. */
  function ema(values, weight) {
    if (!weight) return values;
    let last = 0, count = 0;
    return values.map((v) => {
      if (v === null || !Number.isFinite(v)) return v;
      last = last * weight + (1 - weight) * v;
      count += 1;
      return last / (1 - weight ** count);
    });
  }

  /* One uPlot chart of several series; a series ``x`` with a partner ``x_ci95`` gets a band
   * mean ± CI. ``clock(name, step)`` gives the seconds since the run started at which that
   * step was stored (the wall-clock axis and rates need it; null: unknown). A rate chart holds
   * work done per step and plots its change per second. */
  class Chart {
    constructor(title, { clock, rate = false, id, colors } = {}) {
      this.title = title;
      this.colors = colors || new Map();  // a series' colour where the page fixes it (compare)
      this.series = new Map();
      this.bands = new Map();
      this.clock = clock || (() => null);
      this.rate = rate;
      this.plot = null;
      this.shape = "";
      this.node = el("div", { class: "card chart", id }, el("div", { class: "title", text: title }));
      this.area = el("div");
      this.node.append(this.area);
      new ResizeObserver(() => this.resize()).observe(this.area);
    }
    add(name, step, value, band) {
      const target = band ? this.bands : this.series;
      if (!target.has(name)) target.set(name, new Map());
      target.get(name).set(step, value === null ? null : Number(value));
    }
    points() {
      let count = 0;
      for (const values of this.series.values()) count += values.size;
      return count;
    }
    /* [[x, y], ...] of one series under the options, x ascending. */
    line(name) {
      const values = this.series.get(name);
      const steps = [...values.keys()].sort((a, b) => a - b);
      let points;
      if (this.rate) {
        points = [];
        // Steps are stored in batches (several at one instant): a rate is taken between
        // points at least RATE_WINDOW_S apart, over all the work done in between.
        let previous = null;
        for (const step of steps) {
          const t = this.clock(name, step);
          const work = values.get(step);
          if (t === null || t === undefined || work === null) continue;
          if (previous && t - previous[1] >= RATE_WINDOW_S) {
            points.push([chartOptions.x === "time" ? t : step, (work - previous[2]) / (t - previous[1]), step]);
          }
          if (!previous || t - previous[1] >= RATE_WINDOW_S) previous = [step, t, work];
        }
      } else if (chartOptions.x === "time") {
        points = steps.map((s) => [this.clock(name, s), values.get(s), s]).filter((p) => p[0] !== null && p[0] !== undefined);
      } else {
        points = steps.map((s) => [s, values.get(s), s]);
      }
      const smoothed = ema(points.map((p) => p[1]), chartOptions.ema);
      return points.map((p, i) => [p[0], smoothed[i], p[1], p[2]]);
    }
    render() {
      const names = [...this.series.keys()].sort();
      const lines = new Map(names.map((name) => [name, this.line(name)]));
      const xSet = new Set();
      for (const line of lines.values()) for (const p of line) xSet.add(p[0]);
      const xs = Float64Array.from(xSet).sort();
      const data = [xs];
      const series = [{ label: chartOptions.x === "time" ? "s" : "step" }];
      const bands = [];
      const hidden = [];  // the CI bounds: drawn as a band, not listed in the legend
      const positive = (v) => (chartOptions.log && v !== null && v <= 0 ? null : v);
      names.forEach((name, index) => {
        const color = this.colors.get(name) || COLORS[index % COLORS.length];
        const byX = new Map(lines.get(name).map((p) => [p[0], p]));
        const column = Array.from(xs, (x) => (byX.has(x) ? positive(byX.get(x)[1]) : null));
        data.push(column);
        const size = this.series.get(name).size;
        series.push({ label: name, stroke: color, width: 1.5, spanGaps: true,
                      points: { show: name.startsWith("test/") || size < 3, size: 7, fill: color } });
        const ci = this.bands.get(`${name}_ci95`);
        if (ci && ci.size && !this.rate) {
          const half = (x) => { const p = byX.get(x); return p && ci.has(p[3]) ? ci.get(p[3]) : null; };
          const hi = column.map((v, i) => { const h = half(xs[i]); return v === null || h === null ? null : positive(v + h); });
          const lo = column.map((v, i) => { const h = half(xs[i]); return v === null || h === null ? null : positive(v - h); });
          data.push(hi, lo);
          series.push({ label: `${name} +CI`, stroke: color + "55", width: 1, dash: [4, 4], spanGaps: true, points: { show: false } },
                      { label: `${name} −CI`, stroke: color + "55", width: 1, dash: [4, 4], spanGaps: true, points: { show: false } });
          bands.push({ series: [series.length - 2, series.length - 1], fill: color + "22" });
          hidden.push(series.length - 2, series.length - 1);
        }
      });
      const shape = [series.map((s) => s.label).join("|"), chartOptions.log, chartOptions.x].join("#");
      const width = Math.max(280, this.area.clientWidth || 600);
      if (!this.plot || shape !== this.shape) {
        if (this.plot) this.plot.destroy();
        this.shape = shape;
        this.plot = new uPlot({
          width, height: 240, series, bands,
          scales: { x: { time: false }, y: chartOptions.log ? { distr: 3, log: 10 } : {} },
          axes: [{ label: chartOptions.x === "time" ? "seconds since start" : "step" },
                 { size: 64, values: (plot, ticks) => ticks.map((v) => (v === null ? "" : tick(v))) }],
          legend: { live: true },
          hooks: { init: [(plot) => {
            const rows = plot.root.querySelectorAll(".u-legend .u-series");
            for (const index of hidden) if (rows[index]) rows[index].style.display = "none";
          }] },
        }, data, this.area);
      } else {
        this.plot.setData(data);
      }
    }
    resize() {
      const width = Math.max(280, this.area.clientWidth);
      if (this.plot && Math.abs(width - this.plot.width) > 2) this.plot.setSize({ width, height: 240 });
    }
  }

  /* The charts of one job, grouped by chartOf; fed by add(step, values[, time]). */
  class Charts {
    constructor(container, spec, startedAt) {
      this.container = container;
      this.spec = spec;
      this.started = startedAt ? Date.parse(startedAt) : null;
      this.charts = new Map();
      this.dirty = new Set();
      this.scheduled = false;
      this.times = new Map();  // step -> ms since the epoch when it was stored
      this.t0 = null;
      const listener = () => { for (const chart of this.charts.values()) this.dirty.add(chart); this.schedule(); };
      chartListeners.add(listener);
      pageAbort.signal.addEventListener("abort", () => chartListeners.delete(listener));
    }
    clock(step) {
      const t = this.times.get(step);
      return t === undefined || this.t0 === null ? null : (t - this.t0) / 1000;
    }
    chart(group) {
      let chart = this.charts.get(group);
      if (!chart) {
        chart = new Chart(CHART_TITLES[group], { clock: (name, step) => this.clock(step), rate: group === "throughput" });
        chart.node.dataset.chart = group;
        this.charts.set(group, chart);
        const after = CHART_ORDER.indexOf(group);
        const next = [...this.container.children].find((n) => CHART_ORDER.indexOf(n.dataset.chart) > after);
        this.container.insertBefore(chart.node, next || null);
      }
      return chart;
    }
    add(step, values, time) {
      if (!this.times.has(step)) this.times.set(step, time ? Date.parse(time) : Date.now());
      if (this.started !== null) this.t0 = this.started;
      else if (this.t0 === null || this.times.get(step) < this.t0) this.t0 = this.times.get(step);
      for (const [name, value] of Object.entries(values)) {
        const band = name.endsWith("_ci95");
        const group = band ? chartOf(name.slice(0, -5)) : chartOf(name);
        if (!group) continue;
        const chart = this.chart(group);
        if (group === "throughput") {
          const work = throughputWork(name, step, values, this.spec);
          if (work) chart.add(work[0], step, work[1], false);
        } else {
          chart.add(name, step, value, band);
        }
        this.dirty.add(chart);
      }
      this.schedule();
    }
    schedule() {
      if (!this.scheduled) {
        this.scheduled = true;
        requestAnimationFrame(() => this.flush());
      }
    }
    flush() {
      this.scheduled = false;
      const started = performance.now();
      for (const chart of this.dirty) chart.render();
      this.dirty.clear();
      const spent = performance.now() - started;
      bench.renders += 1;
      bench.lastRenderMs = spent;
      bench.maxRenderMs = Math.max(bench.maxRenderMs, spent);
      bench.lastRenderAt = performance.now();
      bench.points = [...this.charts.values()].reduce((sum, c) => sum + c.points(), 0);
    }
    points(group) { const chart = this.charts.get(group); return chart ? chart.points() : 0; }
    resize() { for (const chart of this.charts.values()) chart.resize(); }
  }

  // ------------------------------------------------------------------ pages

  function logout() {
    sessionStorage.removeItem(KEY);
    pageAbort.abort();
    route();
  }

  function renderLogin() {
    document.getElementById("logout").hidden = true;
    document.getElementById("who").textContent = "";
    main.replaceChildren(document.getElementById("login-template").content.cloneNode(true));
    const form = document.getElementById("login");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = form.key.value.trim();
      const shown = document.getElementById("login-error");
      try {
        const response = await fetch("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${key}` } });
        if (response.ok) {
          sessionStorage.setItem(KEY, key);
          route();
        } else {
          shown.textContent = response.status === 401 ? "That key was refused." : `The server answered ${response.status}.`;
        }
      } catch (error) {
        shown.textContent = `The server did not answer: ${error.message}`;
      }
    });
    form.key.focus();
  }

  // ------------------------------------------------------------------ the run table

  const BASE_COLUMNS = [
    { key: "name", title: "Name", sort: "name" },
    { key: "algorithm", title: "Algorithm" },
    { key: "family", title: "Family" },
    { key: "status", title: "Status", sort: "status" },
    { key: "progress", title: "Progress" },
    { key: "created_at", title: "Created", sort: "created_at" },
    { key: "duration", title: "Duration", sort: "duration" },
  ];

  /* An added column: "param:<dotted.spec.path>" or "metric:<name>"; it sorts on the server
   * by the same key. A metric column shows that one metric in every row. */
  function columnTitle(key) {
    const [kind, ...rest] = key.split(":");
    return { kind, name: rest.join(":") };
  }

  function cellValue(job, key) {
    const { kind, name } = columnTitle(key);
    if (kind === "param") return specValue(job.spec, name);
    const metrics = job.latest_metrics || {};
    return name in metrics ? metrics[name] : undefined;
  }

  async function renderJobs(params) {
    const signal = pageAbort.signal;
    const filters = {
      status: params.get("status") || "", algorithm: params.get("algorithm") || "",
      family: params.get("family") || "", sweep: params.get("sweep") || "", q: params.get("q") || "",
      trials: params.get("trials") || "", sort: params.get("sort") || "created_at",
      order: params.get("order") || "desc",
    };
    const cursors = (params.get("cursors") || "").split(",").filter(Boolean);
    const cursor = cursors[cursors.length - 1] || "";
    const navigate = (changes) => {
      const next = new URLSearchParams(params);
      for (const [k, v] of Object.entries(changes)) { if (v) next.set(k, v); else next.delete(k); }
      location.hash = `#/?${next}`;
    };
    let columns = stored(COLUMNS_KEY, []).filter((key) => typeof key === "string" && /^(param|metric):./.test(key));
    const selected = new Set();
    const compare = el("button", { type: "button", id: "compare-selected", disabled: true,
      onclick: () => { location.hash = `#/compare?ids=${[...selected].join(",")}`; } }, "Compare selected");
    const select = (id, label, value, options, key) => el("select", { id, "aria-label": label,
      onchange: (e) => navigate({ [key]: e.target.value, cursors: "" }) },
      el("option", { value: "" }, label), options.map((o) => el("option", { value: o, selected: o === value }, o)));
    const statusSelect = select("status-filter", "All statuses", filters.status, STATUSES, "status");
    const algorithmSelect = select("algorithm-filter", "All algorithms", filters.algorithm, filters.algorithm ? [filters.algorithm] : [], "algorithm");
    const familySelect = select("family-filter", "All families", filters.family, filters.family ? [filters.family] : [], "family");
    const trialsSelect = el("select", { id: "trials-mode", "aria-label": "Sweep trials",
      onchange: (e) => navigate({ trials: e.target.value === "fold" ? "" : e.target.value, cursors: "" }) },
      [["fold", "Trials folded under their sweep"], ["show", "Trials listed too"], ["only", "Trials only"]].map(([v, t]) =>
        el("option", { value: v, selected: (filters.trials || (filters.sweep ? "show" : "fold")) === v }, t)));
    // The search runs on the server (GET /v1/jobs?name=), so it finds jobs on every page;
    // typing re-lists after a pause, Enter at once, and the box keeps the focus.
    let searchTimer = null;
    const searchNow = (value) => { clearTimeout(searchTimer); navigate({ q: value.trim(), cursors: "" }); };
    const searchBox = el("input", { id: "search", type: "search", placeholder: "Search names", "aria-label": "Search names",
      value: filters.q, maxlength: 200,
      oninput: (e) => { clearTimeout(searchTimer); searchTimer = setTimeout(() => searchNow(e.target.value), 400); },
      onkeydown: (e) => { if (e.key === "Enter") searchNow(e.target.value); } });
    const refocus = document.activeElement && document.activeElement.id === "search";
    const picker = el("select", { id: "add-column", "aria-label": "Add a column", onchange: (e) => {
      if (e.target.value && !columns.includes(e.target.value)) { columns = [...columns, e.target.value]; store(COLUMNS_KEY, columns); }
      e.target.value = "";
      drawHead(); drawRows();
    } });
    const head = el("thead");
    const body = el("tbody");
    const table = el("table", { id: "jobs" }, head, body);
    const info = el("span", { class: "muted", id: "page-info" });
    const pager = el("div", { class: "pager" });
    const live = el("span", { class: "live", id: "jobs-live" });
    const sweepChip = filters.sweep ? el("span", { class: "badge", id: "sweep-filter" }, `trials of sweep ${shortId(filters.sweep)} `,
      el("button", { type: "button", class: "link-dark", title: "all jobs", onclick: () => navigate({ sweep: "", cursors: "" }) }, "×")) : null;
    main.replaceChildren(el("div", { class: "toolbar" }, el("h1", {}, "Jobs"), live),
      el("div", { class: "toolbar" }, statusSelect, algorithmSelect, familySelect, trialsSelect, searchBox, sweepChip,
        el("span", { class: "grow" }), picker, compare),
      el("div", { class: "card table-wrap" }, table, el("div", { class: "pager" }, info, el("span", { class: "grow" }), pager)));
    if (refocus) { searchBox.focus(); searchBox.setSelectionRange(filters.q.length, filters.q.length); }

    // The catalog fills the algorithm and family filters (a failure leaves them as they are).
    Promise.all([api("/v1/algorithms"), api("/v1/task-families")]).then(([algorithms, families]) => {
      for (const [node, entries, value] of [[algorithmSelect, algorithms, filters.algorithm], [familySelect, families, filters.family]]) {
        for (const entry of entries) if (entry.name !== value) node.append(el("option", { value: entry.name }, entry.name));
      }
    }).catch(() => {});

    let jobs = [];
    const expanded = new Map();  // sweep id -> its trials, shown under the driver's row
    function sortKeyOf(column) { return column.sort || column.key; }
    function drawHead() {
      const header = (title, sortKey, extra) => {
        const active = filters.sort === sortKey;
        const arrow = active ? (filters.order === "asc" ? " ▲" : " ▼") : "";
        const th = el("th", { "data-sort": sortKey || null, class: active ? "sorted" : null },
          sortKey ? el("button", { type: "button", class: "sort", title: `sort by ${sortKey}`, onclick: () => navigate({
            sort: sortKey, order: active ? (filters.order === "asc" ? "desc" : "asc") : (sortKey === "name" ? "asc" : "desc"),
            cursors: "" }) }, title + arrow) : title, extra);
        return th;
      };
      head.replaceChildren(el("tr", {}, el("th", {}, ""),
        BASE_COLUMNS.map((c) => header(c.title, c.sort)),
        columns.map((key) => { const { kind, name } = columnTitle(key);
          return header(kind === "param" ? name : `${name}`, key,
            el("button", { type: "button", class: "link-dark remove-column", title: "remove this column", "data-remove": key, onclick: () => {
              columns = columns.filter((c) => c !== key); store(COLUMNS_KEY, columns); drawHead(); drawRows(); } }, "×")); })));
      for (const th of head.querySelectorAll("th")) {
        const key = th.dataset.sort;
        if (key && key.startsWith("metric:")) th.classList.add("metric");
      }
    }
    function row(job, trial) {
      const box = el("input", { type: "checkbox", "aria-label": `select ${job.name}`, "data-id": job.id, checked: selected.has(job.id),
        onchange: (e) => { if (e.target.checked) selected.add(job.id); else selected.delete(job.id); compare.disabled = selected.size < 2; } });
      const sweepId = job.driver_of_sweep;
      const toggle = sweepId ? el("button", { type: "button", class: "expand", "data-sweep": sweepId,
        onclick: () => toggleTrials(sweepId) }, `${expanded.has(sweepId) ? "▾" : "▸"} ${job.trial_count ?? 0} trials`) : null;
      return el("tr", { "data-id": job.id, "data-name": job.name, class: trial ? "trial" : null },
        el("td", {}, box),
        el("td", { class: "name" }, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, text: job.name, title: job.name }),
          el("div", { class: "muted" }, shortId(job.id), sweepId ? " · " : "", toggle, sweepId ? " · " : "",
            sweepId ? el("a", { href: `#/sweeps/${encodeURIComponent(sweepId)}`, class: "sweep-link" }, "sweep") : null)),
        el("td", { text: job.spec.algorithm && job.spec.algorithm.name }),
        el("td", { text: job.spec.task_family && job.spec.task_family.name }),
        el("td", { class: "status" }, badge(job.status), job.status === "queued" && job.message ? el("div", { class: "muted", text: job.message }) : null),
        el("td", { class: "progress" }, progressBar(job.progress), el("div", { class: "muted", text: progressText(job.progress) })),
        el("td", { text: when(job.created_at), title: job.created_at }),
        el("td", { class: "num", text: duration(job) }),
        columns.map((key) => {
          const value = cellValue(job, key);
          return el("td", { class: "num", "data-column": key, text: value === undefined ? "—" : fmt(value) });
        }));
    }
    function drawRows() {
      const rows = [];
      for (const job of jobs) {
        rows.push(row(job, false));
        const trials = job.driver_of_sweep && expanded.get(job.driver_of_sweep);
        if (trials) rows.push(...trials.map((trial) => row(trial, true)));
      }
      if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 8 + columns.length, class: "muted", id: "no-jobs",
        text: filters.q.trim() ? `No jobs whose name contains “${filters.q.trim()}”.` : "No jobs." })));
      body.replaceChildren(...rows);
      // The picker offers every spec path and metric seen on this page.
      const seen = [...jobs, ...[...expanded.values()].flat()];
      const paths = new Set(), metrics = new Set();
      for (const job of seen) {
        for (const path of Object.keys(flatten(job.spec))) if (path !== "name") paths.add(path);
        for (const name of Object.keys(job.latest_metrics || {})) if (!name.endsWith("_ci95")) metrics.add(name);
      }
      picker.replaceChildren(el("option", { value: "" }, "+ Add column"),
        el("optgroup", { label: "Metrics (latest value)" }, [...metrics].sort().map((m) => el("option", { value: `metric:${m}`, disabled: columns.includes(`metric:${m}`) }, m))),
        el("optgroup", { label: "Parameters (spec)" }, [...paths].sort().map((p) => el("option", { value: `param:${p}`, disabled: columns.includes(`param:${p}`) }, p))));
    }
    async function toggleTrials(sweepId) {
      if (expanded.has(sweepId)) { expanded.delete(sweepId); drawRows(); return; }
      const query = new URLSearchParams({ sweep_id: sweepId, trials: "only", limit: "100", sort: filters.sort, order: filters.order });
      try { expanded.set(sweepId, (await api(`/v1/jobs?${query}`)).data); } catch (error) { expanded.set(sweepId, []); }
      drawRows();
    }

    const query = new URLSearchParams({ limit: String(PAGE), sort: filters.sort, order: filters.order });
    for (const key of ["status", "algorithm", "family", "trials"]) if (filters[key]) query.set(key, filters[key]);
    if (filters.sweep) query.set("sweep_id", filters.sweep);
    if (cursor) query.set("cursor", cursor);
    if (filters.q.trim()) query.set("name", filters.q.trim());
    drawHead();
    async function load() {
      let page;
      try {
        page = await api(`/v1/jobs?${query}`, { signal });
      } catch (error) {
        if (signal.aborted) return;
        body.replaceChildren(el("tr", {}, el("td", { colspan: 8 + columns.length, class: "error", id: "jobs-error", text: errorText(error) })));
        return;
      }
      jobs = page.data;
      drawRows();
      const first = cursors.length * PAGE;
      const total = page.total ?? null;
      const more = total === null ? null : Math.max(0, total - first - jobs.length);
      info.textContent = total === null ? "" : (jobs.length ? `${first + 1}–${first + jobs.length} of ${total}` : `0 of ${total}`) +
        (more ? ` · ${more} more` : "");
      pager.replaceChildren();
      if (cursors.length) pager.append(el("button", { type: "button", id: "newer", onclick: () => navigate({ cursors: cursors.slice(0, -1).join(",") }) }, "← Newer"));
      if (page.next_cursor) pager.append(el("button", { type: "button", id: "older", onclick: () => navigate({ cursors: [...cursors, page.next_cursor].join(",") }) }, `Older (${more ?? "more"}) →`));
      bench.listed = (bench.listed || 0) + 1;
    }
    await load();

    // Live: one shared stream of the user's list changes. A change to a listed job is drawn
    // in its row; a new job (or one that now matches) re-reads the page, at most twice a second.
    let reload = null;
    const relist = () => { if (!reload) reload = setTimeout(async () => { reload = null; await load(); }, 500); };
    follow(`/v1/jobs/stream?trials=${encodeURIComponent(filters.trials || (filters.sweep ? "show" : "fold"))}`, {
      signal,
      isLast: () => false,
      onState: (state) => { live.className = `live ${state}`; live.textContent = state === "on" ? "live" : state === "done" ? "" : "reconnecting…"; },
      onEvent: (kind, data) => {
        const changed = data && (data.job || data);
        if (!changed || !changed.id) return;
        const index = jobs.findIndex((job) => job.id === changed.id);
        if (index < 0 || kind === "created" || (changed.status && changed.status !== jobs[index].status && filters.status)) {
          if (index < 0 && kind !== "created" && changed.sweep_id && (filters.trials || "fold") === "fold") return;
          relist();
          return;
        }
        jobs[index] = { ...jobs[index], ...changed, spec: changed.spec || jobs[index].spec,
                        latest_metrics: { ...(jobs[index].latest_metrics || {}), ...(changed.latest_metrics || {}) } };
        const current = body.querySelector(`tr[data-id="${CSS.escape(changed.id)}"]`);
        if (current) current.replaceWith(row(jobs[index], current.classList.contains("trial")));
      },
    });
  }

  // ------------------------------------------------------------------ a job

  async function renderJob(jobId) {
    const signal = pageAbort.signal;
    let job;
    try {
      job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      main.replaceChildren(el("h1", {}, "Job"), el("p", { class: "error", id: "job-error", text: error.status === 404 ? "No such job of yours." : errorText(error) }));
      return;
    }
    const statusNode = el("span", { id: "job-status" }, badge(job.status));
    const live = el("span", { class: "live", id: "live", text: "connecting" });
    const notice = el("div");
    const progressNode = el("div");
    const timesNode = el("dd", { id: "job-times" });
    const history = el("ol", { class: "history", id: "history" });
    const chartsNode = el("div", { class: "grid", id: "charts" });
    const artifacts = el("tbody");
    const logs = el("pre", { class: "logs", id: "logs" });
    const cancel = el("button", { type: "button", class: "danger", id: "cancel", disabled: TERMINAL.has(job.status),
      onclick: async () => {
        cancel.disabled = true;
        try { job = await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" }); showJob(); }
        catch (error) { notice.replaceChildren(el("div", { class: "notice bad", text: errorText(error) })); }
      } }, "Cancel");
    const resubmit = el("button", { type: "button", id: "resubmit", onclick: async () => {
      try {
        const created = await api("/v1/jobs", { method: "POST", json: job.spec });
        location.hash = `#/jobs/${encodeURIComponent(created.id)}`;
      } catch (error) { notice.replaceChildren(el("div", { class: "notice bad", text: errorText(error) })); }
    } }, "Resubmit");
    const compareWith = el("a", { href: `#/compare?ids=${encodeURIComponent(jobId)}` }, "Compare…");
    const charts = new Charts(chartsNode, job.spec, job.started_at);
    window.metaserveDashboard.charts = charts;

    main.replaceChildren(
      el("div", { class: "toolbar" }, el("h1", { id: "job-name", text: job.name }), statusNode, live,
        el("span", { class: "grow" }), compareWith, resubmit, cancel),
      notice,
      el("div", { class: "card" }, el("dl", { class: "kv" },
        el("dt", {}, "Id"), el("dd", {}, el("code", { text: job.id })),
        el("dt", {}, "Algorithm"), el("dd", { text: `${job.spec.algorithm.name} on ${job.spec.task_family.name}` }),
        job.sweep_id ? [el("dt", {}, "Sweep"), el("dd", {}, el("a", { href: `#/sweeps/${encodeURIComponent(job.sweep_id)}`, text: job.sweep_id }))] : null,
        job.driver_of_sweep ? [el("dt", {}, "Drives"), el("dd", {}, el("a", { href: `#/sweeps/${encodeURIComponent(job.driver_of_sweep)}`, text: `sweep ${job.driver_of_sweep} (${job.trial_count ?? 0} trials)` }))] : null,
        el("dt", {}, "Progress"), el("dd", {}, progressNode),
        el("dt", {}, "Attempt"), el("dd", { id: "attempt", text: `${job.attempt} of ${job.max_attempts}` }),
        el("dt", {}, "Times"), timesNode)),
      chartControls(),
      chartsNode,
      el("div", { class: "grid" },
        el("div", { class: "card" }, el("h2", {}, "Status history"), history),
        el("div", { class: "card" }, el("h2", {}, "Artifacts"), el("table", { id: "artifacts" }, el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Size"), el("th", {}, ""))), artifacts))),
      el("div", { class: "card" }, el("h2", {}, "Log"), logs),
      el("div", { class: "card" }, el("h2", {}, "Spec"), el("pre", { class: "spec", id: "spec", text: JSON.stringify(job.spec, null, 2) })));

    function showJob() {
      statusNode.replaceChildren(badge(job.status));
      cancel.disabled = TERMINAL.has(job.status) || job.status === "cancelling";
      progressNode.replaceChildren(progressBar(job.progress), el("span", { class: "muted", text: " " + progressText(job.progress) }));
      document.getElementById("attempt").textContent = `${job.attempt} of ${job.max_attempts}`;
      const times = [`created ${whenExact(job.created_at)}`];
      if (job.started_at) times.push(`started ${whenExact(job.started_at)}`);
      if (job.finished_at) times.push(`finished ${whenExact(job.finished_at)}`);
      if (job.started_at) times.push(`${job.finished_at ? "took" : "running for"} ${duration(job)}`);
      timesNode.textContent = times.join(" · ");
      const items = [];
      if (job.status === "queued" && job.message) items.push(el("div", { class: "notice", id: "queue-reason", text: `Waiting: ${job.message}` }));
      if (job.error) items.push(el("div", { class: "notice bad", id: "job-failure", text: job.error }));
      notice.replaceChildren(...items);
    }

    function historyItem(event) {
      return el("li", {}, badge(event.status), ` attempt ${event.attempt}`,
        event.time ? el("span", { class: "muted", text: ` · ${whenExact(event.time)}` }) : null,
        event.message ? el("span", { class: "muted", text: ` — ${event.message}` }) : null);
    }

    let shownArtifacts = null;
    async function showArtifacts() {
      try {
        const list = await api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`);
        const seen = JSON.stringify(list.data || []);
        if (seen === shownArtifacts) return;  // the same list: its buttons stay as they are
        shownArtifacts = seen;
        artifacts.replaceChildren(...(list.data || []).map((artifact) => el("tr", {},
          el("td", { text: artifact.name }), el("td", { class: "num", text: bytes(artifact.size) }),
          el("td", {}, el("button", { type: "button", onclick: () => download(artifact.name) }, "Download")))));
        if (!artifacts.rows.length) artifacts.append(el("tr", {}, el("td", { colspan: 3, class: "muted", text: "None yet." })));
      } catch (_) { /* keep the last list */ }
    }

    async function download(name) {
      const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(name)}`);
      const blob = response instanceof Response ? await response.blob() : new Blob([JSON.stringify(response, null, 2)]);
      const url = URL.createObjectURL(blob);
      const link = el("a", { href: url, download: name });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    }

    showJob();
    showArtifacts();
    // The stored points first (with the time each was stored: the wall-clock axis and the
    // rates), then the event stream, which replays them (the same step and value) and goes on.
    try {
      const points = await allMetrics(jobId);
      const steps = new Map();
      for (const point of points) {
        if (!steps.has(point.step)) steps.set(point.step, { time: point.time, values: {} });
        steps.get(point.step).values[point.name] = point.value;
      }
      for (const [step, { time, values }] of steps) charts.add(step, values, time);
    } catch (_) { /* the stream brings them */ }
    if (signal.aborted) return;
    follow(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
      signal,
      isLast: (kind, data) => kind === "status" && TERMINAL.has(data.status),
      onState: (state) => { live.className = `live ${state}`; live.textContent = state === "on" ? "live" : state === "done" ? "" : "reconnecting…"; },
      onEvent: async (kind, data) => {
        if (kind === "metrics") charts.add(data.step, data.values, data.time);
        else if (kind === "progress") { job.progress = data; showJob(); }
        else if (kind === "status") {
          // The job's own history has each change's time; the event is the fallback.
          try { job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`); } catch (_) { job.status = data.status; }
          if (Array.isArray(job.status_history) && job.status_history.length) history.replaceChildren(...job.status_history.map(historyItem));
          else history.append(historyItem(data));
          showJob();
          if (TERMINAL.has(data.status)) showArtifacts();
        }
      },
    });
    let logLines = 0;
    follow(`/v1/jobs/${encodeURIComponent(jobId)}/logs?follow=true`, {
      signal,
      isLast: (kind) => kind === "end",
      onState: () => {},
      onEvent: (kind, line) => {
        if (kind !== "log") return;
        const stamp = line.time ? line.time.slice(11, 19) : "";
        logs.append(el("span", { class: line.level, text: `${stamp} ${line.level.padEnd(7)} ${line.source}: ${line.message}\n` }));
        logLines += 1;
        if (logLines > MAX_LOG_LINES) { logs.firstChild.remove(); logLines -= 1; }
        logs.scrollTop = logs.scrollHeight;
      },
    });
    const onResize = () => charts.resize();
    window.addEventListener("resize", onResize);
    signal.addEventListener("abort", () => window.removeEventListener("resize", onResize));
  }

  async function allMetrics(jobId) {
    const points = [];
    let since = null;
    for (;;) {
      const query = new URLSearchParams({ limit: "10000" });
      if (since !== null) query.set("since_step", String(since));
      const page = await api(`/v1/jobs/${encodeURIComponent(jobId)}/metrics?${query}`);
      points.push(...page.data);
      if (page.next_since_step === null || page.next_since_step === undefined) return points;
      since = page.next_since_step;
    }
  }

  // ------------------------------------------------------------------ compare

  /* Several jobs side by side: the spec fields that differ between them (all on request),
   * their latest metric values, and one chart per metric with every job overlaid. */
  async function renderCompare(params) {
    const ids = (params.get("ids") || "").split(",").filter(Boolean);
    if (ids.length < 2) return renderComparePicker(ids);
    main.replaceChildren(el("h1", {}, "Compare"), el("p", { class: "muted", text: "Loading…" }));
    let runs;
    try {
      runs = await Promise.all(ids.map(async (id) => ({ job: await api(`/v1/jobs/${encodeURIComponent(id)}`), points: await allMetrics(id) })));
    } catch (error) {
      main.replaceChildren(el("h1", {}, "Compare"), el("p", { class: "error", id: "compare-error", text: error.status === 404 ? "One of these jobs is not yours, or does not exist." : errorText(error) }));
      return;
    }
    const label = (run) => `${run.job.name} (${shortId(run.job.id)})`;
    const colors = new Map(runs.map((run, i) => [label(run), COLORS[i % COLORS.length]]));

    // The parameter diff.
    const flat = runs.map((run) => flatten(run.job.spec));
    const paths = [...new Set(flat.flatMap((f) => Object.keys(f)))].sort();
    const differs = (path) => new Set(flat.map((f) => JSON.stringify(f[path] ?? null))).size > 1;
    const showAll = el("input", { type: "checkbox", id: "diff-all", onchange: () => drawDiff() });
    const diffBody = el("tbody");
    const diffCount = el("span", { class: "muted", id: "diff-count" });
    function drawDiff() {
      const shown = paths.filter((p) => showAll.checked || differs(p));
      diffCount.textContent = `${paths.filter(differs).length} of ${paths.length} fields differ`;
      diffBody.replaceChildren(...shown.map((path) => el("tr", { "data-path": path, class: differs(path) ? "differs" : null },
        el("th", { scope: "row", text: path }),
        flat.map((f) => el("td", { class: "num", text: f[path] === undefined ? "—" : fmt(f[path]) })))));
      if (!shown.length) diffBody.append(el("tr", {}, el("td", { colspan: runs.length + 1, class: "muted", text: "The specs are the same." })));
    }
    const runHeads = () => el("tr", {}, el("th", {}, ""), runs.map((run) => el("th", { class: "run" },
      el("span", { class: "swatch", "data-color": colors.get(label(run)) }),
      el("a", { href: `#/jobs/${encodeURIComponent(run.job.id)}`, text: run.job.name }), " ", badge(run.job.status))));

    // The latest value of each metric.
    const latest = runs.map((run) => {
      const last = new Map();
      for (const p of run.points) if (!last.has(p.name) || last.get(p.name)[0] <= p.step) last.set(p.name, [p.step, p.value]);
      return last;
    });
    const metricNames = [...new Set(runs.flatMap((run) => run.points.map((p) => p.name)))].filter((n) => !n.endsWith("_ci95")).sort();
    const metricsBody = el("tbody", {}, metricNames.map((name) => el("tr", { "data-metric": name },
      el("th", { scope: "row", text: name }), latest.map((last) => el("td", { class: "num", text: last.has(name) ? fmt(last.get(name)[1]) : "—" })))));

    // One chart per metric (throughput: per unit, as a rate over wall-clock time).
    const chartsNode = el("div", { class: "grid", id: "compare-charts" });
    const charts = new Map();
    const clocks = new Map();
    for (const run of runs) {
      const times = new Map();
      for (const p of run.points) if (!times.has(p.step)) times.set(p.step, Date.parse(p.time));
      const t0 = run.job.started_at ? Date.parse(run.job.started_at) : Math.min(...times.values());
      clocks.set(label(run), (step) => (times.has(step) ? (times.get(step) - t0) / 1000 : null));
    }
    const chartFor = (title, rate) => {
      if (!charts.has(title)) {
        const chart = new Chart(title, { rate, colors, clock: (name, step) => clocks.get(name)(step) });
        chart.node.dataset.metric = title;
        charts.set(title, chart);
      }
      return charts.get(title);
    };
    for (const run of runs) {
      const byStep = new Map();
      for (const p of run.points) {
        if (!byStep.has(p.step)) byStep.set(p.step, {});
        byStep.get(p.step)[p.name] = p.value;
      }
      for (const [step, values] of byStep) {
        for (const [name, value] of Object.entries(values)) {
          if (name.endsWith("_ci95")) { if (chartOf(name.slice(0, -5))) chartFor(name.slice(0, -5), false).add(`${label(run)}_ci95`, step, value, true); continue; }
          const group = chartOf(name);
          if (!group) continue;
          if (group === "throughput") {
            const work = throughputWork(name, step, values, run.job.spec);
            if (work) chartFor(`throughput: ${work[0]} (wall clock)`, true).add(label(run), step, work[1], false);
          } else {
            chartFor(name, false).add(label(run), step, value, false);
          }
        }
      }
    }
    const groupIndex = (title) => CHART_ORDER.indexOf(title.startsWith("throughput:") ? "throughput" : chartOf(title));
    const ordered = [...charts.keys()].sort((a, b) => (groupIndex(a) - groupIndex(b)) || a.localeCompare(b));
    for (const title of ordered) chartsNode.append(charts.get(title).node);

    main.replaceChildren(el("div", { class: "toolbar" }, el("h1", {}, "Compare"), el("span", { class: "muted", text: `${runs.length} jobs` })),
      el("div", { class: "card table-wrap" }, el("div", { class: "toolbar" }, el("h2", {}, "Parameters"), diffCount, el("span", { class: "grow" }),
        el("label", {}, showAll, " show all fields")),
        el("table", { id: "diff-table", class: "compare" }, el("thead", {}, runHeads()), diffBody)),
      chartControls(), chartsNode,
      el("div", { class: "card table-wrap" }, el("h2", {}, "Latest metric values"),
        el("table", { id: "compare-table", class: "compare" }, el("thead", {}, runHeads()), metricsBody)));
    for (const swatch of main.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.color;
    drawDiff();
    const render = () => {
      for (const chart of charts.values()) chart.render();
      bench.points = [...charts.values()].reduce((sum, c) => sum + c.points(), 0);
      bench.compareCharts = charts;
    };
    render();
    chartListeners.add(render);
    pageAbort.signal.addEventListener("abort", () => chartListeners.delete(render));
  }

  async function renderComparePicker(preselected) {
    const selected = new Set(preselected);
    const go = el("button", { type: "button", class: "primary", id: "compare-go", disabled: selected.size < 2,
      onclick: () => { location.hash = `#/compare?ids=${[...selected].join(",")}`; } }, "Compare");
    const list = el("div", { class: "checks" });
    main.replaceChildren(el("h1", {}, "Compare"), el("p", { class: "muted", text: "Pick two or more jobs (or select them in the job list)." }), el("div", { class: "card" }, list), go);
    try {
      const page = await api("/v1/jobs?limit=100&trials=show");
      for (const job of page.data) {
        list.append(el("label", {}, el("input", { type: "checkbox", checked: selected.has(job.id), "data-id": job.id,
          onchange: (e) => { if (e.target.checked) selected.add(job.id); else selected.delete(job.id); go.disabled = selected.size < 2; } }),
          ` ${job.name} (${shortId(job.id)}, ${job.status})`));
      }
    } catch (error) { list.append(el("p", { class: "error", text: errorText(error) })); }
  }

  // ------------------------------------------------------------------ sweeps

  async function renderSweeps() {
    const body = el("tbody");
    main.replaceChildren(el("h1", {}, "Sweeps"), el("div", { class: "card" }, el("table", { id: "sweeps" },
      el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Status"), el("th", {}, "Trials"),
        el("th", {}, "Best"), el("th", {}, "Created"))), body)));
    let page;
    try { page = await api("/v1/sweeps?limit=100"); } catch (error) {
      body.append(el("tr", {}, el("td", { colspan: 5, class: "error", text: errorText(error) }))); return;
    }
    if (!page.data.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "No sweeps." })));
    for (const sweep of page.data) {
      const counts = Object.entries(sweep.trials).map(([status, n]) => `${n} ${status}`).join(", ");
      const best = sweep.best && sweep.best.value !== null ? `${sweep.best.metric} ${fmt(sweep.best.value)}` +
        (sweep.best.test_value !== null && sweep.best.test_value !== undefined ? ` · held-out ${sweep.best.test_metric} ${fmt(sweep.best.test_value)}` : "") : "—";
      body.append(el("tr", { "data-id": sweep.id },
        el("td", {}, el("a", { href: `#/sweeps/${encodeURIComponent(sweep.id)}`, text: sweep.name }), el("div", { class: "muted", text: shortId(sweep.id) })),
        el("td", {}, badge(sweep.status)), el("td", { text: counts || "none yet" }), el("td", { class: "num", text: best }),
        el("td", { text: when(sweep.created_at) })));
    }
  }

  /* An axis of the parallel coordinates: numeric (log where it spans 100x or more) or
   * categorical (its values evenly spaced). position(value) is 0 (bottom) to 1 (top). */
  function axisOf(title, values) {
    const present = values.filter((v) => v !== null && v !== undefined);
    const numeric = present.length > 0 && present.every((v) => typeof v === "number" && Number.isFinite(v));
    if (numeric) {
      let lo = Math.min(...present), hi = Math.max(...present);
      const log = lo > 0 && hi / lo >= 100;
      const f = log ? Math.log10 : (v) => v;
      const [a, b] = [f(lo), f(hi)];
      return { title, log, ticks: [hi, lo], position: (v) => (typeof v !== "number" ? null : b === a ? 0.5 : (f(v) - a) / (b - a)) };
    }
    const keys = [...new Set(present.map((v) => JSON.stringify(v)))].sort();
    return { title, log: false, ticks: keys.slice().reverse().map((k) => JSON.parse(k)),
             position: (v) => (v === null || v === undefined ? null : keys.length === 1 ? 0.5 : keys.indexOf(JSON.stringify(v)) / (keys.length - 1)) };
  }

  /* Parallel coordinates: one axis per swept path and one for the metric, one line per trial
   * with a value, coloured from the best (dark) to the worst (light). */
  function parallelCoordinates(board, paths, metric, maximize, width) {
    const trials = board.filter((t) => t.value !== null && t.value !== undefined);
    const axes = [...paths.map((p) => axisOf(p, trials.map((t) => t.config[p]))), axisOf(metric, trials.map((t) => t.value))];
    const height = 340, top = 44, bottom = 30, left = 60, right = 90;
    const span = Math.max(1, axes.length - 1);
    const x = (i) => left + (i * (width - left - right)) / span;
    const y = (p) => top + (1 - p) * (height - top - bottom);
    const root = svg("svg", { id: "parallel", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
                              "aria-label": `parallel coordinates of ${paths.join(", ")} and ${metric}` });
    // Coloured by rank, so that one diverging trial does not paint all others alike.
    const ranked = trials.map((t) => t.value).sort((a, b) => (maximize ? a - b : b - a));
    const goodness = (v) => (ranked.length < 2 ? 1 : ranked.indexOf(v) / (ranked.length - 1));
    const mix = (g) => { // light orange (worst) to dark blue (best)
      const a = [240, 170, 90], b = [35, 70, 170];
      return `rgb(${a.map((c, i) => Math.round(c + (b[i] - c) * g)).join(",")})`;
    };
    const sorted = trials.slice().sort((p, q) => goodness(p.value) - goodness(q.value));  // best drawn last, on top
    for (const trial of sorted) {
      const coords = axes.map((axis, i) => {
        const p = axis.position(i === axes.length - 1 ? trial.value : trial.config[axis.title]);
        return p === null ? null : `${x(i).toFixed(1)},${y(p).toFixed(1)}`;
      });
      if (coords.includes(null)) continue;
      const line = svg("polyline", { points: coords.join(" "), fill: "none", stroke: mix(goodness(trial.value)),
                                     "stroke-width": "1.6", "stroke-opacity": "0.85", class: "trial-line", "data-id": trial.job_id },
        svg("title", { text: `${trial.trial_id || shortId(trial.job_id)}: ${metric} ${fmt(trial.value)}` }));
      root.append(line);
    }
    axes.forEach((axis, i) => {
      root.append(svg("line", { x1: x(i), x2: x(i), y1: y(1), y2: y(0), stroke: "#687083", "stroke-width": "1" }));
      const anchor = i === 0 ? "start" : i === axes.length - 1 ? "end" : "middle";
      const at = i === 0 ? x(i) - 12 : i === axes.length - 1 ? x(i) + 40 : x(i);
      root.append(svg("text", { x: at, y: 16, "text-anchor": anchor, class: "axis-title", text: axis.title + (axis.log ? " (log)" : "") }));
      const ticks = axis.ticks.length > 6 ? [axis.ticks[0], axis.ticks[axis.ticks.length - 1]] : axis.ticks;
      for (const tick of ticks) {
        const p = axis.position(tick);
        root.append(svg("text", { x: x(i) + 5, y: y(p) + 4, class: "tick", text: fmt(tick) }));
      }
    });
    return { node: root, lines: root.querySelectorAll("polyline").length, axes: axes.length };
  }

  async function renderSweep(sweepId) {
    let board;
    try {
      board = await api(`/v1/sweeps/${encodeURIComponent(sweepId)}/trials`);
    } catch (error) {
      main.replaceChildren(el("h1", {}, "Sweep"), el("p", { class: "error", id: "sweep-error", text: error.status === 404 ? "No such sweep of yours." : errorText(error) }));
      return;
    }
    const sweep = board.sweep;
    const paths = Object.keys(sweep.config.space || {});
    const metric = sweep.config.scheduler.metric;
    const maximize = sweep.config.scheduler.mode === "max";
    const testMetric = (board.data.find((t) => t.test_metric) || {}).test_metric;
    const head = el("tr", {}, el("th", {}, "#"), el("th", {}, "Trial"), el("th", {}, "Status"),
      paths.map((p) => el("th", { text: p })), el("th", { text: `${metric} (${sweep.config.scheduler.mode})` }),
      testMetric ? el("th", { title: "Held out: test tasks no trial is selected or stopped by, evaluated once after the last iteration", text: `held-out ${testMetric}` }) : null,
      el("th", {}, "Iterations"));
    const rows = board.data.map((trial, index) => el("tr", { "data-id": trial.job_id },
      el("td", { class: "num", text: String(index + 1) }),
      el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(trial.job_id)}`, text: trial.trial_id || shortId(trial.job_id) })),
      el("td", {}, badge(trial.status), trial.message && trial.status !== "succeeded" ? el("div", { class: "muted", text: trial.message }) : null),
      paths.map((p) => el("td", { class: "num", text: fmt(trial.config[p]) })),
      el("td", { class: "num", text: fmt(trial.value) }),
      testMetric ? el("td", { class: "num", text: fmt(trial.test_value), title: trial.test_note || "" }) : null,
      el("td", { class: "num", text: trial.iteration ?? "—" })));
    const area = el("div", { class: "card", id: "sweep-chart" }, el("h2", {}, "Parallel coordinates"));
    const importance = el("div", { class: "card", id: "importance-card" }, el("h2", {}, "Parameter importance"),
      el("p", { class: "muted", text: "Loading…" }));
    main.replaceChildren(
      el("div", { class: "toolbar" }, el("h1", { id: "sweep-name", text: sweep.name }), badge(sweep.status), el("span", { class: "grow" }),
        el("a", { href: `#/?sweep=${encodeURIComponent(sweep.id)}` }, "Trials as jobs"),
        el("a", { href: `#/compare?ids=${board.data.slice(0, 5).map((t) => t.job_id).join(",")}`, id: "compare-best" }, "Compare the best five"),
        el("a", { href: `#/jobs/${encodeURIComponent(sweep.driver_job_id)}` }, "Driver job (log, artifacts)")),
      sweep.error ? el("div", { class: "notice bad", text: sweep.error }) : "",
      el("div", { class: "sweep-grid" }, area, importance),
      el("div", { class: "card" }, el("h2", {}, "Leaderboard"), el("table", { id: "leaderboard" }, el("thead", {}, head), el("tbody", {}, rows))));
    if (!paths.length) area.append(el("p", { class: "muted", text: "This sweep has no parameters." }));
    else if (!board.data.some((t) => t.value !== null)) area.append(el("p", { class: "muted", id: "no-values", text: `No trial has a value of ${metric} yet.` }));
    else {
      const drawn = parallelCoordinates(board.data, paths, metric, maximize, Math.max(420, area.clientWidth - 32));
      area.append(drawn.node, el("p", { class: "muted legend", text: `One line per trial with a value, coloured by rank: dark blue is the best ${metric}, light orange the worst.` }));
      bench.points = drawn.lines;
    }
    try {
      const estimate = await api(`/v1/sweeps/${encodeURIComponent(sweepId)}/importance`);
      const list = el("table", { id: "importance" }, el("tbody", {}, estimate.parameters.map((p) => {
        const bar = el("span");
        bar.style.width = `${((p.importance || 0) * 100).toFixed(1)}%`;
        return el("tr", { "data-path": p.path },
          el("th", { scope: "row", text: p.path }),
          el("td", { class: "importance-bar" }, el("div", { class: "bar" }, bar)),
          el("td", { class: "num", text: p.importance === null ? "—" : p.importance.toFixed(2) }),
          el("td", { class: "muted", text: p.spearman === null ? "" : `ρ ${p.spearman >= 0 ? "+" : ""}${p.spearman.toFixed(2)}` }));
      })));
      importance.replaceChildren(el("h2", {}, "Parameter importance"),
        estimate.note ? el("p", { class: "notice", id: "importance-note", text: estimate.note }) : "", list,
        el("p", { class: "muted small", text: `Share of the variance of ${metric}'s ranks each path explains alone, from ${estimate.trials_used} finished trials; ρ: rank correlation with ${metric}.` }));
    } catch (error) {
      importance.replaceChildren(el("h2", {}, "Parameter importance"), el("p", { class: "error", text: errorText(error) }));
    }
  }

  // ------------------------------------------------------------------ registered models

  async function renderModels() {
    const body = el("tbody");
    const error = el("p", { class: "error", id: "models-error", role: "alert" });
    const name = el("input", { id: "new-model-name", placeholder: "model name, e.g. sine", maxlength: 100, "aria-label": "Model name" });
    const create = el("button", { type: "button", class: "primary", id: "create-model", onclick: async () => {
      error.textContent = "";
      try {
        await api("/v1/models", { method: "POST", json: { name: name.value.trim() } });
        location.hash = `#/models/${encodeURIComponent(name.value.trim())}`;
      } catch (e) { error.textContent = errorText(e); }
    } }, "Create model");
    main.replaceChildren(el("h1", {}, "Registered models"),
      el("p", { class: "muted", text: "A registered model keeps a job's final meta-init (or meta-policy) as a numbered version; an alias (production, staging…) names one version. Load one with Client.load_meta_init(\"models:/NAME@ALIAS\") or \"models:/NAME/VERSION\"." }),
      el("div", { class: "toolbar" }, name, create), error,
      el("div", { class: "card" }, el("table", { id: "models" }, el("thead", {}, el("tr", {},
        el("th", {}, "Name"), el("th", {}, "Latest version"), el("th", {}, "Versions"), el("th", {}, "Aliases"), el("th", {}, "Updated"))), body)));
    let page;
    try { page = await api("/v1/models"); } catch (e) {
      body.append(el("tr", {}, el("td", { colspan: 5, class: "error", text: errorText(e) }))); return;
    }
    if (!page.data.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "No registered models yet." })));
    for (const model of page.data) {
      body.append(el("tr", { "data-name": model.name },
        el("td", {}, el("a", { href: `#/models/${encodeURIComponent(model.name)}`, text: model.name }),
          model.description ? el("div", { class: "muted", text: model.description }) : null),
        el("td", { class: "num", text: model.latest_version ?? "—" }), el("td", { class: "num", text: String(model.version_count) }),
        el("td", {}, Object.entries(model.aliases).sort().map(([alias, version]) => el("span", { class: "badge alias" }, `${alias} → v${version}`))),
        el("td", { text: when(model.updated_at) })));
    }
  }

  /* The job metrics worth showing next to a version: test, then validation, values. */
  function headlineMetrics(latest) {
    const names = Object.keys(latest || {}).filter((n) => chartOf(n) && /^(test|val)\//.test(n)).sort((a, b) =>
      (a.startsWith("test/") ? 0 : 1) - (b.startsWith("test/") ? 0 : 1) || a.localeCompare(b));
    return names.slice(0, 3).map((n) => `${n} ${fmt(latest[n])}`).join(" · ");
  }

  async function renderModel(name) {
    let model, versions;
    try {
      [model, versions] = await Promise.all([api(`/v1/models/${encodeURIComponent(name)}`), api(`/v1/models/${encodeURIComponent(name)}/versions`)]);
    } catch (error) {
      main.replaceChildren(el("h1", {}, "Model"), el("p", { class: "error", id: "model-error", text: error.status === 404 ? "No such model of yours." : errorText(error) }));
      return;
    }
    const error = el("p", { class: "error", id: "models-error", role: "alert" });
    const body = el("tbody");
    const jobSelect = el("select", { id: "register-job", "aria-label": "Succeeded job" }, el("option", { value: "" }, "Loading succeeded jobs…"));
    const register = el("button", { type: "button", class: "primary", id: "register-version", onclick: async () => {
      error.textContent = "";
      if (!jobSelect.value) { error.textContent = "job_id: pick a succeeded job"; return; }
      try { await api(`/v1/models/${encodeURIComponent(name)}/versions`, { method: "POST", json: { job_id: jobSelect.value } }); route(); }
      catch (e) { error.textContent = errorText(e); }
    } }, "Register version");
    const aliasName = el("input", { id: "alias-name", value: "production", maxlength: 100, "aria-label": "Alias" });
    const aliasVersion = el("select", { id: "alias-version", "aria-label": "Version" },
      versions.data.map((v) => el("option", { value: String(v.version) }, `v${v.version}`)));
    const setAlias = el("button", { type: "button", id: "set-alias", disabled: !versions.data.length, onclick: async () => {
      error.textContent = "";
      try {
        await api(`/v1/models/${encodeURIComponent(name)}/aliases/${encodeURIComponent(aliasName.value.trim())}`,
                  { method: "PUT", json: { version: Number(aliasVersion.value) } });
        route();
      } catch (e) { error.textContent = errorText(e); }
    } }, "Point alias");
    main.replaceChildren(
      el("div", { class: "toolbar" }, el("h1", { id: "model-name", text: model.name }), el("span", { class: "grow" }), el("a", { href: "#/models" }, "All models")),
      model.description ? el("p", { class: "muted", text: model.description }) : "",
      el("div", { class: "grid" },
        el("div", { class: "card" }, el("h2", {}, "Register a version"),
          el("p", { class: "muted", text: "From a succeeded job of yours (its final meta-init or meta-policy)." }),
          el("div", { class: "toolbar" }, jobSelect, register)),
        el("div", { class: "card" }, el("h2", {}, "Move an alias"),
          el("div", { class: "toolbar" }, aliasName, el("span", {}, "→"), aliasVersion, setAlias))),
      error,
      el("div", { class: "card" }, el("h2", {}, "Versions"), el("table", { id: "versions" }, el("thead", {}, el("tr", {},
        el("th", {}, "Version"), el("th", {}, "Aliases"), el("th", {}, "Source job"), el("th", {}, "Kind"), el("th", {}, "Metrics of the job"),
        el("th", {}, "URI"), el("th", {}, "Registered"))), body)));
    if (!versions.data.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No versions yet." })));
    for (const version of versions.data.slice().sort((a, b) => b.version - a.version)) {
      const metrics = el("td", { class: "muted" });
      body.append(el("tr", { "data-version": String(version.version) },
        el("td", { class: "num", text: `v${version.version}` }),
        el("td", { class: "aliases" }, version.aliases.slice().sort().map((a) => el("span", { class: "badge alias", text: a }))),
        el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(version.job_id)}`, text: shortId(version.job_id) }),
          version.sweep_id ? el("div", { class: "muted" }, "trial of ", el("a", { href: `#/sweeps/${encodeURIComponent(version.sweep_id)}`, text: "a sweep" })) : null),
        el("td", { text: version.artifact_kind }), metrics, el("td", {}, el("code", { text: version.uri })),
        el("td", { text: when(version.created_at) })));
      api(`/v1/jobs/${encodeURIComponent(version.job_id)}`).then((job) => {
        metrics.replaceChildren(el("span", { text: job.name }), el("div", { text: headlineMetrics(job.latest_metrics) }));
      }).catch(() => {});
    }
    try {
      const jobs = (await api("/v1/jobs?status=succeeded&trials=show&limit=100")).data;
      jobSelect.replaceChildren(el("option", { value: "" }, jobs.length ? "Pick a succeeded job" : "No succeeded jobs"),
        ...jobs.map((job) => el("option", { value: job.id }, `${job.name} (${shortId(job.id)})${headlineMetrics(job.latest_metrics) ? " · " + headlineMetrics(job.latest_metrics) : ""}`)));
    } catch (e) { jobSelect.replaceChildren(el("option", { value: "" }, errorText(e))); }
  }

  // ------------------------------------------------------------------ datasets

  function splitText(dataset) {
    const splits = dataset.split_sizes;
    if (!splits) return "";
    const line = (value) => (value && typeof value === "object"
      ? Object.entries(value).map(([k, v]) => (v && typeof v === "object" ? `${k}: ${line(v)}` : `${k} ${v}`)).join(" / ")
      : String(value));
    if (dataset.kind === "table") return Object.entries(splits).map(([column, sizes]) => `${column}: ${line(sizes)}`).join("; ");
    return line(splits);
  }

  async function renderDatasets() {
    const body = el("tbody");
    main.replaceChildren(el("h1", {}, "Datasets"),
      el("p", { class: "muted", text: "Upload with metaserve datasets upload FILE (or POST /v1/datasets); name one in a spec by its id." }),
      el("div", { class: "card table-wrap" }, el("table", { id: "datasets" }, el("thead", {}, el("tr", {},
        el("th", {}, "Name"), el("th", {}, "Kind"), el("th", {}, "Size"), el("th", {}, "Contents"), el("th", {}, "Default split"),
        el("th", {}, "Usable for"), el("th", {}, "Uploaded"))), body)));
    let rows;
    try { rows = await allPages("/v1/datasets"); } catch (e) {
      body.append(el("tr", {}, el("td", { colspan: 7, class: "error", text: errorText(e) }))); return;
    }
    if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No datasets." })));
    for (const dataset of rows) {
      const meta = dataset.meta || {};
      const contents = dataset.kind === "table"
        ? `${meta.rows ?? "?"} rows × ${(meta.columns || []).length} columns`
        : `${dataset.classes ?? "?"} classes, ${dataset.images ?? "?"} images${dataset.shape ? ` of ${dataset.shape.join("×")}` : ""}`;
      const usable = dataset.usable_for && dataset.usable_for.length
        ? el("ul", { class: "usable" }, dataset.usable_for.map((u) => el("li", { text: u })))
        : el("span", { class: "muted", text: dataset.unusable_reason || "—" });
      body.append(el("tr", { "data-id": dataset.id },
        el("td", {}, el("span", { text: dataset.name }), el("div", {}, el("code", { text: dataset.id }))),
        el("td", { text: `${dataset.kind} (${dataset.format})` }),
        el("td", { class: "num", text: bytes(dataset.bytes) }),
        el("td", { text: contents }), el("td", { class: "split", text: splitText(dataset) }), el("td", {}, usable),
        el("td", { text: when(dataset.created_at) })));
    }
  }

  // ------------------------------------------------------------------ routing

  function route() {
    pageAbort.abort();
    pageAbort = new AbortController();
    if (!apiKey()) return renderLogin();
    document.getElementById("logout").hidden = false;
    document.getElementById("who").textContent = "logged in";
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query] = hash.split("?");
    const params = new URLSearchParams(query || "");
    for (const link of document.querySelectorAll(".top nav a")) link.classList.toggle("active", link.getAttribute("href") === `#${path.split("/").slice(0, 2).join("/")}`);
    const jobMatch = path.match(/^\/jobs\/([^/]+)$/);
    if (jobMatch) return renderJob(decodeURIComponent(jobMatch[1]));
    if (path === "/compare") return renderCompare(params);
    const sweepMatch = path.match(/^\/sweeps\/([^/]+)$/);
    if (sweepMatch) return renderSweep(decodeURIComponent(sweepMatch[1]));
    if (path === "/sweeps") return renderSweeps();
    const modelMatch = path.match(/^\/models\/([^/]+)$/);
    if (modelMatch) return renderModel(decodeURIComponent(modelMatch[1]));
    if (path === "/models") return renderModels();
    if (path === "/datasets") return renderDatasets();
    return renderJobs(params);
  }

  document.getElementById("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", route);
  route();
})();
