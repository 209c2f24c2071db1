// The metrics page (#/metrics): polls the server's Prometheus /metrics every 2 s and charts, per
// model, the last 5 minutes: requests/s, errors/s, latency p50/p95/p99, batch size (or UNet rows,
// or running LLM sequences) and queue depth. Everything is computed here from two consecutive
// scrapes (prom.js); the server keeps no second set of books for the console.
import { call } from "../api.js";
import { createChart } from "../chart.js";
import { buckets, counterIncrease, gauge, meanOver, parse, quantile } from "../prom.js";
import { field, formError, h, select } from "../ui.js";

export const title = "Metrics";

const POLL_MS = 2000;
const WINDOW_S = 300;
const ALL = "";

function kinds(served) {
  const byName = new Map();
  for (const m of served || []) {
    if (!m.name || m.name === "_unknown") continue;
    if (!byName.has(m.name) || (!byName.get(m.name) && m.kind)) byName.set(m.name, m.kind || "");
  }
  return new Map([...byName.entries()].sort(([a], [b]) => a.localeCompare(b)));
}

// What the "batch" chart of a kind shows.
function batchSpec(kind) {
  if (kind === "diffusion") return { title: "UNet rows per iteration", unit: "rows", what: "mean UNet rows per iteration" };
  if (kind === "llm") return { title: "Running sequences", unit: "sequences", what: "sequences in the KV cache" };
  return { title: "Batch size", unit: "rows", what: "mean rows per predict() call" };
}

// One point of model `model` from scrapes `prev` and `cur` (each {t, samples}).
export function point(model, kind, prev, cur) {
  const dt = cur.t - prev.t;
  const match = { model };
  const ms = (v) => (v === null || v === undefined || !Number.isFinite(v) ? null : v * 1000);
  const lb = buckets(prev.samples, "tandem_request_latency_seconds", match);
  const la = buckets(cur.samples, "tandem_request_latency_seconds", match);
  let batch;
  if (kind === "llm") batch = gauge(cur.samples, "tandem_llm_running", match) ?? 0;
  else if (kind === "diffusion") batch = meanOver(prev.samples, cur.samples, "tandem_diffusion_unet_rows", match);
  else batch = meanOver(prev.samples, cur.samples, "tandem_batch_size", match);
  const waitingName = kind === "llm" ? "tandem_llm_waiting" : kind === "diffusion" ? "tandem_diffusion_waiting" : null;
  return {
    t: cur.t,
    rps: dt > 0 ? counterIncrease(prev.samples, cur.samples, "tandem_requests_total", match) / dt : 0,
    eps: dt > 0 ? counterIncrease(prev.samples, cur.samples, "tandem_request_failures_total", match) / dt : 0,
    p50: ms(quantile(0.5, lb, la)),
    p95: ms(quantile(0.95, lb, la)),
    p99: ms(quantile(0.99, lb, la)),
    batch,
    inflight: gauge(cur.samples, "tandem_in_flight", match) ?? 0,
    waiting: waitingName ? gauge(cur.samples, waitingName, match) ?? 0 : null,
  };
}

function chartsFor(model, kind) {
  const b = batchSpec(kind);
  const queueSeries = [{ key: "inflight", label: "in flight" }];
  if (kind === "llm" || kind === "diffusion") queueSeries.push({ key: "waiting", label: "waiting" });
  const spec = [
    { metric: "requests", title: "Requests/s", unit: "req/s", series: [{ key: "rps", label: "requests" }],
      describe: `Requests per second of ${model}` },
    { metric: "errors", title: "Errors/s", unit: "err/s", series: [{ key: "eps", label: "errors" }],
      describe: `Failed requests (4xx/5xx) per second of ${model}` },
    { metric: "latency", title: "Latency", unit: "ms",
      series: [{ key: "p50", label: "p50" }, { key: "p95", label: "p95" }, { key: "p99", label: "p99" }],
      describe: `Request latency percentiles of ${model}` },
    { metric: "batch", title: b.title, unit: b.unit, series: [{ key: "batch", label: b.title }],
      describe: `${b.what[0].toUpperCase()}${b.what.slice(1)} of ${model}` },
    { metric: "queue", title: "Queue depth", unit: "requests", series: queueSeries,
      describe: `Requests in flight${queueSeries.length > 1 ? " and waiting" : ""} of ${model}` },
  ];
  return spec.map((s) => ({
    metric: s.metric,
    chart: createChart({ ...s, windowS: WINDOW_S, dataset: { model, metric: s.metric } }),
  }));
}

export async function mount(root, ctx) {
  const served = kinds(ctx.models);
  const controller = new AbortController();
  let alive = true, paused = false, timer = null, prev = null, scrapes = 0;
  const history = new Map([...served.keys()].map((name) => [name, []]));

  root.append(h("h1", {}, "Metrics"),
    h("p", { class: "hint intro" }, "Live from the server's Prometheus ", h("code", {}, "/metrics"),
      ` every ${POLL_MS / 1000} s: rates and latency percentiles over each interval, the last `,
      `${WINDOW_S / 60} minutes (kept in this tab only).`));
  if (!served.size) {
    root.append(h("p", { class: "empty" }, "This server serves no model."));
    return null;
  }

  const chooser = select([[ALL, "All models"], ...[...served.keys()].map((n) => [n, n])], ALL);
  chooser.id = "metrics-model";
  const pause = h("button", { type: "button", class: "ghost", id: "metrics-pause", "aria-pressed": "false" }, "Pause");
  const status = h("p", { id: "metrics-status", class: "hint", role: "status" }, "Reading /metrics…");
  const error = formError();
  error.id = "metrics-error";
  root.append(h("div", { class: "row toolbar" }, field("Model", chooser), pause), status, error);

  const sections = new Map();
  for (const [name, kind] of served) {
    const charts = chartsFor(name, kind);
    const heading = h("h2", { id: `metrics-${name}-title` }, name, " ", h("span", { class: "sub inline" }, kind || ""));
    const section = h("section", { class: "model-metrics", dataset: { model: name },
      "aria-labelledby": heading.id }, heading, h("div", { class: "charts" }, charts.map((c) => c.chart.el)));
    sections.set(name, { section, charts });
    root.append(section);
  }

  function draw() {
    for (const [name, { charts }] of sections) {
      const points = history.get(name);
      for (const c of charts) c.chart.update(points);
    }
  }

  chooser.addEventListener("change", () => {
    for (const [name, { section }] of sections) section.hidden = chooser.value !== ALL && chooser.value !== name;
  });
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (paused) {
      clearTimeout(timer);
      status.textContent = "Paused.";
    } else {
      prev = null; // the paused gap is not one interval
      tick();
    }
  });

  async function tick() {
    timer = null;
    try {
      const response = await call("GET", "/metrics", { signal: controller.signal, accept: "text/plain" });
      const text = await response.text();
      if (!alive || paused) return;
      const cur = { t: Date.now() / 1000, samples: parse(text) };
      if (prev && cur.t > prev.t) {
        for (const [name, kind] of served) {
          const points = history.get(name);
          points.push(point(name, kind, prev, cur));
          while (points.length && points[0].t < cur.t - WINDOW_S) points.shift();
        }
      }
      prev = cur;
      scrapes += 1;
      draw();
      error.hidden = true;
      status.textContent = scrapes === 1 ? "First scrape read; the charts start with the next one."
        : `Updated ${new Date(cur.t * 1000).toLocaleTimeString()} · ${scrapes} scrapes`;
    } catch (e) {
      if (!alive || e.name === "AbortError") return;
      error.textContent = `Could not read /metrics: ${e.message}`;
      error.hidden = false;
    } finally {
      if (alive && !paused && timer === null) timer = setTimeout(tick, POLL_MS);
    }
  }

  draw();
  tick();
  return () => {
    alive = false;
    clearTimeout(timer);
    controller.abort();
  };
}
