// The Keel inspector: reads the node's state as a live stream (server-sent events over fetch,
// so that the token travels in a header), draws it, and sends the operator's actions.
"use strict";

const $ = (id) => document.getElementById(id);
let token = "";
let last = null;

function readToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("keel-token", fromHash);
    history.replaceState(null, "", location.pathname);
  }
  token = sessionStorage.getItem("keel-token") || "";
  $("token-form").hidden = token !== "";
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("keel-token", $("token-input").value.trim());
  readToken();
  live();
});

function headers() {
  return { Authorization: "Bearer " + token };
}

function showError(text) {
  $("error").hidden = !text;
  $("error").textContent = text || "";
}

// Elements with a listener: `patch` replaces them whole (a listener may hold the old data).
const listening = new WeakSet();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) {
      node.addEventListener(k.slice(2), v);
      listening.add(node);
    } else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// Makes `parent`'s children equal to `fresh` (nodes not in the page), changing only the parts
// that differ: the browser then lays out and paints only those, not the whole section (that
// drawing is work on the node's own machine, done while the library changes).
function patch(parent, fresh) {
  const old = parent.childNodes;
  fresh.forEach((node, i) => {
    const was = old[i];
    if (!was) parent.append(node);
    else if (was.isEqualNode(node)) return;
    else if (was.nodeType === Node.TEXT_NODE && node.nodeType === Node.TEXT_NODE) was.nodeValue = node.nodeValue;
    else if (was.nodeType === Node.ELEMENT_NODE && !listening.has(was) && !listening.has(node) &&
      was.cloneNode(false).isEqualNode(node.cloneNode(false))) patch(was, [...node.childNodes]);
    else was.replaceWith(node);
  });
  while (old.length > fresh.length) parent.lastChild.remove();
}

const short = (hex) => (hex || "").slice(0, 8);

function ago(ms) {
  if (!ms) return "not since this node started";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 5) return "now";
  if (s < 120) return s + " s ago";
  if (s < 7200) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function duration(ms) {
  if (ms === null || ms === undefined) return "unknown";
  const s = Math.round(ms / 1000);
  return s < 120 ? s + " s" : Math.round(s / 60) + " min";
}

function drawDevices(state) {
  const node = state.node || {};
  const rows = [];
  const roleOf = (hex, own) => {
    if (node.leader === hex) return "leader";
    return own ? node.role : "follower";
  };
  const joining = new Map((node.joining || []).map((j) => [j.device_id, j]));
  const row = (hex, own, peer) => {
    const join = joining.get(hex);
    const role = join ? "joining" : roleOf(hex, own);
    const connected = own || (peer && peer.connected) || Boolean(join);
    let lag = "—";
    if (join) {
      const share = join.file_bytes > 0 ? Math.min(100, (100 * join.file_sent) / join.file_bytes) : 0;
      const mb = (n) => (n / 1048576).toFixed(1);
      lag = el("div", { class: "joining" },
        el("div", { class: "bar" }, el("div", { style: "width:" + share.toFixed(1) + "%" })),
        "initial sync: file " + mb(join.file_sent) + " of " + mb(join.file_bytes) + " MB, log " +
        join.log_sent + " of " + join.log_end + ", for " + duration(Date.now() - join.started_ms));
    } else if (peer && peer.stored !== null && peer.stored !== undefined) {
      const behind = Math.max(0, node.log_len - peer.stored);
      lag = behind === 0 ? "in step" : behind + " changes behind" +
        (peer.caught_up_ms ? ", for " + duration(Date.now() - peer.caught_up_ms) : "");
    } else if (own && node.role !== "leader") {
      lag = node.offline + " of its changes to push";
    }
    rows.push(
      el("tr", { "data-device": hex },
        el("td", {}, short(hex) + (own ? " (this device)" : "")),
        el("td", {}, el("span", { class: "badge " + role }, role)),
        el("td", {}, el("span", { class: "badge" + (connected ? "" : " down") },
          own ? "here" : connected ? "connected" : "not connected")),
        el("td", {}, lag),
        el("td", {}, own ? "now" : ago(peer && peer.last_seen_ms)),
      ),
    );
  };
  row(state.device_id, true, null);
  for (const peer of node.peers || []) row(peer.device_id, false, peer);
  // A device joining before this node knows it as a peer.
  const known = new Set([state.device_id, ...(node.peers || []).map((p) => p.device_id)]);
  for (const hex of joining.keys()) if (!known.has(hex)) row(hex, false, null);
  patch($("devices").querySelector("tbody"), rows);
}

function drawLog(state) {
  const node = state.node || {};
  const items = [
    ["Role", node.role],
    ["Epoch", node.epoch ? node.epoch.counter + " (by " + short(node.epoch.device) + ")" : "—"],
    ["Leader", node.leader ? short(node.leader) : "none"],
    ["Log position", node.log_len],
    ["Applied", state.applied_lsn],
    ["Compacted to", node.compacted_to],
    ["Waiting to push", node.offline],
    ["Elections seen", node.elections],
    ["Bytes sent / received", state.wire_bytes.sent + " / " + state.wire_bytes.received],
  ];
  if (node.storage_failed) items.push(["Storage", "FAILING: nothing is acknowledged"]);
  // Text changed in place (a rebuilt list is laid out and painted again as a whole).
  const list = $("log");
  if (list.children.length !== items.length * 2) {
    list.replaceChildren(...items.flatMap(([k]) => [el("dt", {}, k), el("dd", {})]));
  }
  items.forEach(([, v], i) => {
    const dd = list.children[i * 2 + 1];
    if (dd.textContent !== String(v)) dd.textContent = String(v);
  });
  $("summary").textContent =
    "this device " + short(state.device_id) + " is " + node.role +
    " in epoch " + (node.epoch ? node.epoch.counter : "?") +
    "; log at " + node.log_len + ", " + (state.conflicts.length || 0) + " conflicts";
}

async function act(path, button) {
  button.disabled = true;
  try {
    const reply = await fetch(path, { method: "POST", headers: headers() });
    if (!reply.ok) showError(path + ": " + (await reply.text()));
    else showError("");
  } catch (e) {
    showError(path + ": " + e);
  } finally {
    button.disabled = false;
  }
}

function drawJobs(state) {
  const jobs = Array.isArray(state.jobs) ? state.jobs : [];
  const open = jobs.filter((j) => ["running", "paused", "interrupted"].includes(j.state));
  const done = jobs.filter((j) => !open.includes(j)).slice(-5).reverse();
  const card = (job) => {
    const p = job.progress || {};
    const share = p.total > 0 ? Math.min(100, (100 * p.done) / p.total) : 0;
    const buttons = [];
    const button = (label, action) =>
      el("button", { "data-action": action, onclick: (e) => act("/api/jobs/" + job.id + "/" + action, e.target) }, label);
    if (job.state === "running") buttons.push(button("Pause", "pause"));
    if (job.state === "paused" || job.state === "interrupted") buttons.push(button("Resume", "resume"));
    if (open.includes(job)) buttons.push(button("Cancel", "cancel"));
    return el("div", { class: "job", "data-job": job.id, "data-state": job.state },
      el("strong", {}, job.kind.kind), " ", el("span", { class: "badge" }, job.state),
      el("div", { class: "bar" }, el("div", { style: "width:" + share.toFixed(1) + "%" })),
      el("div", { class: "muted" },
        p.done + " of " + p.total + " · " + p.per_second + "/s · ETA " + duration(p.eta_ms) +
        (job.summary ? " · " + job.summary : "")),
      el("div", {}, ...buttons),
    );
  };
  const nodes = open.map(card);
  if (done.length) nodes.push(el("h3", {}, "Finished"), ...done.map(card));
  if (!nodes.length) nodes.push(el("p", { class: "muted" }, "no jobs"));
  $("jobs").replaceChildren(...nodes);
}

function drawConflicts(state) {
  const conflicts = Array.isArray(state.conflicts) ? state.conflicts : [];
  if (!conflicts.length) {
    $("conflicts").replaceChildren(el("p", { class: "muted" }, "no conflicts"));
    return;
  }
  const hidden = (state.conflicts_total || 0) - conflicts.length;
  const note = hidden > 0 ? [el("p", { class: "muted" }, hidden + " more not shown (keel conflicts LIB)")] : [];
  $("conflicts").replaceChildren(...note, ...conflicts.map((c) => {
    const resolved = !!c.resolved_by;
    const side = (s, i) => el("div", { class: "side" + (i === c.winner ? " won" : ""), "data-side": i },
      el("div", {}, el("strong", {}, JSON.stringify(s.value))),
      el("div", { class: "muted" }, "by " + short(s.device) + ", written " + new Date(s.written_ms).toLocaleString()),
      i === c.winner ? el("div", {}, "shown now (" + c.strategy + ")") : null,
      resolved ? null : el("button", {
        "data-keep": s.device,
        onclick: (e) => act("/api/conflicts/" + c.id + "/keep/" + s.device, e.target),
      }, "Keep this"),
    );
    return el("div", { class: "conflict", "data-conflict": c.id, "data-resolved": String(resolved) },
      el("h4", {}, c.model + "." + c.field + " of " + c.record.slice(0, 8) + (resolved ? " — resolved" : " — open")),
      ...c.sides.map(side),
    );
  }));
}

async function browse(path) {
  try {
    const url = "/api/ls" + (path ? "?path=" + encodeURIComponent(path) : "");
    const reply = await fetch(url, { headers: headers() });
    const entries = await reply.json();
    $("folder").textContent = path ? "Entries in " + path : "Entries";
    const body = $("entries").querySelector("tbody");
    body.replaceChildren(...(Array.isArray(entries) ? entries : []).map((e) => {
      const isDir = e.kind === 1;
      const full = (path || "").replace(/\/$/, "") + "/" + e.name;
      const name = isDir
        ? el("a", { onclick: () => browse(full) }, e.name + "/")
        : el("a", { onclick: () => details(full) }, e.name || "");
      return el("tr", {}, el("td", {}, name), el("td", {}, isDir ? "folder" : "file"), el("td", {}, String(e.size ?? "")));
    }));
  } catch (e) {
    showError("listing " + path + ": " + e);
  }
}

// An entry's tags and note (`keel show`).
async function details(path) {
  try {
    const reply = await fetch("/api/show?path=" + encodeURIComponent(path), { headers: headers() });
    const shown = await reply.json();
    if (shown.error) throw new Error(shown.error);
    // Tags and notes on the entry itself, and on its content (every copy of the file).
    const scopes = [["this entry", shown.entry_metadata], ["its content", shown.content_metadata]];
    const rows = scopes.flatMap(([scope, md]) => [
      el("dt", {}, "Tags on " + scope), el("dd", {}, md && md.tags.length ? md.tags.join(", ") : "none"),
      el("dt", {}, "Note on " + scope), el("dd", {}, (md && md.notes) || "none"),
    ]);
    $("details").replaceChildren(
      el("h3", {}, path),
      el("dl", { class: "grid" }, el("dt", {}, "Size"), el("dd", {}, shown.size + " B"), ...rows),
    );
  } catch (e) {
    showError("showing " + path + ": " + e);
  }
}

function drawLibrary(state) {
  const locations = Array.isArray(state.locations) ? state.locations : [];
  patch($("locations"), locations.map((l) =>
    el("li", {}, el("a", { onclick: () => browse(l.path) }, l.path), " ", el("span", { class: "muted" }, "on " + (l.device || "?")))));
  const tags = Array.isArray(state.tags) ? state.tags : [];
  const more = (shown, total) => (total > shown ? [el("li", { class: "muted" }, "and " + (total - shown) + " more")] : []);
  patch($("tags"), [
    ...tags.map((t) => el("li", {}, t.name || JSON.stringify(t))),
    ...more(tags.length, state.tags_total),
  ]);
}

// What each section last drew from: a section whose part of the state did not change is left
// as it is (under load only the log's positions move, twice a second).
const drawn = {};

function changed(section, ...parts) {
  const key = JSON.stringify(parts);
  if (drawn[section] === key) return false;
  drawn[section] = key;
  return true;
}

function draw(state) {
  last = state;
  if (changed("library", state.library)) $("library").textContent = state.library;
  if (changed("devices", state.device_id, state.node.peers, state.node.leader, state.node.role, state.node.log_len)) {
    drawDevices(state);
  }
  drawLog(state);
  if (changed("jobs", state.jobs)) drawJobs(state);
  if (changed("conflicts", state.conflicts, state.conflicts_total)) drawConflicts(state);
  if (changed("library-browser", state.locations, state.tags, state.tags_total)) drawLibrary(state);
}

// Draws at most once a second while only positions move (the browser's drawing is work on the
// same machine as the node, and an operator reads no faster); jobs and conflicts at once.
const DRAW_EVERY_MS = 1000;
let pending = null;
let drawnAt = 0;

function schedule(state) {
  const wait = drawnAt + DRAW_EVERY_MS - Date.now();
  // A job or a conflict that changed is drawn at once: they are what an operator acts on.
  const acts = JSON.stringify([state.jobs, state.conflicts]);
  const urgent = acts !== drawn.acts;
  drawn.acts = acts;
  if (urgent || wait <= 0) {
    pending = null;
    drawnAt = Date.now();
    draw(state);
    return;
  }
  const first = pending === null;
  pending = state;
  if (first) {
    setTimeout(() => {
      if (pending === null) return;
      const next = pending;
      pending = null;
      drawnAt = Date.now();
      draw(next);
    }, wait);
  }
}

// The live stream: each `data:` line is the whole state. Reconnects after a pause.
async function live() {
  if (!token) return;
  try {
    const reply = await fetch("/events", { headers: headers() });
    if (reply.status === 401) {
      sessionStorage.removeItem("keel-token");
      readToken();
      showError("the token was refused");
      return;
    }
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    $("live").textContent = "live";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) schedule(JSON.parse(data));
      }
    }
  } catch (e) {
    showError("live view lost: " + e);
  }
  $("live").textContent = "reconnecting…";
  setTimeout(live, 1000);
}

// Relative times move on between updates.
setInterval(() => last && drawDevices(last), 5000);

readToken();
live();
