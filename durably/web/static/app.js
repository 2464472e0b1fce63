// durably dashboard: vanilla JS, no build step. Every URL is relative to the page, so the
// app works wherever it is mounted (/, /durably/ …). Views: #/ (runs), #/runs/ID, #/trigger[/JOB].
"use strict";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const STATUSES = ["pending", "leased", "waiting", "completed", "failed", "cancelled"];
const main = document.getElementById("main");
let cleanup = () => {};
let jobsCache = null;

// --- helpers ---------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  return fill(el, ...children);
}

// Like replaceChildren, but nested arrays are flattened and null/undefined/false skipped.
function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : String(c))));
  return el;
}

async function api(path, options = {}) {
  const init = { ...options, headers: { Accept: "application/json" } };
  if (options.method && options.method !== "GET") {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body ?? {});
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || { type: "HTTPError", message: response.statusText };
    throw new Error(`${error.type}: ${error.message}`);
  }
  return data;
}

function toast(message, ok = false) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.className = ok ? "toast ok" : "toast";
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 6000);
}

function setLive(on, text) {
  const el = document.getElementById("live");
  el.className = on ? "live on" : "live";
  el.textContent = text;
}

function age(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.floor(seconds)}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ago`;
  return `${Math.floor(seconds / 86400)}d ago`;
}

function duration(start, end) {
  if (!start || !end) return "";
  const ms = Date.parse(end) - Date.parse(start);
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function statusBadge(status) {
  return h("span", { class: `status ${status}`, "data-status": status }, status);
}

function progressBar(progress, status) {
  if (!progress) return h("span", { class: "muted" }, status === "completed" ? "done" : "—");
  const max = progress.total || Math.max(progress.current, 1);
  const text = progress.total ? `${progress.current}/${progress.total}` : `${progress.current}`;
  const label = progress.message ? `${text} ${progress.message}` : text;
  return h("span", { class: "bar" },
    h("progress", { max, value: Math.min(progress.current, max), "aria-label": `progress ${label}` }),
    h("span", {}, label));
}

function labelChips(labels) {
  return Object.entries(labels || {}).map(([k, v]) => h("span", { class: "label" }, `${k}=${v}`));
}

function pretty(value) {
  return JSON.stringify(value, null, 2);
}

// Progress pushed live is newer than the copy that rides on status changes; keep the newer.
function mergeProgress(old, run) {
  if (old && old.progress && run.progress && !TERMINAL.has(run.status) && old.attempt === run.attempt &&
      run.progress.current < old.progress.current) {
    return { ...run, progress: old.progress };
  }
  return run;
}

function live(path, handlers, reopened = () => {}) {
  const source = new EventSource(path);
  let lost = false;
  source.onopen = () => {
    setLive(true, "live");
    if (lost) reopened();  // changes made while the stream was down are not replayed
    lost = false;
  };
  source.onerror = () => { lost = true; setLive(false, "reconnecting…"); };
  for (const [name, handler] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => handler(JSON.parse(event.data)));
  }
  return source;
}

// --- runs list -------------------------------------------------------------------------

function filtersFromHash(query) {
  const params = new URLSearchParams(query);
  return { status: params.get("status") || "", job: params.get("job") || "", label: params.get("label") || "" };
}

function queryOf(filters) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(filters)) if (value) params.set(key, value);
  return params.toString();
}

async function jobs() {
  if (!jobsCache) jobsCache = (await api("api/jobs")).jobs;
  return jobsCache;
}

async function runsView(query) {
  const filters = filtersFromHash(query);
  const rows = new Map();
  const tbody = h("tbody");
  const more = h("button", { class: "secondary more", type: "button", hidden: true }, "Load more");
  const empty = h("div", { class: "empty", hidden: true }, "No runs yet.");
  let cursor = null;

  const jobOptions = (await jobs()).map((job) => h("option", { value: job.name, selected: job.name === filters.job }, job.name));
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter runs" },
    h("label", {}, "Status", h("select", { name: "status" }, h("option", { value: "" }, "any"),
      STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s)))),
    h("label", {}, "Job", h("select", { name: "job" }, h("option", { value: "" }, "any"), jobOptions)),
    h("label", {}, "Label", h("input", { name: "label", placeholder: "key:value", value: filters.label })),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    location.hash = `#/?${queryOf(data)}`;
  });

  function render(run) {
    const cells = [
      h("td", { class: "id", "data-label": "Run" }, h("a", { href: `#/runs/${run.id}` }, run.id)),
      h("td", { "data-label": "Job" }, run.job_name),
      h("td", { "data-label": "Status" }, statusBadge(run.status)),
      h("td", { "data-label": "Labels" }, labelChips(run.labels)),
      h("td", { "data-label": "Progress" }, progressBar(run.progress, run.status)),
      h("td", { "data-label": "Age", "data-created": run.created_at }, age(run.created_at)),
    ];
    const row = h("tr", { "data-run": run.id, "data-status": run.status }, cells);
    row.run = run;
    return row;
  }

  // Rows stay newest first (ids sort by creation time); a run older than the loaded pages
  // waits for "Load more".
  function upsert(run, live) {
    const old = rows.get(run.id);
    const row = render(mergeProgress(old && old.run, run));
    if (old) old.replaceWith(row);
    else if (!live) tbody.append(row);
    else {
      const after = [...tbody.children].find((r) => r.run.id < run.id);
      if (after) tbody.insertBefore(row, after);
      else if (cursor) return;
      else tbody.append(row);
    }
    rows.set(run.id, row);
    empty.hidden = rows.size > 0;
  }

  async function load(reset) {
    const params = new URLSearchParams(queryOf(filters));
    params.set("limit", "50");
    if (!reset && cursor) params.set("cursor", cursor);
    const page = await api(`api/runs?${params}`);
    if (reset) { fill(tbody); rows.clear(); }
    for (const run of page.runs) upsert(run, false);
    cursor = page.next_cursor;
    more.hidden = !cursor;
    empty.hidden = rows.size > 0;
  }
  more.addEventListener("click", () => load(false).catch((e) => toast(e.message)));

  fill(main, 
    h("h1", {}, "Runs"), form,
    h("table", { class: "runs" },
      h("caption", { class: "skip" }, "Runs, newest first"),
      h("thead", {}, h("tr", {}, ["Run", "Job", "Status", "Labels", "Progress", "Age"].map((t) => h("th", { scope: "col" }, t)))),
      tbody),
    empty, more);

  const source = live(`api/events?${queryOf(filters)}`, {
    status: (run) => upsert(run, true),
    progress: ({ run_id, progress }) => {
      const row = rows.get(run_id);
      if (row) upsert({ ...row.run, progress }, true);
    },
    delete: ({ run_id }) => { rows.get(run_id)?.remove(); rows.delete(run_id); },
    reset: () => load(true),
  }, () => load(true).catch((e) => toast(e.message)));
  const ticker = setInterval(() => {
    for (const cell of tbody.querySelectorAll("[data-created]")) cell.textContent = age(cell.dataset.created);
  }, 1000);
  await load(true);
  return () => { source.close(); clearInterval(ticker); };
}

// --- one run ---------------------------------------------------------------------------

async function runView(runId) {
  let run = await api(`api/runs/${encodeURIComponent(runId)}`);
  const steps = new Map();
  const stepsBody = h("tbody");
  const logList = h("ol", { class: "logs", "aria-label": "Logs" });
  const head = h("div");
  const bar = h("div", { class: "bar-slot" });
  const result = h("div");
  const buttons = {
    retry: h("button", { type: "button", class: "secondary" }, "Retry"),
    retrigger: h("button", { type: "button", class: "secondary" }, "Retrigger"),
    cancel: h("button", { type: "button", class: "danger" }, "Cancel"),
    signal: h("button", { type: "button", class: "secondary" }, "Signal"),
    delete: h("button", { type: "button", class: "danger" }, "Delete"),
  };

  function renderRun() {
    fill(head, 
      h("h1", {}, `${run.job_name} `, statusBadge(run.status)),
      h("dl", { class: "meta" },
        h("dt", {}, "Run"), h("dd", { class: "id" }, run.id),
        h("dt", {}, "Attempt"), h("dd", {}, run.attempt),
        h("dt", {}, "Created"), h("dd", {}, `${run.created_at} (${age(run.created_at)})`),
        run.completed_at ? [h("dt", {}, "Ended"), h("dd", {}, run.completed_at)] : null,
        run.waiting_for ? [h("dt", {}, "Waiting for"), h("dd", {}, run.waiting_for)] : null,
        run.wake_at ? [h("dt", {}, "Wakes"), h("dd", {}, run.wake_at)] : null,
        run.parent_run_id ? [h("dt", {}, "Parent"), h("dd", {}, h("a", { href: `#/runs/${run.parent_run_id}` }, run.parent_run_id))] : null,
        Object.keys(run.labels || {}).length ? [h("dt", {}, "Labels"), h("dd", {}, labelChips(run.labels))] : null));
    fill(bar, h("h2", {}, "Progress"), progressBar(run.progress, run.status));
    fill(result, 
      h("h2", {}, "Input"), h("pre", { "aria-label": "Input" }, pretty(run.input)),
      run.error ? [h("h2", {}, "Error"), h("pre", { class: "error", "aria-label": "Error" }, run.error)] : null,
      run.status === "completed" ? [h("h2", {}, "Output"), h("pre", { "aria-label": "Output" }, pretty(run.output))] : null);
    buttons.retry.disabled = !["failed", "cancelled"].includes(run.status);
    buttons.cancel.disabled = TERMINAL.has(run.status);
    buttons.signal.disabled = TERMINAL.has(run.status);
    buttons.delete.disabled = !TERMINAL.has(run.status);
  }

  function renderStep(step) {
    const row = h("tr", { "data-step": step.name },
      h("td", {}, step.index), h("td", {}, step.name), h("td", {}, statusBadge(step.status)),
      h("td", {}, duration(step.started_at, step.completed_at)),
      h("td", {}, step.error ? h("span", { class: "lvl-error" }, step.error) : ""));
    const old = steps.get(step.name);
    if (old) old.replaceWith(row); else stepsBody.append(row);
    steps.set(step.name, row);
  }

  function addLog(log) {
    logList.append(h("li", { class: `lvl-${log.level}` },
      `${log.created_at ? log.created_at.slice(11, 23) : ""} ${log.level} ${log.step_name ? `[${log.step_name}] ` : ""}${log.message}`,
      Object.keys(log.data || {}).length ? ` ${JSON.stringify(log.data)}` : ""));
  }

  async function act(name, request) {
    try {
      const answer = await request();
      toast(`${name}: done`, true);
      return answer;
    } catch (error) {
      toast(error.message);
      return null;
    }
  }
  buttons.retry.onclick = () => act("retry", () => api(`api/runs/${run.id}/retry`, { method: "POST" })).then((r) => r && (location.hash = `#/runs/${r.id}?${Date.now()}`));
  buttons.retrigger.onclick = () => act("retrigger", () => api(`api/runs/${run.id}/retrigger`, { method: "POST" })).then((r) => r && (location.hash = `#/runs/${r.id}`));
  buttons.cancel.onclick = () => act("cancel", () => api(`api/runs/${run.id}/cancel`, { method: "POST" }));
  buttons.signal.onclick = () => {
    const waited = (run.waiting_for || "").startsWith("signal:") ? run.waiting_for.slice(7) : "";
    const name = prompt("Signal name", waited);
    if (!name) return;
    let payload;
    try {
      payload = JSON.parse(prompt("Payload (JSON)", "null") ?? "null");
    } catch (error) {
      toast(`signal: the payload is not JSON: ${error.message}`);
      return;
    }
    act("signal", () => api(`api/runs/${run.id}/signals/${encodeURIComponent(name)}`, { method: "POST", body: payload }));
  };
  buttons.delete.onclick = () => {
    if (!confirm(`Delete run ${run.id} with its steps and logs?`)) return;
    act("delete", () => api(`api/runs/${run.id}`, { method: "DELETE" })).then((r) => r && (location.hash = "#/"));
  };

  renderRun();
  fill(main, 
    h("p", {}, h("a", { href: "#/" }, "← All runs")),
    head,
    h("div", { class: "actions", role: "group", "aria-label": "Run actions" }, Object.values(buttons)),
    bar, result,
    h("h2", {}, "Steps"),
    h("table", { class: "steps" },
      h("thead", {}, h("tr", {}, ["#", "Step", "Status", "Duration", "Error"].map((t) => h("th", { scope: "col" }, t)))),
      stepsBody),
    h("h2", {}, "Logs"), logList);

  const source = live(`api/runs/${encodeURIComponent(run.id)}/events`, {
    status: (data) => {
      if (data.status === "deleted") { toast("this run was deleted"); source.close(); return; }
      run = mergeProgress(run, data);
      renderRun();
      if (TERMINAL.has(run.status)) { source.close(); setLive(false, `run ${run.status}`); }
    },
    step: renderStep,
    log: addLog,
    progress: (progress) => { run = { ...run, progress }; renderRun(); },
  });
  return () => source.close();
}

// --- trigger form ----------------------------------------------------------------------

function resolve(schema, root) {
  if (schema && schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return resolve((root.$defs || {})[name] || {}, root);
  }
  if (schema && Array.isArray(schema.anyOf)) {
    const usable = schema.anyOf.filter((s) => s.type !== "null");
    if (usable.length === 1) return { ...resolve(usable[0], root), nullable: true, default: schema.default };
  }
  return schema || {};
}

function fieldFor(name, schema, required) {
  const id = `field-${name}`;
  const hint = schema.type ? null : h("span", { class: "muted" }, " (JSON)");
  const label = h("span", {}, name, required ? h("span", { class: "req", "aria-hidden": "true" }, " *") : null, hint);
  const common = { id, name, required, "data-kind": schema.type || "json" };
  if (schema.enum) {
    return h("label", { for: id }, label, h("select", common, schema.enum.map((v) => h("option", { value: JSON.stringify(v), selected: v === schema.default }, String(v)))));
  }
  if (schema.type === "boolean") {
    return h("label", { for: id, class: "check" }, h("input", { ...common, required: false, type: "checkbox", checked: schema.default === true }), label);
  }
  if (schema.type === "integer" || schema.type === "number") {
    return h("label", { for: id }, label, h("input", { ...common, type: "number", step: schema.type === "integer" ? "1" : "any", value: schema.default ?? "" }));
  }
  if (schema.type === "string") {
    return h("label", { for: id }, label, h("input", { ...common, type: "text", value: schema.default ?? "" }));
  }
  const initial = schema.default !== undefined ? JSON.stringify(schema.default) : schema.type === "object" ? "{}" : "";
  if (schema.type) label.append(h("span", { class: "muted" }, " (JSON)"));
  return h("label", { for: id }, label, h("textarea", { ...common, "data-kind": "json", rows: 3 }, initial));
}

function readField(el) {
  const kind = el.dataset.kind;
  if (el.tagName === "SELECT") return JSON.parse(el.value);
  if (kind === "boolean") return el.checked;
  if (el.value === "") return undefined;
  if (kind === "integer" || kind === "number") return Number(el.value);
  if (kind === "string") return el.value;
  try { return JSON.parse(el.value); } catch { throw new Error(`${el.name}: not valid JSON`); }
}

function parseLabels(text) {
  const labels = {};
  for (const part of text.split(/[\n,]/).map((s) => s.trim()).filter(Boolean)) {
    const at = part.indexOf(":");
    if (at < 1) throw new Error(`label "${part}" must be key:value`);
    labels[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return labels;
}

async function triggerView(jobName) {
  const all = await jobs();
  if (!all.length) { fill(main, h("h1", {}, "Trigger"), h("p", { class: "empty" }, "No jobs are registered.")); return () => {}; }
  const job = all.find((j) => j.name === jobName) || all[0];
  const schema = resolve(job.input_schema, job.input_schema);
  const isObject = schema.type === "object" && schema.properties;
  const required = new Set(schema.required || []);
  const inputs = isObject
    ? Object.entries(schema.properties).map(([name, prop]) => fieldFor(name, resolve(prop, job.input_schema), required.has(name)))
    : [fieldFor("input", schema, true)];

  const picker = h("select", { id: "job-picker", name: "job", onchange: (e) => { location.hash = `#/trigger/${encodeURIComponent(e.target.value)}`; } },
    all.map((j) => h("option", { value: j.name, selected: j.name === job.name }, j.name)));
  const form = h("form", { class: "form", "aria-label": `Trigger ${job.name}` },
    h("label", { for: "job-picker" }, "Job", picker),
    h("fieldset", { class: "input" }, h("legend", {}, "Input"), inputs),
    h("fieldset", {}, h("legend", {}, "Options"),
      h("label", { for: "opt-idem" }, "Idempotency key", h("input", { id: "opt-idem", name: "idempotency_key" })),
      h("label", { for: "opt-conc" }, "Concurrency key", h("input", { id: "opt-conc", name: "concurrency_key" })),
      h("label", { for: "opt-labels" }, "Labels (key:value, comma separated)", h("input", { id: "opt-labels", name: "labels", placeholder: "team:data, env:prod" }))),
    h("div", {}, h("button", { type: "submit" }, `Trigger ${job.name}`)));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      let input;
      if (isObject) {
        input = {};
        for (const el of form.querySelectorAll("fieldset.input [name]")) {
          const value = readField(el);
          if (value !== undefined) input[el.name] = value;
        }
      } else {
        input = readField(form.querySelector("fieldset.input [name]"));
      }
      const body = { input };
      const idem = form.elements.idempotency_key.value.trim();
      const conc = form.elements.concurrency_key.value.trim();
      if (idem) body.idempotency_key = idem;
      if (conc) body.concurrency_key = conc;
      const labels = parseLabels(form.elements.labels.value);
      if (Object.keys(labels).length) body.labels = labels;
      const run = await api(`api/jobs/${encodeURIComponent(job.name)}/trigger`, { method: "POST", body });
      toast(`run ${run.id} ${run.disposition}`, true);
      location.hash = `#/runs/${run.id}`;
    } catch (error) {
      toast(error.message);
    }
  });
  fill(main, h("h1", {}, "Trigger a run"), h("div", { class: "panel" }, form));
  return () => {};
}

// --- router ----------------------------------------------------------------------------

async function route() {
  cleanup();
  cleanup = () => {};
  setLive(false, "");
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const link of document.querySelectorAll("[data-nav]")) {
    const current = (parts[0] || "runs") === link.dataset.nav || (parts[0] === "runs" && link.dataset.nav === "runs");
    if (current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  try {
    if (parts[0] === "runs" && parts[1]) cleanup = await runView(parts[1]);
    else if (parts[0] === "trigger") cleanup = await triggerView(parts[1]);
    else cleanup = await runsView(query);
  } catch (error) {
    fill(main, h("h1", {}, "Something went wrong"), h("p", { role: "alert" }, error.message), h("p", {}, h("a", { href: "#/" }, "Back to runs")));
  }
}

// After a navigation, keyboard and screen-reader users start at the new view's content.
window.addEventListener("hashchange", () => route().then(() => main.focus({ preventScroll: true })));
route();
