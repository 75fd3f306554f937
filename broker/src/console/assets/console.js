// The Ballast console: polls the broker's JSON API (/api/v1/queues and
// /api/v1/queues/{name}) once a second while the tab is visible and draws
// the queue list or one queue's page. Read-only; no dependencies.
"use strict";

const POLL_MS = 1000;
// The next poll waits at least this many times as long as the last answer
// took, so a node with thousands of queues is not asked for its whole
// list back to back.
const POLL_BACKOFF = 10;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let timer = null;
let updates = 0;
// Each refresh's number: an answer that arrives after a newer refresh
// started (the hash changed meanwhile) is dropped, so one loop polls.
let generation = 0;

function token() { return sessionStorage.getItem("ballast-token") || ""; }

async function api(path) {
  const headers = {};
  if (token()) headers.Authorization = "Bearer " + token();
  const response = await fetch(path, { headers, cache: "no-store" });
  const body = await response.json().catch(() => ({ message: response.statusText }));
  if (!response.ok) {
    const error = new Error(body.message || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

// Formatting.
function count(n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); }
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}
function duration(ms) {
  if (ms == null) return "–";
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function rate(r) { return r == null ? "–" : r < 10 ? r.toFixed(2) : r.toFixed(0); }
function percent(f) { return f == null ? "–" : (f * 100).toFixed(f < 0.1 ? 1 : 0) + "%"; }

function cell(row, text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  row.appendChild(td);
  return td;
}

// The colour of a saturation: green below every lane's admission
// threshold, amber once some lanes are refused, red once every lane is.
function level(saturation, thresholds) {
  const passed = thresholds.filter((t) => saturation >= t).length;
  if (passed === 0) return "ok";
  return passed < thresholds.length ? "warn" : "full";
}

function bar(saturation, thresholds, colourBy) {
  const wrap = document.createElement("span");
  const outer = document.createElement("span");
  outer.className = "bar " + level(colourBy, thresholds);
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = Math.min(100, Math.max(0, saturation * 100)) + "%";
  outer.appendChild(fill);
  for (const t of thresholds) {
    if (t >= 1) continue;
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.style.left = t * 100 + "%";
    mark.title = "admission threshold " + percent(t);
    outer.appendChild(mark);
  }
  const label = document.createElement("span");
  label.className = "bar-label";
  label.textContent = percent(saturation);
  wrap.append(outer, label);
  return wrap;
}

// The cells of a queue's or a lane's Saturation figures: depth, bytes,
// the saturation bar, oldest age, publish and ack rates.
function saturationCells(tr, s, thresholds, colourBy) {
  cell(tr, count(s.depth), "num depth").dataset.depth = s.depth;
  cell(tr, bytes(s.bytes), "num");
  cell(tr, "").appendChild(bar(s.saturation, thresholds, colourBy));
  cell(tr, duration(s.oldest_age_ms), "num");
  cell(tr, rate(s.publish_rate), "num");
  cell(tr, rate(s.ack_rate), "num");
}

function queueState(q) {
  if (q.damaged) return ["damaged: " + q.damaged, "state-bad"];
  if (q.opening) return ["opening", "state-note"];
  if (q.lanes.some((l) => l.storage_failed)) return ["storage failed", "state-bad"];
  return ["", ""];
}

function renderList(data) {
  const tbody = $("queues").querySelector("tbody");
  const rows = [];
  for (const q of data.queues) {
    const s = q.saturation;
    const thresholds = q.lanes.map((l) => l.admission);
    const tr = document.createElement("tr");
    tr.dataset.queue = q.name;
    const name = document.createElement("td");
    const link = document.createElement("a");
    link.href = "#/queues/" + encodeURIComponent(q.name);
    link.textContent = q.name;
    name.appendChild(link);
    tr.appendChild(name);
    saturationCells(tr, s, thresholds, s.saturation);
    cell(tr, duration(s.drain_estimate_ms), "num");
    cell(tr, count(q.consumers), "num");
    cell(tr, count(q.refused_queue_full + q.refused_disk_full + q.refused_publish_rate), "num");
    const [state, cls] = queueState(q);
    cell(tr, state, cls);
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
  $("empty").hidden = rows.length > 0;
}

function renderQueue(data) {
  const q = data.queue;
  const s = q.saturation;
  $("queue-name").textContent = q.name;
  const facts = [
    ["depth", count(s.depth)], ["bytes", bytes(s.bytes)], ["saturation", percent(s.saturation)],
    ["oldest message", duration(s.oldest_age_ms)], ["drain estimate", duration(s.drain_estimate_ms)],
    ["publish/s", rate(s.publish_rate)], ["ack/s", rate(s.ack_rate)], ["in flight", count(q.in_flight)],
    ["consumers", count(q.consumers)], ["credit", count(q.credit)],
    ["max messages", count(q.max_messages)], ["max bytes", bytes(q.max_bytes)],
    ["refused: queue full", count(q.refused_queue_full)], ["refused: disk", count(q.refused_disk_full)],
    ["refused: publish rate", count(q.refused_publish_rate)], ["throttled calls", count(q.throttled_calls)],
  ];
  const items = facts.map(([term, value]) => {
    const item = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    item.append(dt, dd);
    return item;
  });
  $("summary").replaceChildren(...items);
  const thresholds = q.lanes.map((l) => l.admission);
  const rows = q.lanes.map((lane) => {
    const ls = lane.saturation;
    const tr = document.createElement("tr");
    tr.dataset.lane = lane.name;
    cell(tr, lane.name);
    // The lane's share of the queue's limits; coloured by what the
    // queue's saturation means for admission.
    saturationCells(tr, ls, thresholds, s.saturation);
    cell(tr, percent(lane.admission), "num");
    cell(tr, count(lane.in_flight), "num");
    if (lane.storage_failed) cell(tr, "storage failed", "state-bad");
    else if (s.saturation >= lane.admission) cell(tr, "refusing", "state-bad");
    else cell(tr, "admitting");
    return tr;
  });
  $("lanes").querySelector("tbody").replaceChildren(...rows);
  renderHistory(data.history, q);
}

function renderHistory(history, q) {
  const samples = history.samples;
  $("history-span").textContent = samples.length
    ? "(last " + duration(samples.length * history.tick_ms) + ", one point per " + duration(history.tick_ms) + ")"
    : "(sampling starts now: one point per " + duration(history.tick_ms) + ")";
  const laneColours = ["#1c7ed6", "#2f9e44", "#e8a317", "#ae3ec9", "#0ca678", "#f76707", "#495057", "#d6336c"];
  const charts = [
    ["Depth by lane", q.lanes.map((lane, i) => [lane.name, laneColours[i % 8], (x) => x.lane_depths[i]]), count],
    ["Saturation", [["queue", "#d6336c", (x) => x.saturation]], percent, q.lanes.map((l) => l.admission)],
    ["Rates (messages/s)", [["publish", "#1c7ed6", (x) => x.publish_rate], ["ack", "#2f9e44", (x) => x.ack_rate]], rate],
    ["Oldest message", [["age", "#f76707", (x) => x.oldest_age_ms]], duration],
  ];
  $("charts").replaceChildren(...charts.map(([title, series, format, lines]) => chart(title, samples, series, format, lines || [])));
}

function chart(title, samples, series, format, lines) {
  const box = document.createElement("div");
  box.className = "chart";
  const h = document.createElement("h3");
  h.textContent = title;
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const [name, colour] of series) {
    const span = document.createElement("span");
    span.textContent = "■ " + name;
    span.style.color = colour;
    legend.appendChild(span);
  }
  const svg = document.createElementNS(SVG, "svg");
  const W = 400, H = 140, PAD = 4;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  let max = 0;
  for (const [, , get] of series) for (const x of samples) max = Math.max(max, get(x) || 0);
  for (const t of lines) max = Math.max(max, t);
  if (max === 0) max = 1;
  const n = Math.max(samples.length - 1, 1);
  const y = (v) => H - PAD - ((v || 0) / max) * (H - 2 * PAD);
  for (const t of lines) {
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("x1", 0); line.setAttribute("x2", W);
    line.setAttribute("y1", y(t)); line.setAttribute("y2", y(t));
    line.setAttribute("stroke", "#adb5bd"); line.setAttribute("stroke-dasharray", "4 3");
    svg.appendChild(line);
  }
  for (const [, colour, get] of series) {
    const points = samples.map((x, i) => `${(i / n) * W},${y(get(x))}`).join(" ");
    const poly = document.createElementNS(SVG, "polyline");
    poly.setAttribute("points", points);
    poly.setAttribute("fill", "none");
    poly.setAttribute("stroke", colour);
    poly.setAttribute("stroke-width", "1.5");
    poly.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(poly);
  }
  const top = document.createElement("div");
  top.className = "muted";
  top.textContent = "max " + format(max);
  box.append(h, legend, svg, top);
  return box;
}

function route() {
  const match = location.hash.match(/^#\/queues\/(.+)$/);
  return match ? decodeURIComponent(match[1]) : null;
}

async function refresh() {
  clearTimeout(timer);
  const mine = ++generation;
  const started = performance.now();
  const queue = route();
  $("list-view").hidden = queue !== null;
  $("queue-view").hidden = queue === null;
  try {
    if (queue === null) {
      const data = await api("/api/v1/queues");
      if (mine !== generation) return;
      renderList(data);
      renderNode(data);
    } else {
      const data = await api("/api/v1/queues/" + encodeURIComponent(queue));
      if (mine !== generation) return;
      renderQueue(data);
      renderNode(data);
    }
    $("error").hidden = true;
    $("login").hidden = true;
    updates += 1;
    document.body.dataset.updates = updates;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    if (mine !== generation) return;
    if (error.status === 401) {
      $("login").hidden = false;
    }
    $("error").textContent = error.message;
    $("error").hidden = false;
  }
  const delay = Math.max(POLL_MS, (performance.now() - started) * POLL_BACKOFF);
  if (!document.hidden) timer = setTimeout(refresh, delay);
}

function renderNode(data) {
  $("node").textContent = "disk free " + bytes(data.disk_free_bytes) + " (refusing below " + bytes(data.disk_free_min_bytes) + ")";
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("ballast-token", $("token").value.trim());
    $("token").value = "";
    refresh();
  });
  window.addEventListener("hashchange", refresh);
  // Nobody looking, nothing asked: polling stops while the tab is hidden.
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); else clearTimeout(timer); });
  refresh();
});
