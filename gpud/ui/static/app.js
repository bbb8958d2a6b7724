// The gpud page: one live view of the box, drawn from the events `gpud ui` relays (/api/events), and the
// actions, sent to the control API through /api/v1/… (the daemon validates; its message is shown as is).
// Text from the daemon is always set with textContent, never parsed as HTML.

import { estimateText, exitShort, modelMeta } from "./describe.js";
import { formatDuration, formatSize, startBody } from "./format.js";
import { gpuLayout } from "./ledger.js";

const PALETTE = ["#4e79a7", "#f28e2b", "#2a9d8f", "#b07aa1", "#d4a72c", "#6b8e23", "#e07a9f", "#8c6d5a", "#5fa8d3", "#9c89b8"];
const MAX_ACTIVITY = 80;
const MAX_LOG_LINES = 2000;
const MODEL_STATES = ["running", "starting", "degraded", "failed", "stopping", "idle"];

const state = {
  models: new Map(),     // name → model show object
  gpus: [],
  status: null,
  ui: null,
  statusAt: 0,           // performance.now() when status arrived, for a ticking uptime
  up: false,
  synced: false,         // a snapshot arrived: later differences are news for the activity list
  colours: new Map(),    // model name → colour, kept for the life of the page
};

// ---- small DOM helpers ------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);

function colourOf(name) {
  if (!state.colours.has(name)) {
    const used = new Set([...state.models.keys()].filter((n) => state.colours.has(n)).map((n) => state.colours.get(n)));
    const free = PALETTE.find((c) => !used.has(c)) ?? PALETTE[state.colours.size % PALETTE.length];
    state.colours.set(name, free);
  }
  return state.colours.get(name);
}

function clock(date = new Date()) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

// ---- talking to gpud ui --------------------------------------------------------------------------------

/** A control-API request through gpud ui; throws an Error whose message is the daemon's own sentence. */
async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch("/api" + path, init);
  } catch {
    throw new Error("gpud ui did not answer (is it still running?).");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) throw new Error(data?.error?.message ?? `HTTP ${response.status}`);
  return data;
}

const modelPath = (name, ...rest) => ["/v1/models", encodeURIComponent(name), ...rest].join("/");

// ---- activity list ---------------------------------------------------------------------------------------

function note(text, tone = "") {
  const list = $("activity");
  list.prepend(h("li", { class: tone }, h("time", { text: clock() }), h("span", { text })));
  while (list.children.length > MAX_ACTIVITY) list.lastChild.remove();
}

function replicaNews(name, before, after) {
  const old = new Map((before?.replicas ?? []).map((r) => [r.index, r]));
  for (const replica of after.replicas ?? []) {
    const was = old.get(replica.index);
    old.delete(replica.index);
    if (was?.state === replica.state && was?.restarts === replica.restarts) continue;
    const label = `${name}#${replica.index}`;
    const why = replica.last_exit_text && ["backoff", "failed", "stopped", "unhealthy"].includes(replica.state)
      ? ` — ${replica.message ?? replica.last_exit_text}` : "";
    const tone = ["failed", "backoff", "unhealthy"].includes(replica.state) ? "bad" : replica.state === "ready" ? "good" : "";
    note(was ? `${label}: ${was.state} → ${replica.state}${why}` : `${label}: ${replica.state}`, tone);
  }
  for (const index of old.keys()) note(`${name}#${index}: removed`);
}

function noticeText(event) {
  const name = event.name ?? event.model ?? "";
  switch (event.type) {
    case "idle": return [`${name}: unloaded (idle)`, ""];
    case "wake": return [`${name}: waking for a request`, ""];
    case "evicted": return [`${name}: evicted to make room${event.for ? ` for ${event.for}` : event.by ? ` for ${event.by}` : ""}`, "warn"];
    case "scaled": return [`${name}: scaled${event.from !== undefined ? ` from ${event.from}` : ""}${event.to !== undefined ? ` to ${event.to}` : ""}${event.why ?? event.reason ? ` (${event.why ?? event.reason})` : ""}`, ""];
    case "progress": return null;  // shown on the model's card instead
    default: return [`${event.type}${name ? `: ${name}` : ""}`, ""];
  }
}

// ---- header ------------------------------------------------------------------------------------------

function renderHeader() {
  const ui = state.ui ?? {};
  $("host").textContent = ui.host ? ui.host : "";
  document.title = ui.host ? `gpud · ${ui.host}` : "gpud";
  const s = state.status;
  const summary = $("summary");
  summary.replaceChildren();
  if (!s) return;
  const models = [...state.models.values()];
  const replicas = models.reduce((n, m) => n + (m.replicas?.length ?? 0), 0);
  const ready = models.reduce((n, m) => n + (m.replicas_ready ?? 0), 0);
  const uptime = (s.uptime_sec ?? 0) + (performance.now() - state.statusAt) / 1000;
  const item = (label, value, id) => h("span", { class: "sum-item", id }, h("span", { class: "sum-label", text: label }), " ", h("b", { text: value }));
  summary.append(
    item("models", String(models.length)),
    item("replicas ready", `${ready}/${replicas}`),
    item("GPUs", String(state.gpus.length)),
    item("endpoint", s.endpoint ?? s.proxy ?? "–"),
    item("gpud", s.version ?? ui.version ?? "–"),
    item("up", formatDuration(uptime), "uptime"),
  );
}

function tickUptime() {
  const el = $("uptime");
  if (el && state.status && state.up) {
    const uptime = (state.status.uptime_sec ?? 0) + (performance.now() - state.statusAt) / 1000;
    el.querySelector("b").textContent = formatDuration(uptime);
  }
}

function setConnection(kind, text, detail) {
  const conn = $("conn");
  conn.className = `conn conn-${kind}`;
  $("conn-text").textContent = text;
  const banner = $("banner");
  banner.hidden = !detail;
  banner.textContent = detail ?? "";
  document.body.classList.toggle("offline", kind !== "live");
}

// ---- GPUs ----------------------------------------------------------------------------------------------

function segmentEl(seg) {
  const size = formatSize(seg.bytes);
  if (seg.kind === "reservation") {
    const measured = typeof seg.measured === "number"
      ? ` · measured ${formatSize(seg.measured)} of ${size}` : "";
    const label = `${seg.label}: ${size} reserved${seg.state ? ` (${seg.state})` : ""}${measured}`;
    const el = h("div", { class: `seg seg-res rs-${seg.state ?? "none"}`, role: "img", "aria-label": label, title: label },
      h("span", { class: "seg-label", text: seg.label }), h("span", { class: "seg-size", text: size }));
    el.style.setProperty("--c", colourOf(seg.model));
    el.style.flexGrow = String(seg.fraction);
    if (typeof seg.measured === "number" && seg.bytes > 0) {
      const fill = h("div", { class: `measured${seg.measured > seg.bytes ? " over" : ""}` });
      fill.style.width = `${Math.min(100, (100 * seg.measured) / seg.bytes)}%`;
      el.append(fill);
    }
    return el;
  }
  const label = `${seg.label}: ${size}`;
  const el = h("div", { class: `seg seg-${seg.kind}`, role: "img", "aria-label": label, title: label },
    seg.kind === "available" ? h("span", { class: "seg-label", text: `${size} available` }) : null);
  el.style.flexGrow = String(seg.fraction);
  return el;
}

function renderGpus() {
  const box = $("gpus");
  if (!state.gpus.length) {
    box.replaceChildren(h("p", { class: "empty", text: state.up ? "The daemon reports no GPUs." : "Waiting for the daemon…" }));
    return;
  }
  const rows = state.gpus.map((gpu) => {
    const layout = gpuLayout(gpu, state.models);
    const title = `GPU ${gpu.index}`;
    const bar = h("div", { class: "bar" }, layout.segments.filter((s) => s.bytes > 0 || s.kind === "available").map(segmentEl));
    const legend = h("div", { class: "legend" },
      legendItem("reserved", layout.reserved, "res"),
      legendItem("used by others", layout.others, "others"),
      legendItem("headroom", layout.headroom, "headroom"),
      legendItem("available", layout.available, "available"),
      layout.overcommitted ? h("span", { class: "legend-item bad", text: "overcommitted" }) : null,
    );
    const broken = gpu.ok === false ? h("p", { class: "error", text: `${title} is not usable: ${gpu.reason ?? "unknown reason"}` }) : null;
    return h("div", { class: "gpu", role: "group", "aria-label": title, "data-gpu": String(gpu.index) },
      h("div", { class: "gpu-head" },
        h("span", { class: "gpu-title", text: title }),
        h("span", { class: "gpu-name", text: gpu.name ?? "" }),
        h("span", { class: "gpu-total", text: formatSize(layout.total) }),
        h("span", { class: "gpu-free" }, h("b", { text: formatSize(layout.available) }), " available"),
      ),
      bar, legend, broken);
  });
  box.replaceChildren(...rows);
  const total = state.gpus.reduce((n, g) => n + (g.total_bytes ?? 0), 0);
  const free = state.gpus.reduce((n, g) => n + (g.available_bytes ?? 0), 0);
  $("gpus-note").textContent = `${formatSize(free)} available of ${formatSize(total)}`;
}

function legendItem(label, bytes, kind) {
  return h("span", { class: `legend-item legend-${kind}` }, h("i", { class: "swatch-mini" }), `${label} `, h("b", { text: formatSize(bytes) }));
}

// ---- models --------------------------------------------------------------------------------------------

const cards = new Map();   // model name → {root, parts…}

function stateBadge(value, kind = "model") {
  return h("span", { class: `badge ${kind}-state state-${value}`, text: value });
}

function createCard(name) {
  const safeId = `m-${[...name].map((c) => (/[A-Za-z0-9_-]/.test(c) ? c : "_")).join("")}-${cards.size}`;
  const replicasInput = h("input", { type: "number", min: "1", name: "replicas", id: `${safeId}-replicas`, inputmode: "numeric" });
  replicasInput.addEventListener("input", () => { replicasInput.dataset.dirty = "1"; });
  const rolling = h("input", { type: "checkbox", checked: true, id: `${safeId}-rolling` });
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const status = h("span", { class: "muted action-status", "aria-live": "polite" });
  const card = { name, replicasInput, rolling, error, status, rows: new Map() };

  const scaleForm = h("form", { class: "scale", novalidate: true, onsubmit: (e) => { e.preventDefault(); scale(card); } },
    h("label", { for: replicasInput.id, text: "Replicas" }), replicasInput,
    h("button", { type: "submit", "aria-label": `Scale ${name}`, text: "Scale" }));
  card.restartBtn = h("button", { type: "button", "aria-label": `Restart ${name}`, text: "Restart", onclick: () => restart(card) });
  card.unloadBtn = h("button", { type: "button", "aria-label": `Unload ${name}`, text: "Unload", onclick: () => act(card, "Unload", "POST", modelPath(name, "unload")) });
  card.loadBtn = h("button", { type: "button", "aria-label": `Load ${name}`, text: "Load", onclick: () => act(card, "Load", "POST", modelPath(name, "load")) });
  card.logsBtn = h("button", { type: "button", "aria-label": `Logs of ${name}`, text: "Logs", onclick: () => openLogs(name, firstReplica(name)) });
  card.stopBtn = h("button", { type: "button", class: "danger", "aria-label": `Stop ${name}`, text: "Stop", onclick: () => confirmStop(card) });

  card.swatch = h("span", { class: "swatch" });
  card.badge = h("span");
  card.ready = h("span", { class: "ready" });
  card.busy = h("span", { class: "busy muted" });
  card.meta = h("div", { class: "meta" });
  card.extra = h("div", { class: "extra" });
  card.progress = h("div", { class: "progress muted" });
  card.tbody = h("tbody");
  card.table = h("table", { class: "replicas" },
    h("caption", { class: "sr-only", text: `Replicas of ${name}` }),
    h("thead", {}, h("tr", {}, ["Index", "State", "GPUs", "Memory", "Port", "PID", "Restarts", "In flight", "Last exit", "Log"]
      .map((t) => h("th", { scope: "col", text: t })))),
    card.tbody);
  card.idleNote = h("p", { class: "idle-note muted", hidden: true });
  const title = h("h3", { id: `${safeId}-h`, text: name });
  card.root = h("article", { class: "model", "data-model": name, "aria-labelledby": title.id },
    h("header", { class: "model-head" }, card.swatch, title, card.badge, card.ready, card.busy, status),
    card.meta, card.extra, card.progress,
    h("div", { class: "actions" }, scaleForm, h("span", { class: "gap" }),
      h("span", { class: "restart" }, card.restartBtn, h("label", { for: rolling.id, class: "check" }, rolling, " rolling")),
      card.unloadBtn, card.loadBtn, card.logsBtn, h("span", { class: "gap" }), card.stopBtn),
    error, card.idleNote, card.table);
  return card;
}

function replicaRow(card, replica) {
  let row = card.rows.get(replica.index);
  if (!row) {
    const cells = Array.from({ length: 9 }, () => h("td"));
    const logs = h("button", { type: "button", class: "small", "aria-label": `Logs of ${card.name}#${replica.index}`, text: "Logs",
      onclick: () => openLogs(card.name, replica.index) });
    const tr = h("tr", { "data-replica": String(replica.index) }, cells, h("td", {}, logs));
    const msg = h("tr", { class: "msg", hidden: true }, h("td", { colspan: "10" }));
    row = { tr, cells, msg };
    card.rows.set(replica.index, row);
  }
  const [index, st, gpus, memory, port, pid, restarts, inflight, last] = row.cells;
  index.textContent = `${card.name}#${replica.index}`;
  st.replaceChildren(stateBadge(replica.state, "replica"));
  gpus.textContent = (replica.gpus ?? []).join(", ") || "–";
  const reserved = formatSize(replica.vram_bytes);
  if (typeof replica.measured_bytes === "number") {
    memory.textContent = `${formatSize(replica.measured_bytes)} of ${reserved}`;
    memory.classList.toggle("bad", replica.measured_bytes > replica.vram_bytes);
  } else {
    memory.textContent = reserved;
  }
  port.textContent = replica.port ? String(replica.port) : "–";
  pid.textContent = replica.pid ? String(replica.pid) : "–";
  restarts.textContent = String(replica.restarts ?? 0);
  inflight.textContent = String(replica.inflight ?? 0);
  last.textContent = replica.last_exit ? (replica.last_exit_text ?? exitShort(replica.last_exit)) : "–";
  last.title = replica.last_exit ? exitShort(replica.last_exit) : "";
  row.msg.hidden = !replica.message;
  row.msg.firstChild.textContent = replica.message ?? "";
  return row;
}

function updateCard(card, m) {
  card.swatch.style.setProperty("--c", colourOf(m.name));
  card.badge.replaceWith(card.badge = stateBadge(m.state));
  card.ready.textContent = `${m.replicas_ready ?? 0}/${m.replicas_desired ?? 0} ready`;
  card.busy.textContent = m.busy ? "operation in progress…" : "";
  card.meta.textContent = modelMeta(m);
  const extra = [];
  if (m.estimate) extra.push(h("div", { class: "estimate", title: m.estimate.source ?? "", text: estimateText(m.estimate, m.gpus_per_replica ?? 1) }));
  const env = Object.entries(m.env ?? {});
  if (env.length) extra.push(h("div", { class: "mono" }, h("span", { class: "muted", text: "env " }), env.map(([k, v]) => `${k}=${v}`).join(" ")));
  if (m.args?.length) extra.push(h("div", { class: "mono" }, h("span", { class: "muted", text: "args " }), m.args.join(" ")));
  if (m.venv?.packages?.length) extra.push(h("div", { class: "mono" }, h("span", { class: "muted", text: "venv " }), m.venv.packages.join(" ")));
  card.extra.replaceChildren(...extra);
  if (!m.busy) card.progress.textContent = "";
  const input = card.replicasInput;
  if (document.activeElement !== input && !input.dataset.dirty) input.value = String(m.replicas_desired ?? 1);
  const idle = m.state === "idle";
  card.unloadBtn.hidden = idle;
  card.loadBtn.hidden = !idle;
  card.idleNote.hidden = !idle;
  card.idleNote.textContent = idle ? `Idle: nothing loaded. ${m.replicas_desired ?? 1} replica(s) start on the next request, or with Load.` : "";
  const replicas = [...(m.replicas ?? [])].sort((a, b) => a.index - b.index);
  card.table.hidden = idle && !replicas.length;
  const seen = new Set();
  const rows = [];
  for (const replica of replicas) {
    seen.add(replica.index);
    const row = replicaRow(card, replica);
    rows.push(row.tr, row.msg);
  }
  for (const index of [...card.rows.keys()]) if (!seen.has(index)) card.rows.delete(index);
  // Only rows that moved are re-inserted, so a focused Logs button keeps its focus.
  rows.forEach((el, i) => { if (card.tbody.children[i] !== el) card.tbody.insertBefore(el, card.tbody.children[i] ?? null); });
  while (card.tbody.children.length > rows.length) card.tbody.lastChild.remove();
  if (!replicas.length && !idle) card.tbody.replaceChildren(h("tr", {}, h("td", { colspan: "10", class: "muted", text: "No replicas." })));
}

function renderModels() {
  const box = $("models");
  const names = [...state.models.keys()].sort((a, b) => a.localeCompare(b));
  for (const [name, card] of cards) if (!state.models.has(name)) { card.root.remove(); cards.delete(name); }
  if (!names.length) {
    box.replaceChildren(h("p", { class: "empty", text: state.up ? "No models. Start one with the form, or with `gpud model start`." : "" }));
  } else {
    box.querySelector(":scope > .empty")?.remove();
  }
  names.forEach((name, i) => {
    let card = cards.get(name);
    if (!card) { card = createCard(name); cards.set(name, card); }
    updateCard(card, state.models.get(name));
    if (box.children[i] !== card.root) box.insertBefore(card.root, box.children[i] ?? null);
  });
  const counts = {};
  for (const m of state.models.values()) counts[m.state] = (counts[m.state] ?? 0) + 1;
  $("models-note").textContent = MODEL_STATES.filter((s) => counts[s]).map((s) => `${counts[s]} ${s}`).join(" · ");
}

function renderAll() {
  renderHeader();
  renderGpus();
  renderModels();
}

// ---- actions -------------------------------------------------------------------------------------------

function firstReplica(name) {
  const replicas = state.models.get(name)?.replicas ?? [];
  return replicas.length ? Math.min(...replicas.map((r) => r.index)) : 0;
}

async function act(card, label, method, path, body, pending) {
  card.error.hidden = true;
  card.status.textContent = pending ?? `${label}…`;
  const buttons = card.root.querySelectorAll("button");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const show = await api(method, path, body);
    card.status.textContent = "";
    if (show && show.name && method !== "DELETE") applyModel(show);
    return true;
  } catch (err) {
    card.status.textContent = "";
    card.error.replaceChildren(h("strong", { text: `${label}: ` }), err.message);
    card.error.hidden = false;
    return false;
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

async function scale(card) {
  const text = card.replicasInput.value.trim();
  const replicas = /^\d+$/.test(text) ? Number(text) : text;
  if (await act(card, "Scale", "PATCH", modelPath(card.name), { replicas }, `Scaling to ${text}…`)) {
    delete card.replicasInput.dataset.dirty;
  }
}

function restart(card) {
  const rolling = card.rolling.checked;
  act(card, "Restart", "POST", modelPath(card.name, "restart"), { rolling }, rolling ? "Restarting one replica at a time…" : "Restarting…");
}

function confirmStop(card) {
  const m = state.models.get(card.name);
  const n = m?.replicas?.length ?? 0;
  const dialog = $("confirm");
  $("confirm-title").textContent = `Stop ${card.name}?`;
  $("confirm-text").textContent = `Its ${n} replica${n === 1 ? "" : "s"} stop (in-flight requests drain first), their GPU memory is freed, and gpud forgets the model.`;
  $("confirm-ok").textContent = `Stop ${card.name}`;
  dialog.returnValue = "";
  dialog.onclose = () => {
    if (dialog.returnValue === "ok") act(card, "Stop", "DELETE", modelPath(card.name), undefined, "Stopping…");
  };
  dialog.showModal();
}

function formValues(form) {
  const values = {};
  for (const el of form.elements) if (el.name) values[el.name] = el.type === "checkbox" ? el.checked : el.value;
  return values;
}

async function submitStart(event) {
  event.preventDefault();
  const form = event.target;
  const error = $("start-error");
  const status = $("start-status");
  error.hidden = true;
  let body;
  try {
    body = startBody(formValues(form));
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
    return;
  }
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  status.textContent = "Starting…";
  try {
    const show = await api("POST", "/v1/models", body);
    status.textContent = `Started ${show.name}: its replicas are coming up.`;
    applyModel(show);
    form.elements.model.value = "";
    form.elements.name.value = "";
  } catch (err) {
    status.textContent = "";
    error.textContent = err.message;
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
}

// ---- logs ----------------------------------------------------------------------------------------------

const logs = { source: null, name: null, replica: null, lines: [], ended: false };

function closeLogs() {
  logs.source?.close();
  logs.source = null;
  logs.name = null;
  $("logs").hidden = true;
  document.body.classList.remove("with-logs");
}

function openLogs(name, replica) {
  logs.source?.close();
  Object.assign(logs, { name, replica, lines: [], ended: false });
  const panel = $("logs");
  panel.hidden = false;
  document.body.classList.add("with-logs");
  $("logs-h").textContent = `Logs — ${name}#${replica}`;
  fillLogReplicas();
  const text = $("logs-text");
  text.textContent = "";
  const stateEl = $("logs-state");
  stateEl.textContent = "connecting…";
  const source = new EventSource(`/api/logs?model=${encodeURIComponent(name)}&replica=${replica}`);
  logs.source = source;
  source.addEventListener("open", () => { logs.lines = []; text.textContent = ""; stateEl.textContent = "following"; });
  source.addEventListener("lines", (e) => {
    const atBottom = text.scrollTop + text.clientHeight >= text.scrollHeight - 8;
    logs.lines.push(...JSON.parse(e.data));
    if (logs.lines.length > MAX_LOG_LINES) logs.lines.splice(0, logs.lines.length - MAX_LOG_LINES);
    text.textContent = logs.lines.join("\n");
    if (atBottom) text.scrollTop = text.scrollHeight;
  });
  const finish = (message) => { source.close(); logs.ended = true; stateEl.textContent = message; };
  source.addEventListener("failure", (e) => finish(JSON.parse(e.data).message));
  source.addEventListener("end", () => finish("ended (the daemon went away?); reopens when it is back"));
  source.addEventListener("error", () => { if (source.readyState === EventSource.CLOSED) finish("disconnected"); });
  text.focus({ preventScroll: true });
}

function fillLogReplicas() {
  const select = $("logs-replica");
  const replicas = (state.models.get(logs.name)?.replicas ?? []).map((r) => r.index);
  if (!replicas.includes(logs.replica)) replicas.push(logs.replica);
  select.replaceChildren(...replicas.sort((a, b) => a - b).map((i) => h("option", { value: String(i), text: `#${i}`, selected: i === logs.replica })));
}

// ---- the live feed ---------------------------------------------------------------------------------------

function applyModel(show) {
  const before = state.models.get(show.name);
  if (state.synced) {
    if (!before) note(`${show.name}: started (${show.replicas_desired} replica${show.replicas_desired === 1 ? "" : "s"})`);
    else if (before.state !== show.state) note(`${show.name} is ${show.state}`, show.state === "failed" ? "bad" : show.state === "running" ? "good" : "");
    replicaNews(show.name, before, show);
  }
  state.models.set(show.name, show);
  renderAll();
  if (logs.name === show.name) fillLogReplicas();
}

function onSnapshot(data) {
  state.status = data.status;
  state.statusAt = performance.now();
  state.ui = data.ui;
  state.gpus = data.gpus?.gpus ?? [];
  state.models = new Map((data.models ?? []).map((m) => [m.name, m]));
  const engine = $("engine");
  if (!engine.options.length) {
    for (const name of data.ui?.engines ?? ["vllm", "sim", "command"]) engine.append(h("option", { value: name, text: name }));
  }
  const reconnected = state.synced && !state.up;
  state.up = true;
  state.synced = true;
  setConnection("live", "Live");
  note(reconnected ? "Daemon is back; the view is current again." : "Connected to the daemon.", "good");
  renderAll();
  if (logs.name && logs.ended) openLogs(logs.name, logs.replica);
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("snapshot", (e) => onSnapshot(JSON.parse(e.data)));
  source.addEventListener("model", (e) => applyModel(JSON.parse(e.data)));
  source.addEventListener("removed", (e) => {
    const { name } = JSON.parse(e.data);
    if (state.models.delete(name)) note(`${name}: stopped and removed`);
    renderAll();
  });
  source.addEventListener("gpus", (e) => { state.gpus = JSON.parse(e.data).gpus ?? []; renderGpus(); renderHeader(); });
  source.addEventListener("notice", (e) => {
    const event = JSON.parse(e.data);
    if (event.type === "progress") {
      const card = cards.get(event.name ?? event.model);
      if (card) card.progress.textContent = `${event.phase ?? "progress"}: ${event.line ?? ""}`;
      return;
    }
    const text = noticeText(event);
    if (text) note(...text);
  });
  source.addEventListener("daemon", (e) => {
    const { message } = JSON.parse(e.data);
    state.up = false;
    setConnection("down", "Daemon unreachable — reconnecting…", `${message} The view below is the last one seen; it updates again when the daemon is back.`);
    note(`Daemon unreachable: ${message}`, "bad");
    renderHeader();
  });
  source.addEventListener("error", () => {
    state.up = false;
    if (source.readyState === EventSource.CLOSED) {
      setConnection("down", "Not connected", "gpud ui refused this page (it was restarted, or the page lacks its token): open the URL that `gpud ui` printed.");
    } else {
      setConnection("wait", "gpud ui unreachable — retrying…", "The connection to gpud ui was lost; retrying every second.");
    }
  });
}

function init() {
  $("start-form").addEventListener("submit", submitStart);
  $("engine").addEventListener("change", (e) => { $("command-field").hidden = e.target.value !== "command"; });
  $("logs-close").addEventListener("click", closeLogs);
  $("logs-replica").addEventListener("change", (e) => openLogs(logs.name, Number(e.target.value)));
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("logs").hidden && !$("confirm").open) closeLogs(); });
  setInterval(tickUptime, 1000);
  connect();
}

init();
