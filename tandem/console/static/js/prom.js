// The Prometheus text exposition format (version 0.0.4, what prometheus_client writes), parsed, and
// the arithmetic a console needs between two scrapes: counter increases that survive resets (a
// worker restart starts its counters at 0 again), rates, histogram quantiles over an interval
// (like PromQL's histogram_quantile(q, rate(x_bucket[...]))), means of histogram sums per count.
// Everything here is pure (no DOM, no fetch), so tests can call it directly.

// A sample value: a float, or +Inf / -Inf / NaN as the format spells them.
export function num(text) {
  const s = String(text).trim();
  if (s === "+Inf" || s === "Inf" || s === "+inf" || s === "inf") return Infinity;
  if (s === "-Inf" || s === "-inf") return -Infinity;
  if (s === "NaN" || s === "nan") return NaN;
  const n = Number(s);
  if (s === "" || Number.isNaN(n)) throw new SyntaxError(`not a number: ${JSON.stringify(s)}`);
  return n;
}

// The label set inside `{...}` starting at text[i] === "{"; returns [labels, index after "}"].
function parseLabels(text, i) {
  const labels = {};
  i += 1; // "{"
  for (;;) {
    while (text[i] === " " || text[i] === "\t" || text[i] === ",") i += 1;
    if (text[i] === "}") return [labels, i + 1];
    const start = i;
    while (i < text.length && /[A-Za-z0-9_:.]/.test(text[i])) i += 1;
    const key = text.slice(start, i);
    while (text[i] === " " || text[i] === "\t") i += 1;
    if (!key || text[i] !== "=") throw new SyntaxError(`bad label at ${JSON.stringify(text.slice(start, start + 20))}`);
    i += 1;
    while (text[i] === " " || text[i] === "\t") i += 1;
    if (text[i] !== '"') throw new SyntaxError(`label ${key}: value not quoted`);
    i += 1;
    let value = "";
    for (;;) {
      if (i >= text.length) throw new SyntaxError(`label ${key}: unterminated value`);
      const c = text[i];
      if (c === "\\") {
        const next = text[i + 1];
        value += next === "n" ? "\n" : next === '"' ? '"' : next === "\\" ? "\\" : `\\${next ?? ""}`;
        i += 2;
      } else if (c === '"') {
        i += 1;
        break;
      } else {
        value += c;
        i += 1;
      }
    }
    labels[key] = value;
  }
}

// parse(text) -> [{name, labels, value}], in order; HELP/TYPE lines and comments are skipped, as
// are blank lines; a line that is not a sample throws SyntaxError (with its line number).
export function parse(text) {
  const samples = [];
  const lines = String(text).split(/\r?\n/);
  for (let n = 0; n < lines.length; n += 1) {
    const line = lines[n].trim();
    if (!line || line.startsWith("#")) continue;
    try {
      let i = 0;
      while (i < line.length && /[A-Za-z0-9_:]/.test(line[i])) i += 1;
      const name = line.slice(0, i);
      if (!name) throw new SyntaxError("no metric name");
      let labels = {};
      if (line[i] === "{") [labels, i] = parseLabels(line, i);
      const rest = line.slice(i).trim().split(/\s+/); // value [timestamp]
      if (!rest[0]) throw new SyntaxError("no value");
      samples.push({ name, labels, value: num(rest[0]) });
    } catch (e) {
      throw new SyntaxError(`line ${n + 1}: ${e.message}`);
    }
  }
  return samples;
}

// A stable key of a label set, leaving out the labels named in `without`.
export function seriesKey(labels, without = []) {
  return Object.keys(labels || {}).filter((k) => !without.includes(k)).sort()
    .map((k) => `${k}=${JSON.stringify(labels[k])}`).join(",");
}

// The samples called `name` whose labels include every pair of `match`.
export function select(samples, name, match = {}) {
  return (samples || []).filter((s) => s.name === name
    && Object.entries(match).every(([k, v]) => s.labels[k] === v));
}

// How much a counter grew from `before` to `after`: never negative. A smaller `after` is a reset
// (the counter restarted at 0 and counted `after` since), as Prometheus' increase() reads it; a
// missing `before` (the series appeared since) counts from 0.
export function increase(before, after) {
  if (after === undefined || after === null || Number.isNaN(after)) return 0;
  if (before === undefined || before === null || Number.isNaN(before)) return Math.max(0, after);
  return after >= before ? after - before : Math.max(0, after);
}

// Per-second rate of a counter between two scrapes `seconds` apart (0 when seconds <= 0).
export function rate(before, after, seconds) {
  return seconds > 0 ? increase(before, after) / seconds : 0;
}

// The increase of the sum of every `name` series matching `match` (e.g. requests over every
// endpoint and status), taken series by series so a reset of one is not hidden by the others.
export function counterIncrease(samplesBefore, samplesAfter, name, match = {}) {
  const before = new Map(select(samplesBefore, name, match).map((s) => [seriesKey(s.labels), s.value]));
  let total = 0;
  for (const s of select(samplesAfter, name, match)) total += increase(before.get(seriesKey(s.labels)), s.value);
  return total;
}

// The sum of the matching gauges; null when none is exposed.
export function gauge(samples, name, match = {}) {
  const found = select(samples, name, match);
  return found.length ? found.reduce((a, s) => a + s.value, 0) : null;
}

// The cumulative buckets of histogram `name` (the `_bucket` series) matching `match`, summed over
// any other label: [{le, count}] sorted by le, +Inf last (le === Infinity).
export function buckets(samples, name, match = {}) {
  const byLe = new Map();
  for (const s of select(samples, `${name}_bucket`, match)) {
    const le = num(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  return [...byLe.entries()].map(([le, count]) => ({ le, count })).sort((a, b) => a.le - b.le);
}

function total(bs) {
  return bs && bs.length ? bs[bs.length - 1].count : 0;
}

// The buckets' growth from `before` to `after` (both cumulative [{le, count}]). A histogram whose
// total count shrank was reset: its `after` counts are the interval's. Missing `before` = zeros.
export function bucketDelta(before, after) {
  const after_ = (after || []).slice().sort((a, b) => a.le - b.le);
  if (!before || !before.length || total(after_) < total(before)) return after_.map((b) => ({ ...b }));
  const prev = new Map(before.map((b) => [b.le, b.count]));
  let floor = 0; // keep the deltas cumulative (monotonic) whatever the rounding
  return after_.map((b) => {
    floor = Math.max(floor, b.count - (prev.get(b.le) ?? 0));
    return { le: b.le, count: floor };
  });
}

// The q-quantile (0 <= q <= 1) of what a histogram observed between two scrapes, from its
// cumulative buckets before and after: linear interpolation inside the bucket the rank falls in
// (the first bucket's lower bound is 0), the highest finite bound when it falls in +Inf, like
// Prometheus' histogram_quantile. null when nothing was observed in the interval.
export function quantile(q, bucketsBefore, bucketsAfter) {
  const bs = bucketDelta(bucketsBefore, bucketsAfter);
  if (!bs.length) return null;
  const count = total(bs);
  if (!(count > 0) || Number.isNaN(q)) return null;
  if (q < 0) return -Infinity;
  if (q > 1) return Infinity;
  const rank = q * count;
  let i = bs.findIndex((b) => b.count >= rank);
  if (i < 0) i = bs.length - 1;
  if (!Number.isFinite(bs[i].le)) { // in +Inf: the highest finite bound
    const finite = bs.filter((b) => Number.isFinite(b.le));
    return finite.length ? finite[finite.length - 1].le : null;
  }
  const upper = bs[i].le;
  const lower = i > 0 ? bs[i - 1].le : 0;
  const below = i > 0 ? bs[i - 1].count : 0;
  if (i === 0 && upper <= 0) return upper;
  const inBucket = bs[i].count - below;
  if (inBucket <= 0) return upper;
  return lower + (upper - lower) * ((rank - below) / inBucket);
}

// The mean observation of histogram `name` between two scrapes (_sum growth / _count growth),
// e.g. rows per batch; null when nothing was observed. A shrunk count is a reset.
export function meanOver(samplesBefore, samplesAfter, name, match = {}) {
  const sb = gauge(samplesBefore, `${name}_sum`, match), sa = gauge(samplesAfter, `${name}_sum`, match);
  const cb = gauge(samplesBefore, `${name}_count`, match), ca = gauge(samplesAfter, `${name}_count`, match);
  if (ca === null) return null;
  const reset = cb !== null && ca < cb;
  const dc = reset || cb === null ? ca : ca - cb;
  const ds = reset || sb === null ? (sa ?? 0) : (sa ?? 0) - sb;
  return dc > 0 ? ds / dc : null;
}

// The distinct values of label `label` across samples named `name` (e.g. every model seen).
export function labelValues(samples, name, label) {
  return [...new Set(select(samples, name).map((s) => s.labels[label]).filter((v) => v !== undefined))];
}
