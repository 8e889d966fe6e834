// pbs2p dashboard: plain ES module, no dependencies. Data comes only from the /v1 API with the key the user
// typed, kept in sessionStorage (gone when the tab closes). Everything from the API is inserted as text.

import { KEY, TERMINAL, hooks, h, s, num, secs, bytes, when, badge, ApiError, api, follow, errorBox } from "./lib.js";
import { comparePage } from "./compare.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let page = new AbortController(); // aborted when the page changes: closes its event streams

// ---------------------------------------------------------------------------------------------- helpers

function progressBar(job) {
  const p = job.progress || {};
  const pct = job.state === "SUCCEEDED" ? 100 : p.percent ?? 0;
  const parts = [];
  if (p.stage && !TERMINAL.has(job.state)) parts.push(p.stage);
  if (p.blocks) parts.push(`block ${p.block} of ${p.blocks}`);
  if (p.bytes_total) parts.push(`${bytes(p.bytes_done)} of ${bytes(p.bytes_total)}`);
  if (p.eta_seconds && p.percent < 100 && !TERMINAL.has(job.state)) parts.push(`ETA ${secs(p.eta_seconds)}`);
  let text = parts.join(" · ");
  if (!text && job.error) text = job.error.split("\n")[0].slice(0, 80);
  else if (!text && !TERMINAL.has(job.state)) text = "waiting";
  const fill = h("div", { class: "fill" });
  fill.style.width = `${Math.max(0, Math.min(100, pct))}%`;
  return h("div", { class: "progress" },
    h("div", { class: `bar ${job.state.toLowerCase()}`, role: "progressbar", "aria-valuenow": pct, "aria-valuemin": 0, "aria-valuemax": 100 }, fill),
    h("span", { class: "ptext", title: job.error, text }));
}


// Downloads need the auth header: fetch as a blob and save it through an object URL.
async function download(job, file, button) {
  button.disabled = true;
  try {
    const blob = await (await api(file.url, { raw: true })).blob();
    const url = URL.createObjectURL(blob);
    h("a", { href: url, download: file.name }).click();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    alert(`${file.name}: ${err.message} (presigned S3 downloads: use \`pbs2p download ${job.id}\`)`);
  } finally {
    button.disabled = false;
  }
}

async function filesPanel(job) {
  const box = h("div", { class: "card files" }, h("p", { class: "muted", text: "loading files…" }));
  try {
    const art = await api(job.links.artifact);
    box.replaceChildren(h("h3", { text: `Artifact (format ${art.format_version ?? "?"})` }), h("table", { class: "files" },
      h("thead", {}, h("tr", {}, h("th", { text: "file" }), h("th", { text: "size" }), h("th", { text: "sha256" }), h("th"))),
      h("tbody", {}, art.files.map((f) => {
        const btn = h("button", { type: "button", text: "Download" });
        btn.addEventListener("click", () => download(job, f, btn));
        return h("tr", { "data-file": f.name }, h("td", { text: f.name }), h("td", { class: "num", text: bytes(f.size) }),
          h("td", { class: "mono", title: f.sha256, text: `${f.sha256.slice(0, 16)}…` }), h("td", {}, btn));
      }))));
  } catch (err) {
    box.replaceChildren(errorBox(err));
  }
  return box;
}

function actions(job, onChange, extra) {
  const out = [];
  if (!TERMINAL.has(job.state) && job.state !== "CANCELLING") {
    out.push(h("button", { type: "button", class: "danger", text: "Cancel", onclick: async (ev) => {
      ev.target.disabled = true;
      try { onChange(await api(`${job.links.self}/cancel`, { method: "POST" })); } catch (err) { alert(err.message); }
    } }));
  }
  if (job.state === "SUCCEEDED") {
    out.push(h("button", { type: "button", text: "Files", onclick: async () => extra.replaceChildren(await filesPanel(job)) }));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------- pages

function signInPage(message) {
  nav.hidden = true;
  const input = h("input", { type: "password", id: "key", name: "key", autocomplete: "off", required: true, placeholder: "pbs2p_…" });
  const err = h("div", { id: "signin-error" });
  if (message) err.append(h("div", { class: "alert", role: "alert", text: message }));
  const form = h("form", { id: "signin", class: "card narrow" },
    h("h2", { text: "Sign in" }),
    h("p", { class: "muted", text: "Paste an API key (create one with `pbs2p keys create`). It is kept in this tab only." }),
    h("label", { for: "key", text: "API key" }), input, err,
    h("button", { type: "submit", class: "primary", text: "Sign in" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    try {
      await api("/v1/jobs?limit=1", { key });
      sessionStorage.setItem(KEY, key);
      route();
    } catch (e) {
      err.replaceChildren(h("div", { class: "alert", role: "alert", text: e.message }));
    }
  });
  main.replaceChildren(form);
  input.focus();
}

async function jobsPage() {
  const body = h("tbody");
  const more = h("button", { type: "button", hidden: true, text: "Older jobs" });
  const table = h("table", { id: "jobs" },
    h("thead", {}, h("tr", {}, ["", "job", "state", "model", "method", "pattern", "progress", "created", ""].map((t) => h("th", { text: t })))),
    body);
  // the jobs ticked for the comparison view (finished ones: SUCCEEDED, with a report)
  const picked = new Set();
  const compare = h("button", { type: "button", id: "compare-selected", disabled: true, title: "tick two or more finished jobs",
    text: "Compare selected", onclick: () => { location.hash = `#/compare/${[...picked].map(encodeURIComponent).join(",")}`; } });
  const pick = (id, on) => {
    if (on) picked.add(id); else picked.delete(id);
    compare.disabled = picked.size < 2;
    compare.textContent = picked.size ? `Compare ${picked.size} jobs` : "Compare selected";
  };
  main.replaceChildren(h("section", {},
    h("div", { class: "titlebar" }, h("h2", { text: "Jobs" }), compare,
      h("button", { type: "button", text: "Refresh", onclick: () => route() }),
      h("a", { class: "button primary", href: "#/new", text: "New job" })),
    table, more));
  const signal = page.signal;

  function row(job) {
    const extra = h("td", { colspan: 9 });
    const tr = h("tr", { "data-job": job.id });
    const sub = h("tr", { class: "sub" }, extra);
    const render = (j) => tr.replaceChildren(
      h("td", { class: "pick" }, j.state === "SUCCEEDED" ? h("input", { type: "checkbox", "aria-label": `compare ${j.name || j.id}`,
        checked: picked.has(j.id), onchange: (ev) => pick(j.id, ev.target.checked) }) : null),
      h("td", {}, h("a", { href: `#/jobs/${j.id}`, text: j.name || j.id }), j.name ? h("div", { class: "muted mono", text: j.id }) : null),
      h("td", {}, badge(j.state)), h("td", { class: "model", title: j.model, text: j.model }),
      h("td", { text: j.config.method }), h("td", { text: j.config.pattern }), h("td", {}, progressBar(j)),
      h("td", { class: "muted", text: when(j.created_at) }), h("td", { class: "actions" }, actions(j, render, extra)));
    render(job);
    rows.set(job.id, render);
    return [tr, sub];
  }

  // One event stream for every row (the tenant's): a browser allows only ~6 connections per host. It starts
  // with the jobs changed in the last seconds, so nothing changed between the list's answer and the stream is
  // missed; an event of a job that is not on the page (newer: Refresh shows it) is ignored.
  const rows = new Map();
  let streaming = false;
  const followAll = () => {
    if (streaming) return;
    streaming = true;
    follow("/v1/events", (j) => rows.get(j.id)?.(j), signal);
  };

  async function load(cursor) {
    const q = cursor ? `?cursor=${encodeURIComponent(cursor)}` : "";
    const list = await api(`/v1/jobs${q}`, { signal });
    body.append(...list.jobs.flatMap(row));
    if (list.jobs.some((j) => !TERMINAL.has(j.state))) followAll();
    if (!cursor && !list.jobs.length) body.append(h("tr", {}, h("td", { colspan: 9, class: "muted", text: "No jobs yet." })));
    more.hidden = !list.next_cursor;
    more.onclick = () => load(list.next_cursor).catch(show);
  }
  const show = (err) => { if (!signal.aborted) main.append(errorBox(err)); };
  await load().catch(show);
}

function nChart(blocks, pattern) {
  const m = Number(String(pattern).split(":")[1]) || Math.max(...blocks.map((b) => b.n_keep));
  const target = Number(String(pattern).split(":")[0]);
  const W = Math.max(320, 28 * blocks.length + 60), H = 200, L = 36, B = 28, T = 10;
  const bw = (W - L - 10) / blocks.length;
  const y = (v) => T + (H - T - B) * (1 - v / m);
  const svg = s("svg", { id: "nchart", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "kept weights N per block" });
  for (let v = 0; v <= m; v += m > 8 ? 2 : 1) {
    svg.append(s("line", { x1: L, x2: W - 10, y1: y(v), y2: y(v), class: "grid" }),
      s("text", { x: L - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, String(v)));
  }
  blocks.forEach((b, i) => {
    const x = L + i * bw + bw * 0.15;
    svg.append(s("rect", { class: "bar", x, y: y(b.n_keep), width: bw * 0.7, height: y(0) - y(b.n_keep), "data-block": b.index },
      s("title", {}, `block ${b.index}: N = ${b.n_keep} of ${m}, cosine ${num(b.cosine, 4)}, ${secs(b.seconds)}`)));
    if (blocks.length <= 48 || b.index % 4 === 0) {
      svg.append(s("text", { x: x + bw * 0.35, y: H - B + 16, class: "tick", "text-anchor": "middle" }, String(b.index)));
    }
  });
  if (target) svg.append(s("line", { x1: L, x2: W - 10, y1: y(target), y2: y(target), class: "target" }));
  return svg;
}

function layerTable(blocks) {
  const rows = blocks.flatMap((b) => b.linears.map((lr) => ({ block: b.index, n: b.n_keep, ...lr })));
  const max = Math.max(1e-9, ...rows.flatMap((r) => [r.rel_error ?? 0, r.rel_error_oneshot ?? 0]));
  const bar = (v, cls) => {
    if (v === null || v === undefined) return null;
    const el = h("span", { class: `ebar ${cls}` });
    el.style.width = `${(100 * (v ?? 0)) / max}%`;
    return h("div", { class: "etrack" }, el);
  };
  return h("table", { id: "layers" },
    h("thead", {}, h("tr", {}, ["block", "N", "linear", "shape", "error before SPBO", "error after SPBO", "change", "paper bits", "true bits"].map((t) => h("th", { text: t })))),
    h("tbody", {}, rows.map((r) => {
      const before = r.rel_error_oneshot, after = r.rel_error;
      const change = before ? `${(100 * (after / before - 1)).toFixed(1)}%` : "n/a";
      return h("tr", { class: "layer" },
        h("td", { class: "num", text: r.block }), h("td", { class: "num", text: r.n }),
        h("td", { class: "mono", title: r.name, text: r.name.replace(/^.*layers\.\d+\./, "") }),
        h("td", { class: "mono", text: (r.shape || []).join("×") }),
        h("td", { class: "num" }, num(before, 4), bar(before, "before")), h("td", { class: "num" }, num(after, 4), bar(after, "after")),
        h("td", { class: "num", text: change }), h("td", { class: "num", text: num(r.bits?.paper_bits, 3) }),
        h("td", { class: "num", text: num(r.bits?.true_bits, 3) }));
    })));
}

// The job's zero-shot task accuracy (metrics.tasks): per task and metric (acc, acc_norm), before and after.
function taskTable(tasks) {
  const after = tasks?.after || {}, before = tasks?.before || {};
  const rows = Object.entries(after).flatMap(([task, m]) => Object.keys(m)
    .filter((k) => !k.endsWith("_stderr") && k !== "examples")
    .map((metric) => ({ task, metric, before: before[task]?.[metric], after: m[metric], se: m[`${metric}_stderr`], n: m.examples })));
  return h("table", { id: "tasks" },
    h("thead", {}, h("tr", {}, ["task", "metric", "before", "after", "change", "± (after)", "examples"].map((t) => h("th", { text: t })))),
    h("tbody", {}, rows.map((r) => h("tr", { class: "task", "data-task": r.task, "data-metric": r.metric },
      h("td", { class: "mono", text: r.task }), h("td", { text: r.metric }),
      h("td", { class: "num", text: num(r.before, 4) }), h("td", { class: "num", text: num(r.after, 4) }),
      h("td", { class: "num", text: r.before === undefined ? "n/a" : num(r.after - r.before, 4) }),
      h("td", { class: "num", text: num(r.se, 4) }), h("td", { class: "num", text: r.n ?? "n/a" })))));
}

// A nested object as [dotted name, value] pairs: {ablations: {spbo_report: true}} -> [["ablations.spbo_report", true]].
const dotted = (obj, prefix = "") => Object.entries(obj).flatMap(([k, v]) =>
  (v && typeof v === "object" && !Array.isArray(v) ? dotted(v, `${prefix}${k}.`) : [[prefix + k, v]]));

const stat = (label, value, id) => h("div", { class: "stat", id }, h("div", { class: "label", text: label }), h("div", { class: "value", text: value }));

async function jobPage(id) {
  const signal = page.signal;
  const root = h("section", { id: "job" });
  main.replaceChildren(root);
  let job;
  try {
    job = await api(`/v1/jobs/${encodeURIComponent(id)}`, { signal });
  } catch (err) {
    if (!signal.aborted) root.replaceChildren(h("a", { href: "#/jobs", text: "← Jobs" }), errorBox(err));
    return;
  }
  const render = (j) => {
    const m = j.metrics || {}, t = j.timings || {}, blocks = j.report?.blocks || [];
    const extra = h("div");
    root.replaceChildren(h("div", {},
      h("a", { href: "#/jobs", text: "← Jobs" }),
      h("div", { class: "titlebar" }, h("h2", { text: j.name || j.id }), badge(j.state), actions(j, render, extra)),
      h("p", { class: "muted mono", text: `${j.id} · ${j.model}` }),
      progressBar(j), extra,
      j.error ? h("div", { class: "alert", id: "job-error", role: "alert" }, h("strong", { text: "Error: " }), j.error) : null,
      h("div", { class: "stats" },
        stat("perplexity before", num(m.ppl_before), "ppl-before"), stat("perplexity after", num(m.ppl_after), "ppl-after"),
        stat("paper bits / weight", num(m.paper_bits, 3), "paper-bits"), stat("true bits / weight", num(m.true_bits, 3), "true-bits"),
        stat("mean rel. error", num(m.mean_rel_error, 4)),
        stat("timings", `prepare ${secs(t.prepare_s)} · compress ${secs(t.compress_s)} · evaluate ${secs(t.evaluate_s)}`, "timings")),
      m.tasks ? h("div", { class: "card" }, h("h3", { text: `Zero-shot tasks (lm-evaluation-harness ${m.tasks.lm_eval}, ${m.tasks.limit ? `first ${m.tasks.limit} examples each` : "all examples"}): ${(j.evaluate?.tasks || []).join(", ")}` }),
        h("div", { class: "scroll" }, taskTable(m.tasks))) : null,
      blocks.length ? h("div", { class: "card" }, h("h3", { text: `Kept weights N per block (${j.config.allocation} allocation, ${j.config.pattern} target dashed)` }), h("div", { class: "chart" }, nChart(blocks, j.config.pattern))) : null,
      blocks.length ? h("div", { class: "card" }, h("h3", { text: "Per-layer reconstruction error" }),
        j.config.ablations?.spbo_report ? null : h("p", { class: "muted", text: "“Before SPBO” needs the config field ablations.spbo_report: true." }),
        h("div", { class: "scroll" }, layerTable(blocks))) : null,
      h("details", { class: "card", open: !blocks.length },
        h("summary", { text: "Config" }),
        h("dl", { id: "config" }, dotted({ ...j.config, ...(j.evaluate ? { evaluate: j.evaluate } : {}) })
          .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { class: "mono", text: typeof v === "object" ? JSON.stringify(v) : String(v) })])))));
  };
  render(job);
  if (!TERMINAL.has(job.state)) follow(job.links.events, render, signal);
}

// ---------------------------------------------------------------------------------------------- new job form
// Generated from the API's own OpenAPI document: one input per field of JobCreate (its config with the
// ablations nested, and evaluate), each starting at the schema's default. On submit only the fields changed
// from their defaults are sent, so the server's defaults (and its validation) apply to everything else.

const SECTIONS = { "config.ablations": { title: "Ablations and diagnostics", collapsed: true } };
const DEFAULT = Symbol("the server's default"); // what an input reads as when nothing is to be sent for it
let openapi = null; // the promise of /openapi.json: fetched once per page load (again after a failure)

class FieldError extends Error {}

function apiSchema() {
  openapi ??= fetch("/openapi.json", { headers: { Accept: "application/json" } }).then((res) => {
    if (!res.ok) throw new ApiError(res.status, { detail: `/openapi.json: ${res.status} ${res.statusText}` });
    return res.json();
  });
  openapi.catch(() => { openapi = null; });
  return openapi;
}

// A property's schema with what pydantic wraps it in taken off: `$ref` (its siblings win: a field's own
// description over its model's), `allOf: [X]` and `anyOf: [X, {type: "null"}]` (X, nullable); an array's
// `items` resolved too.
function resolve(spec, node) {
  let out = node, nullable = false;
  for (;;) {
    const { $ref, allOf, anyOf, ...rest } = out;
    const alts = (anyOf || []).filter((a) => a.type !== "null");
    if ($ref) {
      const target = $ref.split("/").slice(1).reduce((o, k) => o?.[k.replaceAll("~1", "/").replaceAll("~0", "~")], spec);
      if (!target) throw new Error(`schema ${$ref} not found in /openapi.json`);
      out = { ...target, ...rest };
    } else if (allOf?.length === 1) out = { ...allOf[0], ...rest };
    else if (anyOf && alts.length === 1) {
      nullable ||= alts.length < anyOf.length;
      out = { ...alts[0], ...rest };
    } else if (Array.isArray(out.type) && out.type.filter((t) => t !== "null").length === 1) {
      nullable ||= out.type.includes("null");
      out = { ...out, type: out.type.find((t) => t !== "null") };
    } else return { ...out, nullable, ...(out.items ? { items: resolve(spec, out.items) } : {}) };
  }
}

function kindOf(s) {
  if (s.properties) return "object";
  if (s.enum) return "enum";
  if (s.type === "array" && ["string", "integer", "number"].includes(s.items?.type)) return "list";
  if (["boolean", "integer", "number", "string"].includes(s.type)) return s.type;
  return "json"; // a shape the form has no input for: typed as JSON
}

const shown = (v, kind) => (kind === "list" ? v.join(", ") : kind === "json" ? JSON.stringify(v) : String(v));

// One input for the leaf field `path`; `read()` gives its JSON value, DEFAULT, or throws FieldError.
function leafField(s, path, name, required, toggles) {
  const kind = kindOf(s);
  const def = "default" in s ? s.default : s.nullable ? null : undefined;
  const text = def === undefined || def === null ? "" : shown(def, kind);
  const hint = s.nullable && !text ? "(default)" : text || null;
  let input;
  if (kind === "enum") {
    input = h("select", {}, s.nullable ? h("option", { value: "", text: "(default)" }) : null,
      s.enum.map((v) => h("option", { value: String(v), text: String(v), selected: v === def })));
  } else if (kind === "boolean") {
    input = h("input", { type: "checkbox", checked: def === true });
  } else if (kind === "integer" || kind === "number") {
    input = h("input", { type: "number", step: kind === "integer" ? 1 : "any", value: text, placeholder: hint,
      min: s.minimum ?? s.exclusiveMinimum, max: s.maximum ?? s.exclusiveMaximum });
  } else {
    input = h("input", { type: "text", value: text, spellcheck: "false", required,
      placeholder: s.examples?.[0] ?? (kind === "list" ? `comma-separated ${s.items.type}s` : hint),
      pattern: kind === "string" ? s.pattern : null, maxlength: kind === "string" ? s.maxLength : null });
  }
  input.name = path;
  input.id = `f-${path}`;
  const label = kind === "boolean" ? h("label", { class: "check" }, input, name) : h("label", { for: input.id, text: name });
  const el = h("div", { class: `field ${kind}`, "data-field": path }, label, kind === "boolean" ? null : input,
    s.description ? h("small", { class: "muted help", text: s.description }) : null,
    text || kind === "list" ? h("small", { class: "muted default", text: `default: ${text || "none"}` }) : null,
    h("div", { class: "ferror" }));

  const number = (t, what) => {
    const x = Number(t);
    if (!Number.isFinite(x) || (what === "integer" && !/^[+-]?\d+$/.test(t))) {
      throw new FieldError(`'${t}' is not ${what === "integer" ? "an integer" : "a number"}`);
    }
    return x;
  };
  const read = () => {
    if (kind === "boolean") return input.checked;
    if (kind === "enum") return input.value === "" ? DEFAULT : s.enum.find((v) => String(v) === input.value);
    const t = input.value.trim();
    if (kind === "integer" || kind === "number") {
      if (input.validity.badInput) throw new FieldError(`not ${kind === "integer" ? "an integer" : "a number"}`);
      return t === "" ? DEFAULT : number(t, kind);
    }
    if (kind === "list") {
      if (t === "" && s.nullable) return DEFAULT;
      const type = s.items.type;
      const items = t.split(",").map((x) => x.trim()).filter((x) => x !== "");
      if (type === "string") return items;
      try {
        return items.map((x) => number(x, type));
      } catch (e) {
        throw new FieldError(`${e.message}; write ${type}s separated by commas, e.g. 8, 16`);
      }
    }
    if (t === "") return required ? "" : DEFAULT;
    if (kind === "json") {
      try { return JSON.parse(t); } catch { throw new FieldError("not JSON; write a JSON value"); }
    }
    return t;
  };
  return { path, def, required, toggles, el, read };
}

// The fields of object schema `s` under `prefix`: a grid of its leaves, then a section per nested object
// (a <fieldset>; a collapsed <details> where SECTIONS says; a nullable object behind a checkbox named by its
// path, sent only when checked). Constants (config.version) have nothing to choose and are left out.
function objectFields(spec, s, prefix, form, toggles = []) {
  const grid = h("div", { class: "grid" });
  const sections = [];
  for (const [name, raw] of Object.entries(s.properties)) {
    const sub = resolve(spec, raw), path = prefix + name;
    if ("const" in sub) continue;
    if (kindOf(sub) !== "object") {
      const leaf = leafField(sub, path, name, !!s.required?.includes(name), toggles);
      form.leaves.push(leaf);
      grid.append(leaf.el);
      continue;
    }
    const opts = SECTIONS[path] || {};
    const about = [sub.description ? h("small", { class: "muted help", text: sub.description }) : null, h("div", { class: "ferror" })];
    if (sub.nullable) {
      const box = h("input", { type: "checkbox", name: path, id: `f-${path}`, checked: sub.default != null });
      const set = h("fieldset", { class: "section", "data-field": path, disabled: !box.checked },
        h("legend", {}, h("label", { class: "check" }, box, opts.title ?? name)), about,
        objectFields(spec, sub, `${path}.`, form, [...toggles, box]));
      box.addEventListener("change", () => { set.disabled = !box.checked; });
      form.toggles.push({ path, box, toggles });
      sections.push(set);
    } else if (opts.collapsed) {
      sections.push(h("details", { class: "section", "data-field": path }, h("summary", { text: opts.title ?? name }), about,
        objectFields(spec, sub, `${path}.`, form, toggles)));
    } else {
      sections.push(h("fieldset", { class: "section", "data-field": path }, h("legend", { text: opts.title ?? name }), about,
        objectFields(spec, sub, `${path}.`, form, toggles)));
    }
  }
  return [grid.childElementCount ? grid : null, ...sections];
}

// The request body: required fields always, others only where changed from their defaults; nested objects only
// where something in them is set (a checked nullable object at least as {}). Parse errors as {field, message}.
function collect(form) {
  const body = {}, errors = [];
  const on = (toggles) => toggles.every((b) => b.checked);
  const put = (path, value) => {
    const keys = path.split(".");
    let o = body;
    for (const k of keys.slice(0, -1)) o = o[k] ??= {};
    o[keys.at(-1)] ??= value;
  };
  for (const f of form.leaves) {
    if (!on(f.toggles)) continue;
    try {
      const v = f.read();
      if (v !== DEFAULT && (f.required || JSON.stringify(v) !== JSON.stringify(f.def))) put(f.path, v);
    } catch (e) {
      if (!(e instanceof FieldError)) throw e;
      errors.push({ field: f.path, message: e.message });
    }
  }
  for (const t of form.toggles) if (t.box.checked && on(t.toggles)) put(t.path, {});
  return { body, errors };
}

async function newJobPage() {
  const signal = page.signal;
  main.replaceChildren(h("p", { class: "muted", text: "loading the job schema…" }));
  let spec;
  try {
    spec = await apiSchema();
  } catch (err) {
    if (!signal.aborted) main.replaceChildren(errorBox(err));
    return;
  }
  if (signal.aborted) return;
  const model = { leaves: [], toggles: [] };
  const form = h("form", { id: "submit", class: "card", novalidate: true },
    h("h2", { text: "New compression job" }),
    h("p", { class: "muted", text: "Every field starts at its default (from the API's schema); only the fields you change are sent." }),
    h("div", { id: "form-error" }),
    objectFields(spec, resolve(spec, { $ref: "#/components/schemas/JobCreate" }), "", model),
    h("button", { type: "submit", class: "primary", text: "Submit" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    form.querySelectorAll(".ferror").forEach((e) => e.replaceChildren());
    form.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
    form.querySelector("#form-error").replaceChildren();
    const { body, errors } = collect(model);
    if (errors.length) {
      const detail = errors.map((e) => `${e.field}: ${e.message}`).join("; ");
      return showErrors(form, new ApiError(0, { detail, errors }));
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await api("/v1/jobs", { method: "POST", body });
      location.hash = "#/jobs";
    } catch (err) {
      showErrors(form, err);
    } finally {
      button.disabled = false;
    }
  });
  main.replaceChildren(form);
}

// The problem's detail above the form, each errors[] message next to its field: the longest name that is a
// prefix of the error's path (config.skip_modules.0 -> config.skip_modules; config.version -> the config section).
function showErrors(form, err) {
  form.querySelector("#form-error").replaceChildren(errorBox(err));
  const boxes = new Map([...form.querySelectorAll("[data-field]")].map((el) => [el.dataset.field, el]));
  for (const e of err.problem?.errors || []) {
    const parts = (e.field || "").split(".");
    while (parts.length && !boxes.has(parts.join("."))) parts.pop();
    const box = parts.length ? boxes.get(parts.join(".")) : null;
    if (!box) continue;
    box.classList.add("invalid");
    box.querySelector(":scope > .ferror").append(h("div", { text: e.message }));
    for (let d = box.closest("details"); d; d = d.parentElement.closest("details")) d.open = true;
  }
}

// ---------------------------------------------------------------------------------------------- routing

function signOut(message) {
  sessionStorage.removeItem(KEY);
  page.abort();
  page = new AbortController();
  signInPage(message);
}

hooks.unauthorized = signOut;

function route() {
  page.abort();
  page = new AbortController();
  if (!sessionStorage.getItem(KEY)) return signInPage();
  nav.hidden = false;
  const [, name, id] = location.hash.split("/");
  if (name === "new") return newJobPage();
  if (name === "jobs" && id) return jobPage(decodeURIComponent(id));
  if (name === "compare") return comparePage(main, (id || "").split(",").filter(Boolean).map(decodeURIComponent), page.signal);
  return jobsPage();
}

document.getElementById("signout").addEventListener("click", () => {
  history.replaceState(null, "", location.pathname); // no hashchange: the message below stays
  signOut("Signed out.");
});
window.addEventListener("hashchange", route);
route();
