// The gateway console. Plain JavaScript, no build step, no library. Rules kept here:
// - every value from the API is put on the page as text (textContent, text nodes, SVG
//   attributes), never parsed as HTML; the page's Content-Security-Policy enforces Trusted
//   Types, so a string assigned to innerHTML would throw;
// - the token lives in this tab's sessionStorage and goes only to this gateway's own API
//   (relative URLs; connect-src 'self');
// - every query is a documented endpoint of the gateway API (GET /v1/openapi.json);
// - signing out loads the page anew (signOut): nothing one person was shown outlives it.
"use strict";

const TOKEN_KEY = "gateway-console-token";
const SIGNED_OUT_KEY = "gateway-console-signed-out";   // why, shown by the page loaded anew
// The roles are the policy's (GET /v1/catalog `roles`), never a list written here: what a
// role may open follows from its gateway_api groups and whether it is a data subject.
let roles = new Map();
const PALETTE = 8;   // console.css colours role-0 … role-7, in the policy's order of roles
const $ = (id) => document.getElementById(id);

// --- small helpers ------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));   // strings become text nodes
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function say(id, text, isError) {
  const node = $(id);
  node.textContent = text || "";
  node.classList.toggle("error", Boolean(isError));
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString();
}

function list(values) {
  return Array.isArray(values) ? values.join(", ") : (values === null || values === undefined ? "" : String(values));
}

// A data set as the Provider's published table calls it (its `seed` row in the catalog:
// "User first and last name", "Voicemails (.wav)"), never its id; unknown ones as they are.
function dataSetLabel(name) {
  const d = catalog.data_sets.find((x) => x.name === name);
  return d && d.seed ? d.seed.replace(/\s*\(\*\*\)\s*$/, "") : String(name);
}

function inWords(names) {
  return (names || []).map((n) => `your ${dataSetLabel(n).replace(/^User /, "").toLowerCase()}`)
    .join("; ");
}

// What an access of a user's access log did, in words, so that the row reads as a sentence
// (who · what happened · your data): the raw fields (method, route, data set ids) sit under
// "details" for auditors.
function whatHappened(a) {
  if (a.decision !== "allow") return "was refused access to";
  const verb = {served: "saw", named: "named in a request", explained: "asked why the gateway decides on"}[a.access]
    || (a.access === "acted_upon" ? (a.action === "DELETE" ? "deleted" : "changed") : "accessed");
  return a.outcome === "unknown" ? `${verb} (whether it was carried out is not recorded)` : verb;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function roleLabel(role) {
  if (role === null || role === undefined) return "no token";
  const r = roles.get(role);
  return r ? r.label : String(role);
}

function roleColour(role) {
  const names = [...roles.keys()];
  return role === null || role === undefined || !names.includes(role) ? "role-none"
    : `role-${names.indexOf(role) % PALETTE}`;
}

function may(group) { return Boolean(me && roles.get(me.role)?.gateway_api.includes(group)); }

function organisation(role, partner, euo) {
  const r = roles.get(role);
  if (!r) return partner || euo || "";
  if (r.tenant_claim === null) return r.organisation || "";
  return (r.tenant_claim === "partner" ? partner : euo) || "";
}

// --- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, requestId) {
    super(`${code}: ${message}` + (requestId ? ` (request ${requestId})` : ""));
    this.status = status;
    this.code = code;
  }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, options) {
  const opts = options || {};
  const headers = {"Authorization": `Bearer ${token()}`, "Accept": opts.accept || "application/json"};
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: opts.method || "GET", headers, credentials: "omit", cache: "no-store",
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body)});
  if (!response.ok) {
    let code = "http_" + response.status, message = response.statusText, requestId = null;
    try {
      const body = await response.json();
      code = body.error.code; message = body.error.message; requestId = body.error.request_id;
    } catch (e) { /* not the gateway's error body */ }
    if (response.status === 401) signOut(`${code}: ${message}`);
    throw new ApiError(response.status, code, message, requestId);
  }
  return opts.raw ? response : response.json();
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? "?" + s : "";
}

// A download: the body read chunk by chunk (progress), then saved under a file name.
async function download(path, accept, filename, progress) {
  const response = await api(path, {accept, raw: true});
  const total = Number(response.headers.get("Content-Length")) || 0;
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const {done, value} = await reader.read();   // a cut connection rejects: no partial file
    if (done) break;
    chunks.push(value);
    received += value.length;
    if (progress) progress(received, total);
  }
  const blob = new Blob(chunks, {type: response.headers.get("Content-Type") || "application/octet-stream"});
  const url = URL.createObjectURL(blob);
  const a = el("a", {href: url, download: filename, hidden: ""});
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return received;
}

// Only the newest query of a view may draw: an older answer arriving late is dropped.
const latest = {};
function ticket(view) {
  const n = (latest[view] || 0) + 1;
  latest[view] = n;
  return () => latest[view] === n;
}

// --- sign-in ------------------------------------------------------------------------------

function claims(jwt) {
  // Only to choose which views to show; the gateway checks the token on every call.
  const part = String(jwt).split(".")[1];
  if (!part) return null;
  try {
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/"));
    const text = new TextDecoder().decode(Uint8Array.from(json, (c) => c.charCodeAt(0)));
    return JSON.parse(text);
  } catch (e) { return null; }
}

let me = null;

async function signIn(jwt) {
  const c = claims(jwt);
  if (!c || typeof c.role !== "string" || !c.role) {
    say("signin-error", "This is not a gateway token (a JWT with a role claim).", true);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, jwt);
  try {
    catalog = await api("/v1/catalog");     // proves the token works
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    say("signin-error", `Sign-in refused: ${e.message}`, true);
    return;
  }
  roles = new Map((catalog.roles || []).map((r) => [r.name, r]));
  const mine = roles.get(c.role);
  if (!mine) {
    sessionStorage.removeItem(TOKEN_KEY);
    say("signin-error", `Sign-in refused: the role ${c.role} is not in this gateway's policy.`, true);
    return;
  }
  me = c;
  say("signin-error", "");
  $("token").value = "";
  $("signin").hidden = true;
  $("who").hidden = false;
  const org = organisation(c.role, c.partner, c.euo);
  $("who-text").textContent = `${c.sub} · ${mine.label}${org ? " · " + org : ""}`;
  const tabs = {audit: may("audit"), requests: may("requests"), alerts: may("audit"),
                mydata: mine.data_subject};
  $("tabs").hidden = false;
  for (const [tab, open] of Object.entries(tabs)) $("tab-" + tab).hidden = !open;
  fillDataSets();
  const first = Object.keys(tabs).find((tab) => tabs[tab]);
  if (first) show(first);
  else say("signin-error", `Signed in, but the role ${mine.label} may use none of the console's views.`, true);
}

// Signing out forgets everything the console showed by loading the page anew, rather than
// resetting each view: a new document cannot keep a table, chart, chain check, status line,
// detail panel, typed filter or draft, nor a late answer to the last person's query (its
// fetch dies with the old page), including those of a view added later and never taught to
// reset. Only the token goes first, and the reason to show (no data) is carried over.
function signOut(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (me === null) {    // a refused sign-in (nothing was shown), or the page is already going
    say("signin-error", why || "", Boolean(why));
    return;
  }
  me = null;
  if (why) sessionStorage.setItem(SIGNED_OUT_KEY, why);
  else sessionStorage.removeItem(SIGNED_OUT_KEY);
  $("who").hidden = true;
  document.querySelector("main").hidden = true;   // until the new page replaces this one
  location.reload();
}

function show(tab) {
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.tab === tab);
    b.setAttribute("aria-pressed", String(b.dataset.tab === tab));
  }
  for (const id of ["audit", "mydata", "requests", "alerts"]) $(id).hidden = id !== tab;
  if (tab === "audit") openAudit();
  if (tab === "mydata") openMyData();
  if (tab === "requests") loadRequests();
  if (tab === "alerts") loadAlerts();
}

let catalog = {data_sets: []};

function fillDataSets() {
  const names = catalog.data_sets.map((d) => d.name).sort();
  $("datasets").replaceChildren(...names.map((n) => el("option", {value: n})));
  $("r-datasets").replaceChildren(...catalog.data_sets.map(
    (d) => el("option", {value: d.name}, d.seed ? `${d.name} — ${d.seed}` : d.name)));
}

// --- audit explorer -----------------------------------------------------------------------

const audit = {filters: {}, cursors: [null], page: 0, opened: false};

function localInput(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T` +
         `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function setRange(days) {
  const now = new Date();
  const start = new Date(now);
  start.setHours(0, 0, 0, 0);
  if (days === "week") start.setDate(start.getDate() - ((start.getDay() + 6) % 7));   // Monday
  else start.setDate(start.getDate() - days);
  $("f-from").value = localInput(start);
  $("f-to").value = "";
  searchAudit();
}

function readFilters() {
  const iso = (v) => (v ? new Date(v).toISOString() : null);
  return {actor: $("f-actor").value.trim(), subject_user: $("f-subject-user").value.trim(),
          euo: $("f-euo").value.trim(), dataset: $("f-dataset").value.trim(),
          decision: $("f-decision").value, from: iso($("f-from").value), to: iso($("f-to").value)};
}

function openAudit() {
  const staff = may("audit_verify");
  $("verify").hidden = !staff;
  if (!audit.opened) {
    audit.opened = true;
    say("verify-status", staff ? "Not checked yet."
        : "Checking every hash chain is for the Provider's roles (GET /v1/audit/verify); " +
          "signed checkpoints are at GET /v1/audit/checkpoints.");
    searchAudit();
  }
}

function searchAudit() {
  audit.filters = readFilters();
  audit.cursors = [null];
  audit.page = 0;
  $("audit-detail").hidden = true;
  loadAuditPage();
  loadChart();
}

async function loadAuditPage() {
  const current = ticket("audit");
  say("audit-status", "Loading…");
  const params = {...audit.filters, limit: 50, cursor: audit.cursors[audit.page]};
  try {
    const page = await api("/v1/audit" + query(params));
    if (!current()) return;
    renderAudit(page.rows);
    if (page.next_cursor) audit.cursors[audit.page + 1] = page.next_cursor;
    else audit.cursors.length = audit.page + 1;
    $("audit-older").disabled = !page.next_cursor;
    $("audit-newer").disabled = audit.page === 0;
    $("audit-page").textContent = `page ${audit.page + 1}`;
    say("audit-status", page.rows.length ? `${page.rows.length} ${page.rows.length === 1 ? "row" : "rows"} on this page, newest first.`
        : "No row matches these filters.");
  } catch (e) {
    if (!current()) return;
    renderAudit([]);
    say("audit-status", e.message, true);
  }
}

function renderAudit(rows) {
  const body = $("audit-table").tBodies[0];
  body.replaceChildren(...rows.map((r) => {
    const actor = [roleLabel(r.actor_role),
                   organisation(r.actor_role, r.actor_partner, r.actor_euo), r.actor_sub]
      .filter(Boolean).join(" · ");
    const tr = el("tr", {tabindex: "0", class: "clickable"},
      el("td", {title: r.at}, when(r.at)),
      el("td", null, actor),
      el("td", null, `${r.method || ""} ${r.route || ""}`),
      el("td", null, [r.subject_euo, list(r.subject_users)].filter(Boolean).join(" / ")),
      el("td", null, list(r.data_sets)),
      el("td", {class: "decision-" + r.decision}, `${r.decision} ${r.status}`),
      el("td", null, r.reason || ""));
    const open = () => showDetail(r, tr);
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") open(); });
    return tr;
  }));
}

const DETAIL_ORDER = ["at", "decision", "status", "reason", "actor_role", "actor_partner", "actor_euo",
  "actor_sub", "method", "path", "route", "service", "data_sets", "fields_removed", "subject_euo",
  "subject_users", "policy_version", "bytes", "duration_ms", "requests", "request_id",
  "client_request_id", "trace_id", "client_addr", "chain_id", "seq"];

function showDetail(row, tr) {
  for (const other of $("audit-table").querySelectorAll("tr.selected")) other.classList.remove("selected");
  tr.classList.add("selected");
  const keys = [...DETAIL_ORDER, ...Object.keys(row).filter((k) => !DETAIL_ORDER.includes(k))];
  const items = [];
  for (const k of keys) {
    if (!(k in row)) continue;
    const v = row[k];
    const text = Array.isArray(v) ? (v.length ? v.join(", ") : "none")
      : (v === null || v === undefined ? "—" : (typeof v === "object" ? JSON.stringify(v) : String(v)));
    items.push(el("dt", null, k.replace(/_/g, " ")), el("dd", {"data-field": k}, text));
  }
  $("detail-fields").replaceChildren(...items);
  $("audit-detail").hidden = false;
  $("audit-detail").scrollIntoView({block: "nearest"});
}

async function auditDownload(kind) {
  const accept = kind === "csv" ? "text/csv" : "application/x-ndjson";
  say("download-status", "Preparing the download…");
  try {
    const n = await download("/v1/audit" + query(audit.filters), accept, `audit.${kind}`,
      (got) => say("download-status", `${bytes(got)} received…`));
    say("download-status", `audit.${kind} saved (${bytes(n)}).`);
  } catch (e) {
    say("download-status", `Download failed: ${e.message}`, true);
  }
}

// This month's report (GET /v1/reports/monthly) in the caller's scope, as a printable HTML
// page: about the EUO of the filter when one is given (staff must name one; a partner's
// report without it covers all its customers).
async function reportDownload() {
  const month = new Date().toISOString().slice(0, 7);
  const file = `report-${month}.html`;
  say("download-status", "Preparing the report…");
  try {
    const euo = $("f-euo").value.trim();
    const n = await download("/v1/reports/monthly" + query({month, format: "html", euo: euo || null}),
      "text/html", file, (got) => say("download-status", `${bytes(got)} received…`));
    say("download-status", `${file} saved (${bytes(n)}).`);
  } catch (e) {
    say("download-status", `Report failed: ${e.message}`, true);
  }
}

async function loadChart() {
  const current = ticket("chart");
  say("chart-status", "Loading…");
  const {from, to, actor, subject_user, euo, dataset, decision} = audit.filters;
  try {
    const data = await api("/v1/audit/per-day" +
      query({actor, subject_user, euo, dataset, decision, from, to}));
    if (current()) drawChart(data);
  } catch (e) {
    if (!current()) return;
    $("chart").replaceChildren();
    say("chart-status", e.message, true);
  }
}

function drawChart(data) {
  const start = new Date(data.from), end = new Date(data.to);
  const days = [];
  for (let d = Date.UTC(start.getUTCFullYear(), start.getUTCMonth(), start.getUTCDate());
       d <= end.getTime() && days.length < 400; d += 86400000) {
    days.push(new Date(d).toISOString().slice(0, 10));
  }
  const counts = new Map(days.map((d) => [d, new Map()]));
  let total = 0;
  for (const item of data.days) {
    if (!counts.has(item.day)) counts.set(item.day, new Map());
    counts.get(item.day).set(item.role, item.accesses);
    total += item.accesses;
  }
  const W = 720, H = 200, left = 36, bottom = 22, top = 8;
  const keys = [...counts.keys()].sort();
  // the policy's roles, then any other role the rows name (one since removed), then no token
  const named = new Set(data.days.map((item) => item.role));
  const chartRoles = [...roles.keys(), ...[...named].filter((r) => r !== null && !roles.has(r)).sort(), null]
    .filter((role) => role === null || roles.has(role) || named.has(role));
  const max = Math.max(1, ...keys.map((d) => [...counts.get(d).values()].reduce((a, b) => a + b, 0)));
  const slot = (W - left - 4) / Math.max(1, keys.length);
  const scale = (H - bottom - top) / max;
  const chart = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", class: "bars",
                            "aria-label": "accesses per day by role"});
  chart.append(svg("line", {x1: left, y1: H - bottom, x2: W, y2: H - bottom, class: "axis"}));
  chart.append(svg("text", {x: left - 4, y: top + 8, class: "tick", "text-anchor": "end"}, String(max)));
  chart.append(svg("text", {x: left - 4, y: H - bottom, class: "tick", "text-anchor": "end"}, "0"));
  keys.forEach((day, i) => {
    let y = H - bottom;
    const width = Math.max(1, Math.min(slot * 0.8, 28));
    const x = left + i * slot + (slot - width) / 2;
    for (const role of chartRoles) {
      const n = counts.get(day).get(role) || 0;
      if (!n) continue;
      const h = Math.max(1, n * scale);
      y -= h;
      chart.append(svg("rect", {x, y, width, height: h,
                                class: roleColour(role), "data-day": day, "data-role": role || "none"},
        svg("title", null, `${day} · ${roleLabel(role)}: ${n}`)));
    }
    if (keys.length <= 14 || i % Math.ceil(keys.length / 10) === 0) {
      chart.append(svg("text", {x: x + width / 2, y: H - 6, class: "tick", "text-anchor": "middle"}, day.slice(5)));
    }
  });
  const legend = el("ul", {class: "legend"}, ...chartRoles.map((role) =>
    el("li", null, el("span", {class: "swatch " + roleColour(role)}), roleLabel(role))));
  $("chart").replaceChildren(chart, legend);
  say("chart-status", `${total} ${total === 1 ? "access" : "accesses"} from ${keys[0] || ""} to ${keys[keys.length - 1] || ""} (UTC days).`);
}

async function verifyChains() {
  say("verify-status", "Checking every chain…");
  try {
    const r = await api("/v1/audit/verify");
    const counted = `${r.chains_checked} chains, ${r.rows_checked} rows checked`;
    if (r.ok) say("verify-status", `Intact: ${counted}.`);
    else say("verify-status", `BROKEN: ${counted}; first break: ${JSON.stringify(r.first_break)}`, true);
  } catch (e) {
    say("verify-status", e.message, true);
  }
}

// --- my data (users) ----------------------------------------------------------------------

const access = {cursors: [null], page: 0};

function openMyData() {
  access.cursors = [null];
  access.page = 0;
  loadAccessLog();
  loadMyRequests();
}

async function loadAccessLog() {
  const current = ticket("access");
  say("access-status", "Loading…");
  try {
    const page = await api("/v1/me/access-log" + query({limit: 50, cursor: access.cursors[access.page]}));
    if (!current()) return;
    $("access-table").tBodies[0].replaceChildren(...page.accesses.map((a) => el("tr", null,
      el("td", {title: a.at}, when(a.at)),
      el("td", null, roleLabel(a.accessor.role)),
      el("td", null, a.accessor.organisation || ""),
      el("td", null, whatHappened(a), el("details", {class: "raw"},
        el("summary", null, "details"),
        el("code", null, [a.action, a.route, list(a.data_sets), a.reason, a.phase]
          .filter(Boolean).join(" · ")))),
      el("td", null, inWords(a.data_sets)),
      el("td", {class: "decision-" + a.decision}, a.decision || ""),
      el("td", {class: "break-glass"}, a.break_glass
        ? `break-glass: ${a.break_glass.purpose} (ticket ${a.break_glass.ticket})` : ""))));
    if (page.next_cursor) access.cursors[access.page + 1] = page.next_cursor;
    $("access-older").disabled = !page.next_cursor;
    $("access-newer").disabled = access.page === 0;
    say("access-status", page.accesses.length ? "" : "Nobody else has accessed your data (in what is kept).");
  } catch (e) {
    say("access-status", e.message, true);
  }
}

async function exportData() {
  const bar = $("export-progress");
  bar.hidden = false;
  bar.removeAttribute("value");
  $("export").disabled = true;
  say("export-status", "Gathering your data…");
  try {
    const n = await download("/v1/me/export", "application/zip", "export.zip", (got, total) => {
      if (total) { bar.max = total; bar.value = got; }
      say("export-status", `${bytes(got)}${total ? " of " + bytes(total) : ""} received…`);
    });
    bar.max = 1; bar.value = 1;
    say("export-status", `export.zip saved (${bytes(n)}).`);
  } catch (e) {
    bar.hidden = true;
    say("export-status", `The export failed, nothing was saved: ${e.message}`, true);
  } finally {
    $("export").disabled = false;
  }
}

async function loadMyRequests() {
  const current = ticket("my-requests");
  try {
    const r = await api("/v1/me/requests");
    if (!current()) return;
    $("my-requests").tBodies[0].replaceChildren(...r.requests.map((q) => el("tr", null,
      el("td", {title: q.created_at}, when(q.created_at)),
      el("td", null, q.type),
      el("td", null, list(q.data_sets)),
      el("td", {class: "state"}, q.status),
      el("td", {title: q.due_at}, when(q.due_at)),
      el("td", null, q.resolution || ""))));
  } catch (e) {
    say("request-status", e.message, true);
  }
}

async function fileRequest(ev) {
  ev.preventDefault();
  const data_sets = [...$("r-datasets").selectedOptions].map((o) => o.value);
  if (!data_sets.length) { say("request-status", "Choose at least one data set.", true); return; }
  try {
    const q = await api("/v1/me/requests", {method: "POST",
      body: {type: $("r-type").value, data_sets, detail: $("r-detail").value}});
    say("request-status", `Request filed; due ${when(q.due_at)}.`);
    $("r-detail").value = "";
    loadMyRequests();
  } catch (e) {
    say("request-status", e.message, true);
  }
}

// --- requests (admins) --------------------------------------------------------------------

const ANSWERS = [["accepted", "Accept"], ["rejected", "Reject"], ["completed", "Complete"]];

async function loadRequests() {
  const current = ticket("requests");
  say("requests-status", "Loading…");
  try {
    const r = await api("/v1/requests" + query({status: $("q-status").value}));
    if (!current()) return;
    const now = Date.now();
    $("requests-table").tBodies[0].replaceChildren(...r.requests.map((q) => {
      const overdue = new Date(q.due_at).getTime() < now && !["rejected", "completed", "withdrawn"].includes(q.status);
      const resolution = el("input", {type: "text", placeholder: "resolution", maxlength: "10000",
                                      "aria-label": "resolution"});
      const answer = el("td", {class: "answer"}, resolution);
      for (const [status, label] of ANSWERS) {
        const b = el("button", {type: "button", "data-status": status}, label);
        b.addEventListener("click", () => answerRequest(q.id, status, resolution.value));
        answer.append(b);
      }
      return el("tr", {class: overdue ? "overdue" : "", "data-id": q.id},
        el("td", {title: q.due_at}, when(q.due_at), overdue ? el("strong", null, " overdue") : null),
        el("td", null, q.user_sub),
        el("td", null, q.euo_id),
        el("td", null, q.type),
        el("td", null, list(q.data_sets)),
        el("td", {class: "free-text"}, q.detail || ""),
        el("td", {class: "state"}, q.status),         // unknown states are shown as they come
        answer);
    }));
    say("requests-status", r.requests.length ? `${r.requests.length} requests, overdue first.`
        : "No request in this state.");
  } catch (e) {
    say("requests-status", e.message, true);
  }
}

async function answerRequest(id, status, resolution) {
  try {
    const body = {status};
    if (resolution) body.resolution = resolution;
    const q = await api(`/v1/requests/${encodeURIComponent(id)}`, {method: "PATCH", body});
    await loadRequests();
    say("requests-status", `Request of ${q.user_sub} is now ${q.status}.`);
  } catch (e) {
    say("requests-status", e.message, true);
  }
}

// --- alerts -------------------------------------------------------------------------------

// The audit explorer opened on the rows an alert counted (its `audit` query).
function showAuditRows(link) {
  const params = new URL(link, location.href).searchParams;
  const fields = {actor: "f-actor", dataset: "f-dataset", decision: "f-decision"};
  for (const [name, id] of Object.entries(fields)) $(id).value = params.get(name) || "";
  for (const [name, id] of [["from", "f-from"], ["to", "f-to"]]) {
    const t = params.get(name) ? new Date(params.get(name)) : null;
    // the inputs keep whole seconds: the window's end rounds up, so no counted row is left out
    if (t && name === "to" && t.getMilliseconds()) t.setSeconds(t.getSeconds() + 1, 0);
    $(id).value = t ? localInput(t) : "";
  }
  show("audit");
  searchAudit();
}

async function loadAlerts() {
  const current = ticket("alerts");
  say("alerts-status", "Loading…");
  try {
    const r = await api("/v1/alerts" + query({acked: $("al-acked").value, limit: 100}));
    if (!current()) return;
    $("alerts-table").tBodies[0].replaceChildren(...r.alerts.map((a) => {
      const who = a.actor.sub !== null && a.actor.sub !== undefined
        ? `${roleLabel(a.actor.role)} · ${a.actor.sub}` : roleLabel(a.actor.role);
      const open = el("button", {type: "button"}, "open in the audit explorer");
      open.addEventListener("click", () => showAuditRows(a.audit));
      let ack;
      if (a.acked_at) {
        ack = el("td", null, `${when(a.acked_at)} by ${a.acked_by}: ${a.ack_note}`);
      } else {
        const note = el("input", {type: "text", placeholder: "note", maxlength: "1000",
                                  "aria-label": "acknowledgement note"});
        const button = el("button", {type: "button", "data-id": a.id}, "Acknowledge");
        button.addEventListener("click", () => ackAlert(a.id, note.value));
        ack = el("td", {class: "answer"}, note, button);
      }
      return el("tr", {"data-id": a.id},
        el("td", {title: a.raised_at}, when(a.raised_at)),
        el("td", null, a.rule),
        el("td", null, who),
        el("td", null, `${when(a.window.from)} – ${when(a.window.to)}`),
        el("td", null, a.observed),
        el("td", null, a.limit),
        el("td", null, a.baseline === null ? "" : `${a.baseline} × ${a.factor}`),
        el("td", null, open),
        ack);
    }));
    say("alerts-status", r.alerts.length ? "" : "No alert.");
  } catch (e) {
    say("alerts-status", e.message, true);
  }
}

async function ackAlert(id, note) {
  if (!note.trim()) {
    say("alerts-status", "Write a note to acknowledge an alert.", true);
    return;
  }
  try {
    await api(`/v1/alerts/${encodeURIComponent(id)}/ack`, {method: "POST", body: {note}});
    await loadAlerts();
    say("alerts-status", "Acknowledged.");
  } catch (e) {
    say("alerts-status", e.message, true);
  }
}

// --- wiring -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("token").value.trim().replace(/^Bearer\s+/i, ""));
  });
  $("sign-out").addEventListener("click", () => signOut());
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.tab));
  $("audit-filters").addEventListener("submit", (ev) => { ev.preventDefault(); searchAudit(); });
  $("audit-clear").addEventListener("click", () => { $("audit-filters").reset(); searchAudit(); });
  $("range-today").addEventListener("click", () => setRange(0));
  $("range-week").addEventListener("click", () => setRange("week"));
  $("range-30").addEventListener("click", () => setRange(30));
  $("audit-older").addEventListener("click", () => { audit.page += 1; loadAuditPage(); });
  $("audit-newer").addEventListener("click", () => { audit.page = Math.max(0, audit.page - 1); loadAuditPage(); });
  $("download-csv").addEventListener("click", () => auditDownload("csv"));
  $("download-report").addEventListener("click", reportDownload);
  $("al-refresh").addEventListener("click", loadAlerts);
  $("al-acked").addEventListener("change", loadAlerts);
  $("download-ndjson").addEventListener("click", () => auditDownload("ndjson"));
  $("verify").addEventListener("click", verifyChains);
  $("access-older").addEventListener("click", () => { access.page += 1; loadAccessLog(); });
  $("access-newer").addEventListener("click", () => { access.page = Math.max(0, access.page - 1); loadAccessLog(); });
  $("export").addEventListener("click", exportData);
  $("request-form").addEventListener("submit", fileRequest);
  $("q-status").addEventListener("change", loadRequests);
  $("q-refresh").addEventListener("click", loadRequests);
  const why = sessionStorage.getItem(SIGNED_OUT_KEY);
  sessionStorage.removeItem(SIGNED_OUT_KEY);
  if (why) say("signin-error", why, true);
  if (token()) signIn(token());
});
