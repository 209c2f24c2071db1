// A small live SVG line chart (no library): a rolling time window on x, 0..a round maximum on y,
// one <path> per series (gaps where a value is null), axis labels with units, and the latest
// value as text and as the chart's accessible name (role="img" + aria-label).
import { h } from "./ui.js";

const SVG = "http://www.w3.org/2000/svg";
const W = 320, H = 160;
const PAD = { left: 44, right: 10, top: 10, bottom: 30 };

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.append(document.createTextNode(String(text)));
  return el;
}

// The smallest 1, 2, 2.5 or 5 x 10^k at or above `x` (so the y axis ends on a round number).
export function niceMax(x) {
  if (!(x > 0) || !Number.isFinite(x)) return 1;
  const p = 10 ** Math.floor(Math.log10(x));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x * (1 - 1e-9)) return m * p;
  return 10 * p;
}

// A number for an axis tick or a readout: few digits, no exponent for ordinary magnitudes.
export function short(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1000) return `${(v / 1000).toFixed(a >= 10000 ? 0 : 1)}k`;
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1).replace(/\.0$/, "");
  if (a >= 1) return v.toFixed(2).replace(/\.?0+$/, "");
  return v.toPrecision(2).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

// createChart({title, unit, series: [{key, label}], windowS, describe}) -> {el, update(points)}.
// points: [{t (seconds), [key]: number | null}], oldest first. `unit` labels the y axis and the
// readout; `describe` (optional) names what is charted in the accessible name.
export function createChart({ title, unit, series, windowS = 300, describe = title, id, dataset = {} }) {
  const root = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${describe}: no data yet` });
  const grid = svg("g", { class: "grid" });
  const lines = series.map((s, i) => svg("path", { class: `line s${i}`, d: "", "data-series": s.key, fill: "none" }));
  const dots = series.map((s, i) => svg("circle", { class: `dot s${i}`, r: 2.5, cx: -10, cy: -10 })); // the latest
  const x0 = PAD.left, x1 = W - PAD.right, y0 = H - PAD.bottom, y1 = PAD.top;
  root.append(grid,
    svg("line", { class: "axis", x1: x0, y1: y0, x2: x1, y2: y0 }),
    svg("line", { class: "axis", x1: x0, y1: y1, x2: x0, y2: y0 }),
    svg("text", { x: x0, y: H - 4, "text-anchor": "start" }, `-${Math.round(windowS / 60)} min`),
    svg("text", { x: (x0 + x1) / 2, y: H - 4, "text-anchor": "middle", class: "axis-title" }, "time"),
    svg("text", { x: x1, y: H - 4, "text-anchor": "end" }, "now"),
    svg("text", { x: -(y0 + y1) / 2, y: 10, "text-anchor": "middle", class: "axis-title unit",
      transform: "rotate(-90)" }, unit),
    ...lines, ...dots);

  const latest = h("span", { class: "chart-latest" }, "–");
  const legend = series.length > 1
    ? h("ul", { class: "legend" }, series.map((s, i) => h("li", { class: `s${i}` }, h("span", { class: "swatch", "aria-hidden": "true" }), s.label)))
    : null;
  const el = h("figure", { class: "chart-card", id, dataset: { ...dataset, latest: "" } },
    h("figcaption", {}, h("span", { class: "chart-title" }, title), " ", latest), root, legend);

  function readout(point) {
    if (!point) return "no data yet";
    const none = (v) => v === null || v === undefined || !Number.isFinite(v);
    if (series.every((s) => none(point[s.key]))) return "none in the last interval";
    return series.map((s) => `${series.length > 1 ? `${s.label} ` : ""}${short(point[s.key])}`).join(" · ") + (unit ? ` ${unit}` : "");
  }

  function update(points) {
    const now = points.length ? points[points.length - 1].t : 0;
    const from = now - windowS;
    let max = 0;
    for (const p of points) for (const s of series) if (p[s.key] > max && Number.isFinite(p[s.key])) max = p[s.key];
    const top = niceMax(max);
    const X = (t) => x0 + ((t - from) / windowS) * (x1 - x0);
    const Y = (v) => y0 - (Math.min(v, top) / top) * (y0 - y1);

    grid.replaceChildren();
    for (const f of [0, 0.5, 1]) {
      const y = Y(top * f);
      if (f > 0) grid.append(svg("line", { class: "gridline", x1: x0, y1: y, x2: x1, y2: y }));
      grid.append(svg("text", { x: x0 - 4, y: y + 3, "text-anchor": "end" }, short(top * f)));
    }
    series.forEach((s, i) => {
      let d = "", open = false;
      for (let k = 0; k < points.length; k += 1) {
        const v = points[k][s.key];
        if (v === null || v === undefined || !Number.isFinite(v)) { open = false; continue; }
        const x = X(points[k].t).toFixed(1), y = Y(v).toFixed(1);
        const next = points[k + 1]?.[s.key];
        const alone = !open && (next === null || next === undefined || !Number.isFinite(next));
        d += open ? `L${x} ${y}` : `M${x} ${y}${alone ? "l0.01 0" : ""}`; // a lone point: a round dot
        open = true;
      }
      lines[i].setAttribute("d", d);
      const last = points[points.length - 1]?.[s.key];
      const shown = last !== null && last !== undefined && Number.isFinite(last);
      dots[i].setAttribute("cx", shown ? X(points[points.length - 1].t).toFixed(1) : -10);
      dots[i].setAttribute("cy", shown ? Y(last).toFixed(1) : -10);
    });

    const last = points[points.length - 1];
    const text = readout(last);
    latest.textContent = text;
    root.setAttribute("aria-label", `${describe}: ${last ? `latest ${text}` : text}`);
    const first = last ? last[series[0].key] : null;
    el.dataset.latest = first === null || first === undefined || !Number.isFinite(first) ? "" : String(first);
    for (const s of series) {
      const v = last ? last[s.key] : null;
      el.dataset[`latest_${s.key}`] = v === null || v === undefined || !Number.isFinite(v) ? "" : String(v);
    }
  }

  return { el, update };
}
