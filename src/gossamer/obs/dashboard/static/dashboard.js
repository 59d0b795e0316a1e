// Gossamer dashboard: polls /api/state and redraws the peers, curves, links and events.
// Plain JavaScript and SVG, no libraries. Everything from the network is inserted as text.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = [
  "#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed",
  "#0891b2", "#65a30d", "#dc2626", "#4b5563", "#ca8a04",
];
const CHART = { width: 560, height: 240, left: 56, right: 14, top: 12, bottom: 28 };
const MAX_TICKS = 20;
// A value range narrower than this share of its values is widened: ticks closer together than
// that are not told apart by their labels, nor by doubles at 1e11 and a spread of 1e-5.
const MIN_RELATIVE_SPAN = 1e-9;
let refreshMs = 1000;
let numUpdates = 0;

// ---- small helpers -------------------------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

function shortId(peerId) {
  return peerId.length > 16 ? peerId.slice(0, 12) + "…" : peerId;
}

function colorOf(peerId) {
  let hash = 0;
  for (const ch of peerId) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return PALETTE[hash % PALETTE.length];
}

function fmtNumber(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  const abs = Math.abs(value);
  if (abs >= 1e9) return (value / 1e9).toFixed(1) + "G";
  if (abs >= 1e6) return (value / 1e6).toFixed(1) + "M";
  if (abs >= 1e4) return (value / 1e3).toFixed(1) + "k";
  if (abs >= 100 || Number.isInteger(value)) return value.toFixed(0);
  return value.toPrecision(digits);
}

function fmtBytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i += 1;
  }
  return (i === 0 ? value.toFixed(0) : value.toFixed(1)) + " " + units[i];
}

function fmtAgo(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 1) return "now";
  if (seconds < 120) return seconds.toFixed(0) + " s ago";
  return (seconds / 60).toFixed(0) + " min ago";
}

function fmtClock(wallS) {
  return new Date(wallS * 1000).toLocaleTimeString([], { hour12: false });
}

function replaceChildren(parent, children) {
  // Through a fragment, not spread into one call: past some 125,000 arguments V8 throws.
  const fragment = document.createDocumentFragment();
  for (const child of children) fragment.append(child);
  parent.replaceChildren(fragment);
}

function magnitudeOf(lo, hi) {
  return Math.max(Math.abs(lo), Math.abs(hi));
}

// ---- peers ---------------------------------------------------------------------------------

function renderPeers(peers) {
  const rows = peers.map((p) => {
    const row = el("tr", { "data-peer-id": p.peer_id, "data-status": p.status, class: p.status });
    const status = el("span", { class: "status " + p.status });
    status.append(el("span", { class: "dot" }), document.createTextNode(p.status));
    const name = el("td", { class: "mono", title: p.peer_id });
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colorOf(p.peer_id); // (a style attribute: refused by the page's policy)
    name.append(swatch);
    name.append(document.createTextNode(shortId(p.peer_id)));
    const cells = [
      el("td"),
      name,
      el("td", { class: "mono" }, p.address || "–"),
      el("td", { class: p.reachability === "relayed" ? "relayed" : "" }, p.reachability),
      el("td", { class: "num" }, fmtNumber(p.step)),
      el("td", { class: "num" }, fmtNumber(p.loss, 4)),
      el("td", { class: "num" }, fmtNumber(p.tokens_per_second)),
      el("td", { class: "num" },
        p.goodput_ratio === null ? "–" : (100 * p.goodput_ratio).toFixed(0) + " %"),
      el("td", { class: "num" }, fmtAgo(p.last_seen_s_ago)),
    ];
    cells[0].append(status);
    // Why its metrics were not read whole (a page cut at its limits, no answer): text, never markup.
    if (p.problem) cells[0].append(el("div", { class: "problem", title: p.problem }, p.problem));
    row.append(...cells);
    return row;
  });
  replaceChildren($("peers-body"), rows);
  $("no-peers").hidden = peers.length > 0;
}

// ---- curves --------------------------------------------------------------------------------

// About `count` round values from lo to hi, at most MAX_TICKS. Each tick is counted from the
// first (first + i steps), not added up: a step below half the spacing of doubles at the values
// (1e-6 at 1e11) left `v += step` where it was, and the tab hung filling an array.
function niceTicks(lo, hi, count) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi) || hi < lo) return [];
  const span = Math.max(hi - lo, magnitudeOf(lo, hi) * MIN_RELATIVE_SPAN) || 1;
  const raw = span / count;
  const step = Math.pow(10, Math.floor(Math.log10(raw)));
  const factor = [1, 2, 5, 10].find((f) => f * step >= raw) * step;
  if (!Number.isFinite(factor) || factor <= 0) return []; // (a span past the largest double)
  const first = Math.ceil(lo / factor);
  const ticks = [];
  for (let i = 0; i < MAX_TICKS; i++) {
    const v = (first + i) * factor;
    if (v > hi + factor * 1e-9) break;
    const tick = Number(v.toPrecision(12));
    if (ticks.length === 0 || tick !== ticks[ticks.length - 1]) ticks.push(tick);
  }
  return ticks;
}

function drawChart(svg, series, nowS, emptyText) {
  const { width, height, left, right, top, bottom } = CHART;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const points = series.flatMap((s) => s.points.filter((p) => p.v !== null));
  const children = [];
  if (points.length === 0) {
    children.push(svgEl("text", { class: "nodata", x: width / 2, y: height / 2,
      "text-anchor": "middle" }, emptyText));
    replaceChildren(svg, children);
    return;
  }
  // The right edge is now; the window shows at least the last 30 s. (A loop, not
  // Math.min(...points): spread into one call, some 125,000 points threw a RangeError.)
  let tLo = Infinity;
  let tHi = nowS;
  let vLo = Infinity;
  let vHi = -Infinity;
  for (const p of points) {
    if (p.t < tLo) tLo = p.t;
    if (p.t > tHi) tHi = p.t;
    if (p.v < vLo) vLo = p.v;
    if (p.v > vHi) vHi = p.v;
  }
  const t1 = tHi;
  const t0 = Math.min(t1 - 30, tLo);
  if (vHi - vLo <= magnitudeOf(vLo, vHi) * MIN_RELATIVE_SPAN) {
    vLo -= Math.abs(vLo) * 0.1 || 1;
    vHi += Math.abs(vHi) * 0.1 || 1;
  }
  const pad = (vHi - vLo) * 0.08;
  vLo = vLo >= 0 && vLo - pad < 0 ? 0 : vLo - pad;
  vHi += pad;
  const x = (t) => left + ((t - t0) / (t1 - t0)) * plotW;
  const y = (v) => top + (1 - (v - vLo) / (vHi - vLo)) * plotH;

  const grid = svgEl("g", { class: "grid" });
  const axis = svgEl("g", { class: "axis" });
  for (const v of niceTicks(vLo, vHi, 4)) {
    if (v < vLo || v > vHi) continue;
    grid.append(svgEl("line", { x1: left, x2: width - right, y1: y(v), y2: y(v) }));
    axis.append(svgEl("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, fmtNumber(v)));
  }
  const spanS = t1 - t0;
  for (const ago of niceTicks(0, spanS, 5)) {
    const t = t1 - ago;
    if (t < t0) continue;
    axis.append(svgEl("text", { x: x(t), y: height - 8, "text-anchor": "middle" },
      ago === 0 ? "now" : "-" + (ago >= 120 ? (ago / 60).toFixed(0) + "m" : ago + "s")));
  }
  axis.append(svgEl("line", { x1: left, x2: width - right, y1: top + plotH, y2: top + plotH }));
  children.push(grid, axis);

  for (const s of series) {
    let d = "";
    let drawn = 0;
    let penDown = false;
    for (const p of s.points) {
      if (p.v === null) {
        penDown = false;
        continue;
      }
      d += (penDown ? "L" : "M") + x(p.t).toFixed(1) + "," + y(p.v).toFixed(1);
      penDown = true;
      drawn += 1;
    }
    if (drawn === 0) continue;
    if (drawn === 1) d += "h0.1"; // a lone point still shows as a dot
    const path = svgEl("path", {
      d, class: "series " + s.status, stroke: s.color,
      "data-peer-id": s.peerId, "data-points": drawn,
    });
    path.append(svgEl("title", {}, s.peerId));
    children.push(path);
  }
  replaceChildren(svg, children);
}

function seriesOf(state, key) {
  const status = Object.fromEntries(state.peers.map((p) => [p.peer_id, p.status]));
  return Object.entries(state.curves).map(([peerId, curve]) => ({
    peerId,
    color: colorOf(peerId),
    status: status[peerId] || "gone",
    points: curve.t.map((t, i) => ({ t, v: curve[key][i] })),
  }));
}

// ---- links ---------------------------------------------------------------------------------

function renderLinks(state) {
  const svg = $("links-graph");
  const peers = state.peers;
  const links = state.links;
  const W = 560;
  const H = 260;
  const radius = Math.min(W, H) / 2 - 40;
  const pos = {};
  peers.forEach((p, i) => {
    const angle = (2 * Math.PI * i) / Math.max(1, peers.length) - Math.PI / 2;
    pos[p.peer_id] = peers.length === 1
      ? { x: W / 2, y: H / 2 }
      : { x: W / 2 + radius * Math.cos(angle), y: H / 2 + radius * Math.sin(angle) };
  });
  // One line per pair of peers, its width growing with the traffic both ways.
  const pairs = new Map();
  for (const link of links) {
    if (!(link.source in pos) || !(link.target in pos)) continue;
    const key = [link.source, link.target].sort().join("\u0000");
    const entry = pairs.get(key) || { a: link.source, b: link.target, rate: 0, total: 0 };
    entry.rate += link.bytes_per_s || 0;
    entry.total += link.bytes_total || 0;
    pairs.set(key, entry);
  }
  let maxRate = 1;
  for (const e of pairs.values()) maxRate = Math.max(maxRate, e.rate);
  const children = [];
  for (const e of pairs.values()) {
    const widthPx = e.rate > 0 ? 1.5 + 8 * Math.sqrt(e.rate / maxRate) : 1.5;
    const line = svgEl("line", {
      class: "link", x1: pos[e.a].x, y1: pos[e.a].y, x2: pos[e.b].x, y2: pos[e.b].y,
      "stroke-width": widthPx.toFixed(1),
    });
    line.append(svgEl("title", {}, shortId(e.a) + " ↔ " + shortId(e.b) + ": " +
      fmtBytes(e.total) + ", " + fmtBytes(e.rate) + "/s"));
    children.push(line);
  }
  for (const p of peers) {
    const g = svgEl("g", { class: "node " + p.status, "data-peer-id": p.peer_id });
    g.append(svgEl("circle", { cx: pos[p.peer_id].x, cy: pos[p.peer_id].y, r: 9,
      fill: colorOf(p.peer_id) }));
    const below = pos[p.peer_id].y > H / 2;
    g.append(svgEl("text", { x: pos[p.peer_id].x, y: pos[p.peer_id].y + (below ? 24 : -15),
      "text-anchor": "middle" }, shortId(p.peer_id)));
    children.push(g);
  }
  replaceChildren(svg, children);

  const rows = links.map((l) => {
    const row = el("tr");
    row.append(
      el("td", { class: "mono", title: l.source }, shortId(l.source)),
      el("td", { class: "mono", title: l.target }, shortId(l.target)),
      el("td", { class: "num" }, fmtBytes(l.bytes_total)),
      el("td", { class: "num" }, l.bytes_per_s === null ? "–" : fmtBytes(l.bytes_per_s) + "/s"),
    );
    return row;
  });
  replaceChildren($("links-body"), rows);
  $("links").hidden = links.length === 0;
  $("no-links").hidden = links.length > 0;
}

// ---- events --------------------------------------------------------------------------------

function renderEvents(events) {
  const items = events.map((e) => {
    const item = el("li", { "data-kind": e.kind, "data-peer-id": e.peer_id });
    item.append(
      el("span", { class: "time" }, fmtClock(e.wall_s)),
      el("span", { class: "kind " + e.kind.replace(/\s+/g, "-") }, e.kind),
      el("span", { class: "mono", title: e.peer_id }, shortId(e.peer_id)),
    );
    if (e.detail) item.append(el("span", { class: "detail" }, e.detail));
    return item;
  });
  replaceChildren($("events"), items);
  $("no-events").hidden = events.length > 0;
}

// ---- the loop ------------------------------------------------------------------------------

function render(state) {
  document.title = state.title;
  $("title").textContent = state.title;
  $("num-alive").textContent = state.swarm.num_alive;
  $("num-gone").textContent = state.swarm.num_gone;
  $("swarm-throughput").textContent = fmtNumber(state.swarm.tokens_per_second);
  $("swarm-goodput").textContent = state.swarm.goodput_ratio === null
    ? "–" : (100 * state.swarm.goodput_ratio).toFixed(0) + " %";
  $("updated").textContent = "updated " + new Date().toLocaleTimeString([], { hour12: false });
  showError(state.error ? "The swarm could not be read: " + state.error : null);
  const now = state.now_wall_s || Date.now() / 1000;
  renderPeers(state.peers);
  drawChart($("loss-chart"), seriesOf(state, "loss"), now, "no loss reported yet");
  drawChart($("throughput-chart"), seriesOf(state, "tokens_per_second"), now,
    "no throughput reported yet");
  renderLinks(state);
  renderEvents(state.events);
}

function showError(message) {
  const box = $("error");
  box.hidden = message === null;
  box.textContent = message || "";
}

async function refresh() {
  let state;
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    state = await response.json();
    refreshMs = Math.max(200, 1000 * (state.page_refresh_s || 1));
  } catch (err) {
    showError("The dashboard server does not answer (" + err.message + "); retrying.");
    setTimeout(refresh, refreshMs);
    return;
  }
  // Drawing fails apart from fetching: the server answered, and saying it did not sent
  // whoever read the page looking at the wrong thing.
  try {
    render(state);
    numUpdates += 1;
    document.body.dataset.updates = String(numUpdates);
  } catch (err) {
    console.error(err);
    showError("The page could not draw the swarm's state (" + err + "); a bug in the " +
      "dashboard's page. Retrying.");
  } finally {
    setTimeout(refresh, refreshMs);
  }
}

refresh();
