// The branchkey-local dashboard: reads the admin JSON routes, listens to /admin/v1/events and
// refreshes only the part an event concerns. No framework, no build step; uPlot draws the plots.
// Every value from the server is put in the page as text (textContent), never as markup.
"use strict";

const TOKEN_KEY = "branchkey-local-admin-token";
const state = { branch: null, run: null, overview: null, live: null, analytics: null, timers: {}, stream: null,
  plots: [], summary: null };

const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class Unauthorized extends Error {}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  opts.headers = Object.assign({ Authorization: "Bearer " + token(), Accept: "application/json" }, opts.headers);
  const answer = await fetch(path, opts);
  let body = {};
  try { body = await answer.json(); } catch (e) { /* empty body */ }
  if (answer.status === 401 || answer.status === 403) throw new Unauthorized(body.error || answer.statusText);
  if (!answer.ok) throw new Error(body.error || (answer.status + " " + answer.statusText));
  return body.data;
}

// -- formatting -----------------------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return "removed";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function seconds(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}

function ago(epochS) {
  if (!epochS) return "never";
  const s = Math.max(0, Date.now() / 1000 - epochS);
  return s < 1 ? "just now" : seconds(s).replace(/\.\d+ s$/, " s") + " ago";
}

// Rounds are numbered from 1 within their run, as the callbacks, `simulate` and `status` print them; the
// JSON keeps the protocol's round_index (from 0).
function roundNo(index) { return index + 1; }

function number(v) { return Number.isInteger(v) ? String(v) : v.toFixed(4).replace(/0+$/, "").replace(/\.$/, ""); }

// -- access ---------------------------------------------------------------------------------

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.stream) state.stream.abort();
  state.stream = null;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("live-state").textContent = "offline";
  clearTables();
}

function clearTables() {
  for (const id of ["branches", "leaves", "rounds", "analytics", "analytics-fields"]) {
    $(id).querySelector("tbody").replaceChildren();
  }
  state.analytics = null;
  $("plots").replaceChildren();
  $("branch").hidden = true;
  state.branch = null;
}

async function redeemLoginLink() {
  const match = /^#login=([A-Za-z0-9_-]+)$/.exec(location.hash);
  if (!match) return;
  history.replaceState(null, "", location.pathname);  // the code is single-use: drop it from the address bar
  const answer = await fetch("/admin/v1/dashboard/login", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ code: match[1] }),
  });
  const body = await answer.json().catch(() => ({}));
  if (answer.ok) sessionStorage.setItem(TOKEN_KEY, body.data.token);
  else $("login-error").textContent = body.error || "The login link was refused.";
}

async function guarded(work) {
  try {
    await work();
  } catch (err) {
    if (err instanceof Unauthorized) showLogin("The server refused the token: " + err.message);
    else console.error(err);
  }
}

async function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  await guarded(async () => {
    await loadOverview();
    if (state.branch) {
      await Promise.all([loadLive(), loadRounds(), loadAnalytics()]);
      await mark("paintedAt");  // the tables are on screen before the biggest answer is asked for
      await loadPlots();
    }
    loadAudit().catch((err) => console.error(err));  // below the fold: never holds the page up
    document.body.dataset.ready = "1";
    await mark("completeAt");
  });
  if (token()) openStream();
}

// -- trees, branches, runs ------------------------------------------------------------------

async function loadOverview() {
  const data = await api("/admin/v1/overview");
  state.overview = data;
  const trees = Object.fromEntries(data.trees.map((t) => [t.id, t.name]));
  const body = $("branches").querySelector("tbody");
  body.replaceChildren();
  if (!state.branch && data.branches.length) state.branch = data.branches[data.branches.length - 1].id;
  for (const b of data.branches) {
    const row = el("tr", null, { "data-branch": b.id, "data-testid": "branch-row" });
    if (b.id === state.branch) row.classList.add("selected");
    row.append(el("td", trees[b.tree_id] || b.tree_id), el("td", b.name, { title: b.id }), el("td", b.run_number),
      el("td", b.run_status, { class: "status-" + b.run_status, "data-testid": "run-status" }), el("td", b.leaves),
      el("td", b.round_index === null ? "none (" + (b.state || "stopped") + ")"
        : "round " + roundNo(b.round_index) + ": " + b.uploaded + "/" + b.required, { "data-testid": "open-round" }));
    const control = el("td");
    for (const [status, label] of [["start", "Start"], ["pause", "Pause"], ["stop", "Stop"]]) {
      const button = el("button", label, { type: "button", "data-testid": status + "-button" });
      button.disabled = b.run_status === status;
      button.addEventListener("click", (ev) => { ev.stopPropagation(); setRun(b.id, status); });
      control.append(button);
    }
    row.append(control);
    row.addEventListener("click", () => selectBranch(b.id));
    body.append(row);
  }
}

async function setRun(branchId, status) {
  $("control-error").textContent = "";
  try {
    await api("/admin/v1/branches/" + branchId + "/run", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ run_status: status }),
    });
  } catch (err) {
    if (err instanceof Unauthorized) return showLogin("The server refused the token: " + err.message);
    $("control-error").textContent = "Could not " + status + " the run: " + err.message;
    return;
  }
  await guarded(() => Promise.all([loadOverview(), branchId === state.branch ? loadLive() : null]));
}

async function selectBranch(id) {
  if (id === state.branch) return;
  state.branch = id;
  state.run = null;
  state.analytics = null;
  await guarded(() => Promise.all([loadOverview(), loadLive(), loadHistory(), loadAnalytics()]));
}

// -- the open round -------------------------------------------------------------------------

async function loadLive() {
  const data = await api("/admin/v1/branches/" + state.branch + "/live");
  state.live = data;
  $("branch").hidden = false;
  $("round-title").textContent = data.round_index === null
    ? "No open round: " + data.state
    : "Open round " + roundNo(data.round_index) + " of run " + data.run_number + " (" + data.run_status + ")";
  renderFacts();
  const body = $("leaves").querySelector("tbody");
  body.replaceChildren();
  for (const leaf of data.leaves) {
    const row = el("tr", null, { "data-leaf": leaf.name, "data-testid": "leaf-row" });
    const what = el("td", leaf.state, { class: "state-" + leaf.state, "data-testid": "leaf-state" });
    if (leaf.reason) what.append(el("div", leaf.reason, { class: "reason" }));
    row.append(el("td", leaf.name), what,
      el("td", leaf.websocket ? "connected" : "not connected", { class: leaf.websocket ? "on" : "off" }),
      el("td", leaf.amqp === null ? "-" : leaf.amqp ? "connected" : "not connected",
        { class: leaf.amqp ? "on" : "off" }),
      el("td", ago(leaf.last_seen), { "data-seen": leaf.last_seen || "" }), leafButtons(leaf));
    body.append(row);
  }
}

// -- the leaf lifecycle and the audit trail ---------------------------------------------------

function leafButtons(leaf) {
  const cell = el("td");
  for (const action of ["rotate", "revoke"]) {
    const button = el("button", action, { type: "button", "data-testid": action + "-leaf" });
    button.addEventListener("click", () => leafAction(leaf, action));
    cell.append(button);
  }
  return cell;
}

async function leafAction(leaf, action) {
  const what = action === "revoke"
    ? "Revoke " + leaf.name + "? Its token is refused at once and its connections close (its upload in the open round is kept)."
    : "Rotate " + leaf.name + "'s token? The old one is refused at once; the new credentials file is downloaded.";
  if (!window.confirm(what)) return;
  $("leaf-error").textContent = "";
  try {
    const data = await api("/admin/v1/branches/" + state.branch + "/leaves/" + leaf.id + "/" + action, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    if (action === "rotate") saveCredentials(data.leaf);
  } catch (err) {
    if (err instanceof Unauthorized) return showLogin("The server refused the token: " + err.message);
    $("leaf-error").textContent = "Could not " + action + " " + leaf.name + ": " + err.message;
    return;
  }
  await guarded(() => Promise.all([loadOverview(), loadLive(), loadAudit()]));
}

function saveCredentials(credentials) {  // straight to a file: the token is never put in the page
  const url = URL.createObjectURL(new Blob([JSON.stringify(credentials, null, 2) + "\n"], { type: "application/json" }));
  const link = el("a", null, { href: url, download: credentials.name + ".json" });
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function loadAudit() {
  const data = await api("/admin/v1/audit?latest=50");
  const body = $("audit").querySelector("tbody");
  body.replaceChildren();
  for (const entry of data.entries.slice().reverse()) {
    body.append(el("tr", null, { "data-testid": "audit-row" }));
    body.lastChild.append(el("td", entry.at), el("td", entry.action), el("td", entry.target), el("td", entry.peer),
      el("td", JSON.stringify(entry.detail), { class: "reason" }));
  }
}

function renderFacts() {
  const data = state.live;
  if (!data) return;
  const facts = [];
  const idle = data.round_index === null || (!data.uploaded.length && !data.refused.length);
  if (idle) facts.push(data.state);  // a finished run reads as such, not as a round that every leaf is missing
  else facts.push(data.uploaded.length + " of " + data.required + " uploads needed");
  if (data.missing.length && !idle) facts.push("missing: " + data.missing.join(", "));
  if (data.refused.length) facts.push(data.refused.length + " refused");
  if (data.opened_at && !idle) facts.push("opened " + ago(Date.parse(data.opened_at) / 1000));
  if (!idle) facts.push(data.deadline_at ? "deadline " + new Date(data.deadline_at).toLocaleTimeString() : "no deadline");
  const latest = data.latest_aggregate;
  if (latest) facts.push("latest aggregate: round " + roundNo(latest.round_index) + " of run " + latest.run_number);
  $("round-facts").textContent = facts.join(" · ");
  renderAnalyticsFacts();
}

function tick() {  // seconds since the round opened and "last seen" move on without asking the server
  renderFacts();
  for (const cell of document.querySelectorAll("[data-seen]")) {
    const seen = parseFloat(cell.dataset.seen);
    cell.textContent = ago(Number.isFinite(seen) ? seen : null);
  }
}

// -- history --------------------------------------------------------------------------------

function mark(name) {  // the next frame: when the page was on screen (benchmarks/dashboard.py reads these)
  return new Promise((resolve) => requestAnimationFrame(() => {
    document.body.dataset[name] = String(performance.now());
    setTimeout(resolve, 0);  // after the frame is painted
  }));
}

function historyPath(what) {
  return "/admin/v1/branches/" + state.branch + what + (state.run === null ? "" : "?run=" + state.run);
}

async function loadHistory() { await Promise.all([loadRounds(), loadPlots()]); }

async function loadPlots() { drawPlots(await api(historyPath("/metrics/summary"))); }

async function loadRounds() {
  const hist = await api(historyPath("/history"));
  const select = $("run-select");
  select.replaceChildren(...hist.runs.map((r) => el("option", "run " + r, { value: r })));
  select.value = String(hist.run_number);
  const body = $("rounds").querySelector("tbody");
  body.replaceChildren();
  for (const r of hist.rounds.slice().reverse()) {
    const row = el("tr", null, { "data-testid": "round-row" });
    const link = el("td");
    if (r.aggregate_size !== null) {
      const button = el("button", "download", { type: "button", class: "link", "data-testid": "download" });
      button.addEventListener("click", () => download(r.aggregate_id));
      link.append(button);
    } else {
      link.textContent = "removed";
    }
    const strategy = el("td", (r.strategy || "fedavg") + (r.strategy_note ? " *" : ""),
      r.strategy_note ? { title: r.strategy_note } : {});
    row.append(el("td", roundNo(r.round_index), { "data-testid": "round-number" }), el("td", r.leaves), el("td", number(r.total_weighting)), strategy,
      el("td", bytes(r.aggregate_size)), el("td", seconds(r.round_s)), el("td", seconds(r.aggregation_s)), link);
    body.append(row);
  }
}

async function download(aggregateId) {
  await guarded(async () => {
    const data = await api("/admin/v1/aggregates/" + aggregateId + "/download");
    location.assign(data.download_url);  // a signed, expiring URL: the token never goes into an address
  });
}

// What a plot's caption says of a metric: the simulation's leaves score each aggregate on a held-out part of
// their own data, and its evaluator on the common test set (the terminal's figure).
const CAPTIONS = {
  "test/heldout_accuracy": "held-out accuracy on the leaf's own data",
  "test/common_test_accuracy": "accuracy on the common test set (as the terminal reports it)",
};

function plotWidth(box) {  // as many plots a row as fit at >= 420 px, sharing the section's width
  const gap = 24;
  const width = Math.max(320, box.clientWidth);
  const columns = Math.max(1, Math.floor((width + gap) / (420 + gap)));
  return Math.floor((width - gap * (columns - 1)) / columns);
}

function latestLegend(plot, last) {  // the legend shows the latest values until the cursor points elsewhere
  plot.setLegend({ idx: last });
}

function drawPlots(summary) {
  for (const plot of state.plots) plot.destroy();
  state.plots = [];
  state.summary = summary;
  const box = $("plots");
  box.replaceChildren();
  if (!summary.series.length) {
    box.append(el("p", "No metrics yet: leaves send them after each aggregate.", { class: "muted" }));
    return;
  }
  const manyLeaves = summary.leaves.length > 12;
  for (const s of summary.series) {
    const figure = el("figure", null, { "data-testid": "plot", "data-metric": s.mode + "/" + s.metric,
      "data-rounds": s.rounds.length, "data-leaves": Object.keys(s.per_leaf).length });
    const common = s.metric === "common_test_accuracy";  // one evaluator, not a leaf: one line
    const what = CAPTIONS[s.mode + "/" + s.metric] || s.mode + " " + s.metric;
    figure.append(el("figcaption", what + (common ? "" : ": sample-weighted mean over leaves")
      + (manyLeaves && !common ? " (bold) and each of " + summary.leaves.length + " leaves (thin)" : "")));
    box.append(figure);
    const leaves = common ? [] : Object.keys(s.per_leaf);
    const series = [{ label: "round" },
      { label: common ? "common test set" : "mean", stroke: "#1f4e9e", width: 2.5, points: { show: true } }];
    for (const [i, name] of leaves.entries()) {
      series.push({ label: name, stroke: "hsla(" + ((i * 47) % 360) + ",55%,50%,0.55)", width: 1,
        points: { show: !manyLeaves, size: 4 }, spanGaps: true });
    }
    const data = [s.rounds.map(roundNo), s.mean, ...leaves.map((name) => s.per_leaf[name])];
    const last = s.rounds.length - 1;
    const opts = { width: plotWidth(box), height: 240, series, legend: { show: !manyLeaves },
      scales: { x: { time: false } }, axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] }, {}],
      hooks: { setCursor: [(u) => { if (u.cursor.idx === null || u.cursor.idx === undefined) latestLegend(u, last); }] } };
    const plot = new uPlot(opts, data, figure);
    latestLegend(plot, last);
    state.plots.push(plot);
  }
}

// -- federated analytics -------------------------------------------------------------------

const STATS = ["count", "mean", "variance", "std", "min", "max", "range", "nan", "completeness"];

function stat(v) { return v === null || v === undefined ? "-" : number(v); }

async function loadAnalytics() {
  const branch = state.branch;
  const data = await api("/admin/v1/branches/" + branch + "/analytics/result");
  if (branch !== state.branch) return;  // another branch was chosen meanwhile
  state.analytics = data;
  const result = data.result;
  $("analytics-title").textContent = result
    ? "(analytics round " + roundNo(result.round_index) + " of run " + result.run_number + ")" : "(no result yet)";
  renderAnalyticsFacts();
  const body = $("analytics").querySelector("tbody");
  body.replaceChildren();
  for (const [column, stats] of Object.entries(result ? result.columns : {})) {
    const row = el("tr", null, { "data-testid": "analytics-row", "data-column": column });
    row.append(el("td", column));
    for (const key of STATS) row.append(el("td", stat(stats[key]), { "data-stat": key }));
    row.append(el("td", stats.leaves, { "data-stat": "leaves" }));
    body.append(row);
  }
  const fields = $("analytics-fields").querySelector("tbody");
  fields.replaceChildren();
  for (const f of result ? result.fields : []) {
    const values = f.values.map((v) => typeof v === "number" ? number(v) : String(v)).join(", ");
    fields.append(el("tr", null, { "data-testid": "analytics-field", "data-field": f.name }));
    fields.lastChild.append(el("td", f.name), el("td", f.op || "none"),
      el("td", f.dtype + " [" + f.shape.join(", ") + "]"), el("td", "[" + values + (f.truncated ? ", …" : "") + "]"));
  }
  $("analytics-fields").hidden = !(result && result.fields.length);
}

function renderAnalyticsFacts() {  // the open analytics round (from the round view) and the latest result
  const facts = [];
  const open = state.live && state.live.analytics;
  if (open && open.round_index !== null) {
    facts.push("open analytics round " + roundNo(open.round_index) + ": " + open.uploaded.length + " of " + open.required
      + " uploads" + (open.missing.length ? " (missing: " + open.missing.join(", ") + ")" : ""));
  }
  const data = state.analytics;
  const result = data && data.result;
  if (result) {
    facts.push(result.contributors + " leaves contributed, combined " + ago(Date.parse(result.aggregated_at) / 1000));
    if (result.note) facts.push(result.note);
  } else if (data) {
    facts.push("no analytics round combined yet (leaves send them with save_analytics or save_fields)");
  }
  if (data) {
    const ops = Object.entries(data.field_ops).map(([name, op]) => name + "=" + op);
    facts.push(ops.length ? "field operations: " + ops.join(", ") : "no field operations configured");
  }
  $("analytics-facts").textContent = facts.join(" · ");
}

// -- the live stream ------------------------------------------------------------------------

function soon(name, work, delayMs) {  // coalesce bursts of events into one refresh per part
  if (state.timers[name]) return;
  state.timers[name] = setTimeout(() => { state.timers[name] = null; guarded(work); }, delayMs);
}

function onEvent(kind, event) {
  soon("overview", loadOverview, 150);
  if (!state.branch || (event.branch_id && event.branch_id !== state.branch)) return;
  if (["upload", "refused", "presence", "run_status", "aggregation_status", "overflow"].includes(kind)) {
    soon("live", loadLive, 100);
  }
  const analytics = event.payload_kind === "federated_analytics";
  if ((kind === "aggregation_status" && analytics) || kind === "overflow") soon("analytics", loadAnalytics, 100);
  if ((kind === "aggregation_status" && !analytics) || ["metrics", "overflow"].includes(kind)) {
    soon("history", loadHistory, 300);
  }
}

async function openStream() {
  const controller = new AbortController();
  state.stream = controller;
  let delay = 1000;
  while (state.stream === controller) {
    try {
      const answer = await fetch("/admin/v1/events", {
        headers: { Authorization: "Bearer " + token(), Accept: "text/event-stream" }, signal: controller.signal,
      });
      if (answer.status === 401 || answer.status === 403) return showLogin("The server refused the token.");
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      $("live-state").textContent = "live";
      $("live-state").className = "pill on";
      delay = 1000;
      await readEvents(answer.body.getReader());
    } catch (err) {
      if (controller.signal.aborted) return;
    }
    $("live-state").textContent = "reconnecting";
    $("live-state").className = "pill off";
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10000);
    if (state.stream === controller) {
      guarded(() => Promise.all([loadOverview(), state.branch ? loadLive() : null, state.branch ? loadAnalytics() : null]));
    }
  }
}

async function readEvents(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data && kind !== "hello") onEvent(kind, JSON.parse(data));
    }
  }
}

// -- start ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("logout").addEventListener("click", () => showLogin("Logged out."));
  $("audit-refresh").addEventListener("click", () => guarded(loadAudit));
  $("run-select").addEventListener("change", () => {
    state.run = parseInt($("run-select").value, 10);
    guarded(loadHistory);
  });
  setInterval(tick, 1000);
  let resized = null;
  window.addEventListener("resize", () => {  // the plots share the window's width
    clearTimeout(resized);
    resized = setTimeout(() => { if (state.summary) drawPlots(state.summary); }, 200);
  });
  await redeemLoginLink();
  if (token()) start(); else showLogin($("login-error").textContent);
});
