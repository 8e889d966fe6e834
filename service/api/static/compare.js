// The comparison view (#/compare/ID,ID,...): finished jobs side by side, from each job's GET /v1/jobs/{id}/report.
// A scatter plot of perplexity after compression against true bits per weight (one point per job, labelled by
// name · method · N:M), a table of the jobs' metrics, and per block and linear each job's N and layer error.

import { h, s, num, api, errorBox } from "./lib.js";

const COLORS = 8; // style.css: .c0 … .c7, one per job (cycling)
const label = (r) => `${r.name || r.job} · ${r.method ?? "?"} · ${r.pattern ?? "?"}`;
const short = (name) => name.replace(/^.*layers\.\d+\./, ""); // model.layers.3.self_attn.q_proj -> self_attn.q_proj

// Axis ticks of [lo, hi]: about `count` round values (1, 2, 5 × 10^k steps), or 1-2-5 decades on a log axis.
function ticks(lo, hi, log, count = 5) {
  if (log) {
    const out = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      for (const m of [1, 2, 5]) {
        const v = m * 10 ** e;
        if (v >= lo && v <= hi) out.push(v);
      }
    }
    return out.length >= 2 ? out : [lo, hi];
  }
  const raw = (hi - lo) / count, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((st) => st >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

// [lo, hi] of `values`, widened by 8 % (a single value: by 5 % of itself) so no point sits on the frame.
function range(values, log) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (log) {
    const pad = (Math.log10(hi) - Math.log10(lo)) * 0.08 || 0.05;
    return [lo / 10 ** pad, hi * 10 ** pad];
  }
  const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.05 || 1;
  return [lo - pad, hi + pad];
}

// Perplexity after compression (y; log scale where the values span more than 10×) against true bits per weight (x).
// The source models' perplexity (ppl_before) is a dashed line.
function scatter(points) {
  const W = 720, H = 360, L = 60, R = 20, T = 16, B = 44;
  const ys = points.flatMap((p) => [p.r.metrics.ppl_after, p.r.metrics.ppl_before]).filter((v) => v > 0);
  const logY = Math.max(...ys) / Math.min(...ys) > 10;
  const [x0, x1] = range(points.map((p) => p.r.metrics.true_bits), false);
  const [y0, y1] = range(ys, logY);
  const fy = logY ? (v) => Math.log10(v) : (v) => v;
  const X = (v) => L + ((W - L - R) * (v - x0)) / (x1 - x0);
  const Y = (v) => T + (H - T - B) * (1 - (fy(v) - fy(y0)) / (fy(y1) - fy(y0)));
  const svg = s("svg", { id: "compare-plot", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "data-yscale": logY ? "log" : "linear",
    "aria-label": "perplexity after compression against true bits per weight, one point per job" });
  for (const v of ticks(x0, x1, false)) {
    svg.append(s("line", { x1: X(v), x2: X(v), y1: T, y2: H - B, class: "grid" }),
      s("text", { x: X(v), y: H - B + 16, class: "tick", "text-anchor": "middle" }, String(v)));
  }
  for (const v of ticks(y0, y1, logY)) {
    svg.append(s("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid" }),
      s("text", { x: L - 6, y: Y(v) + 4, class: "tick", "text-anchor": "end" }, String(Number(v.toPrecision(3)))));
  }
  svg.append(s("text", { x: (L + W - R) / 2, y: H - 6, class: "axis", "text-anchor": "middle" }, "true bits per weight"),
    s("text", { x: 14, y: (T + H - B) / 2, class: "axis", "text-anchor": "middle", transform: `rotate(-90 14 ${(T + H - B) / 2})` },
      `perplexity after${logY ? " (log)" : ""}`));
  // the source models' perplexity (ppl_before): one dashed line per value, named by the jobs that share it
  const sources = new Map();
  for (const p of points) {
    const before = p.r.metrics.ppl_before;
    if (before > 0) sources.set(num(before), [...(sources.get(num(before)) ?? []), p.r.name || p.r.job]);
  }
  for (const [text, jobs] of sources) {
    const y = Y(Number(text));
    svg.append(s("line", { x1: L, x2: W - R, y1: y, y2: y, class: "source" }, s("title", {}, `source model of ${jobs.join(", ")}: perplexity ${text}`)),
      s("text", { x: W - R - 4, y: y - 4, class: "tick", "text-anchor": "end" }, `source model ${text}`));
  }
  // labels right of their points (left of them near the right edge), moved down where two would overlap
  const placed = [];
  for (const p of [...points].sort((a, b) => Y(a.r.metrics.ppl_after) - Y(b.r.metrics.ppl_after))) {
    const m = p.r.metrics, cx = X(m.true_bits), cy = Y(m.ppl_after), text = label(p.r);
    const width = 6.2 * text.length, left = cx + 8 + width > W - R;
    const lx = left ? cx - 8 : cx + 8;
    let ly = cy + 4;
    const [a, b] = left ? [lx - width, lx] : [lx, lx + width];
    while (placed.some((q) => Math.abs(q.y - ly) < 13 && q.a < b && a < q.b)) ly += 13;
    placed.push({ y: ly, a, b });
    svg.append(s("g", { class: `point c${p.color}`, "data-job": p.r.job },
      s("circle", { cx, cy, r: 5 }, s("title", {}, `${text}: perplexity ${num(m.ppl_after)} at ${num(m.true_bits, 3)} bits per weight`)),
      s("text", { x: lx, y: ly, class: "plabel", "text-anchor": left ? "end" : "start" }, text)));
  }
  return svg;
}

function jobsTable(reports) {
  const cols = [["model", (r) => r.model], ["method", (r) => r.method], ["pattern", (r) => r.pattern], ["allocation", (r) => r.allocation],
    ["perplexity before", (r) => num(r.metrics.ppl_before)], ["perplexity after", (r) => num(r.metrics.ppl_after)],
    ["true bits", (r) => num(r.metrics.true_bits, 3)], ["paper bits", (r) => num(r.metrics.paper_bits, 3)],
    ["mean layer error", (r) => num(r.metrics.mean_rel_error, 4)], ["blocks", (r) => String(r.blocks.length)]];
  return h("table", { id: "compare-jobs" },
    h("thead", {}, h("tr", {}, h("th", { text: "job" }), cols.map(([t]) => h("th", { text: t })))),
    h("tbody", {}, reports.map((r, i) => h("tr", { "data-job": r.job },
      h("td", {}, h("span", { class: `swatch c${i % COLORS}` }), h("a", { href: `#/jobs/${r.job}`, text: r.name || r.job })),
      cols.map(([t, f]) => h("td", { class: t === "model" ? "mono" : /bits|perplexity|error|blocks/.test(t) ? "num" : null, text: f(r) ?? "n/a" }))))));
}

// One row per block and linear (the union over the jobs, in block order); per job a column group: the block's N
// (one cell spanning its linears) and each linear's error. A job without that block or linear shows "–".
function blocksTable(reports) {
  const byBlock = new Map();
  for (const r of reports) {
    for (const b of r.blocks) {
      const names = byBlock.get(b.index) ?? [];
      for (const lr of b.linears) if (!names.includes(short(lr.name))) names.push(short(lr.name));
      byBlock.set(b.index, names);
    }
  }
  const find = reports.map((r) => new Map(r.blocks.map((b) => [b.index, { b, lin: new Map(b.linears.map((lr) => [short(lr.name), lr])) }])));
  const rows = [];
  for (const index of [...byBlock.keys()].sort((a, b) => a - b)) {
    const names = byBlock.get(index), span = Math.max(1, names.length);
    (names.length ? names : [""]).forEach((name, k) => {
      const tr = h("tr", { "data-block": index, class: k === 0 ? "first" : null });
      if (k === 0) tr.append(h("td", { class: "num", rowspan: span, text: index }));
      tr.append(h("td", { class: "mono", text: name }));
      reports.forEach((r, j) => {
        const got = find[j].get(index);
        if (k === 0) {
          tr.append(h("td", { class: `num n c${j % COLORS}`, rowspan: span, "data-job": r.job, "data-block": index,
            text: got ? got.b.n_keep : "–", title: got?.b.cosine != null ? `CFS cosine ${num(got.b.cosine, 4)}` : null }));
        }
        const lr = got?.lin.get(name);
        tr.append(h("td", { class: "num err", "data-job": r.job, text: lr ? num(lr.rel_error, 4) : "–" }));
      });
      rows.push(tr);
    });
  }
  return h("table", { id: "compare-blocks" },
    h("thead", {},
      h("tr", {}, h("th", { rowspan: 2, text: "block" }), h("th", { rowspan: 2, text: "linear" }),
        reports.map((r, j) => h("th", { colspan: 2, class: `group c${j % COLORS}`, "data-job": r.job, title: r.model, text: label(r) }))),
      h("tr", {}, reports.flatMap(() => [h("th", { class: "num", text: "N" }), h("th", { class: "num", text: "error" })]))),
    h("tbody", {}, rows));
}

export async function comparePage(main, ids, signal) {
  const back = h("a", { href: "#/jobs", text: "← Jobs" });
  const root = h("section", { id: "compare" }, back, h("p", { class: "muted", text: "loading the reports…" }));
  main.replaceChildren(root);
  if (ids.length < 2) {
    root.replaceChildren(back, h("div", { class: "alert", role: "alert", text: "Tick two or more finished jobs on the Jobs page to compare them." }));
    return;
  }
  const got = await Promise.allSettled(ids.map((id) => api(`/v1/jobs/${encodeURIComponent(id)}/report`, { signal })));
  if (signal.aborted) return;
  const reports = got.filter((g) => g.status === "fulfilled").map((g) => g.value);
  const problems = got.map((g, i) => (g.status === "rejected" ? [ids[i], g.reason] : null)).filter(Boolean)
    .map(([id, err]) => h("div", { class: "alert", role: "alert", "data-job": id, text: `${id}: ${err.message}` }));
  const points = reports.map((r, i) => ({ r, color: i % COLORS })).filter((p) => p.r.metrics.ppl_after > 0 && p.r.metrics.true_bits > 0);
  const unplotted = reports.filter((r) => !points.some((p) => p.r === r));
  root.replaceChildren(back,
    h("div", { class: "titlebar" }, h("h2", { text: `Comparing ${reports.length} jobs` })),
    ...problems,
    reports.length ? h("div", { class: "card scroll" }, jobsTable(reports)) : null,
    reports.length ? h("div", { class: "card" }, h("h3", { text: "Perplexity against true bits per weight" }),
      points.length ? h("div", { class: "chart" }, scatter(points)) : null,
      unplotted.length ? h("p", { class: "muted", id: "unplotted",
        text: `Not plotted (no perplexity: submitted without evaluate): ${unplotted.map(label).join(", ")}` }) : null) : null,
    reports.length ? h("div", { class: "card" }, h("h3", { text: "N and layer error per block, side by side" }),
      h("p", { class: "muted", text: "error: the linear's relative reconstruction error ‖WX − ŴX‖² / ‖WX‖² on its calibration inputs" }),
      h("div", { class: "scroll" }, blocksTable(reports))) : null);
}
