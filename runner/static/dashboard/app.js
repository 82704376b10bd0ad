// workerhost dashboard: one page, hash routes, no framework, no build step.
//
// Everything that comes from the API is put in the page as text (text nodes,
// textContent, attributes), never parsed as HTML: see el() below, the only way
// this file makes elements. No inline handlers, no eval: a strict CSP holds.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const POLL_MS = 2000;
  const PAGE = 50;
  const STATUSES = ["pending", "running", "completed", "failed", "dead"];
  const FINAL = new Set(["completed", "failed", "dead"]);
  const FORBIDDEN = new Set(["innerHTML", "outerHTML", "insertAdjacentHTML", "srcdoc"]);

  const state = {
    session: null, // {auth_required, logged_in}
    gen: 0, // bumped on every route change: stale answers and timers see it and stop
    timer: null,
    errorSource: null,
    tasks: { status: "", type: "", q: "", offset: 0 }, // the task list's filters, kept across routes
  };

  // -- building elements --------------------------------------------------------------

  function build(node, attrs, children, isSvg) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (value === false) {
        if (!isSvg && key in node && typeof node[key] === "boolean") node[key] = false;
        continue;
      }
      if (FORBIDDEN.has(key)) throw new Error(`el(): ${key} is not allowed`);
      if (key.startsWith("on") && typeof value === "function") {
        node.addEventListener(key.slice(2), value);
      } else if (key === "class") {
        node.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : String(value));
      } else if (key === "dataset") {
        for (const [k, v] of Object.entries(value)) if (v !== null && v !== undefined) node.dataset[k] = String(v);
      } else if (key === "style") {
        Object.assign(node.style, value); // CSSOM: allowed under a strict style-src
      } else if (!isSvg && key in node && typeof node[key] !== "function") {
        node[key] = value;
      } else {
        node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(node, child);
      else if (child instanceof Node) node.appendChild(child);
      else node.appendChild(document.createTextNode(String(child)));
    }
  }

  function el(tag, attrs, ...children) {
    return build(document.createElement(tag), attrs, children, false);
  }

  function svg(tag, attrs, ...children) {
    return build(document.createElementNS(SVG_NS, tag), attrs, children, true);
  }

  const $ = (selector) => document.querySelector(selector);

  // Replaces a node's children, with el()'s rules (text as text nodes, arrays flattened, null skipped).
  function fill(node, ...children) {
    while (node.firstChild) node.removeChild(node.firstChild);
    append(node, children);
    return node;
  }

  // -- talking to the host -------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (method !== "GET") headers["X-Workerhost-CSRF"] = "1";
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let text;
    let response;
    try {
      response = await fetch(path, init);
      text = await response.text();
    } catch (err) {
      throw new HttpError(0, `cannot reach the host (${(err && err.message) || err})`);
    }
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = null;
      }
    }
    if (!response.ok) {
      const said = data && typeof data.error === "string" ? data.error : "";
      throw new HttpError(response.status, said || `${response.status} ${response.statusText || "error"}`, data);
    }
    return data;
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, String(v));
    const s = q.toString();
    return s ? `?${s}` : "";
  }

  const taskPath = (id) => `/tasks/${encodeURIComponent(id)}`;
  const taskHref = (id) => `#/tasks/${encodeURIComponent(id)}`;

  // -- the error banner ----------------------------------------------------------------

  function showError(message, source = "action") {
    const banner = $("#error");
    $("#error-text").textContent = message;
    banner.hidden = false;
    state.errorSource = source;
  }

  function hideError(source) {
    if (source && state.errorSource !== source) return;
    $("#error").hidden = true;
    state.errorSource = null;
  }

  function describe(err) {
    if (err instanceof HttpError) return err.status ? `${err.message} (HTTP ${err.status})` : err.message;
    return String((err && err.message) || err);
  }

  // Every failure ends here: a 401 asks for the token again, anything else shows in the banner.
  function failed(err, what, source = "action") {
    if (err instanceof HttpError && err.status === 401) {
      state.session = { auth_required: true, logged_in: false };
      showLogin();
      return;
    }
    showError(what ? `${what}: ${describe(err)}` : describe(err), source);
  }

  // Runs fn now and every POLL_MS while the route stays the same (not while the tab is hidden).
  function poll(gen, what, fn) {
    const tick = async () => {
      if (gen !== state.gen) return;
      if (!document.hidden) {
        try {
          await fn();
          if (gen === state.gen) {
            hideError("poll");
            markLive();
          }
        } catch (err) {
          if (gen !== state.gen) return;
          failed(err, what, "poll");
          if (err instanceof HttpError && err.status === 401) return;
        }
      }
      if (gen === state.gen) state.timer = setTimeout(tick, POLL_MS);
    };
    tick();
  }

  function markLive() {
    const live = $("#live");
    live.hidden = false;
    live.textContent = `live · ${clock(new Date())}`;
  }

  // -- formatting ----------------------------------------------------------------------

  const pad = (n) => String(n).padStart(2, "0");
  const clock = (d) => `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;

  function when(iso) {
    if (!iso) return el("span", { class: "muted" }, "—");
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const text = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(d)}`;
    return el("time", { dateTime: String(iso), title: String(iso) }, text);
  }

  function seconds(value) {
    if (value === null || value === undefined || value === "") return "—";
    const n = Number(value);
    if (!Number.isFinite(n)) return String(value);
    if (n < 1) return `${(n * 1000).toFixed(n < 0.01 ? 2 : 1)} ms`;
    if (n < 120) return `${n.toFixed(2)} s`;
    return `${Math.floor(n / 60)} min ${Math.round(n % 60)} s`;
  }

  function ms(value) {
    const n = Number(value) * 1000;
    if (!Number.isFinite(n)) return "—";
    if (n === 0) return "0 ms";
    return `${n < 1 ? n.toFixed(2) : n < 100 ? n.toFixed(1) : Math.round(n)} ms`;
  }

  const NUMERIC = new Set(["#", "attempts", "exit code", "duration", "in flight"]);
  const th = (h) => el("th", { class: NUMERIC.has(h) ? "num" : null }, h);

  function bytes(value) {
    if (value === null || value === undefined || value === "") return "—";
    if (typeof value !== "number") return String(value);
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let n = value;
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${Number.isInteger(n) ? n : n.toFixed(1)} ${units[i]}`;
  }

  function shortDigest(digest) {
    if (!digest) return el("span", { class: "muted" }, "—");
    const text = String(digest);
    const [algo, hex] = text.includes(":") ? text.split(":", 2) : ["", text];
    const short = (algo ? `${algo}:` : "") + hex.slice(0, 12);
    return el("code", { class: "mono", title: text }, short);
  }

  function pretty(value) {
    if (value === undefined) return "";
    try {
      return JSON.stringify(value, null, 2);
    } catch (_) {
      return String(value);
    }
  }

  function text(value) {
    if (value === null || value === undefined || value === "") return el("span", { class: "muted" }, "—");
    return typeof value === "object" ? pretty(value) : String(value);
  }

  function badge(status) {
    const s = String(status || "unknown");
    return el("span", { class: `badge status-${s.replace(/[^a-z_-]/gi, "")}`, dataset: { status: s } }, s);
  }

  function yesNo(value, yes = "yes", no = "no") {
    if (value === null || value === undefined) return el("span", { class: "badge neutral" }, "unknown");
    return el("span", { class: `badge ${value ? "ok" : "bad"}` }, value ? yes : no);
  }

  function card(title, ...children) {
    return el("section", { class: "card" }, title ? el("h2", null, title) : null, ...children);
  }

  function table(headers, rows, attrs) {
    return el("table", attrs, el("thead", null, el("tr", null, headers.map(th))),
      el("tbody", null, rows));
  }

  function safeUrl(url) {
    try {
      const u = new URL(String(url), location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (_) {
      return null;
    }
  }

  function mount(view) {
    fill($("#main"), view);
  }

  // Keeps the last answer's JSON, so a poll that brings nothing new leaves the page alone.
  function changed(holder, data) {
    const key = JSON.stringify(data);
    if (holder.last === key) return false;
    holder.last = key;
    return true;
  }

  let typesCache = null;
  async function taskTypes() {
    const workers = await api("GET", "/workers");
    const types = new Set();
    for (const w of workers || []) for (const t of w.task_types || []) types.add(String(t));
    typesCache = [...types].sort();
    return typesCache;
  }

  // -- session and login ---------------------------------------------------------------

  async function boot() {
    try {
      state.session = await api("GET", "/session");
    } catch (err) {
      document.body.classList.remove("booting");
      showError(`Cannot read the session: ${describe(err)}`);
      return;
    }
    document.body.classList.remove("booting");
    if (state.session && state.session.auth_required && !state.session.logged_in) {
      showLogin();
      return;
    }
    loggedIn();
  }

  function loggedIn() {
    document.body.classList.remove("logged-out");
    $("#logout").hidden = !(state.session && state.session.auth_required);
    route();
  }

  function showLogin() {
    state.gen += 1;
    clearTimeout(state.timer);
    hideError();
    document.body.classList.add("logged-out");
    $("#logout").hidden = true;
    $("#live").hidden = true;
    const message = el("p", { id: "login-error", class: "form-error", role: "alert", hidden: true });
    const token = el("input", {
      id: "token", name: "token", type: "password", autocomplete: "current-password", required: true,
      placeholder: "API token",
    });
    const submit = el("button", { type: "submit" }, "Log in");
    const form = el("form", { class: "login-form", onsubmit: (e) => {
      e.preventDefault();
      login(token.value, message, submit).catch((err) => showError(describe(err)));
    } },
    el("label", { for: "token" }, "Token"), token, submit, message);
    mount(el("section", { id: "login", class: "view narrow" },
      card("Log in", el("p", { class: "muted" }, "This host asks for its API token ([host] api_token)."), form)));
    token.focus();
  }

  async function login(token, message, submit) {
    submit.disabled = true;
    message.hidden = true;
    try {
      await api("POST", "/login", { token });
    } catch (err) {
      message.textContent = err instanceof HttpError && err.status ? err.message : describe(err);
      message.hidden = false;
      return;
    } finally {
      submit.disabled = false;
    }
    state.session = await api("GET", "/session");
    if (state.session && state.session.auth_required && !state.session.logged_in) {
      message.textContent = "Logged in, but the browser kept no session cookie (is the page served over the same origin?)";
      message.hidden = false;
      return;
    }
    loggedIn();
  }

  async function logout() {
    try {
      await api("POST", "/logout");
    } catch (err) {
      failed(err, "Log out");
      return;
    }
    state.session = { auth_required: true, logged_in: false };
    showLogin();
  }

  // -- routing -------------------------------------------------------------------------

  function parseHash() {
    const raw = location.hash.replace(/^#/, "") || "/";
    const [path, search] = raw.split("?", 2);
    return { path: path || "/", params: new URLSearchParams(search || "") };
  }

  function route() {
    if (state.session && state.session.auth_required && !state.session.logged_in) return;
    state.gen += 1;
    clearTimeout(state.timer);
    hideError();
    const gen = state.gen;
    const { path, params } = parseHash();
    const parts = path.split("/").filter(Boolean);
    let name = "";
    if (parts.length === 0) name = "overview";
    else if (parts[0] === "tasks" && parts.length === 1) name = "tasks";
    else if (parts[0] === "tasks" && parts.length === 2) name = "task";
    else if (parts.length === 1 && ["workers", "dead", "submit"].includes(parts[0])) name = parts[0];
    for (const a of document.querySelectorAll("#nav a")) {
      const active = a.dataset.route === (name === "task" ? "tasks" : name);
      a.classList.toggle("active", active);
      if (active) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    window.scrollTo(0, 0);
    switch (name) {
      case "overview": return viewOverview(gen);
      case "tasks": return viewTasks(gen, params);
      case "task": return viewTask(gen, decodeURIComponent(parts[1]));
      case "workers": return viewWorkers(gen);
      case "dead": return viewDead(gen);
      case "submit": return viewSubmit(gen);
      default:
        document.title = "workerhost";
        return mount(el("section", { id: "notfound", class: "view" }, el("h1", null, "Not found"),
          el("p", null, "No page ", el("code", null, location.hash), ". ", el("a", { href: "#/" }, "Overview"))));
    }
  }

  // -- overview ------------------------------------------------------------------------

  function viewOverview(gen) {
    document.title = "Overview · workerhost";
    const body = el("div", { class: "grid" }, el("p", { class: "muted" }, "Loading…"));
    mount(el("section", { id: "overview", class: "view" }, el("h1", null, "Overview"), body));
    const seen = {};
    poll(gen, "Overview", async () => {
      const data = await api("GET", "/overview");
      if (gen !== state.gen || !changed(seen, data)) return;
      fill(body, ...overviewCards(data || {}));
    });
  }

  function overviewCards(data) {
    const counts = data.tasks || {};
    const total = STATUSES.reduce((sum, s) => sum + (Number(counts[s]) || 0), 0);
    const stats = el("div", { class: "stats" },
      STATUSES.map((s) => el("a", { class: `stat status-${s}`, href: `#/tasks?status=${s}`, dataset: { status: s } },
        el("span", { class: "count" }, String(counts[s] ?? 0)), el("span", { class: "label" }, s))),
      el("div", { class: "stat total" }, el("span", { class: "count" }, String(total)), el("span", { class: "label" }, "all")));

    const workers = data.workers || [];
    const flight = workers.length
      ? table(["worker", "in flight", ""], workers.map((w) => {
        const n = Number(w.in_flight) || 0;
        const cap = Number(w.concurrency) || 0;
        return el("tr", { dataset: { worker: w.name } },
          el("td", null, el("a", { href: "#/workers" }, w.name)),
          el("td", { class: "num" }, cap ? `${n} / ${cap}` : String(n)),
          el("td", { class: "meter-cell" }, el("div", { class: "meter" },
            el("div", { class: "fill", style: { width: `${cap ? Math.min(100, (n / cap) * 100) : 0}%` } }))));
      }), { class: "compact", id: "in-flight" })
      : el("p", { class: "muted" }, "No workers configured.");

    const perMinute = Array.isArray(data.per_minute) ? data.per_minute : [];
    const done = perMinute.reduce((s, m) => s + (Number(m.completed) || 0), 0);
    const bad = perMinute.reduce((s, m) => s + (Number(m.failed) || 0), 0);

    const health = (what, h) => el("div", { class: "health-row", dataset: { what } },
      el("span", { class: "health-name" }, what),
      yesNo(h ? h.ok : null, "ok", "down"),
      h && h.error ? el("span", { class: "health-error" }, String(h.error)) : null);

    return [
      card("Tasks by status", data.tasks === null ? el("p", { class: "muted" }, "This source keeps no tasks (RabbitMQ carries them only).") : stats),
      card("In flight per worker", flight),
      el("section", { class: "card wide" }, el("h2", null, "Completed and failed per minute, last hour"),
        chart(perMinute),
        el("div", { class: "legend" },
          el("span", { class: "swatch completed" }), `completed ${done}`,
          el("span", { class: "swatch failed" }), `failed ${bad}`)),
      card("Health", el("div", { id: "health" }, health("engine", data.engine), health("source", data.source),
        el("div", { class: "health-row" }, el("span", { class: "health-name" }, "traces"),
          data.trace_url ? el("span", null, "linked to ", el("code", null, String(data.trace_url)))
            : el("span", { class: "muted" }, "no [telemetry] trace_url: waterfalls only")))),
    ];
  }

  function chart(perMinute) {
    const W = 720;
    const H = 170;
    const left = 34;
    const right = 6;
    const top = 10;
    const bottom = 24;
    const n = Math.max(perMinute.length, 1);
    const plotW = W - left - right;
    const plotH = H - top - bottom;
    const max = Math.max(1, ...perMinute.map((m) => (Number(m.completed) || 0) + (Number(m.failed) || 0)));
    const bw = plotW / n;
    const y = (v) => top + plotH - (v / max) * plotH;
    const root = svg("svg", {
      class: "chart", id: "per-minute", viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "tasks completed and failed per minute over the last hour"
    });
    root.appendChild(svg("line", { class: "axis", x1: left, x2: W - right, y1: top + plotH, y2: top + plotH }));
    root.appendChild(svg("line", { class: "grid", x1: left, x2: W - right, y1: top, y2: top }));
    root.appendChild(svg("text", { class: "tick", x: left - 6, y: top + 4, "text-anchor": "end" }, String(max)));
    root.appendChild(svg("text", { class: "tick", x: left - 6, y: top + plotH, "text-anchor": "end" }, "0"));
    perMinute.forEach((m, i) => {
      const c = Number(m.completed) || 0;
      const f = Number(m.failed) || 0;
      const x = left + i * bw;
      const d = new Date(m.minute);
      const label = Number.isNaN(d.getTime()) ? String(m.minute) : `${pad(d.getHours())}:${pad(d.getMinutes())}`;
      const g = svg("g", { class: "minute", "data-minute": String(m.minute), "data-completed": c, "data-failed": f },
        svg("title", null, `${label}: ${c} completed, ${f} failed`),
        svg("rect", { class: "hit", x, y: top, width: bw, height: plotH }));
      const w = Math.max(bw - 2, 1);
      if (c) g.appendChild(svg("rect", { class: "completed", x: x + 1, y: y(c), width: w, height: top + plotH - y(c) }));
      if (f) g.appendChild(svg("rect", { class: "failed", x: x + 1, y: y(c + f), width: w, height: y(c) - y(c + f) }));
      root.appendChild(g);
      if (i === 0 || i === n - 1 || i % 15 === 0) {
        const anchor = i === 0 ? "start" : i === n - 1 ? "end" : "middle";
        root.appendChild(svg("text", { class: "tick", x: i === n - 1 ? x + bw : x, y: H - 6, "text-anchor": anchor }, label));
      }
    });
    if (!perMinute.length) {
      root.appendChild(svg("text", { class: "tick", x: W / 2, y: top + plotH / 2, "text-anchor": "middle" }, "no data"));
    }
    return root;
  }

  // -- tasks ---------------------------------------------------------------------------

  function viewTasks(gen, params) {
    document.title = "Tasks · workerhost";
    const f = state.tasks;
    if ([...params.keys()].length) {
      f.status = params.get("status") || "";
      f.type = params.get("type") || "";
      f.q = params.get("q") || "";
      f.offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
    }
    const statusSel = el("select", { id: "filter-status", name: "status" },
      el("option", { value: "" }, "any status"), STATUSES.map((s) => el("option", { value: s }, s)));
    statusSel.value = f.status;
    const typeSel = el("select", { id: "filter-type", name: "type" }, el("option", { value: "" }, "any type"));
    const fillTypes = (types) => {
      const all = new Set(types);
      if (f.type) all.add(f.type);
      fill(typeSel, el("option", { value: "" }, "any type"), [...all].sort().map((t) => el("option", { value: t }, t)));
      typeSel.value = f.type;
    };
    fillTypes(typesCache || []);
    const search = el("input", {
      id: "filter-q", name: "q", type: "search", placeholder: "task id or correlation id", value: f.q,
      autocomplete: "off", spellcheck: false,
    });
    const clear = el("button", { type: "button", class: "secondary", id: "filter-clear" }, "Clear");
    const tbody = el("tbody", null, el("tr", null, el("td", { colSpan: 6, class: "muted" }, "Loading…")));
    const prev = el("button", { type: "button", class: "secondary", id: "prev", disabled: true }, "← Prev");
    const next = el("button", { type: "button", class: "secondary", id: "next", disabled: true }, "Next →");
    const info = el("span", { class: "muted", id: "page-info" });

    const list = el("table", { class: "tasks-table", id: "tasks-table" },
      el("thead", null, el("tr", null, ["id", "type", "status", "attempts", "created", "finished"].map(th))),
      tbody);
    mount(el("section", { id: "tasks", class: "view" }, el("h1", null, "Tasks"),
      el("section", { class: "card" },
        el("form", { class: "filters", role: "search", onsubmit: (e) => { e.preventDefault(); apply(); } },
          el("label", null, "Status ", statusSel), el("label", null, "Type ", typeSel),
          el("label", { class: "grow" }, "Search ", search), clear),
        el("div", { class: "table-wrap" }, list),
        el("div", { class: "pager" }, prev, info, next))));

    const seen = {};
    let seq = 0;
    const refresh = async () => {
      seq += 1;
      const mine = seq;
      const data = await api("GET", `/tasks${query({ status: f.status, type: f.type, q: f.q.trim(), limit: PAGE + 1, offset: f.offset })}`);
      if (gen !== state.gen || mine !== seq) return;
      const rows = Array.isArray(data) ? data : [];
      const more = rows.length > PAGE;
      const shown = rows.slice(0, PAGE);
      prev.disabled = f.offset === 0;
      next.disabled = !more;
      info.textContent = shown.length ? `${f.offset + 1}–${f.offset + shown.length}` : "";
      if (!changed(seen, { filters: { ...f }, shown })) return;
      fill(tbody, ...(shown.length ? shown.map(taskRow)
        : [el("tr", { class: "empty" }, el("td", { colSpan: 6, class: "muted" },
          f.status || f.type || f.q ? "No tasks match these filters." : "No tasks yet."))]));
    };
    const now = () => refresh().catch((err) => { if (gen === state.gen) failed(err, "Tasks", "poll"); });
    const syncHash = () => {
      const h = `#/tasks${query({ status: f.status, type: f.type, q: f.q.trim(), offset: f.offset || "" })}`;
      if (location.hash !== h) history.replaceState(null, "", h);
    };
    let debounce = null;
    const apply = () => {
      clearTimeout(debounce);
      f.status = statusSel.value;
      f.type = typeSel.value;
      f.q = search.value;
      f.offset = 0;
      syncHash();
      now();
    };
    statusSel.addEventListener("change", apply);
    typeSel.addEventListener("change", apply);
    search.addEventListener("input", () => {
      clearTimeout(debounce);
      debounce = setTimeout(apply, 300);
    });
    clear.addEventListener("click", () => {
      statusSel.value = "";
      typeSel.value = "";
      search.value = "";
      apply();
    });
    prev.addEventListener("click", () => {
      f.offset = Math.max(0, f.offset - PAGE);
      syncHash();
      now();
    });
    next.addEventListener("click", () => {
      f.offset += PAGE;
      syncHash();
      now();
    });

    syncHash();
    taskTypes().then((types) => { if (gen === state.gen) fillTypes(types); })
      .catch((err) => { if (gen === state.gen) failed(err, "Task types"); });
    poll(gen, "Tasks", refresh);
  }

  function taskRow(t) {
    const attempts = t.max_attempts ? `${t.attempts ?? 0} / ${t.max_attempts}` : String(t.attempts ?? 0);
    return el("tr", { dataset: { id: t.id, status: t.status } },
      el("td", null, el("a", { class: "mono", href: taskHref(t.id) }, String(t.id))),
      el("td", null, text(t.type)),
      el("td", null, badge(t.status)),
      el("td", { class: "num" }, attempts),
      el("td", null, when(t.created_at)),
      el("td", null, when(t.finished_at)));
  }

  // -- one task ------------------------------------------------------------------------

  function viewTask(gen, id) {
    document.title = `Task ${id} · workerhost`;
    const body = el("div", { class: "stack" }, el("p", { class: "muted" }, "Loading…"));
    mount(el("section", { id: "task", class: "view", dataset: { id } },
      el("p", { class: "crumbs" }, el("a", { href: "#/tasks" }, "← Tasks")),
      el("h1", null, "Task ", el("span", { class: "mono" }, id)), body));
    const seen = {};
    let gone = false;
    const load = async () => {
      if (gone) return;
      let task;
      try {
        task = await api("GET", taskPath(id));
      } catch (err) {
        if (err instanceof HttpError && err.status === 404) {
          gone = true;
          if (gen === state.gen) fill(body, card(null, el("p", { class: "muted" }, err.message)));
          return;
        }
        throw err;
      }
      if (gen !== state.gen || !changed(seen, task)) return;
      fill(body, ...taskCards(task || {}, () => load().catch((err) => failed(err, "Task"))));
    };
    poll(gen, "Task", load);
  }

  function taskCards(t, reload) {
    const facts = [
      ["status", badge(t.status)],
      ["type", text(t.type)],
      ["attempts", t.max_attempts ? `${t.attempts ?? 0} / ${t.max_attempts}` : text(t.attempts)],
      ["priority", text(t.priority)],
      ["worker", text(t.worker)],
      ["correlation id", t.correlation_id ? el("span", { class: "mono" }, String(t.correlation_id)) : text(null)],
      ["created", when(t.created_at)],
      ["started", when(t.started_at)],
      ["finished", when(t.finished_at)],
      ["duration", seconds(t.duration)],
      ["image", shortDigest(t.image_id)],
    ];
    if (t.run_at) facts.push(["runs at", when(t.run_at)]);
    if (t.idempotency_key) facts.push(["idempotency key", el("span", { class: "mono" }, String(t.idempotency_key))]);
    if (t.trace_id) facts.push(["trace id", el("span", { class: "mono" }, String(t.trace_id))]);

    const actions = el("div", { class: "actions" });
    const url = t.trace_url ? safeUrl(t.trace_url) : null;
    if (url) {
      actions.appendChild(el("a", { class: "trace-link button secondary", id: "trace-link", href: url, target: "_blank", rel: "noopener noreferrer" },
        "Open trace ", el("span", { class: "mono" }, String(t.trace_id || ""))));
    }
    if (t.status === "failed" || t.status === "dead") {
      const button = el("button", { type: "button", class: "retry", id: "retry", dataset: { id: t.id } }, "Retry");
      button.addEventListener("click", () => {
        button.disabled = true;
        api("POST", `${taskPath(t.id)}/retry`)
          .then(() => reload())
          .catch((err) => {
            button.disabled = false;
            failed(err, `Retry ${t.id}`);
          });
      });
      actions.appendChild(button);
    }

    const cards = [
      el("section", { class: "card" },
        el("div", { class: "card-head" }, el("h2", null, "Summary"), actions),
        el("dl", { class: "facts" }, facts.map(([k, v]) => [el("dt", null, k), el("dd", null, v)]))),
    ];
    if (t.progress && typeof t.progress === "object") {
      const pct = Math.max(0, Math.min(100, Number(t.progress.percent) || 0));
      cards.push(card("Progress", el("div", { id: "progress", class: "progress-row" },
        el("progress", { max: 100, value: pct }), el("span", { class: "num" }, `${pct}%`),
        t.progress.message ? el("span", null, String(t.progress.message)) : null)));
    }
    if (t.unreadable) cards.push(card("Unreadable", el("pre", null, pretty(t.unreadable))));
    cards.push(card("Params", el("pre", { id: "params", class: "json" }, pretty(t.params ?? null))));
    if (t.error) {
      const e = t.error;
      cards.push(el("section", { class: "card error-card", id: "task-error" }, el("h2", null, "Error"),
        typeof e === "object"
          ? el("div", null, el("p", null, el("strong", { class: "mono" }, String(e.type ?? "error")),
            e.retriable !== undefined ? el("span", { class: "muted" }, e.retriable ? " · retriable" : " · permanent") : null),
          el("pre", { class: "message" }, String(e.message ?? "")))
          : el("pre", null, String(e))));
    }
    if (t.result !== undefined && t.result !== null) {
      cards.push(card("Result", el("pre", { id: "result", class: "json" }, pretty(t.result))));
    }
    if (t.stderr_tail) cards.push(card("stderr (tail)", el("pre", { id: "stderr", class: "stderr" }, String(t.stderr_tail))));
    const records = Array.isArray(t.attempt_records) ? t.attempt_records : [];
    cards.push(card("Attempts", records.length ? attemptsTable(records) : el("p", { class: "muted" }, "No attempts recorded yet.")));
    cards.push(card("Trace", records.length ? waterfall(records) : el("p", { class: "muted" }, "Nothing to draw yet.")));
    return cards;
  }

  function attemptsTable(records) {
    return table(["#", "outcome", "exit code", "duration", "image", "OOM", "mode", "error"], records.map((r) =>
      el("tr", { dataset: { attempt: r.attempt } },
        el("td", { class: "num" }, text(r.attempt)),
        el("td", null, badge(r.outcome)),
        el("td", { class: "num" }, text(r.exit_code)),
        el("td", { class: "num" }, seconds(r.duration)),
        el("td", null, shortDigest(r.image_id)),
        el("td", null, r.oom_killed ? el("span", { class: "badge bad" }, "OOM") : "no"),
        el("td", null, text(r.mode)),
        el("td", { class: "error-text" }, r.error ? String(r.error) : text(null)))), { id: "attempts" });
  }

  // One timeline for the whole task: a row per attempt, its container phases, the worker's spans.
  function waterfall(records) {
    const times = [];
    const num = (v) => (v === null || v === undefined || v === "" ? NaN : Number(v));
    for (const r of records) {
      for (const item of [r, ...(r.phases || []), ...(r.spans || [])]) {
        for (const v of [num(item.start), num(item.end)]) if (Number.isFinite(v)) times.push(v);
      }
    }
    const t0 = times.length ? Math.min(...times) : 0;
    const t1 = times.length ? Math.max(...times) : 1;
    const span = t1 - t0 > 0 ? t1 - t0 : 1;

    const row = (kind, name, start, end, depth, extra = {}) => {
      const s = num(start);
      const e = num(end);
      const ok = Number.isFinite(s) && Number.isFinite(e);
      const left = ok ? ((s - t0) / span) * 100 : 0;
      const width = ok ? Math.max(((e - s) / span) * 100, 0.3) : 0;
      const dur = ok ? ms(e - s) : "—";
      const title = [`${name}: ${dur}`, ok ? `at +${ms(s - t0)}` : null, extra.title].filter(Boolean).join("\n");
      return el("div", {
        class: ["row", `kind-${kind}`, extra.error ? "has-error" : null],
        dataset: { kind, name, depth, start: ok ? (s - t0) * 1000 : "", durationMs: ok ? (e - s) * 1000 : "" },
      },
      el("div", { class: "label", title: name, style: { paddingLeft: `${0.25 + depth * 1}rem` } }, name),
      el("div", { class: "track" }, ok ? el("div", { class: "bar", title, style: { left: `${Math.min(left, 99.7)}%`, width: `${Math.min(width, 100 - Math.min(left, 99.7))}%` } }) : null),
      el("div", { class: "dur num" }, dur));
    };

    const rows = [];
    for (const r of records) {
      const label = `attempt ${r.attempt ?? "?"}`;
      rows.push(row("attempt", label, r.start, r.end, 0, {
        error: r.outcome && r.outcome !== "completed",
        title: [r.outcome, r.mode, r.error].filter(Boolean).join(" · "),
      }));
      for (const p of r.phases || []) rows.push(row("phase", String(p.name ?? "phase"), p.start, p.end, 1));
      const spans = Array.isArray(r.spans) ? r.spans : [];
      const ids = new Set(spans.map((s) => s.span_id).filter(Boolean));
      const children = new Map();
      const roots = [];
      for (const s of spans) {
        if (s.parent_id && ids.has(s.parent_id) && s.parent_id !== s.span_id) {
          if (!children.has(s.parent_id)) children.set(s.parent_id, []);
          children.get(s.parent_id).push(s);
        } else roots.push(s);
      }
      const byStart = (a, b) => (num(a.start) || 0) - (num(b.start) || 0);
      const seenSpans = new Set();
      const walk = (s, depth) => {
        if (seenSpans.has(s)) return;
        seenSpans.add(s);
        const attrs = s.attrs && typeof s.attrs === "object" && Object.keys(s.attrs).length ? pretty(s.attrs) : null;
        rows.push(row("span", String(s.name ?? "span"), s.start, s.end, depth, {
          error: Boolean(s.error), title: [s.error ? `error: ${s.error}` : null, attrs].filter(Boolean).join("\n"),
        }));
        for (const c of (children.get(s.span_id) || []).sort(byStart)) walk(c, depth + 1);
      };
      roots.sort(byStart).forEach((s) => walk(s, 1));
    }

    const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) =>
      el("span", { class: "tick", style: { left: `${f * 100}%` } }, ms(span * f)));
    return el("div", { class: "waterfall", id: "waterfall", dataset: { t0, t1 } },
      el("div", { class: "wf-axis" }, el("div", { class: "label muted" }, "name"),
        el("div", { class: "track ticks" }, ticks), el("div", { class: "dur muted" }, "duration")),
      rows);
  }

  // -- workers -------------------------------------------------------------------------

  function viewWorkers(gen) {
    document.title = "Workers · workerhost";
    const body = el("div", { class: "grid" }, el("p", { class: "muted" }, "Loading…"));
    mount(el("section", { id: "workers", class: "view" }, el("h1", null, "Workers"), body));
    const seen = {};
    poll(gen, "Workers", async () => {
      const data = await api("GET", "/workers");
      if (gen !== state.gen || !changed(seen, data)) return;
      const workers = Array.isArray(data) ? data : [];
      fill(body, ...(workers.length ? workers.map(workerCard) : [el("p", { class: "muted" }, "No workers configured.")]));
    });
  }

  function workerCard(w) {
    const warm = w.warm && typeof w.warm === "object" ? w.warm : null;
    const recent = Array.isArray(w.recent) ? w.recent : [];
    const tally = {};
    for (const r of recent) tally[r.outcome] = (tally[r.outcome] || 0) + 1;
    const pool = [];
    if (w.prewarm !== undefined && w.prewarm !== null) pool.push(`prewarm ${w.prewarm}`);
    if (w.reuse !== undefined && w.reuse !== null) pool.push(`reuse ${w.reuse}`);
    const facts = [
      ["image", el("span", null, el("code", { class: "mono" }, String(w.image ?? "")), " ", yesNo(w.image_present, "present", "missing"))],
      ["task types", (w.task_types || []).length ? el("span", null, (w.task_types || []).map((t) => el("code", { class: "chip" }, String(t)))) : text(null)],
      ["in flight", w.concurrency ? `${w.in_flight ?? 0} / ${w.concurrency}` : text(w.in_flight)],
      ["cpus", text(w.cpus)],
      ["memory", bytes(w.memory)],
      ["pids limit", text(w.pids_limit)],
      ["timeout", w.timeout === null || w.timeout === undefined ? text(null) : typeof w.timeout === "number" ? `${w.timeout} s` : String(w.timeout)],
      ["sandbox", text(w.sandbox)],
      ["prewarm / reuse", pool.length ? pool.join(" · ") : text(null)],
      ["warm", warm
        ? el("span", { class: "warm" }, `${warm.mode ? `${warm.mode}: ` : ""}idle ${warm.idle ?? 0} · busy ${warm.busy ?? 0} · starting ${warm.starting ?? 0} · target ${warm.target ?? 0}`,
          warm.broken ? el("span", { class: "health-error" }, ` broken: ${String(warm.broken)}`) : null)
        : el("span", { class: "muted" }, "no warm containers")],
    ];
    if (w.engine_error) facts.push(["engine", el("span", { class: "health-error" }, String(w.engine_error))]);
    return el("section", { class: "card worker", dataset: { worker: w.name } },
      el("div", { class: "card-head" }, el("h2", { class: "mono worker-name" }, String(w.name ?? "")), yesNo(w.healthy, "healthy", "unhealthy")),
      el("dl", { class: "facts" }, facts.map(([k, v]) => [el("dt", null, k), el("dd", null, v)])),
      el("h3", null, "Recent outcomes"),
      recent.length
        ? el("div", null,
          el("div", { class: "outcomes" }, recent.map((r) => el("a", {
            class: `dot status-${String(r.outcome || "").replace(/[^a-z_-]/gi, "")}`,
            href: r.task_id ? taskHref(r.task_id) : "#/workers",
            title: `${r.outcome} · ${r.task_id ?? ""} · ${seconds(r.duration)}${r.at ? ` · ${new Date(r.at * 1000).toLocaleString()}` : ""}`,
            "aria-label": `${r.outcome} ${r.task_id ?? ""}`,
          }))),
          el("p", { class: "muted small" }, Object.entries(tally).map(([k, v]) => `${v} ${k}`).join(" · ")))
        : el("p", { class: "muted small" }, "none yet"));
  }

  // -- dead letters --------------------------------------------------------------------

  function viewDead(gen) {
    document.title = "Dead letters · workerhost";
    const note = el("p", { class: "notice", id: "dead-notice", role: "status", hidden: true });
    const tbody = el("tbody", null, el("tr", null, el("td", { colSpan: 7, class: "muted" }, "Loading…")));
    mount(el("section", { id: "dead", class: "view" }, el("h1", null, "Dead letters"),
      el("p", { class: "muted" }, "Tasks that ended dead (no attempts left) or failed. Retry sends one back to the queue."),
      note,
      el("section", { class: "card" }, el("div", { class: "table-wrap" },
        el("table", { id: "dead-table" }, el("thead", null, el("tr", null,
          ["id", "type", "status", "attempts", "error", "finished", ""].map(th))), tbody)))));
    const seen = {};
    const load = async () => {
      const [dead, failedTasks] = await Promise.all([
        api("GET", `/tasks${query({ status: "dead", limit: 200 })}`),
        api("GET", `/tasks${query({ status: "failed", limit: 200 })}`),
      ]);
      if (gen !== state.gen) return;
      const all = [...(dead || []), ...(failedTasks || [])];
      all.sort((a, b) => String(b.finished_at || b.updated_at || "").localeCompare(String(a.finished_at || a.updated_at || "")));
      if (!changed(seen, all)) return;
      fill(tbody, ...(all.length ? all.map((t) => deadRow(t, retry))
        : [el("tr", { class: "empty" }, el("td", { colSpan: 7, class: "muted" }, "No dead or failed tasks."))]));
    };
    const retry = (t, button) => {
      button.disabled = true;
      api("POST", `${taskPath(t.id)}/retry`)
        .then(() => {
          if (gen !== state.gen) return;
          fill(note, "Sent ", el("a", { class: "mono", href: taskHref(t.id) }, String(t.id)), " back to the queue.");
          note.hidden = false;
          return load();
        })
        .catch((err) => {
          button.disabled = false;
          failed(err, `Retry ${t.id}`);
        });
    };
    poll(gen, "Dead letters", load);
  }

  function deadRow(t, retry) {
    const e = t.error;
    const message = e && typeof e === "object" ? [e.type, e.message].filter(Boolean).join(": ") : e ? String(e) : "";
    const button = el("button", { type: "button", class: "retry small", dataset: { id: t.id } }, "Retry");
    button.addEventListener("click", () => retry(t, button));
    return el("tr", { dataset: { id: t.id, status: t.status } },
      el("td", null, el("a", { class: "mono", href: taskHref(t.id) }, String(t.id))),
      el("td", null, text(t.type)),
      el("td", null, badge(t.status)),
      el("td", { class: "num" }, t.max_attempts ? `${t.attempts ?? 0} / ${t.max_attempts}` : text(t.attempts)),
      el("td", { class: "error-text clip", title: message }, message || text(null)),
      el("td", null, when(t.finished_at)),
      el("td", null, button));
  }

  // -- submit --------------------------------------------------------------------------

  function viewSubmit(gen) {
    document.title = "Submit · workerhost";
    const typeSel = el("select", { id: "submit-type", name: "type", required: true },
      el("option", { value: "" }, "Loading task types…"));
    const params = el("textarea", { id: "submit-params", name: "params", rows: 10, spellcheck: false, class: "mono" }, "{}");
    const priority = el("input", { id: "submit-priority", name: "priority", type: "number", step: 1, placeholder: "0", inputMode: "numeric" });
    const problem = el("p", { id: "params-error", class: "form-error", role: "alert", hidden: true });
    const status = el("p", { id: "submit-message", class: "form-error", role: "alert", hidden: true });
    const send = el("button", { type: "submit", id: "submit-button", disabled: true }, "Submit");
    const hint = el("span", { id: "submit-hint", class: "muted" });

    const check = () => {
      let message = "";
      let value;
      const raw = params.value.trim();
      if (!raw) message = "Params: empty; write a JSON object, {} at least.";
      else {
        try {
          value = JSON.parse(raw);
          if (value === null || typeof value !== "object" || Array.isArray(value)) {
            message = `Params must be a JSON object ({…}), not ${value === null ? "null" : Array.isArray(value) ? "an array" : `a ${typeof value}`}.`;
          }
        } catch (err) {
          message = `Params are not valid JSON: ${err.message}`;
        }
      }
      const p = priority.value.trim();
      if (!message && p !== "" && !/^-?\d+$/.test(p)) message = "Priority must be a whole number.";
      problem.textContent = message;
      problem.hidden = !message;
      params.classList.toggle("invalid", Boolean(message) && !message.startsWith("Priority"));
      params.setAttribute("aria-invalid", message ? "true" : "false");
      send.disabled = Boolean(message) || !typeSel.value;
      hint.textContent = !typeSel.value ? "Choose a task type." : "";
      return message ? null : value;
    };

    const form = el("form", { id: "submit-form", class: "submit-form", novalidate: true },
      el("label", { for: "submit-type" }, "Type"), typeSel,
      el("label", { for: "submit-params" }, "Params (a JSON object)"), params, problem,
      el("label", { for: "submit-priority" }, "Priority (optional, higher runs first)"), priority,
      el("div", { class: "actions" }, send, hint), status);
    form.addEventListener("input", check);
    form.addEventListener("change", check);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const value = check();
      if (value === null || !typeSel.value) return;
      const body = { type: typeSel.value, params: value };
      if (priority.value.trim() !== "") body.priority = parseInt(priority.value.trim(), 10);
      send.disabled = true;
      status.hidden = true;
      api("POST", "/tasks", body)
        .then((task) => {
          if (gen !== state.gen) return;
          if (task && task.id) location.hash = taskHref(task.id);
          else check();
        })
        .catch((err) => {
          if (gen !== state.gen) return;
          check();
          if (err instanceof HttpError && err.status === 401) return failed(err);
          const details = err.body && Array.isArray(err.body.details)
            ? err.body.details.map((d) => (typeof d === "object" ? Object.values(d).map(String).join(": ") : String(d))) : [];
          fill(status, describe(err), details.length ? el("ul", null, details.map((d) => el("li", null, d))) : null);
          status.hidden = false;
        });
    });

    mount(el("section", { id: "submit", class: "view narrow" }, el("h1", null, "Submit a task"), card(null, form)));
    taskTypes()
      .then((types) => {
        if (gen !== state.gen) return;
        fill(typeSel, 
          el("option", { value: "" }, types.length ? "choose a task type" : "no task types configured"),
          types.map((t) => el("option", { value: t }, t)));
        if (types.length === 1) typeSel.value = types[0];
        check();
      })
      .catch((err) => { if (gen === state.gen) failed(err, "Task types"); });
    check();
  }

  // -- start ---------------------------------------------------------------------------

  function start() {
    $("#error-close").addEventListener("click", () => hideError());
    $("#logout").addEventListener("click", () => { logout(); });
    window.addEventListener("hashchange", () => route());
    boot();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
