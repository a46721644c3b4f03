// The jobs page of the RLHF control plane: plain JavaScript, no build step, nothing fetched from
// outside this server. It uses only the public REST API (/v1/jobs...) with the user's API key,
// so it shows exactly what that key's tenant may read. The key lives in sessionStorage (this tab,
// until it closes or signs out) and travels only in the Authorization header, never in a URL.
// Live streams are server-sent events read with fetch() (EventSource cannot send a header); after a
// dropped connection a stream resumes with Last-Event-ID, and entries are taken in id order only
// once, so a curve has no gaps and no duplicates.
"use strict";

const API_ROOT = new URL("..", document.baseURI); // this page is /ui/, beside /v1/
const KEY_ITEM = "rlhf.apiKey";
const STATUSES = ["queued", "starting", "running", "cancelling", "succeeded", "failed", "cancelled"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const CHARTS = [
  { id: "reward/mean", title: "reward (mean)", keys: (k) => k === "reward/mean" },
  { id: "kl", title: "KL", keys: (k) => k === "kl" },
  { id: "entropy", title: "entropy", keys: (k) => k === "entropy" },
  { id: "response_length/mean", title: "response length", keys: (k) => k === "response_length/mean" },
  // Held-out score: the rewards' mean on eval prompts (RL, SFT), pairwise accuracy (rm, dpo).
  { id: "eval", title: "eval", keys: (k) => ["eval/reward/mean", "eval/accuracy", "eval/rewards/accuracies"].includes(k) },
  // Shown once a job reports them: asynchronous training (rollout.max_staleness > 0) ...
  { id: "staleness", title: "staleness (versions)", optional: true, keys: (k) => k === "staleness/mean" || k === "staleness/max" },
  { id: "staleness/frac", title: "staleness histogram (fraction)", optional: true, keys: (k) => k.startsWith("staleness/frac_") },
  { id: "async/buffer_fill", title: "rollout buffer fill", optional: true, keys: (k) => k === "async/buffer_fill" },
  { id: "idle", title: "idle fraction", optional: true, keys: (k) => k === "async/rollout_idle_frac" || k === "async/trainer_idle_frac" },
  { id: "tokens_per_s", title: "tokens/s per side", optional: true,
    keys: (k) => k === "throughput/rollout_tokens_per_s" || k === "throughput/trainer_tokens_per_s" },
  { id: "off_policy", title: "off-policy ratio", optional: true, keys: (k) => ["off_policy/ratio_mean", "off_policy/ratio_max", "off_policy/ratio_min"].includes(k) },
  { id: "off_policy/corrected", title: "truncated / masked (fraction)", optional: true,
    keys: (k) => k === "off_policy/truncated_frac" || k === "off_policy/masked_frac" },
  // ... and agents (rollout.agent).
  { id: "agent/turns", title: "turns and tool calls per episode", optional: true,
    keys: (k) => k === "agent/turns_per_episode" || k === "agent/tool_calls" },
  { id: "agent/errors", title: "tool errors, invalid calls, truncated", optional: true,
    keys: (k) => ["agent/tool_errors", "agent/invalid_calls", "agent/truncated"].includes(k) },
];
const COLORS = ["#2f6fed", "#12805c", "#c0362c", "#b54708", "#7a5af8", "#0e9384"];

// ------------------------------------------------------------------ small helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, text) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function age(seconds) {
  const d = Math.max(0, Date.now() / 1000 - seconds);
  if (d < 60) return `${Math.floor(d)} s`;
  if (d < 3600) return `${Math.floor(d / 60)} min`;
  if (d < 86400) return `${Math.floor(d / 3600)} h`;
  return `${Math.floor(d / 86400)} d`;
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "-");
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

function fmt(v, digits = 4) {
  if (v === null || v === undefined || !isFinite(v)) return "-";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(digits - 2);
  return String(Number(v.toPrecision(digits)));
}

function statusBadge(status) {
  return h("span", { class: `status ${status}`, dataset: { status } }, status);
}

function progress(step, total) {
  const pct = total ? Math.min(100, (100 * step) / total) : 0;
  const bar = h("span", { class: "progress" }, h("span"));
  bar.firstChild.style.width = `${pct}%`;
  return h("span", { class: "steps" }, bar, `${step}/${total ?? "?"}`);
}

// A Redis stream id "ms-seq" as a pair of BigInts, to order entries.
function streamId(id) {
  const [ms, seq = "0"] = String(id).split("-");
  return [BigInt(ms), BigInt(seq)];
}
function newer(id, than) {
  if (!than) return true;
  const [a, b] = [streamId(id), streamId(than)];
  return a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);
}

// ------------------------------------------------------------------ the API

const auth = {
  get key() { return sessionStorage.getItem(KEY_ITEM); },
  set(key) { sessionStorage.setItem(KEY_ITEM, key); },
  clear() { sessionStorage.removeItem(KEY_ITEM); },
};

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code;
    this.param = err.param;
  }
}

async function api(path, { method = "GET", body, headers = {}, signal, key = auth.key } = {}) {
  const init = { method, signal, cache: "no-store", headers: { Authorization: `Bearer ${key}`, ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(new URL(path, API_ROOT), init);
  const data = await r.json().catch(() => null);
  if (r.status === 401 && key === auth.key) signOut("Your API key was not accepted; sign in again.");
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

// One live SSE stream of the API (`events` or `metrics` of a job), read with fetch() so that it can
// carry the Authorization header. Reconnects after a drop, resuming after the last id it delivered.
class Stream {
  constructor(path, { onItem, onEnd, onState }) {
    Object.assign(this, { path, onItem, onEnd, onState });
    this.lastId = null;
    this.connects = 0;
    this.stopped = false;
    this.controller = null;
  }

  async run() {
    let delay = 500;
    while (!this.stopped) {
      this.controller = new AbortController();
      try {
        const headers = { Accept: "text/event-stream", Authorization: `Bearer ${auth.key}` };
        if (this.lastId) headers["Last-Event-ID"] = this.lastId;
        const r = await fetch(new URL(this.path, API_ROOT), { headers, signal: this.controller.signal, cache: "no-store" });
        if (r.status === 401) return signOut("Your API key was not accepted; sign in again.");
        if (r.status === 404) return this.onState("gone");
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        this.connects += 1;
        this.onState("live");
        const end = await this.read(r.body);
        if (end) return this.onEnd(end);
        delay = 500; // the server closed the stream early: come back at once
      } catch (err) {
        if (this.stopped) return;
      }
      this.onState("reconnecting");
      await sleep(delay);
      delay = Math.min(2 * delay, 5000);
    }
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null;
      buffer += value;
      let cut;
      while ((cut = buffer.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + (buffer.startsWith("\r\n", cut) ? 4 : 2));
        const msg = { data: [] };
        for (const line of block.split(/\r\n|\r|\n/)) {
          if (!line || line.startsWith(":")) continue; // keep-alive comments
          const i = line.indexOf(":");
          const field = i < 0 ? line : line.slice(0, i);
          const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
          if (field === "data") msg.data.push(val);
          else msg[field] = val;
        }
        if (msg.event === "end") return JSON.parse(msg.data.join("\n") || "{}");
        if (msg.id && msg.data.length && newer(msg.id, this.lastId)) {
          this.lastId = msg.id;
          this.onItem(JSON.parse(msg.data.join("\n")));
        }
      }
    }
  }

  drop() { if (this.controller) this.controller.abort(); } // as a lost connection: it reconnects
  stop() { this.stopped = true; if (this.controller) this.controller.abort(); }
}

// ------------------------------------------------------------------ curves (SVG, drawn here)

class Chart {
  constructor({ id, title, keys, optional = false }) {
    Object.assign(this, { id, title, keys, optional });
    this.series = new Map(); // metric name -> Map(step -> value)
    this.last = h("span", { class: "last" }, "-");
    this.svg = s("svg", { viewBox: "0 0 320 150", role: "img", "aria-label": title });
    this.legend = h("div", { class: "legend" });
    const caption = h("figcaption", { title: id === "eval" ? "eval/reward/mean, eval/accuracy or eval/rewards/accuracies" : id }, h("span", {}, title), this.last);
    // An optional chart stays hidden until a metric of its own arrives (a sync job shows no staleness).
    this.el = h("figure", { class: "chart", hidden: optional, dataset: { metric: id, points: "0" } }, caption, this.svg, this.legend);
    this.pending = false;
    this.draw();
  }

  add(step, values) {
    let changed = false;
    for (const [k, v] of Object.entries(values)) {
      if (!this.keys(k) || v === null || !isFinite(v)) continue;
      if (!this.series.has(k)) this.series.set(k, new Map());
      this.series.get(k).set(step, v); // a step seen again replaces its point
      changed = true;
    }
    if (changed) this.el.hidden = false;
    if (changed && !this.pending) {
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }
  }

  steps() {
    const first = this.series.values().next().value;
    return first ? [...first.keys()].sort((a, b) => a - b) : [];
  }

  draw() {
    const [W, H, L, R, T, B] = [320, 150, 50, 8, 8, 20];
    this.svg.replaceChildren();
    const all = [...this.series.values()].flatMap((m) => [...m.entries()]);
    this.el.dataset.points = String(this.steps().length);
    if (!all.length) {
      this.svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
      return;
    }
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
    if (y0 === y1) [y0, y1] = [y0 - (Math.abs(y0) || 1) * 0.1, y1 + (Math.abs(y1) || 1) * 0.1];
    const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
    this.svg.append(
      s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
      s("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }),
      s("text", { x: L - 4, y: T + 8, "text-anchor": "end", class: "tick" }, fmt(y1, 3)),
      s("text", { x: L - 4, y: H - B, "text-anchor": "end", class: "tick" }, fmt(y0, 3)),
      s("text", { x: L, y: H - 6, class: "tick" }, `step ${Math.ceil(x0)}`),
      s("text", { x: W - R, y: H - 6, "text-anchor": "end", class: "tick" }, String(Math.floor(x1))),
    );
    this.legend.replaceChildren();
    [...this.series.entries()].forEach(([name, points], i) => {
      const color = COLORS[i % COLORS.length];
      const sorted = [...points.entries()].sort((a, b) => a[0] - b[0]);
      const d = sorted.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ");
      this.svg.append(s("polyline", { points: d, fill: "none", stroke: color, "stroke-width": 1.6 }));
      if (sorted.length < 40) for (const [x, y] of sorted) this.svg.append(s("circle", { cx: X(x), cy: Y(y), r: 2, fill: color }));
      if (this.series.size > 1) {
        const key = h("span", {}, `■ ${name}  `);
        key.style.color = color; // (CSSOM, not a style attribute: the page's CSP allows no inline styles)
        this.legend.append(key);
      }
      if (i === 0) this.last.textContent = fmt(sorted[sorted.length - 1][1]);
    });
  }
}

// ------------------------------------------------------------------ views

const view = document.getElementById("view");
let cleanup = [];
let generation = 0; // bumped on every change of view, so that a view still loading knows it is gone
function leave() {
  generation += 1;
  for (const fn of cleanup) fn();
  cleanup = [];
}

function signOut(message) {
  auth.clear();
  leave();
  renderSignIn(message);
}

function renderSignIn(message) {
  document.getElementById("nav").hidden = true;
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", placeholder: "rlhf-...", required: true, "aria-label": "API key" });
  const note = h("p", { id: "signin-error", class: "form-errors", role: "alert" }, message || "");
  const form = h("form", { id: "signin", class: "card signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "With your team's API key. It is kept in this browser tab only (session storage) and sent only in the Authorization header."),
    input, note, h("button", { type: "submit", class: "primary" }, "Sign in"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    try {
      await api("v1/jobs?limit=1", { key });
      auth.set(key);
      input.value = "";
      if (!location.hash || location.hash === "#/signin") location.hash = "#/jobs";
      else route();
    } catch (err) {
      note.textContent = err.status === 401 ? "That key was not accepted." : `Could not reach the API: ${err.message}`;
    }
  });
  view.replaceChildren(form);
  input.focus();
}

function renderJobs() {
  const text = h("input", { id: "job-filter", type: "search", placeholder: "filter by name, id or status", "aria-label": "filter" });
  const status = h("select", { id: "status-filter", "aria-label": "status" }, h("option", { value: "" }, "any status"), STATUSES.map((st) => h("option", { value: st }, st)));
  const body = h("tbody");
  const note = h("p", { class: "muted", id: "jobs-note" });
  view.replaceChildren(
    h("div", { class: "row" }, h("h1", {}, "Jobs"), h("span", { class: "spacer" }), text, status, h("a", { href: "#/submit" }, h("button", { type: "button", class: "primary" }, "Submit a job"))),
    h("table", { id: "jobs" }, h("thead", {}, h("tr", {}, ["name", "id", "status", "step", "age", "updated"].map((c) => h("th", {}, c)))), body),
    note,
  );
  let jobs = [];
  let hasMore = false;
  const draw = () => {
    const q = text.value.trim().toLowerCase();
    const shown = jobs.filter((j) => !q || [j.name, j.id, j.status].some((f) => f.toLowerCase().includes(q)));
    body.replaceChildren(...shown.map((j) => h("tr", { dataset: { job: j.id } },
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.name || "(unnamed)")),
      h("td", { class: "mono" }, j.id),
      h("td", {}, statusBadge(j.status)),
      h("td", {}, progress(j.step, j.total_steps)),
      h("td", { title: when(j.created_at) }, age(j.created_at)),
      h("td", { title: when(j.updated_at) }, j.updated_at ? `${age(j.updated_at)} ago` : "-"))));
    note.textContent = !jobs.length ? "No jobs yet." : hasMore ? "Showing the newest 100 jobs." : "";
  };
  let timer = null;
  let stopped = false;
  const load = async () => {
    clearTimeout(timer);
    try {
      const page = await api(`v1/jobs?limit=100${status.value ? `&status=${status.value}` : ""}`);
      jobs = page.data;
      hasMore = page.has_more;
      draw();
    } catch (err) {
      if (err.status !== 401) note.textContent = `Could not load jobs: ${err.message}`;
    }
    if (!stopped) timer = setTimeout(load, 2000);
  };
  text.addEventListener("input", draw);
  status.addEventListener("change", load);
  cleanup.push(() => { stopped = true; clearTimeout(timer); });
  load();
}

async function renderJob(id) {
  const mine = generation;
  view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  let job;
  try {
    job = await api(`v1/jobs/${encodeURIComponent(id)}`);
  } catch (err) {
    if (mine !== generation) return;
    view.replaceChildren(h("div", { id: "job-missing", class: "error-box" }, err.status === 404 ? `No job ${id} for this key.` : `Could not load job ${id}: ${err.message}`), h("p", {}, h("a", { href: "#/jobs" }, "← all jobs")));
    return;
  }
  if (mine !== generation) return;
  const charts = CHARTS.map((c) => new Chart(c));
  const head = h("div", { class: "job-head" });
  const errorBox = h("div", { id: "job-error" });
  const liveNote = h("span", { class: "live off", id: "live" }, "connecting");
  const events = h("tbody");
  const checkpoints = h("tbody");
  // A multi-turn job (rollout.agent, here or in a stage) shows its newest sample episodes.
  const isAgent = !!(job.spec?.rollout?.agent || (job.spec?.stages || []).some((st) => st?.rollout?.agent));
  const episodes = h("div", { id: "episodes" });
  const specBlock = h("pre", { class: "spec" }, JSON.stringify(job.spec, null, 2));
  let latestStep = job.step;

  // The head is built once and updated in place (a button rebuilt under the user's pointer would miss a click).
  const title = h("span");
  const badge = h("span");
  const stepText = h("b", { id: "job-step" });
  const ended = h("span");
  const cancel = h("button", { id: "cancel", type: "button", class: "danger" }, "Cancel job");
  const link = /^https?:\/\//.test(job.dashboard_url) ? h("a", { id: "ray-link", href: job.dashboard_url, target: "_blank", rel: "noopener noreferrer" }, "Ray dashboard ↗") : null;
  head.append(
    h("div", {},
      h("h1", {}, title, " ", badge),
      h("div", { class: "facts" },
        h("span", { class: "mono" }, job.id),
        h("span", {}, "step ", stepText),
        h("span", { title: when(job.created_at) }, "submitted ", h("b", {}, new Date(job.created_at * 1000).toLocaleString())),
        ended, liveNote)),
    h("span", { class: "spacer" }),
    h("div", { class: "row" }, link, cancel));
  const drawHead = () => {
    title.textContent = job.name || "(unnamed)";
    badge.replaceChildren(statusBadge(job.status));
    stepText.textContent = `${Math.max(latestStep, job.step)}/${job.total_steps ?? "?"}`;
    ended.replaceChildren(...(job.finished_at ? ["ended ", h("b", {}, when(job.finished_at))]
      : job.queue ? [h("span", { class: "muted", id: "queue-reason" }, `#${job.queue.position} in the queue: ${job.queue.reason}`)] : []));
    cancel.disabled = TERMINAL.has(job.status) || job.status === "cancelling";
    if (job.status === "failed" && job.error && !errorBox.childElementCount) {
      errorBox.replaceChildren(h("div", { class: "error-box" }, h("b", {}, `Failed (${job.error.code}): `), job.error.message));
    }
  };
  cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel job ${job.name || job.id}?`)) return;
    cancel.disabled = true;
    try {
      job = await api(`v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
      drawHead();
    } catch (err) {
      errorBox.replaceChildren(h("div", { class: "error-box" }, `Cancel failed: ${err.message}`));
      cancel.disabled = TERMINAL.has(job.status);
    }
  });

  const refresh = async () => {
    try {
      job = await api(`v1/jobs/${encodeURIComponent(id)}`);
      drawHead();
      const list = await api(`v1/jobs/${encodeURIComponent(id)}/checkpoints`);
      checkpoints.replaceChildren(...list.data.map((c) => h("tr", {},
        h("td", {}, c.step), h("td", { class: "mono" }, c.id), h("td", {}, `${(c.bytes / 1e6).toFixed(1)} MB`), h("td", {}, when(c.created_at)))));
      if (!list.data.length) checkpoints.replaceChildren(h("tr", {}, h("td", { colspan: 4, class: "muted" }, "none yet")));
      if (isAgent) drawEpisodes((await api(`v1/jobs/${encodeURIComponent(id)}/trajectories?limit=8`)).data);
    } catch (err) { /* the streams report trouble; the next refresh tries again */ }
  };
  let episodesShown = null; // what is drawn: redrawn only when it changes, with the episodes the user opened kept open
  const drawEpisodes = (list) => {
    const key = JSON.stringify(list.map((t) => [t.step, t.sample]));
    if (key === episodesShown) return;
    episodesShown = key;
    if (!list.length) { episodes.replaceChildren(h("p", { class: "muted" }, "none yet")); return; }
    const open = new Set([...episodes.querySelectorAll("details[open]")].map((d) => `${d.dataset.step}/${d.dataset.sample}`));
    episodes.replaceChildren(...list.slice().reverse().map((t) => h("details", { class: "episode card", open: open.has(`${t.step}/${t.sample}`) || null, dataset: { step: t.step, sample: t.sample, reward: t.reward } },
      h("summary", {}, `step ${t.step} · episode ${t.sample} · reward ${fmt(t.reward, 3)} · ${t.turns} turns · ${t.tool_calls} tool calls`
        + (t.tool_errors ? ` · ${t.tool_errors} tool errors` : "") + (t.truncated ? " · truncated" : "")),
      ...t.messages.map((m) => h("div", { class: `turn turn-${m.role}` }, h("b", {}, m.name ? `${m.role} (${m.name})` : m.role), h("pre", {}, m.content))))));
  };
  let refreshTimer = null; // one refresh for a burst of events (a long job's history arrives at once)
  const scheduleRefresh = () => {
    if (refreshTimer === null) refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 250);
  };

  const addEvent = (e) => {
    const extra = e.data.traceback ? h("details", {}, h("summary", {}, "traceback"), h("pre", {}, e.data.traceback)) : null;
    const where = [e.data.stage && `stage ${e.data.stage}`, e.data.step !== undefined && `step ${e.data.step}`].filter(Boolean).join(", ");
    events.prepend(h("tr", { class: `ev-${e.type}`, dataset: { id: e.id, type: e.type } },
      h("td", { class: "mono when" }, clock(e.created_at)), h("td", { class: "type" }, e.type), h("td", {}, e.message, where ? h("span", { class: "muted" }, ` (${where})`) : null, extra)));
    while (events.childElementCount > 500) events.lastElementChild.remove();
    if (e.type === "status" || e.type === "checkpoint" || e.type === "error") scheduleRefresh();
  };

  const states = {};
  const onState = (name) => (state) => {
    states[name] = state;
    const all = Object.values(states);
    const done = all.every((x) => x === "ended");
    const live = all.every((x) => x === "live" || x === "ended");
    liveNote.className = `live ${done ? "" : live ? "on" : "off"}`;
    liveNote.textContent = done ? "ended" : live ? "live" : all.includes("gone") ? "job gone" : "reconnecting";
  };
  const metricStream = new Stream(`v1/jobs/${encodeURIComponent(id)}/metrics`, {
    onItem: (m) => {
      for (const c of charts) c.add(m.step, m.values);
      if (m.step > latestStep) {
        latestStep = m.step;
        if (isAgent) scheduleRefresh(); // a new step appended its episodes
        stepText.textContent = `${latestStep}/${job.total_steps ?? "?"}`;
      }
    },
    onEnd: () => onState("metrics")("ended"),
    onState: onState("metrics"),
  });
  const eventStream = new Stream(`v1/jobs/${encodeURIComponent(id)}/events`, {
    onItem: addEvent,
    onEnd: () => { onState("events")("ended"); scheduleRefresh(); },
    onState: onState("events"),
  });

  drawHead();
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/jobs" }, "← all jobs")),
    head, errorBox,
    h("h2", {}, "Curves"), h("div", { class: "charts", id: "charts" }, charts.map((c) => c.el)),
    h("h2", {}, "Events"), h("div", { class: "events card" }, h("table", { id: "events" }, events)),
    ...(isAgent ? [h("h2", {}, "Episodes"), h("p", { class: "muted" }, "the newest sampled episodes (each step's first prompt), with their turns and rewards"), episodes] : []),
    h("h2", {}, "Checkpoints"), h("table", { id: "checkpoints" }, h("thead", {}, h("tr", {}, ["step", "id (a new job's model.path)", "size", "saved"].map((c) => h("th", {}, c)))), checkpoints),
    h("h2", {}, "Spec"), h("details", {}, h("summary", {}, "the validated job spec"), specBlock));
  refresh();
  metricStream.run();
  eventStream.run();
  // For tests and the curious: the streams and the curves' points.
  window.rlhfUI = {
    jobId: id,
    streams: { metrics: metricStream, events: eventStream },
    dropStreams() { metricStream.drop(); eventStream.drop(); },
    steps(metric) { return charts.find((c) => c.id === metric).steps(); },
  };
  cleanup.push(() => { metricStream.stop(); eventStream.stop(); clearTimeout(refreshTimer); delete window.rlhfUI; });
}

// ------------------------------------------------------------------ submit, with field errors beside their lines

const EXAMPLE = `api_version: rlhf/v1
name: grpo-arith
algorithm: {name: grpo}
model:
  path: tiny-model          # a model from GET /v1/models, or one of your checkpoint ids (ckpt-...)
data:
  train_file: file-REPLACE  # the id POST /v1/files gave your upload
  max_prompt_length: 16
rollout: {backend: hf, n: 4, max_new_tokens: 4}
rewards:
  - function: accuracy
optim:
  lr: 1.0e-4
  steps: 20
  prompts_per_step: 4
checkpoint: {every: 10}
`;

// The 0-based line of a field path (`optim.lr`, `rewards.0.function`) in YAML or indented JSON: each
// part is looked for inside the block of the part before it; a part that is not there (a missing
// field) leaves the line of its parent.
function fieldLine(text, param) {
  const lines = text.split("\n");
  const indent = (l) => l.length - l.trimStart().length;
  let [from, end, parentCol, found] = [0, lines.length, -1, null];
  const blockEnd = (i, col) => {
    for (let j = i + 1; j < end; j++) if (lines[j].trim() && !lines[j].trim().startsWith("#") && indent(lines[j]) <= col) return j;
    return end;
  };
  for (const part of param.split(".")) {
    if (/^\d+$/.test(part)) { // the n-th item of a list: `- ...` (YAML) or `{` (JSON) lines at the list's indent
      const items = [];
      for (let i = from; i < end; i++) {
        const t = lines[i].trimStart();
        if ((t.startsWith("- ") || t === "-" || t.startsWith("{")) && indent(lines[i]) > parentCol - (t.startsWith("-") ? 1 : 0)) {
          if (!items.length || indent(lines[i]) === indent(lines[items[0]])) items.push(i);
        }
      }
      const i = items[Number(part)];
      if (i === undefined) break;
      [found, from, end, parentCol] = [i, i, blockEnd(i, indent(lines[i])), indent(lines[i])];
      continue;
    }
    const escaped = part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    const re = new RegExp(`(^|[\\s{,-])["']?${escaped}["']?\\s*:`, "g");
    let hit = null;
    for (let i = from; i < end && hit === null; i++) {
      if (lines[i].trimStart().startsWith("#")) continue;
      for (const m of lines[i].matchAll(re)) {
        const col = m.index + m[1].length;
        if (col > parentCol) { hit = [i, col]; break; }
      }
    }
    if (!hit) break;
    [found, from, end, parentCol] = [hit[0], hit[0], blockEnd(hit[0], hit[1]), hit[1]];
  }
  return found;
}

// The field errors of a 422: the API's message is `invalid job spec: a.b: why; c: why`.
function fieldErrors(err) {
  const text = err.message.replace(/^invalid [^:]*: /, "");
  const parts = text.split(/; (?=[\w.<>[\]-]+: )/);
  return parts.map((p) => {
    const i = p.indexOf(": ");
    const param = i > 0 ? p.slice(0, i) : null;
    return param && param !== "<body>" ? { param, message: p.slice(i + 2) } : { param: null, message: param === "<body>" ? p.slice(i + 2) : p };
  });
}

function renderSubmit() {
  const area = h("textarea", { id: "spec-text", spellcheck: "false", wrap: "off", "aria-label": "job spec (YAML or JSON)" });
  area.value = sessionStorage.getItem("rlhf.draft") || EXAMPLE;
  const gutter = h("pre", { class: "gutter", "aria-hidden": "true" });
  const notes = h("div", { class: "notes", id: "spec-notes" });
  const general = h("ul", { class: "form-errors", id: "spec-errors", role: "alert" });
  const button = h("button", { type: "submit", class: "primary", id: "submit-spec" }, "Submit job");
  const lineHeight = () => parseFloat(getComputedStyle(area).lineHeight) || 20;
  let marks = [];

  const drawGutter = () => {
    const n = area.value.split("\n").length;
    const bad = new Set(marks.map((m) => m.line));
    gutter.replaceChildren(...Array.from({ length: n }, (_, i) => h("span", { class: bad.has(i) ? "bad" : null }, `${i + 1}\n`)));
    gutter.scrollTop = area.scrollTop;
  };
  const drawNotes = () => {
    const lh = lineHeight();
    const pad = parseFloat(getComputedStyle(area).paddingTop) || 0;
    notes.replaceChildren(...marks.map((m) => {
      const el = h("div", { class: "field-error", dataset: { param: m.param, line: String(m.line + 1) }, title: `${m.param}: ${m.message}` }, `${m.param}: ${m.message}`);
      el.style.top = `${pad + m.line * lh - area.scrollTop}px`;
      return el;
    }));
  };
  const show = (errors) => {
    marks = [];
    general.replaceChildren();
    for (const e of errors) {
      const line = e.line ?? (e.param ? fieldLine(area.value, e.param) : null);
      if (line === null) general.append(h("li", { dataset: { param: e.param || "" } }, e.param ? `${e.param}: ${e.message}` : e.message));
      else marks.push({ ...e, param: e.param || "spec", line });
    }
    // Two errors on one line: the first stays beside it, the others below.
    const seen = new Set();
    marks = marks.filter((m) => (seen.has(m.line) ? (general.append(h("li", { dataset: { param: m.param } }, `${m.param} (line ${m.line + 1}): ${m.message}`)), false) : seen.add(m.line)));
    drawGutter();
    drawNotes();
  };
  area.addEventListener("input", () => { sessionStorage.setItem("rlhf.draft", area.value); if (marks.length) show([]); else drawGutter(); });
  area.addEventListener("scroll", () => { gutter.scrollTop = area.scrollTop; drawNotes(); });
  area.addEventListener("keydown", (e) => {
    if (e.key === "Tab") { e.preventDefault(); area.setRangeText("  ", area.selectionStart, area.selectionEnd, "end"); }
  });

  const form = h("form", { id: "submit-form" },
    h("div", { class: "row" }, h("h1", {}, "Submit a job"), h("span", { class: "spacer" }), h("span", { class: "muted" }, "The spec as YAML or JSON: the same file works with `rlhf train` and `ray job submit`.")),
    general,
    h("div", { class: "editor" }, gutter, area, notes),
    h("p", {}, button));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    let body;
    try {
      body = jsyaml.load(area.value); // JSON is YAML too
    } catch (err) {
      return show([{ param: "syntax", line: err.mark ? err.mark.line : null, message: err.reason || err.message }]);
    }
    if (!body || typeof body !== "object" || Array.isArray(body)) return show([{ param: null, message: "The spec must be a mapping of sections (model, data, optim, ...)." }]);
    button.disabled = true;
    try {
      const job = await api("v1/jobs", { method: "POST", body });
      sessionStorage.removeItem("rlhf.draft");
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      show(err.status === 422 ? fieldErrors(err) : [{ param: null, message: `${err.status ?? ""} ${err.message}`.trim() }]);
    } finally {
      button.disabled = false;
    }
  });
  view.replaceChildren(form);
  drawGutter();
  window.rlhfUI = { fieldLine };
  cleanup.push(() => { delete window.rlhfUI; });
}

// ------------------------------------------------------------------ routing

function route() {
  leave();
  if (!auth.key) return renderSignIn();
  document.getElementById("nav").hidden = false;
  const hash = location.hash || "#/jobs";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", hash.startsWith(`#/${a.dataset.nav}`));
  const m = hash.match(/^#\/jobs\/([^/]+)$/);
  if (m) return renderJob(decodeURIComponent(m[1]));
  if (hash === "#/submit") return renderSubmit();
  return renderJobs();
}

document.getElementById("sign-out").addEventListener("click", () => { signOut(); location.hash = "#/jobs"; });
window.addEventListener("hashchange", route);
route();
