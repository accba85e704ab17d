// atlaskv web page: ask with streamed answers and cited facts, edit the KB, browse it.
// Plain JavaScript, no framework, no build step. It uses the server's own API only:
//   POST /v1/chat/completions (stream), POST / DELETE /v1/kb/triples, GET /v1/kb, GET /v1/kb/search.
"use strict";

// The API key lives in this variable only: never in a URL, a cookie, or local or session storage.
let apiKey = null;
let graphHead = null;      // the entity the graph shows
const MAX_FIELD = 2000;    // the server's limit on a head, relation or tail

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

// ------------------------------------------------------------------ talking to the server
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function request(method, path, body) {
  const headers = {};
  if (apiKey !== null) headers["Authorization"] = "Bearer " + apiKey;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    return await fetch(path, { method, headers, cache: "no-store",
                               body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, "cannot reach the server (" + e.message + ")");
  }
}

// The server's error message ({"error": {"message"}}), else the status line.
async function errorOf(r) {
  const text = await r.text();
  try { return JSON.parse(text).error.message; } catch (e) { return `HTTP ${r.status} ${r.statusText}`; }
}

async function call(method, path, body) {
  const r = await request(method, path, body);
  if (!r.ok) {
    const err = new ApiError(r.status, await errorOf(r));
    if (r.status === 401 && apiKey !== null) showLogin(err.message);   // the key stopped working
    throw err;
  }
  return r.json();
}

function showError(id, e) { $(id).textContent = e.message || String(e); }

// ------------------------------------------------------------------ login
function showLogin(message = "") {
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("status").textContent = "API key needed";
  $("key").focus();
}

async function enter() {
  const kb = await call("GET", "/v1/kb");   // the first call: shows the page only once it succeeds
  $("login").hidden = true;
  $("app").hidden = false;
  showKB(kb);
  $("question").focus();
}

async function signIn(event) {
  event.preventDefault();
  apiKey = $("key").value;
  $("key").value = "";
  try {
    await enter();
    $("login-error").textContent = "";
  } catch (e) {
    apiKey = null;
    showLogin(e.message);
  }
}

// ------------------------------------------------------------------ chat
async function ask(event) {
  event.preventDefault();
  const question = $("question").value;
  $("chat-error").textContent = "";
  $("ask").disabled = true;
  const answer = el("div", { class: "answer streaming" }, el("p", { class: "text" }));
  $("messages").append(el("div", { class: "question" }, question), answer);
  scrollChat();
  try {
    const r = await request("POST", "/v1/chat/completions",
                            { messages: [{ role: "user", content: question }], stream: true });
    if (!r.ok) throw new ApiError(r.status, await errorOf(r));
    $("question").value = "";
    const info = await readStream(r, answer.querySelector(".text"));
    showCitations(answer, info);
    const entity = questionEntity(question, info);
    if (entity !== null) drawGraph(entity).catch((e) => showError("chat-error", e));
    else clearGraph("no cited fact is about an entity named in the question");
  } catch (e) {
    answer.classList.add("failed");
    answer.querySelector(".text").textContent = e.message;
    showError("chat-error", e);
    if (e.status === 401) showLogin(e.message);
  } finally {
    answer.classList.remove("streaming");
    $("ask").disabled = false;
  }
}

function scrollChat() { $("messages").scrollTop = $("messages").scrollHeight; }

// Server-sent events: text pieces as they come, then the final chunk's "atlaskv" field.
async function readStream(r, textNode) {
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", info = null;
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new ApiError(500, chunk.error.message);
        const piece = chunk.choices[0].delta.content;
        if (piece) { textNode.textContent += piece; scrollChat(); }
        if (chunk.atlaskv) info = chunk.atlaskv;
      }
    }
    if (done) break;
  }
  if (info === null) throw new ApiError(0, "the answer ended before its citations came");
  return info;
}

// The graph's entity: the head of the most-cited fact that the question names, else (for an answer that
// was not refused) the head of the most-cited fact.
function questionEntity(question, info) {
  const q = question.toLowerCase();
  const named = info.citations.find((c) => q.includes(c.head.toLowerCase()));
  if (named) return named.head;
  return info.refused || !info.citations.length ? null : info.citations[0].head;
}

function percent(x) { return (100 * x).toFixed(1) + "%"; }

function showCitations(answer, info) {
  const support = info.support === null ? "∞" : info.support.toFixed(1) + "×";
  const meta = el("p", { class: "meta" },
    el("span", { class: info.refused ? "badge refused" : "badge answered" }, info.refused ? "refused" : "answered"),
    (info.missing ? ` the KB holds no “${info.missing[1]}” fact about ${info.missing[0]} ·` : "") +
    ` support ${support} · KB attention ${percent(info.kb_attention_mass)} · KB version ${info.kb_version}` +
    ` · ${info.kb_size.toLocaleString("en")} facts`);
  meta.title = "support: the weight of the cited facts naming the most-cited value over the heaviest one " +
               "naming another; under the server's threshold, or when the most-cited fact is about an entity " +
               "the question does not name, the answer is \"I don't know.\"";
  const list = el("ol", { class: "citations" });
  for (const c of info.citations) {
    const bar = el("span", { class: "bar" });
    bar.style.width = percent(c.weight);            // its share of the KB attention
    list.append(el("li", { class: "citation" },
      el("span", { class: "weight" }, percent(c.weight)),
      el("span", { class: "track" }, bar),
      el("span", { class: "fact" }, `${c.head} | ${c.relation} | ${c.tail}`)));
  }
  answer.append(meta, list);
  scrollChat();
}

// ------------------------------------------------------------------ the KB panel
function showKB(kb) {
  $("model").textContent = kb.model;
  $("status").textContent = `KB version ${kb.version}`;
  const info = $("kb-info");
  info.replaceChildren();
  const rows = [["facts", kb.triples.toLocaleString("en")], ["version", kb.version],
                ["encoder", `${kb.encoder} (${kb.dim})`], ["attention", kb.indexed ? "HiKVP index" : "flat"],
                ["refuses below", `${kb.refuse_below}× support`],
                ["refuses a lacking fact at", `${kb.lacking_ratio}× its attention`]];
  for (const [k, v] of rows) info.append(el("dt", {}, k), el("dd", { id: "kb-" + k.replace(/ /g, "-") }, String(v)));
  $("relations-count").textContent = `(${kb.relations.length})`;
  $("relations").replaceChildren(...kb.relations.map(
    (r) => el("li", {}, el("span", {}, r.relation), el("span", { class: "muted" }, String(r.count)))));
}

async function refreshKB() {
  showKB(await call("GET", "/v1/kb"));
  if (graphHead !== null) await drawGraph(graphHead);
}

function factItem(t) {
  const head = el("a", { href: "#", class: "head" }, t.head);
  head.addEventListener("click", (e) => { e.preventDefault(); drawGraph(t.head); });
  return el("li", {}, head, ` | ${t.relation} | ${t.tail}`);
}

let searchTimer = null;
function searchSoon() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(search, 250);
}

async function search() {
  const text = $("search").value.trim();
  if (!text) { $("search-results").replaceChildren(); $("search-summary").textContent = ""; return; }
  try {
    const res = await call("GET", "/v1/kb/search?" + new URLSearchParams({ head: text, limit: 30 }));
    $("search-summary").textContent = plural(res.total, "fact") +
                                      (res.total > res.triples.length ? `, first ${res.triples.length}` : "");
    $("search-results").replaceChildren(...res.triples.map(factItem));
  } catch (e) {
    $("search-summary").textContent = e.message;
  }
}

// ------------------------------------------------------------------ the graph (inline SVG)
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function plural(n, word) { return `${n.toLocaleString("en")} ${word}${n === 1 ? "" : "s"}`; }

function short(s, n) { return s.length > n ? s.slice(0, n - 1) + "…" : s; }

function clearGraph(why) {
  graphHead = null;
  $("graph").replaceChildren();
  $("graph-title").textContent = why;
}

// The entity on the left, its facts fanning out to the right: "relation  tail" at each end.
async function drawGraph(head) {
  graphHead = head;
  const res = await call("GET", "/v1/kb/search?" + new URLSearchParams({ head, limit: 100 }));
  const facts = res.triples.filter((t) => t.head.toLowerCase() === head.toLowerCase());
  const shown = facts.slice(0, 12);
  $("graph-title").textContent = `${head}: ${plural(facts.length, "fact")}` +
                                 (facts.length > shown.length ? ` (${shown.length} shown)` : "");
  const step = 24, height = Math.max(90, shown.length * step + 36), cy = height / 2, x0 = 24, x1 = 104;
  const g = $("graph");
  g.setAttribute("viewBox", `0 0 320 ${height}`);
  g.replaceChildren();
  shown.forEach((t, i) => {
    const y = cy + (i - (shown.length - 1) / 2) * step;
    g.append(svg("path", { d: `M ${x0} ${cy} C ${x0 + 60} ${cy}, ${x1 - 60} ${y}, ${x1} ${y}`, class: "edge" }));
    g.append(svg("circle", { cx: x1, cy: y, r: 4.5, class: "node" }));
    const label = svg("text", { x: x1 + 9, y: y + 4, class: "fact" });
    const relation = short(t.relation, 18);   // both on one line of the 320-wide drawing
    label.append(svg("tspan", { class: "relation" }, relation + "  "),
                 svg("tspan", { class: "tail" }, short(t.tail, 36 - relation.length)));
    label.append(svg("title", {}, `${t.head} | ${t.relation} | ${t.tail}`));
    g.append(label);
  });
  g.append(svg("circle", { cx: x0, cy, r: 7, class: "center" }));
  g.append(svg("text", { x: 6, y: cy - 14, class: "entity" }, short(head, 34)));
}

// ------------------------------------------------------------------ editing the KB
function formTriple() {
  return { head: $("head").value, relation: $("relation").value, tail: $("tail").value };
}

async function change(method, triples, what) {
  $("edit-error").textContent = "";
  $("edit-result").textContent = "";
  try {
    const res = await call(method, "/v1/kb/triples", { triples });
    const done = method === "POST"
      ? `added ${res.added}` + (res.duplicates ? `, ${res.duplicates} already there` : "")
      : `removed ${res.removed}` + (res.not_found ? `, ${res.not_found} not found` : "");
    $("edit-result").textContent = `${what}: ${done}. KB version ${res.version}, ` +
                                   `${res.triples.toLocaleString("en")} facts.`;
    graphHead = triples[0].head.trim();   // the graph shows the entity just changed
    await refreshKB();
    return true;
  } catch (e) {
    showError("edit-error", e);
    return false;
  }
}

async function changeOne(method) {
  const t = formTriple();
  if (await change(method, [t], `${t.head} | ${t.relation} | ${t.tail}`)) {
    for (const id of ["head", "relation", "tail"]) $(id).value = "";
  }
}

async function changeFile(method) {
  $("edit-error").textContent = "";
  $("edit-result").textContent = "";
  const file = $("file").files[0];
  if (!file) { $("edit-error").textContent = "choose a file first"; return; }
  let triples;
  try {
    triples = parseTriples(file.name, await file.text());
  } catch (e) {
    $("edit-result").textContent = "";
    showError("edit-error", e);      // nothing was sent: the whole file is refused
    return;
  }
  await change(method, triples, `${file.name} (${triples.length} facts)`);
}

// ------------------------------------------------------------------ reading an uploaded file
// The same rules as the server's file readers (kb/formats.py): whitespace collapsed, no empty field, an
// optional header row (head, relation, tail or subject, predicate, object). A bad row refuses the file.
const HEADERS = ["head,relation,tail", "subject,predicate,object"];

function cleanField(value, name, where) {
  const text = String(value).split(/\s+/).filter(Boolean).join(" ");
  if (!text) throw new Error(`${where}: empty ${name}`);
  if (text.length > MAX_FIELD) throw new Error(`${where}: ${name} is ${text.length} characters, over ${MAX_FIELD}`);
  if (text.includes("\0")) throw new Error(`${where}: NUL character in ${name}`);
  return text;
}

function toTriple(fields, where) {
  const [head, relation, tail] = fields.map((f, i) => cleanField(f, ["head", "relation", "tail"][i], where));
  return { head, relation, tail };
}

function isHeader(fields) {
  return HEADERS.includes(fields.map((f) => f.trim().toLowerCase()).join(","));
}

function parseTriples(name, text) {
  const ext = name.toLowerCase().split(".").pop();
  const rows = ext === "jsonl" || ext === "ndjson" ? jsonlRows(name, text)
             : ext === "csv" ? csvRows(name, text)
             : ext === "tsv" || ext === "txt" ? tsvRows(name, text)
             : null;
  if (rows === null) throw new Error(`${name}: not a .tsv, .csv or .jsonl file`);
  if (!rows.length) throw new Error(`${name}: no facts in the file`);
  return rows;
}

function lines(text) { return text.replace(/^\uFEFF/, "").split(/\r\n|\r|\n/); }

function tsvRows(name, text) {
  const out = [];
  let first = true;
  lines(text).forEach((line, i) => {
    if (!line.trim()) return;
    const fields = line.split("\t");
    if (first && isHeader(fields)) { first = false; return; }
    first = false;
    if (fields.length !== 3) {
      throw new Error(`${name} line ${i + 1}: expected 3 tab-separated columns (head, relation, tail), ` +
                      `found ${fields.length}`);
    }
    out.push(toTriple(fields, `${name} line ${i + 1}`));
  });
  return out;
}

function jsonlRows(name, text) {
  const out = [];
  lines(text).forEach((line, i) => {
    if (!line.trim()) return;
    const where = `${name} line ${i + 1}`;
    let obj;
    try { obj = JSON.parse(line); } catch (e) { throw new Error(`${where}: invalid JSON (${e.message})`); }
    if (obj === null || typeof obj !== "object" || Array.isArray(obj)) throw new Error(`${where}: expected a JSON object`);
    const keys = "subject" in obj && !("head" in obj) ? ["subject", "predicate", "object"] : ["head", "relation", "tail"];
    for (const k of keys) {
      if (!(k in obj)) throw new Error(`${where}: missing key "${k}"`);
      if (typeof obj[k] !== "string") throw new Error(`${where}: "${k}" must be a string`);
    }
    out.push(toTriple(keys.map((k) => obj[k]), where));
  });
  return out;
}

// CSV records as Python's csv module reads them (skipinitialspace, strict): quoted fields may hold commas,
// doubled quotes and line breaks; a quote inside an unquoted field is kept as it is.
function csvRecords(name, text) {
  const records = [];
  let fields = [], field = "", quoted = false, inQuotes = false, line = 1, start = 1;
  const endField = () => { fields.push(field); field = ""; quoted = false; };
  text = text.replace(/^\uFEFF/, "").replace(/\r\n?/g, "\n");
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inQuotes) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
      else if (c === '"') inQuotes = false;
      else { if (c === "\n") line++; field += c; }
    } else if (c === ",") { endField(); while (text[i + 1] === " ") i++; }
    else if (c === "\n") { endField(); records.push([start, fields]); fields = []; line++; start = line; }
    else if (quoted) throw new Error(`${name} line ${start}: CSV error: ',' expected after '"'`);
    else if (c === '"' && field === "") inQuotes = quoted = true;
    else field += c;
  }
  if (inQuotes) throw new Error(`${name} line ${start}: CSV error: a quoted field is never closed`);
  if (field !== "" || quoted || fields.length) { endField(); records.push([start, fields]); }
  return records;
}

function csvRows(name, text) {
  const out = [];
  let first = true;
  for (const [line, fields] of csvRecords(name, text)) {
    if (fields.length === 1 && !fields[0].trim()) continue;
    if (first && isHeader(fields)) { first = false; continue; }
    first = false;
    if (fields.length !== 3) {
      throw new Error(`${name} line ${line}: expected 3 comma-separated columns (head, relation, tail), ` +
                      `found ${fields.length}`);
    }
    out.push(toTriple(fields, `${name} line ${line}`));
  }
  return out;
}

// ------------------------------------------------------------------ start
document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", signIn);
  $("ask-form").addEventListener("submit", ask);
  $("fact-form").addEventListener("submit", (e) => { e.preventDefault(); changeOne("POST"); });
  $("remove").addEventListener("click", () => changeOne("DELETE"));
  $("add-file").addEventListener("click", () => changeFile("POST"));
  $("remove-file").addEventListener("click", () => changeFile("DELETE"));
  $("search").addEventListener("input", searchSoon);
  try {
    await enter();               // no key needed (or the server has none)
  } catch (e) {
    if (e.status === 401) showLogin();
    else $("status").textContent = e.message;
  }
});
