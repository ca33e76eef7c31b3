// velda web UI: one small script, no build step.
// The HTML shells carry no data; everything comes from the JSON API (docs/api.md), polled.
// Rendering goes through textContent and DOM nodes only, never innerHTML with API data.
"use strict";

(() => {
  const API = "/api/v1";
  const PAGE_SIZE = 50;
  const LIST_POLL_MS = 1000;
  const LOG_POLL_MS = 500;
  const LOG_KEEP_CHARS = 2_000_000; // what a log view keeps in the page; the rest is a download
  const FINAL = new Set(["SUCCESS", "FAILURE", "FAILED_UPSTREAM", "SKIPPED", "CANCELLED"]);
  const STATUS_FILTERS = [
    ["", "All statuses"],
    ["PENDING,QUEUED,RUNNING,RUNNING_SUBTASKS", "Active"],
    ["RUNNING,RUNNING_SUBTASKS", "Running"],
    ["PENDING,QUEUED", "Waiting"],
    ["SUCCESS", "Succeeded"],
    ["FAILURE,FAILED_UPSTREAM", "Failed"],
    ["CANCELLED", "Cancelled"],
    ["SKIPPED", "Skipped"],
  ];
  const DEP_KINDS = { success: "after success", fail: "after failure", any: "after end" };

  // ---- DOM helpers -------------------------------------------------------------------------

  const $ = (sel, root = document) => root.querySelector(sel);

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "style") Object.assign(el.style, v); // CSSOM: allowed by the page's CSP
      else if (k in el && k !== "list" && typeof v !== "string") el[k] = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    el.append(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
    return el;
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function replaceKids(el, ...kids) {
    el.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined));
  }

  // ---- API ---------------------------------------------------------------------------------

  function cookie(name) {
    const hit = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
    return hit ? decodeURIComponent(hit.slice(name.length + 1)) : "";
  }

  function toLogin() {
    const next = location.pathname + location.search;
    location.assign("/login?next=" + encodeURIComponent(next));
  }

  async function api(path, { method = "GET", body } = {}) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-Velda-CSRF"] = cookie("velda_csrf");
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) init.body = JSON.stringify(body);
    const resp = await fetch(API + path, init);
    if (resp.status === 401) {
      toLogin();
      throw new Error("not signed in");
    }
    if (!resp.ok) {
      let msg = `${resp.status} ${resp.statusText}`;
      try {
        msg = (await resp.json()).error || msg;
      } catch (_) {
        /* not JSON: keep the status line */
      }
      const err = new Error(msg);
      err.status = resp.status;
      throw err;
    }
    return resp;
  }

  const getJSON = async (path) => (await api(path)).json();
  const taskPath = (id) => "/tasks/" + encodeURIComponent(id);

  // ---- polling and the live indicator ------------------------------------------------------

  function showLive(ok, err) {
    const el = $("#live");
    if (!el) return;
    el.classList.toggle("off", !ok);
    setText(el, ok ? "Live" : "Offline");
    el.title = ok ? "Live updates" : "Cannot reach the server: " + (err && err.message);
  }

  // Calls fn now and then every ms until fn returns false; pauses while the tab is hidden.
  class Poller {
    constructor(fn, ms) {
      this.fn = fn;
      this.ms = ms;
      this.timer = null;
      this.busy = false;
      this.again = false;
      this.done = false;
      document.addEventListener("visibilitychange", () => document.hidden || this.now());
      this.now();
    }

    now() {
      if (this.done) return;
      if (this.busy) {
        this.again = true;
        return;
      }
      clearTimeout(this.timer);
      if (document.hidden) return;
      this.busy = true;
      Promise.resolve()
        .then(this.fn)
        .then(
          (more) => {
            showLive(true);
            if (more === false) this.done = true;
          },
          (err) => showLive(false, err),
        )
        .finally(() => this.next());
    }

    next() {
      this.busy = false;
      if (this.done) return;
      if (this.again) {
        this.again = false;
        this.now();
      } else {
        this.timer = setTimeout(() => this.now(), this.ms);
      }
    }

    restart() {
      this.done = false;
      this.now();
    }
  }

  // ---- formatting --------------------------------------------------------------------------

  const ms = (iso) => (iso ? Date.parse(iso) : null);

  function fmtDuration(millis) {
    if (millis === null || millis === undefined || millis < 0) return "";
    const s = millis / 1000;
    if (s < 10) return s.toFixed(1) + "s";
    if (s < 60) return Math.floor(s) + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${Math.floor(s % 60)}s`;
    const hrs = Math.floor(m / 60);
    if (hrs < 24) return `${hrs}h ${m % 60}m`;
    return `${Math.floor(hrs / 24)}d ${hrs % 24}h`;
  }

  function fmtAgo(t) {
    const s = (Date.now() - t) / 1000;
    if (s < 5) return "just now";
    if (s < 60) return Math.floor(s) + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    if (s < 86400) return Math.floor(s / 3600) + "h ago";
    const opts = { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" };
    return new Date(t).toLocaleString(undefined, opts);
  }

  const fmtTime = (t) => (t === null ? "" : new Date(t).toLocaleString());

  // Start of the task's own run to its resolution; still counting while it is not final.
  function durationOf(task) {
    const start = ms(task.started_at);
    if (start === null) return null;
    const end = ms(task.resolved_at) ?? (FINAL.has(task.status) ? ms(task.finished_at) : null);
    return (end ?? Date.now()) - start;
  }

  // Elements that show "3m ago" or a running duration carry their times in data attributes
  // and are refreshed here every second, between API polls.
  function timeAgo(iso) {
    if (!iso) return h("span", { class: "muted" }, "—");
    return h("time", { datetime: iso, title: fmtTime(ms(iso)), "data-ago": iso }, fmtAgo(ms(iso)));
  }

  function durationEl(task) {
    const d = durationOf(task);
    if (d === null) return h("span", { class: "muted" }, "—");
    const open = ms(task.resolved_at) === null && !FINAL.has(task.status);
    return h("span", { "data-since": open ? task.started_at : null }, fmtDuration(d));
  }

  function tickClocks() {
    for (const el of document.querySelectorAll("[data-ago]")) {
      setText(el, fmtAgo(ms(el.dataset.ago)));
    }
    for (const el of document.querySelectorAll("[data-since]")) {
      setText(el, fmtDuration(Date.now() - ms(el.dataset.since)));
    }
  }

  function shellQuote(arg) {
    if (arg !== "" && /^[\w@%+=:,./-]+$/.test(arg)) return arg;
    if (arg.includes("'") && !/["\\$`!]/.test(arg)) return '"' + arg + '"';
    return "'" + arg.replace(/'/g, "'\\''") + "'";
  }

  const commandLine = (argv) => (argv || []).map(shellQuote).join(" ");

  function statusBadge(status) {
    const label = status.charAt(0) + status.slice(1).toLowerCase().replace(/_/g, " ");
    return h("span", { class: "badge s-" + status.toLowerCase(), "data-status": status }, label);
  }

  function progressBar(c) {
    if (!c || !c.total) return h("span", { class: "muted" }, "—");
    const pct = (n) => (100 * n) / c.total + "%";
    const seg = (cls, n, what) =>
      n ? h("span", { class: "seg " + cls, style: { width: pct(n) }, title: `${n} ${what}` }) : null;
    // cancelled and skipped children are neither succeeded nor failed (skipped counts as
    // fine for the parent's outcome, cancelled does not)
    const cancelled = c.cancelled || 0;
    const skipped = c.skipped || 0;
    const done = c.succeeded + c.failed + cancelled + skipped;
    return h(
      "div",
      { class: "progress", title: progressTitle(c) },
      h(
        "div",
        { class: "bar" },
        seg("ok", c.succeeded, "succeeded"),
        seg("skip", skipped, "skipped"),
        seg("bad", c.failed, "failed"),
        seg("cancel", cancelled, "cancelled"),
        seg("run", c.running, "running"),
        seg("wait", c.queued, "queued"),
      ),
      h(
        "span",
        { class: "count" },
        `${done}/${c.total}`,
        c.failed ? h("span", { class: "failed-count" }, ` · ${c.failed} failed`) : null,
        cancelled ? h("span", { class: "cancelled-count" }, ` · ${cancelled} cancelled`) : null,
      ),
    );
  }

  function progressTitle(c) {
    const extra = ["cancelled", "skipped"].filter((k) => c[k]).map((k) => `${c[k]} ${k}, `).join("");
    return (
      `${c.succeeded} succeeded, ${c.failed} failed, ${extra}${c.running} running, ` +
      `${c.queued} queued of ${c.total}`
    );
  }

  function link(href, text, cls) {
    return h("a", { href, class: cls }, text);
  }

  // ---- task table (the list page and a task's children) -----------------------------------

  class TaskTable {
    // parent: null for the top-level list; syncUrl: keep the filters in the address bar.
    constructor(root, { parent = null, syncUrl = false } = {}) {
      this.root = root;
      this.parent = parent;
      this.syncUrl = syncUrl;
      this.rows = new Map();
      this.tokens = []; // page tokens of the pages before this one, for "Previous"
      const url = new URLSearchParams(syncUrl ? location.search : "");
      this.state = {
        q: url.get("q") || "",
        status: url.get("status") || "",
        label: url.getAll("label").join(", "),
        token: url.get("page_token") || "",
      };
      this.build();
      this.poller = new Poller(() => this.load(), LIST_POLL_MS);
    }

    build() {
      const s = this.state;
      this.search = h("input", {
        type: "search",
        placeholder: "Search name or command",
        value: s.q,
        "aria-label": "Search",
        oninput: debounce(() => this.change({ q: this.search.value.trim() }), 250),
      });
      this.statusSel = h(
        "select",
        { "aria-label": "Status", onchange: () => this.change({ status: this.statusSel.value }) },
        STATUS_FILTERS.map(([v, text]) => h("option", { value: v, selected: v === s.status }, text)),
      );
      this.labelIn = h("input", {
        type: "text",
        placeholder: "label key=value",
        value: s.label,
        "aria-label": "Label",
        onchange: () => this.change({ label: this.labelIn.value.trim() }),
      });
      this.tbody = h("tbody");
      this.empty = h("div", { class: "empty", hidden: true });
      this.pager = this.buildPager();
      const head = ["ID", "Name", "Status", "Pool", "Progress", "Created", "Duration"];
      replaceKids(
        this.root,
        h("div", { class: "toolbar" }, this.search, this.statusSel, this.labelIn),
        h(
          "div",
          { class: "card flush" },
          h(
            "table",
            { class: "grid tasks" },
            h("thead", {}, h("tr", {}, head.map((t) => h("th", { class: "c-" + t.toLowerCase() }, t)))),
            this.tbody,
          ),
          this.empty,
        ),
        this.pager.el,
      );
    }

    buildPager() {
      const first = h("button", { type: "button", class: "btn small", onclick: () => this.go("") }, "« First");
      const prev = h("button", { type: "button", class: "btn small", onclick: () => this.go(this.tokens.pop() ?? "", true) }, "‹ Previous");
      const next = h("button", { type: "button", class: "btn small", onclick: () => this.go(this.nextToken, false, true) }, "Next ›");
      const info = h("span", { class: "muted" });
      return { el: h("div", { class: "pager" }, info, h("span", { class: "grow" }), first, prev, next), first, prev, next, info };
    }

    go(token, back = false, forward = false) {
      if (forward) this.tokens.push(this.state.token);
      if (!back && !forward) this.tokens = [];
      this.state.token = token || "";
      this.update();
    }

    change(patch) {
      Object.assign(this.state, patch, { token: "" });
      this.tokens = [];
      this.update();
    }

    update() {
      if (this.syncUrl) history.replaceState(null, "", location.pathname + this.query(false));
      this.poller.restart();
    }

    // The API query for the current state; withPaging adds page_size and the parent.
    query(forApi = true) {
      const s = this.state;
      const q = new URLSearchParams();
      if (forApi && this.parent) q.set("parent", this.parent);
      if (s.q) q.set("q", s.q);
      if (s.status) q.set("status", s.status);
      for (const l of s.label.split(/[\s,]+/).filter(Boolean)) q.append("label", l);
      if (s.token) q.set("page_token", s.token);
      if (forApi) q.set("page_size", PAGE_SIZE);
      const text = q.toString();
      return text ? "?" + text : "";
    }

    // stopped is set by the owner (a task page whose task is final): one more read, then no more.
    async load() {
      const last = this.stopped;
      const sent = this.query();
      const page = await getJSON("/tasks" + sent);
      if (sent !== this.query()) return true; // the filters changed while this was in flight
      const tasks = page.tasks || [];
      this.render(tasks);
      this.nextToken = page.next_page_token || "";
      this.renderPager(tasks.length);
      return !last;
    }

    render(tasks) {
      const seen = new Set();
      tasks.forEach((task, i) => {
        seen.add(task.id);
        let tr = this.rows.get(task.id);
        if (!tr) {
          tr = h("tr", { "data-id": task.id });
          this.rows.set(task.id, tr);
        }
        fillRow(tr, task);
        if (this.tbody.children[i] !== tr) this.tbody.insertBefore(tr, this.tbody.children[i] || null);
      });
      for (const [id, tr] of this.rows) {
        if (!seen.has(id)) {
          tr.remove();
          this.rows.delete(id);
        }
      }
      this.renderEmpty(tasks.length);
    }

    renderEmpty(count) {
      const s = this.state;
      const filtered = s.q || s.status || s.label;
      this.empty.hidden = count > 0;
      if (count) return;
      if (filtered) setText(this.empty, "No tasks match these filters.");
      else if (this.parent) setText(this.empty, "No children.");
      else replaceKids(this.empty, "No tasks yet. Submit one with ", h("code", {}, "vbatch echo hello"), ".");
    }

    renderPager(count) {
      const p = this.pager;
      const pageNo = this.tokens.length + 1;
      setText(p.info, count ? `Page ${pageNo} · ${count} task${count === 1 ? "" : "s"}` : "");
      p.first.disabled = !this.state.token;
      p.prev.disabled = !this.tokens.length;
      p.next.disabled = !this.nextToken;
      p.el.hidden = !this.state.token && !this.nextToken;
    }
  }

  // Rebuilds a row's cells only when what they show changed, so a row under the mouse
  // or a text selection survives the once-a-second refresh.
  function fillRow(tr, task) {
    const key = JSON.stringify([task.status, task.children, task.started_at, task.resolved_at, task.finished_at, task.name]);
    if (tr.dataset.key === key) return;
    tr.dataset.key = key;
    const href = taskPath(task.id);
    const cmd = commandLine(task.command);
    const name = task.name ? link(href, task.name, "name") : link(href, cmd || "(no command)", "name cmd-name");
    replaceKids(
      tr,
      h("td", { class: "c-id" }, link(href, task.id, "mono")),
      h("td", { class: "c-name" }, name, task.name && cmd ? h("div", { class: "cmd", title: cmd }, cmd) : null),
      h("td", { class: "c-status" }, statusBadge(task.status)),
      h("td", { class: "c-pool" }, task.pool),
      h("td", { class: "c-progress" }, progressBar(task.children)),
      h("td", { class: "c-created" }, timeAgo(task.created_at)),
      h("td", { class: "c-duration" }, durationEl(task)),
    );
  }

  function debounce(fn, wait) {
    let t = null;
    return () => {
      clearTimeout(t);
      t = setTimeout(fn, wait);
    };
  }

  // ---- logs --------------------------------------------------------------------------------

  // Terminal semantics for progress bars: a bare "\r" goes back to the start of the line,
  // so only the last non-empty piece of each line is kept.
  function collapseCR(line) {
    if (!line.includes("\r")) return line;
    const parts = line.split("\r").filter(Boolean);
    return parts.length ? parts[parts.length - 1] : "";
  }

  // Colour and cursor escape sequences (tqdm, rich, ...) would show as garbage in a page.
  const ANSI = /\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]/g;

  class LogView {
    constructor(taskId) {
      this.taskId = taskId;
      this.pre = $("#log");
      this.note = $("#log-note");
      this.follow = $("#follow");
      this.view = "combined";
      this.attempt = null; // null: the latest
      this.final = false;
      this.pre.addEventListener("scroll", () => this.onScroll());
      for (const tab of document.querySelectorAll("[data-view]")) {
        tab.addEventListener("click", () => this.setView(tab.dataset.view));
      }
      $("#attempt").addEventListener("change", (e) => this.setAttempt(e.target.value));
      this.reset();
      this.poller = new Poller(() => this.load(), LOG_POLL_MS);
    }

    reset() {
      this.gen = (this.gen || 0) + 1; // reads in flight for an older view are dropped
      // One read serves all three views: the combined stream, each piece marked with its
      // stream, in the order the task wrote them (the server keeps that order).
      this.offset = 0;
      this.started = undefined; // where the page's view of the merged stream begins
      this.decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
      this.parts = []; // [{stream, text}] in written order: the combined view
      this.dropped = false;
      this.pre.replaceChildren();
      this.pre.dataset.empty = "No output yet";
      this.note.hidden = true;
      this.updateLinks();
    }

    updateLinks() {
      for (const stream of ["stdout", "stderr"]) {
        const q = new URLSearchParams({ stream });
        if (this.attempt) q.set("attempt", this.attempt);
        const a = $("#raw-" + stream);
        a.href = `${API}${taskPath(this.taskId)}/logs?${q}`;
        a.download = `${this.taskId}${this.attempt ? "-" + this.attempt : ""}.${stream}.log`;
        a.title = `Download ${stream}`;
      }
    }

    setTask(task) {
      if (this.attempt === null && this.seen !== undefined && this.seen !== task.attempt) this.reset();
      this.seen = task.attempt;
      const latest = this.attempt === null || Number(this.attempt) === task.attempt;
      this.final = FINAL.has(task.status) || !latest || task.status === "RUNNING_SUBTASKS";
      this.renderAttempts(task);
      if (!this.final && this.poller.done) this.poller.restart();
    }

    renderAttempts(task) {
      const sel = $("#attempt");
      const attempts = task.attempts || [];
      sel.hidden = attempts.length < 2;
      if (sel.options.length === attempts.length) return;
      replaceKids(
        sel,
        attempts
          .slice()
          .reverse()
          .map((a) => h("option", { value: a.attempt === task.attempt ? "" : String(a.attempt) }, attemptText(task, a))),
      );
      sel.value = this.attempt || "";
    }

    setAttempt(value) {
      this.attempt = value || null;
      this.reset();
      this.poller.restart();
    }

    async load() {
      const last = this.final; // final before the read: this read has everything there is
      await this.read();
      if (last) this.pre.dataset.empty = "No output";
      return !last;
    }

    async read() {
      const q = new URLSearchParams({ stream: "combined", framed: "1", offset: this.offset });
      const first = this.started === undefined;
      if (first) q.set("tail", LOG_KEEP_CHARS); // a long log: only its end is in the page
      if (this.attempt) q.set("attempt", this.attempt);
      const gen = this.gen;
      const resp = await api(`${taskPath(this.taskId)}/logs?${q}`);
      const start = Number(resp.headers.get("X-Velda-Offset") || this.offset);
      const { frames, total, dropped } = await readFrames(resp, LOG_KEEP_CHARS);
      if (gen !== this.gen) return;
      if (first) this.started = start;
      this.offset = start + total;
      if (dropped || (first && start > 0)) this.truncated();
      for (const [stream, bytes] of frames) {
        this.append(stream, this.decoders[stream].decode(bytes, { stream: true }));
      }
    }

    append(stream, raw) {
      const text = raw.replace(ANSI, "").replace(/\r\n/g, "\n");
      const last = this.parts[this.parts.length - 1];
      if (last && last.stream === stream) last.text = joinLog(last.text, text);
      else this.parts.push({ stream, text: collapseLines(text) });
      if (this.view === "combined" || this.view === stream) this.show(stream, text);
      this.trim();
    }

    // Appends to the <pre> in place: a following view costs only the new bytes.
    show(stream, text) {
      const atBottom = this.follow.checked;
      let node = this.pre.lastChild;
      const cls = this.view === "combined" && stream === "stderr" ? "err" : "out";
      if (!node || node.className !== cls) {
        node = h("span", { class: cls });
        this.pre.append(node);
      }
      node.textContent = joinLog(node.textContent, text);
      if (atBottom) this.pre.scrollTop = this.pre.scrollHeight;
    }

    render() {
      const parts = this.view === "combined" ? this.parts : this.parts.filter((p) => p.stream === this.view);
      this.pre.replaceChildren();
      for (const p of parts) this.show(p.stream, p.text);
    }

    setView(view) {
      this.view = view;
      for (const tab of document.querySelectorAll("[data-view]")) {
        tab.setAttribute("aria-selected", String(tab.dataset.view === view));
      }
      this.render();
    }

    trim() {
      let size = this.parts.reduce((n, p) => n + p.text.length, 0);
      if (size <= LOG_KEEP_CHARS) return;
      while (size > LOG_KEEP_CHARS / 2 && this.parts.length > 1) size -= this.parts.shift().text.length;
      this.truncated();
      this.render();
    }

    truncated() {
      this.note.hidden = false;
      setText(this.note, "Only the end of this log is shown. Download stdout or stderr for all of it.");
    }

    onScroll() {
      const p = this.pre;
      this.follow.checked = p.scrollTop + p.clientHeight >= p.scrollHeight - 8;
    }
  }

  // Reads a response body keeping only its last `keep` bytes: a log of gigabytes streams
  // through without piling up in the page.
  // The frames of a framed log read ("o 12\n" + 12 bytes of stdout, "e ..." for stderr),
  // keeping only the last `keep` bytes of them; total counts every payload byte.
  async function readFrames(resp, keep) {
    const { tail } = await readTail(resp, Infinity);
    const frames = [];
    let at = 0;
    let total = 0;
    while (at < tail.byteLength) {
      const nl = tail.indexOf(10, at);
      if (nl < 0) break;
      const [kind, size] = new TextDecoder().decode(tail.subarray(at, nl)).split(" ");
      const n = Number(size);
      frames.push([kind === "e" ? "stderr" : "stdout", tail.subarray(nl + 1, nl + 1 + n)]);
      total += n;
      at = nl + 1 + n;
    }
    let size = total;
    let dropped = false;
    while (frames.length > 1 && size - frames[0][1].byteLength >= keep) {
      size -= frames.shift()[1].byteLength;
      dropped = true;
    }
    return { frames, total, dropped };
  }

  async function readTail(resp, keep) {
    const reader = resp.body.getReader();
    const chunks = [];
    let size = 0;
    let total = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      size += value.byteLength;
      total += value.byteLength;
      while (size - chunks[0].byteLength >= keep) size -= chunks.shift().byteLength;
    }
    const buf = new Uint8Array(size);
    let at = 0;
    for (const c of chunks) {
      buf.set(c, at);
      at += c.byteLength;
    }
    return { tail: size > keep ? buf.subarray(size - keep) : buf, total };
  }

  function collapseLines(text) {
    return text.includes("\r") ? text.split("\n").map(collapseCR).join("\n") : text;
  }

  // Appends new output to old, redrawing the old unfinished line if the new part rewrites it.
  function joinLog(old, text) {
    if (!text.includes("\r")) return old + text;
    const cut = old.lastIndexOf("\n") + 1;
    return old.slice(0, cut) + collapseLines(old.slice(cut) + text);
  }

  // ---- usage -------------------------------------------------------------------------------

  // What the task's latest attempt uses: a totals line from the task's own JSON (polled with
  // the page), and charts of its samples from /tasks/ID/usage, read every USAGE_POLL_MS while
  // the attempt runs and once more when it ended (once only for a task that had ended).
  const USAGE_POLL_MS = 2000;
  const CHART_POINTS = 600; // a long run's samples are thinned to about this many per line
  const SVG_NS = "http://www.w3.org/2000/svg";
  const CHART = { w: 320, h: 104, left: 46, right: 6, top: 8, bottom: 86 };

  function svg(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) el.setAttribute(k, String(v));
    }
    el.append(...kids.filter((k) => k !== null && k !== undefined));
    return el;
  }

  // Bytes as people read them, as the CLI writes them: 512 B, 210.0 MB, 1.5 GB.
  function fmtBytes(n) {
    if (n === null || n === undefined) return "—";
    let value = n;
    for (const unit of ["B", "KB", "MB", "GB"]) {
      if (value < 1024 || unit === "GB") return unit === "B" ? `${Math.round(value)} B` : `${value.toFixed(1)} ${unit}`;
      value /= 1024;
    }
    return "";
  }

  const fmtSeconds = (s) => `${Number(s || 0).toFixed(2)} s`;
  const fmtPercent = (p) => `${Math.round(p)}%`;
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);

  // A round top for a memory axis, in the unit it is read in: 110.3 MB -> [120, "120 MB"].
  function bytesAxis(peak) {
    const units = ["B", "KB", "MB", "GB"];
    let value = Math.max(peak, 1);
    let i = 0;
    while (value >= 1000 && i < units.length - 1) {
      value /= 1024;
      i += 1;
    }
    const top = niceCeil(value);
    return [top * 1024 ** i, `${top} ${units[i]}`];
  }

  function niceCeil(value) {
    const exp = 10 ** Math.floor(Math.log10(value));
    const step = [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].find((m) => m * exp >= value - 1e-9) || 10;
    return Number((step * exp).toPrecision(3));
  }

  function thin(points) {
    if (points.length <= CHART_POINTS) return points;
    const stride = Math.ceil(points.length / CHART_POINTS);
    const kept = points.filter((_, i) => i % stride === 0);
    if (kept[kept.length - 1] !== points[points.length - 1]) kept.push(points[points.length - 1]);
    return kept;
  }

  // One small chart: [t, value] points from t0 to t1, 0 to max, the max and the span labelled.
  function usageChart({ metric, label, points, t0, t1, max, maxLabel, now, extra }) {
    const c = CHART;
    const span = t1 - t0 || 1;
    const x = (t) => (c.left + ((t - t0) / span) * (c.w - c.left - c.right)).toFixed(1);
    const y = (v) => (c.bottom - (Math.max(0, Math.min(v, max)) / max) * (c.bottom - c.top)).toFixed(1);
    const line = thin(points).map(([t, v]) => `${x(t)},${y(v)}`);
    const area = line.length > 1 ? [...line, `${x(points[points.length - 1][0])},${c.bottom}`, `${x(points[0][0])},${c.bottom}`] : null;
    const chart = svg(
      "svg",
      { class: "usage-chart", "data-metric": metric, ...extra, "data-points": points.length, viewBox: `0 0 ${c.w} ${c.h}`, role: "img", "aria-label": `${label} over time` },
      svg("title", {}, `${label} over time (${points.length} samples, axis up to ${maxLabel})`),
      svg("line", { class: "guide", x1: c.left, y1: c.top, x2: c.w - c.right, y2: c.top }),
      svg("line", { class: "axis", x1: c.left, y1: c.bottom, x2: c.w - c.right, y2: c.bottom }),
      svg("text", { class: "axis-max", x: c.left - 5, y: c.top + 4, "text-anchor": "end" }, maxLabel),
      svg("text", { class: "axis-min", x: c.left - 5, y: c.bottom + 3, "text-anchor": "end" }, "0"),
      svg("text", { class: "axis-time", x: c.w - c.right, y: c.h - 3, "text-anchor": "end" }, t1 > t0 ? fmtDuration((t1 - t0) * 1000) : ""),
      area ? svg("polygon", { class: "area", points: area.join(" ") }) : null,
      svg("polyline", { class: "line", points: line.join(" ") }),
    );
    return h("figure", { class: "usage-fig", "data-metric": metric }, h("figcaption", {}, label, h("span", { class: "now" }, now)), chart);
  }

  function usageCharts(samples) {
    if (!samples.length) return [];
    const t0 = samples[0].t;
    const t1 = samples[samples.length - 1].t;
    const cpu = [];
    const memory = [];
    const gpus = new Map(); // index -> [t, utilisation %]
    for (const s of samples) {
      if (isNum(s.cpu_percent)) cpu.push([s.t, s.cpu_percent]);
      if (isNum(s.memory_bytes)) memory.push([s.t, s.memory_bytes]);
      for (const g of s.gpus || []) {
        if (!gpus.has(g.index)) gpus.set(g.index, []);
        if (isNum(g.utilization_percent)) gpus.get(g.index).push([s.t, g.utilization_percent]);
      }
    }
    const last = (points, fmt) => (points.length ? fmt(points[points.length - 1][1]) : "");
    const top = (points) => points.reduce((m, [, v]) => Math.max(m, v), 0);
    const cpuMax = Math.max(100, Math.ceil(top(cpu) / 100) * 100);
    const [memMax, memLabel] = bytesAxis(top(memory));
    const charts = [
      usageChart({ metric: "cpu", label: "CPU %", points: cpu, t0, t1, max: cpuMax, maxLabel: fmtPercent(cpuMax), now: last(cpu, fmtPercent) }),
      usageChart({ metric: "memory", label: "Memory", points: memory, t0, t1, max: memMax, maxLabel: memLabel, now: last(memory, fmtBytes) }),
    ];
    for (const [index, points] of [...gpus].sort(([a], [b]) => a - b)) {
      const extra = { "data-gpu": index };
      charts.push(usageChart({ metric: "gpu", label: `GPU ${index} utilisation`, points, t0, t1, max: 100, maxLabel: "100%", now: last(points, fmtPercent), extra }));
    }
    return charts;
  }

  function usageTotals(u) {
    const parts = [
      h("span", { class: "u-cpu" }, `CPU ${fmtSeconds(u.cpu_s)} (user ${fmtSeconds(u.cpu_user_s)}, system ${fmtSeconds(u.cpu_system_s)})`),
      isNum(u.cpu_percent) ? h("span", { class: "u-cpu-percent" }, `${fmtPercent(u.cpu_percent)} of a CPU ${u.final ? "over its run" : "now"}`) : null,
      h("span", { class: "u-memory" }, !u.final && isNum(u.memory_bytes) ? `memory ${fmtBytes(u.memory_bytes)} now, peak ${fmtBytes(u.peak_memory_bytes)}` : `memory peak ${fmtBytes(u.peak_memory_bytes)}`),
      !u.final && isNum(u.processes) ? h("span", { class: "u-procs" }, `${u.processes} process${u.processes === 1 ? "" : "es"}`) : null,
      ...(u.gpus || []).map((g) =>
        h(
          "span",
          { class: "u-gpu", "data-gpu": g.index },
          `GPU ${g.index}: ${isNum(g.utilization_percent) ? fmtPercent(g.utilization_percent) : "—"}, ` +
            `${fmtBytes(g.memory_bytes)}${isNum(g.memory_total_bytes) ? " of " + fmtBytes(g.memory_total_bytes) : ""}` +
            (isNum(g.peak_memory_bytes) ? ` (peak ${fmtBytes(g.peak_memory_bytes)})` : ""),
        ),
      ),
    ].filter(Boolean);
    return parts.flatMap((p, i) => (i ? [h("span", { class: "sep" }, " · "), p] : [p]));
  }

  function subtreeText(s) {
    const n = s.attempts || 0;
    const peak = isNum(s.peak_memory_bytes) ? `, largest memory peak ${fmtBytes(s.peak_memory_bytes)}` : "";
    return `Subtree: CPU ${fmtSeconds(s.cpu_s)} in ${n} attempt${n === 1 ? "" : "s"}${peak}`;
  }

  class UsageView {
    constructor(taskId) {
      this.taskId = taskId;
      this.card = $("#usage");
      this.totals = $("#usage-totals");
      this.subtree = $("#usage-subtree");
      this.charts = $("#usage-charts");
      this.key = "";
      this.chartKey = "";
      this.attempt = null; // the attempt the charts show: the task's latest
      this.live = false;
      this.poller = null;
    }

    setTask(task) {
      const usage = task.usage || null;
      const sub = task.subtree_usage || null;
      const key = JSON.stringify([usage, sub, task.started_at, task.attempt]);
      if (key === this.key) return this.follow(task, usage);
      this.key = key;
      this.card.hidden = !usage && !sub && !task.started_at;
      this.totals.hidden = !usage && !task.started_at;
      this.totals.classList.toggle("muted", !usage);
      if (usage) replaceKids(this.totals, usageTotals(usage));
      else setText(this.totals, task.command && task.command.length ? "No usage recorded." : "No command of its own.");
      this.subtree.hidden = !sub;
      setText(this.subtree, sub ? subtreeText(sub) : "");
      this.follow(task, usage);
    }

    // Starts (or restarts, for a new attempt) the reads of the charts' samples.
    follow(task, usage) {
      this.live = Boolean(usage) && task.status === "RUNNING" && !usage.final;
      if (!usage) {
        if (this.attempt !== null) this.clearCharts(null);
        return;
      }
      if (this.attempt !== task.attempt) {
        this.clearCharts(task.attempt);
        if (this.poller) this.poller.restart();
      }
      if (!this.poller) this.poller = new Poller(() => this.load(), USAGE_POLL_MS);
      else if (this.live && this.poller.done) this.poller.restart();
    }

    clearCharts(attempt) {
      this.attempt = attempt;
      this.chartKey = "";
      this.charts.replaceChildren();
    }

    async load() {
      const last = !this.live; // the attempt had ended before this read: it has every sample
      const attempt = this.attempt;
      if (attempt === null) return false;
      const data = await getJSON(`${taskPath(this.taskId)}/usage?attempt=${encodeURIComponent(attempt)}`);
      if (attempt !== this.attempt) return true; // a retry started meanwhile: read that one
      const samples = data.samples || [];
      const key = `${samples.length}:${samples.length ? samples[samples.length - 1].t : ""}`;
      if (key !== this.chartKey) {
        this.chartKey = key;
        replaceKids(this.charts, usageCharts(samples));
      }
      return !last;
    }
  }

  // ---- task page ---------------------------------------------------------------------------

  class TaskPage {
    constructor() {
      this.id = decodeURIComponent(location.pathname.split("/")[2] || "");
      this.names = new Map(); // id -> name, for dependency links
      this.children = null;
      this.key = "";
      this.logs = new LogView(this.id);
      this.usage = new UsageView(this.id);
      $("#cancel").addEventListener("click", () => this.act("cancel"));
      $("#retry").addEventListener("click", () => this.act("retry"));
      this.poller = new Poller(() => this.load(), LIST_POLL_MS);
    }

    async load() {
      let task;
      try {
        task = await getJSON(taskPath(this.id));
      } catch (err) {
        if (err.status !== 404 && err.status !== 403) throw err;
        this.fail(err.status === 404 ? `There is no task ${this.id}.` : err.message);
        this.logs.poller.done = true;
        return false;
      }
      this.task = task;
      this.logs.setTask(task);
      this.render(task);
      this.usage.setTask(task);
      const final = FINAL.has(task.status);
      if (this.children) {
        this.children.stopped = final;
        if (!final && this.children.poller.done) this.children.poller.restart();
      }
      return !final;
    }

    fail(msg) {
      const el = $("#task-error");
      el.hidden = !msg;
      setText(el, msg || "");
    }

    render(task) {
      const key = JSON.stringify(task);
      if (key === this.key) return;
      this.key = key;
      document.title = `${task.name || "Task " + task.id} · velda`;
      setText($("#task-title"), task.name || commandLine(task.command) || "Task " + task.id);
      replaceKids($("#task-status"), statusBadge(task.status));
      this.renderWaiting(task.waiting_for);
      this.renderCrumbs(task);
      replaceKids($("#details"), props(detailRows(task)));
      replaceKids($("#timing"), props(timingRows(task)), attemptsTable(task));
      this.renderDeps(task);
      this.renderChildren(task);
      this.renderEnv(task);
      $("#cancel").hidden = FINAL.has(task.status);
      $("#retry").hidden = !FINAL.has(task.status) || task.status === "SUCCESS";
    }

    // why a PENDING or QUEUED task has not started, in one line under its status
    renderWaiting(waiting) {
      const el = $("#task-waiting");
      el.hidden = !waiting;
      el.classList.toggle("never", Boolean(waiting && waiting.never));
      setText(el, waiting ? `Waiting: ${waiting.message}` : "");
    }

    renderCrumbs(task) {
      const items = [link("/", "Tasks")];
      for (const a of task.ancestors || []) items.push(link(taskPath(a.id), a.name || a.id));
      items.push(h("span", { "aria-current": "page" }, task.name || task.id));
      replaceKids($("#crumbs"), items);
    }

    renderDeps(task) {
      const list = (deps) =>
        deps.length
          ? h("ul", { class: "deps" }, deps.map((d) => h("li", {}, this.depLink(d.id), " ", h("span", { class: "chip" }, DEP_KINDS[d.kind] || d.kind))))
          : h("span", { class: "muted" }, "none");
      replaceKids($("#deps"), props([
        ["Waits for", list(task.depends_on || [])],
        ["Needed by", list(task.dependents || [])],
      ]));
    }

    depLink(id) {
      const a = link(taskPath(id), id, "mono");
      const fill = (name) => name && a.replaceChildren(h("span", { class: "mono" }, id), " " + name);
      if (this.names.has(id)) fill(this.names.get(id));
      else if (this.names.size < 50) {
        this.names.set(id, "");
        getJSON(taskPath(id)).then((t) => {
          this.names.set(id, t.name || "");
          fill(t.name);
        }, () => {});
      }
      return a;
    }

    renderChildren(task) {
      const c = task.children;
      if (!c || !c.total) return;
      $("#children-card").hidden = false;
      setText($("#children-summary"), progressTitle(c));
      replaceKids($("#children-progress"), progressBar(c));
      if (!this.children) this.children = new TaskTable($("#children"), { parent: task.id });
    }

    renderEnv(task) {
      const env = Object.entries(task.env || {}).sort(([a], [b]) => a.localeCompare(b));
      $("#env-card").hidden = !env.length;
      replaceKids(
        $("#env tbody"),
        env.map(([k, v]) => h("tr", {}, h("th", { class: "mono" }, k), h("td", { class: "mono" }, v))),
      );
    }

    async act(verb) {
      const t = this.task;
      if (verb === "cancel" && !confirm(`Cancel task ${t.id}${t.children.total ? " and all its children" : ""}?`)) return;
      const btn = $("#" + verb);
      btn.disabled = true;
      this.fail("");
      try {
        await api(`${taskPath(this.id)}/${verb}`, { method: "POST" });
      } catch (err) {
        this.fail(`Could not ${verb}: ${err.message}`);
      } finally {
        btn.disabled = false;
      }
      if (verb === "retry") this.logs.setAttempt("");
      this.poller.restart();
    }
  }

  function props(rows) {
    return rows
      .filter(([, v]) => v !== null && v !== undefined && v !== "")
      .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]);
  }

  function detailRows(t) {
    const labels = Object.entries(t.labels || {});
    return [
      ["ID", h("span", { class: "mono" }, t.id)],
      ["Name", t.name],
      ["Command", t.command && t.command.length ? h("code", { class: "command" }, commandLine(t.command)) : h("span", { class: "muted" }, "none (a parent of shards)")],
      ["Pool", link("/pools", t.pool)],
      ["Labels", labels.length ? labels.map(([k, v]) => link("/?label=" + encodeURIComponent(`${k}=${v}`), `${k}=${v}`, "chip")) : null],
      ["Directory", t.cwd ? h("code", {}, t.cwd) : null],
      ["Parent", t.parent_id ? link(taskPath(t.parent_id), t.parent_id, "mono") : null],
      ["Shard", t.shard_id !== null && t.shard_id !== undefined ? `${t.shard_id} of ${t.total_shards}` : null],
      ["Shards", t.total_shards && t.shard_id === null ? `${t.total_shards}${t.gang ? " (gang)" : ""}` : null],
      ["Priority", t.priority ? String(t.priority) : null],
      ["Timeout", t.timeout_s ? fmtDuration(t.timeout_s * 1000) : null],
      ["Forwarded ports", portLinks(t.forwarded_ports || [])],
    ];
  }

  // Ports forwarded now by `velda task port-forward` or `vrun -p`: each opens where the
  // forwarder listens, http://127.0.0.1:LOCAL on the machine it runs on.
  function portLinks(ports) {
    if (!ports.length) return null;
    return h("span", { class: "ports" }, ports.map((p) =>
      p.local
        ? h("a", { href: `http://127.0.0.1:${p.local}/`, class: "port", target: "_blank", rel: "noopener", title: `port ${p.port} of the task` }, `127.0.0.1:${p.local}`, h("span", { class: "muted" }, ` → ${p.port}`))
        : h("span", { class: "port mono" }, String(p.port))));
  }

  function timingRows(t) {
    const at = (iso) => (iso ? h("span", {}, fmtTime(ms(iso)), " ", h("span", { class: "muted" }, "(", timeAgo(iso), ")")) : null);
    // Only what is true in this state: a parent whose own command ended still runs.
    const final = FINAL.has(t.status);
    const parent = t.status === "RUNNING_SUBTASKS" || (t.children && t.children.total > 0);
    const open = t.children ? t.children.running + t.children.queued : 0;
    return [
      ["Created", at(t.created_at)],
      ["Started", at(t.started_at)],
      [parent ? "Own command ended" : "Finished", at(t.finished_at)],
      ["Waiting for", t.status === "RUNNING_SUBTASKS" ? `${open} open ${open === 1 ? "child" : "children"}` : null],
      ["Resolved", final ? at(t.resolved_at) : null],
      [final ? "Duration" : "Running for", t.started_at ? durationEl(t) : null],
      ["Exit code", t.exit_code !== null && t.exit_code !== undefined ? h("span", { class: t.exit_code ? "bad mono" : "mono" }, String(t.exit_code)) : null],
      ["Signal", t.signal ? h("span", { class: "bad mono" }, String(t.signal)) : null],
      ["Reason", t.reason ? h("span", { class: "bad" }, t.reason_detail ? `${t.reason}: ${t.reason_detail}` : t.reason) : null],
      ["Attempt", t.attempt ? attemptText(t, (t.attempts || []).find((a) => a.attempt === t.attempt)).replace(/^attempt /, "") : null],
    ];
  }

  // "attempt 2 (retried by hand)", "attempt 2 (automatic retry 1 of 3)": `cause` comes from
  // the API (first, retry: --retries, hand: velda task retry).
  function attemptText(t, a) {
    const n = a ? a.attempt : t.attempt;
    const cause = a ? a.cause : n === 1 ? "first" : null;
    if (cause === "hand") return `attempt ${n} (retried by hand)`;
    if (cause === "retry") return `attempt ${n} (automatic retry ${n - 1} of ${t.retries})`;
    if (cause === "first" && t.retries) return `attempt ${n} (up to ${t.retries} automatic ${t.retries === 1 ? "retry" : "retries"})`;
    return `attempt ${n}`;
  }

  function attemptsTable(t) {
    const attempts = t.attempts || [];
    if (attempts.length < 2) return null;
    const outcome = (a) => a.reason ? `${a.reason}${a.exit_code !== null ? " " + a.exit_code : ""}${a.signal ? " signal " + a.signal : ""}` : a.finished_at ? "ok" : "";
    return h(
      "table",
      { class: "grid attempts" },
      h("thead", {}, h("tr", {}, ["#", "Started", "Ended", "Outcome"].map((x) => h("th", {}, x)))),
      h("tbody", {}, attempts.map((a) => h("tr", {}, h("td", {}, attemptText(t, a)), h("td", {}, timeAgo(a.started_at)), h("td", {}, timeAgo(a.finished_at)), h("td", {}, outcome(a))))),
    );
  }

  // ---- pools page --------------------------------------------------------------------------

  const UNITS = { cpus: ["CPU", "CPUs"], gpus: ["GPU", "GPUs"], memory_mb: ["MB", "MB"] };

  function resourcesText(r) {
    return Object.entries(r || {})
      .filter(([, v]) => v)
      .map(([k, v]) => `${v} ${(UNITS[k] || [k, k])[v === 1 ? 0 : 1]}`)
      .join(", ");
  }

  // A Slurm pool's nodes, as sinfo reports them: "n1 mix, CPUs 1/4, GPUs 1/1 allocated".
  function nodesText(nodes) {
    return nodes.map((x) => `${x.name} ${x.state}, CPUs ${x.cpus_allocated}/${x.cpus}, GPUs ${x.gpus_allocated}/${x.gpus}`).join(" · ") + " allocated";
  }

  async function loadPools() {
    const { pools, machine } = await getJSON("/pools");
    if (machine) {
      const n = (x) => String(Math.round(x * 100) / 100);
      setText($("#machine-cpus"), `${n(machine.cpus_used)} of ${n(machine.cpus)} CPUs in use, ${n(machine.cpus_free)} free`);
      setText($("#machine-gpus"), `${machine.gpus_used} of ${machine.gpus} GPUs in use, ${machine.gpus_free} free`);
    }
    const rows = pools.map((p) => {
      const cap = p.capacity === null || p.capacity === undefined ? null : p.capacity;
      const use = cap ? h("div", { class: "progress" }, h("div", { class: "bar" }, h("span", { class: "seg run", style: { width: Math.min(100, (100 * p.running) / cap) + "%" } }))) : null;
      return h(
        "tr",
        { "data-pool": p.name },
        h("td", {}, h("strong", {}, p.name), p.configured ? null : h("span", { class: "muted small" }, " built in"), p.error ? h("div", { class: "bad small" }, p.error) : null, p.nodes ? h("div", { class: "muted small nodes" }, nodesText(p.nodes)) : null),
        h("td", {}, h("span", { class: "chip" }, p.engine)),
        h("td", {}, resourcesText(p.resources)),
        h("td", { class: "num" }, cap === null ? "no limit" : String(cap)),
        h("td", { class: "num" }, String(p.running)),
        h("td", { class: "num" }, String(p.queued)),
        h("td", { class: "c-use" }, use),
      );
    });
    replaceKids($("#pools tbody"), rows);
  }

  // ---- start -------------------------------------------------------------------------------

  function start() {
    const page = document.body.dataset.page;
    for (const a of document.querySelectorAll("[data-nav]")) {
      if (a.dataset.nav === page || (page === "task" && a.dataset.nav === "list")) a.classList.add("active");
    }
    if (page === "list") new TaskTable($("#tasks"), { syncUrl: true });
    else if (page === "task") new TaskPage();
    else if (page === "pools") new Poller(loadPools, 2000);
    if (page !== "login") setInterval(tickClocks, 1000);
  }

  start();
})();
