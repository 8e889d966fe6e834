// Helpers of the dashboard's pages: DOM and SVG builders, number formats, the /v1 API with the key of this tab
// (sessionStorage), server-sent events over fetch. Everything from the API is inserted as text.

export const KEY = "pbs2p.key";
export const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
// what a 401 to the stored key does (app.js: sign out)
export const hooks = { unauthorized: (message) => {} };

export function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) el.append(kid);
  return el;
}

export function s(tag, attrs = {}, ...kids) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const kid of kids) el.append(kid);
  return el;
}

export const num = (x, d = 2) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(d));
export const secs = (x) => (x === null || x === undefined ? "n/a" : x < 90 ? `${Math.round(x)} s` : `${Math.round(x / 60)} min`);
export const bytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`);
export const when = (t) => (t ? new Date(t).toLocaleString() : "");
export const badge = (state) => h("span", { class: `badge ${state.toLowerCase()}`, "data-state": state, text: state });

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

export async function api(path, { method = "GET", body, signal, raw = false, key } = {}) {
  key = key ?? sessionStorage.getItem(KEY);
  if (!key) throw new ApiError(401, { detail: "sign in with an API key" });
  const headers = { Authorization: `Bearer ${key}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!res.ok) {
    let problem = {};
    try { problem = await res.json(); } catch { problem = { detail: `${res.status} ${res.statusText}` }; }
    const err = new ApiError(res.status, problem);
    if (res.status === 401 && key === sessionStorage.getItem(KEY)) hooks.unauthorized(err.message);
    throw err;
  }
  return raw ? res : res.json();
}

// Server-sent events over fetch (EventSource cannot send the Authorization header): calls onJob with every
// `job` event of the stream at `url` (a job's links.events, or the tenant's /v1/events) until `end`; reconnects
// after a dropped connection unless `signal` aborts.
export async function follow(url, onJob, signal) {
  while (!signal.aborted) {
    try {
      const res = await api(url, { signal, raw: true });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf = (buf + value).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let event = "message";
          const data = [];
          for (const line of block.split("\n")) {
            const i = line.indexOf(":");
            if (i === 0) continue; // a comment (keep-alive)
            const field = i < 0 ? line : line.slice(0, i);
            const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (field === "event") event = val;
            else if (field === "data") data.push(val);
          }
          if (event === "job") onJob(JSON.parse(data.join("\n")));
          else if (event === "end") return;
        }
      }
    } catch (err) {
      if (signal.aborted || (err instanceof ApiError && err.status !== 503)) return;
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

export function errorBox(err) {
  const box = h("div", { class: "alert", role: "alert", text: err.message });
  const list = err.problem?.errors;
  if (list?.length > 1) box.append(h("ul", {}, list.map((e) => h("li", { text: `${e.field || "body"}: ${e.message}` }))));
  return box;
}
