/* metaserve dashboard: a static page over the REST API (see api/routes/dashboard.py).
 * The API key lives in sessionStorage and goes out only as an Authorization header; every
 * text from the server is put in the page with textContent, never as HTML. */
"use strict";
(() => {
  const KEY = "metaserve.apiKey";
  const PAGE = 25;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
  const COLORS = ["#2f5fd0", "#d0602f", "#1f8a4c", "#8e44ad", "#c0392b", "#16a085", "#b7791f",
                  "#34495e", "#e84393", "#6c5ce7"];
  const MAX_LOG_LINES = 3000;
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

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const apiKey = () => sessionStorage.getItem(KEY);
  const shortId = (id) => id.slice(-8);

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

  function duration(job) {
    if (!job.started_at) return "";
    const end = job.finished_at ? new Date(job.finished_at) : new Date();
    let seconds = Math.max(0, (end - new Date(job.started_at)) / 1000);
    if (seconds < 60) return `${seconds.toFixed(0)} s`;
    if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  function fmt(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    const magnitude = Math.abs(value);
    if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)) return value.toExponential(3);
    return Number(value.toPrecision(4)).toString();
  }

  const badge = (status) => el("span", { class: `badge ${status}`, text: status });

  function progressBar(progress) {
    const total = progress && progress.total;
    const fraction = total ? Math.min(1, (progress.iteration || 0) / total) : 0;
    const bar = el("div", { class: "bar", title: total ? `${progress.iteration} / ${total}` : "" });
    bar.append(el("span", { style: `width:${(fraction * 100).toFixed(1)}%` }));
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

  // ------------------------------------------------------------------ metric grouping

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
    train_other: "Training: other", eval_other: "Evaluation: other", throughput: "Throughput",
  };
  const CHART_ORDER = Object.keys(CHART_TITLES);

  /* One uPlot chart of several series sharing the step axis; a series ``x`` with a partner
   * ``x_ci95`` gets a band mean ± CI. */
  class Chart {
    constructor(title) {
      this.title = title;
      this.series = new Map();
      this.bands = new Map();
      this.plot = null;
      this.shape = "";
      this.node = el("div", { class: "card chart" }, el("div", { class: "title", text: title }));
      this.area = el("div");
      this.node.append(this.area);
      // Follow the card's width (the grid re-flows as charts are added or the window resized).
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
    render() {
      const names = [...this.series.keys()].sort();
      const stepSet = new Set();
      for (const name of names) for (const step of this.series.get(name).keys()) stepSet.add(step);
      const steps = Float64Array.from(stepSet).sort();
      const data = [steps];
      const series = [{ label: "step" }];
      const bands = [];
      const hidden = [];  // the CI bounds: drawn as a band, not listed in the legend
      names.forEach((name, index) => {
        const values = this.series.get(name);
        const color = COLORS[index % COLORS.length];
        const column = Array.from(steps, (step) => (values.has(step) ? values.get(step) : null));
        data.push(column);
        // A series with a few steps only (a final test evaluation) is drawn as points.
        series.push({ label: name, stroke: color, width: 1.5, spanGaps: true,
                      points: { show: (plot, index) => name.startsWith("test/") || this.series.get(
                                  plot.series[index].label)?.size < 3, size: 7, fill: color } });
        const ci = this.bands.get(`${name}_ci95`);
        if (ci && ci.size) {
          const hi = column.map((v, i) => (v === null || !ci.has(steps[i]) ? null : v + ci.get(steps[i])));
          const lo = column.map((v, i) => (v === null || !ci.has(steps[i]) ? null : v - ci.get(steps[i])));
          data.push(hi, lo);
          series.push({ label: `${name} +CI`, stroke: color + "55", width: 1, dash: [4, 4], spanGaps: true, points: { show: false } },
                      { label: `${name} −CI`, stroke: color + "55", width: 1, dash: [4, 4], spanGaps: true, points: { show: false } });
          bands.push({ series: [series.length - 2, series.length - 1], fill: color + "22" });
          hidden.push(series.length - 2, series.length - 1);
        }
      });
      const shape = series.map((s) => s.label).join("|");
      const width = Math.max(280, this.area.clientWidth || 600);
      if (!this.plot || shape !== this.shape) {
        if (this.plot) this.plot.destroy();
        this.shape = shape;
        this.plot = new uPlot({
          width, height: 240, series, bands,
          scales: { x: { time: false } },
          axes: [{ label: "step" }, { size: 60 }],
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

  class Charts {
    constructor(container) {
      this.container = container;
      this.charts = new Map();
      this.dirty = new Set();
      this.scheduled = false;
    }
    add(step, values) {
      for (const [name, value] of Object.entries(values)) {
        const band = name.endsWith("_ci95");
        const group = band ? chartOf(name.slice(0, -5)) : chartOf(name);
        if (!group) continue;
        let chart = this.charts.get(group);
        if (!chart) {
          chart = new Chart(CHART_TITLES[group]);
          chart.node.dataset.chart = group;
          this.charts.set(group, chart);
          const after = CHART_ORDER.indexOf(group);
          const next = [...this.container.children].find((n) => CHART_ORDER.indexOf(n.dataset.chart) > after);
          this.container.insertBefore(chart.node, next || null);
        }
        chart.add(name, step, value, band);
        this.dirty.add(chart);
      }
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

  async function finalMetric(job, cell) {
    const total = job.progress && job.progress.total;
    if (job.status !== "succeeded" || !total) return;
    try {
      const page = await api(`/v1/jobs/${encodeURIComponent(job.id)}/metrics?since_step=${total - 1}&limit=1000`);
      const values = Object.fromEntries(page.data.map((p) => [p.name, p.value]));
      const pick = (prefix) => Object.keys(values).filter((n) => n.startsWith(prefix) && !n.endsWith("_ci95"))
        .sort((a, b) => (parseInt(b.replace(/\D+/g, ""), 10) || 0) - (parseInt(a.replace(/\D+/g, ""), 10) || 0))[0];
      const name = pick("test/accuracy") || pick("test/return") || pick("test/loss") || pick("val/accuracy") || pick("val/loss");
      if (name) {
        const [split, measure] = name.split("/");
        cell.replaceChildren(fmt(values[name]), el("div", { class: "muted", text: `${split} ${measure.replace("_step", " @")}` }));
        cell.title = name;
      }
    } catch (_) { /* leave it empty */ }
  }

  async function renderJobs(params) {
    const status = params.get("status") || "";
    const search = params.get("q") || "";
    const sweep = params.get("sweep") || "";
    const cursors = (params.get("cursors") || "").split(",").filter(Boolean);
    const cursor = cursors[cursors.length - 1] || "";
    const navigate = (changes) => {
      const next = new URLSearchParams(params);
      for (const [k, v] of Object.entries(changes)) { if (v) next.set(k, v); else next.delete(k); }
      location.hash = `#/?${next}`;
    };
    const selected = new Set();
    const compare = el("button", { type: "button", id: "compare-selected", disabled: true,
      onclick: () => { location.hash = `#/compare?ids=${[...selected].join(",")}`; } }, "Compare selected");
    const statusSelect = el("select", { id: "status-filter", "aria-label": "Status",
      onchange: (e) => navigate({ status: e.target.value, cursors: "" }) },
      el("option", { value: "" }, "All statuses"), STATUSES.map((s) => el("option", { value: s, selected: s === status }, s)));
    // The search runs on the server (GET /v1/jobs?name=), so it finds jobs on every page;
    // typing re-lists after a pause, Enter at once, and the box keeps the focus.
    let searchTimer = null;
    const searchNow = (value) => { clearTimeout(searchTimer); navigate({ q: value.trim(), cursors: "" }); };
    const searchBox = el("input", { id: "search", type: "search", placeholder: "Search names", "aria-label": "Search names",
      value: search, maxlength: 200,
      oninput: (e) => { clearTimeout(searchTimer); searchTimer = setTimeout(() => searchNow(e.target.value), 400); },
      onkeydown: (e) => { if (e.key === "Enter") searchNow(e.target.value); } });
    const refocus = document.activeElement && document.activeElement.id === "search";
    const body = el("tbody");
    const table = el("table", { id: "jobs" }, el("thead", {}, el("tr", {},
      el("th", {}, ""), el("th", {}, "Name"), el("th", {}, "Algorithm"), el("th", {}, "Family"),
      el("th", {}, "Status"), el("th", {}, "Progress"), el("th", {}, "Created"),
      el("th", {}, "Duration"), el("th", {}, "Final metric"))), body);
    const pager = el("div", { class: "pager" });
    const sweepChip = sweep ? el("span", { class: "badge", id: "sweep-filter" }, `trials of sweep ${shortId(sweep)} `,
      el("button", { type: "button", class: "link-dark", title: "all jobs", onclick: () => navigate({ sweep: "", cursors: "" }) }, "×")) : null;
    main.replaceChildren(el("h1", {}, "Jobs"),
      el("div", { class: "toolbar" }, statusSelect, searchBox, sweepChip, el("span", { class: "grow" }),
        el("button", { type: "button", id: "refresh", onclick: () => route() }, "Refresh"), compare),
      el("div", { class: "card" }, table, pager));

    if (refocus) { searchBox.focus(); searchBox.setSelectionRange(search.length, search.length); }

    const query = new URLSearchParams({ limit: String(PAGE) });
    if (status) query.set("status", status);
    if (sweep) query.set("sweep", sweep);
    if (cursor) query.set("cursor", cursor);
    if (search.trim()) query.set("name", search.trim());
    let page;
    try {
      page = await api(`/v1/jobs?${query}`);
    } catch (error) {
      body.append(el("tr", {}, el("td", { colspan: 9, class: "error", text: errorText(error) })));
      return;
    }
    if (!page.data.length) body.append(el("tr", {}, el("td", { colspan: 9, class: "muted", id: "no-jobs",
      text: search.trim() ? `No jobs whose name contains “${search.trim()}”.` : "No jobs." })));
    for (const job of page.data) {
      const finalCell = el("td", { class: "num" });
      const box = el("input", { type: "checkbox", "aria-label": `select ${job.name}`, "data-id": job.id,
        onchange: (e) => { if (e.target.checked) selected.add(job.id); else selected.delete(job.id); compare.disabled = selected.size < 2; } });
      body.append(el("tr", { "data-id": job.id, "data-name": job.name },
        el("td", {}, box),
        el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, text: job.name }), el("div", { class: "muted", text: shortId(job.id) })),
        el("td", { text: job.spec.algorithm && job.spec.algorithm.name }),
        el("td", { text: job.spec.task_family && job.spec.task_family.name }),
        el("td", {}, badge(job.status), job.status === "queued" && job.message ? el("div", { class: "muted", text: job.message }) : null),
        el("td", {}, progressBar(job.progress), el("div", { class: "muted", text: progressText(job.progress) })),
        el("td", { text: when(job.created_at) }),
        el("td", { class: "num", text: duration(job) }),
        finalCell));
      finalMetric(job, finalCell);
    }
    if (cursors.length) pager.append(el("button", { type: "button", onclick: () => navigate({ cursors: cursors.slice(0, -1).join(",") }) }, "← Newer"));
    if (page.next_cursor) pager.append(el("button", { type: "button", id: "older", onclick: () => navigate({ cursors: [...cursors, page.next_cursor].join(",") }) }, "Older →"));
  }

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
    const charts = new Charts(chartsNode);
    window.metaserveDashboard.charts = charts;

    main.replaceChildren(
      el("div", { class: "toolbar" }, el("h1", { id: "job-name", text: job.name }), statusNode, live,
        el("span", { class: "grow" }), compareWith, resubmit, cancel),
      notice,
      el("div", { class: "card" }, el("dl", { class: "kv" },
        el("dt", {}, "Id"), el("dd", {}, el("code", { text: job.id })),
        el("dt", {}, "Algorithm"), el("dd", { text: `${job.spec.algorithm.name} on ${job.spec.task_family.name}` }),
        el("dt", {}, "Progress"), el("dd", {}, progressNode),
        el("dt", {}, "Attempt"), el("dd", { id: "attempt", text: `${job.attempt} of ${job.max_attempts}` }),
        el("dt", {}, "Created"), el("dd", { text: when(job.created_at) }))),
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
      const items = [];
      if (job.status === "queued" && job.message) items.push(el("div", { class: "notice", id: "queue-reason", text: `Waiting: ${job.message}` }));
      if (job.error) items.push(el("div", { class: "notice bad", id: "job-failure", text: job.error }));
      notice.replaceChildren(...items);
    }

    async function showArtifacts() {
      try {
        const list = await api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`);
        artifacts.replaceChildren(...(list.data || []).map((artifact) => el("tr", {},
          el("td", { text: artifact.name }), el("td", { class: "num", text: `${(artifact.size / 1024).toFixed(1)} KiB` }),
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
    follow(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
      signal,
      isLast: (kind, data) => kind === "status" && TERMINAL.has(data.status),
      onState: (state) => { live.className = `live ${state}`; live.textContent = state === "on" ? "live" : state === "done" ? "" : "reconnecting…"; },
      onEvent: async (kind, data) => {
        if (kind === "metrics") charts.add(data.step, data.values);
        else if (kind === "progress") { job.progress = data; showJob(); }
        else if (kind === "status") {
          history.append(el("li", {}, badge(data.status), ` attempt ${data.attempt}`,
            data.message ? el("span", { class: "muted", text: ` — ${data.message}` }) : null));
          try { job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`); } catch (_) { job.status = data.status; }
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
    const names = [...new Set(runs.flatMap((run) => run.points.map((p) => p.name)))].filter((n) => chartOf(n)).sort();
    const preferred = ["train/loss_after", "train/return_after", "val/accuracy_step1", "val/loss_step1"].find((n) => names.includes(n));
    let metric = params.get("metric") || preferred || names[0] || "";
    const picker = el("select", { id: "compare-metric", "aria-label": "Metric",
      onchange: (e) => { const next = new URLSearchParams(params); next.set("metric", e.target.value); location.hash = `#/compare?${next}`; } },
      names.map((n) => el("option", { value: n, selected: n === metric }, n)));
    const area = el("div", { class: "card chart", id: "compare-chart" });
    const rows = el("tbody");
    main.replaceChildren(el("div", { class: "toolbar" }, el("h1", {}, "Compare"), el("span", { class: "grow" }), el("label", { for: "compare-metric" }, "Metric "), picker),
      area, el("div", { class: "card" }, el("table", { id: "compare-table" }, el("thead", {}, el("tr", {}, el("th", {}, "Job"), el("th", {}, "Status"), el("th", {}, "Algorithm"), el("th", {}, `Last ${metric}`))), rows)));
    const stepSet = new Set();
    const columns = runs.map((run) => {
      const values = new Map(run.points.filter((p) => p.name === metric).map((p) => [p.step, p.value]));
      for (const step of values.keys()) stepSet.add(step);
      return values;
    });
    const steps = Float64Array.from(stepSet).sort();
    const data = [steps, ...columns.map((values) => Array.from(steps, (s) => (values.has(s) ? values.get(s) : null)))];
    const series = [{ label: "step" }, ...runs.map((run, i) => ({ label: `${run.job.name} (${shortId(run.job.id)})`, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true, points: { show: false } }))];
    new uPlot({ width: Math.max(320, area.clientWidth - 32), height: 320, series, scales: { x: { time: false } }, axes: [{ label: "step" }, { label: metric, size: 60 }] }, data, area);
    bench.points = columns.reduce((sum, values) => sum + values.size, 0);
    runs.forEach((run, i) => {
      const last = [...columns[i].entries()].sort((a, b) => a[0] - b[0]).pop();
      rows.append(el("tr", {}, el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(run.job.id)}`, text: run.job.name })),
        el("td", {}, badge(run.job.status)), el("td", { text: run.job.spec.algorithm.name }), el("td", { class: "num", text: last ? fmt(last[1]) : "—" })));
    });
  }

  async function renderComparePicker(preselected) {
    const selected = new Set(preselected);
    const go = el("button", { type: "button", class: "primary", id: "compare-go", disabled: selected.size < 2,
      onclick: () => { location.hash = `#/compare?ids=${[...selected].join(",")}`; } }, "Compare");
    const list = el("div", { class: "checks" });
    main.replaceChildren(el("h1", {}, "Compare"), el("p", { class: "muted", text: "Pick two or more jobs." }), el("div", { class: "card" }, list), go);
    try {
      const page = await api("/v1/jobs?limit=100");
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
      const best = sweep.best && sweep.best.value !== null ? `${sweep.best.metric} ${fmt(sweep.best.value)}` : "—";
      body.append(el("tr", { "data-id": sweep.id },
        el("td", {}, el("a", { href: `#/sweeps/${encodeURIComponent(sweep.id)}`, text: sweep.name }), el("div", { class: "muted", text: shortId(sweep.id) })),
        el("td", {}, badge(sweep.status)), el("td", { text: counts || "none yet" }), el("td", { class: "num", text: best }),
        el("td", { text: when(sweep.created_at) })));
    }
  }

  /* A sweep: its trials' leaderboard (best first by the sweep's metric) and the metric
   * against one parameter of the space. */
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
    const head = el("tr", {}, el("th", {}, "#"), el("th", {}, "Trial"), el("th", {}, "Status"),
      paths.map((p) => el("th", { text: p })), el("th", { text: `${metric} (${sweep.config.scheduler.mode})` }), el("th", {}, "Iterations"));
    const rows = board.data.map((trial, index) => el("tr", { "data-id": trial.job_id },
      el("td", { class: "num", text: String(index + 1) }),
      el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(trial.job_id)}`, text: trial.trial_id || shortId(trial.job_id) })),
      el("td", {}, badge(trial.status)),
      paths.map((p) => el("td", { class: "num", text: typeof trial.config[p] === "number" ? fmt(trial.config[p]) : JSON.stringify(trial.config[p]) })),
      el("td", { class: "num", text: fmt(trial.value) }), el("td", { class: "num", text: trial.iteration ?? "—" })));
    const picker = el("select", { id: "sweep-parameter", "aria-label": "Parameter", onchange: () => plot() },
      paths.map((p) => el("option", { value: p }, p)));
    const area = el("div", { class: "card chart", id: "sweep-chart" });
    main.replaceChildren(
      el("div", { class: "toolbar" }, el("h1", { id: "sweep-name", text: sweep.name }), badge(sweep.status), el("span", { class: "grow" }),
        el("a", { href: `#/?sweep=${encodeURIComponent(sweep.id)}` }, "Trials as jobs"),
        el("a", { href: `#/jobs/${encodeURIComponent(sweep.driver_job_id)}` }, "Driver job (log, artifacts)")),
      sweep.error ? el("div", { class: "notice bad", text: sweep.error }) : "",
      el("div", { class: "toolbar" }, el("label", { for: "sweep-parameter" }, `${metric} against `), picker),
      area,
      el("div", { class: "card" }, el("h2", {}, "Leaderboard"), el("table", { id: "leaderboard" }, el("thead", {}, head), el("tbody", {}, rows))));
    let chart = null;
    function plot() {
      const path = picker.value;
      const points = board.data.filter((t) => typeof t.config[path] === "number" && t.value !== null)
        .map((t) => [t.config[path], t.value]).sort((a, b) => a[0] - b[0]);
      const xs = points.map((p) => p[0]);
      const logX = xs.length > 1 && xs[0] > 0 && xs[xs.length - 1] / xs[0] >= 100;
      if (chart) chart.destroy();
      chart = new uPlot({
        width: Math.max(320, area.clientWidth - 32), height: 300,
        scales: { x: { time: false, distr: logX ? 3 : 1 } },
        axes: [{ label: path }, { label: metric, size: 60 }],
        series: [{ label: path }, { label: metric, stroke: COLORS[0], paths: () => null, points: { show: true, size: 9, fill: COLORS[0] } }],
      }, [xs, points.map((p) => p[1])], area);
      bench.points = points.length;
    }
    if (paths.length) plot(); else area.append(el("p", { class: "muted", text: "This sweep has no parameters." }));
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
    const jobMatch = path.match(/^\/jobs\/([^/]+)$/);
    if (jobMatch) return renderJob(decodeURIComponent(jobMatch[1]));
    if (path === "/compare") return renderCompare(params);
    const sweepMatch = path.match(/^\/sweeps\/([^/]+)$/);
    if (sweepMatch) return renderSweep(decodeURIComponent(sweepMatch[1]));
    if (path === "/sweeps") return renderSweeps();
    return renderJobs(params);
  }

  document.getElementById("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", route);
  route();
})();
