// The image-classification playground (#/classify): an uploaded or dropped image's bytes POSTed to
// /predictions/{model} as they are (with the file's content type); the top classes shown as bars.
import { call } from "../api.js";
import { clearErrors, field, formError, h, none, select, servedBy, showError } from "../ui.js";

export const title = "Classify";

const TOP = 5;

// The image classifiers served, one per name (the READY version when there are several).
function classifiers(served) {
  return servedBy(served, (m) => m.card?.task === "image-classification");
}

function percent(score) {
  const p = score * 100;
  return `${p >= 10 || p === 0 ? p.toFixed(1) : p.toPrecision(2)}%`;
}

function bars(predictions) {
  return predictions.slice(0, TOP).map((p, i) => {
    const score = Math.max(0, Math.min(1, Number(p.score) || 0));
    const fill = h("div", { class: "fill" });
    fill.style.width = `${(score * 100).toFixed(2)}%`; // from script: allowed by the CSP
    return h("li", { class: "bar", dataset: { testid: "bar", rank: String(i + 1), label: String(p.label),
      score: String(p.score) } },
    h("span", { class: "label", dataset: { testid: "bar-label" } }, String(p.label)),
    h("div", { class: "track", "aria-hidden": "true" }, fill),
    h("span", { class: "pct", dataset: { testid: "bar-pct" } }, percent(score)));
  });
}

export async function mount(root, ctx) {
  const models = classifiers(ctx.models);
  root.append(h("h1", {}, "Image classification"));
  if (!models.length) {
    root.append(none("image-classification"));
    return null;
  }
  let controller = null;
  let file = null;
  let previewUrl = null;

  const modelSelect = select(models.map((m) => [m.name, m.state === "READY" ? m.name : `${m.name} (${m.state})`]),
    models[0].name);
  modelSelect.id = "classify-model";
  modelSelect.dataset.testid = "classify-model";
  const input = h("input", { type: "file", id: "classify-file", accept: "image/*",
    dataset: { testid: "classify-file" } });
  const run = h("button", { type: "submit", id: "classify-run", disabled: true, dataset: { testid: "classify-run" } },
    "Classify");
  const error = formError();
  error.id = "classify-error";
  error.dataset.testid = "classify-error";
  const chosen = h("p", { class: "hint", id: "classify-chosen", dataset: { testid: "classify-chosen" } },
    "No image chosen.");
  const drop = h("div", { class: "drop", id: "classify-drop", dataset: { testid: "classify-drop" } },
    h("p", {}, "Drop an image here, or choose a file:"),
    field("Image file", input, { hint: "JPEG, PNG, WebP, GIF, BMP... sent to the model as it is." }),
    chosen);

  const preview = h("img", { class: "preview", id: "classify-preview", alt: "", hidden: true,
    dataset: { testid: "classify-preview" } });
  preview.addEventListener("error", () => { preview.hidden = true; });
  const status = h("p", { class: "hint", id: "classify-status", role: "status", dataset: { testid: "classify-status" } });
  const list = h("ol", { class: "bars", id: "classify-bars", "aria-label": "Top classes",
    dataset: { testid: "classify-bars" } });
  const weights = h("p", { class: "hint", id: "classify-weights" });
  status.textContent = `Choose or drop an image: its top ${TOP} classes appear here.`;

  const form = h("form", { class: "panel", id: "classify-form", novalidate: true },
    h("div", { class: "fields" }, h("div", { class: "wide" }, field("Model", modelSelect)),
      h("div", { class: "wide" }, drop)),
    h("div", { class: "row actions" }, run), error);
  const results = h("section", { class: "panel", id: "classify-results", "aria-labelledby": "classify-results-title" },
    h("h2", { id: "classify-results-title" }, "Result"), preview, status, list, weights);
  root.append(h("div", { class: "split pg" }, form, results));

  function choose(f) {
    if (!f) return;
    file = f;
    chosen.textContent = `${f.name || "image"} · ${f.type || "unknown type"} · ${f.size} bytes`;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(f);
    preview.alt = `The image chosen: ${f.name || "image"}`;
    preview.src = previewUrl;
    preview.hidden = false;
    run.disabled = false;
    classify();
  }

  async function classify() {
    if (!file) return;
    clearErrors(form);
    controller?.abort();
    const mine = controller = new AbortController();
    const model = modelSelect.value;
    run.disabled = true;
    list.replaceChildren();
    weights.textContent = "";
    status.textContent = "Classifying…";
    const started = performance.now();
    try {
      const response = await call("POST", `/predictions/${encodeURIComponent(model)}`, {
        body: file, contentType: file.type || "application/octet-stream", signal: mine.signal,
      });
      const out = await response.json();
      const predictions = Array.isArray(out.predictions) ? out.predictions : [];
      list.replaceChildren(...bars(predictions));
      const top = predictions[0];
      status.textContent = top
        ? `${model}: ${top.label} (${percent(top.score)}) in ${Math.round(performance.now() - started)} ms`
        : `${model} returned no classes.`;
      if (out.weights) weights.textContent = `Weights: ${out.weights}`;
    } catch (e) {
      if (e.name === "AbortError") return;
      status.textContent = "";
      showError(form, e, error);
    } finally {
      if (controller === mine) {
        controller = null;
        run.disabled = !file;
      }
    }
  }

  input.addEventListener("change", () => choose(input.files?.[0]));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    classify();
  });
  modelSelect.addEventListener("change", () => { if (file) classify(); });

  // Drag and drop onto the zone; a file dropped elsewhere on the page must not navigate away.
  let depth = 0;
  drop.addEventListener("dragenter", (e) => {
    e.preventDefault();
    depth += 1;
    drop.classList.add("over");
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    if (e.dataTransfer) e.dataTransfer.dropEffect = "copy";
  });
  drop.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) drop.classList.remove("over");
  });
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    e.stopPropagation();
    depth = 0;
    drop.classList.remove("over");
    choose(e.dataTransfer?.files?.[0]);
  });
  const swallow = (e) => {
    if (e.dataTransfer?.types?.includes("Files")) e.preventDefault();
  };
  window.addEventListener("dragover", swallow);
  window.addEventListener("drop", swallow);

  return () => {
    controller?.abort();
    window.removeEventListener("dragover", swallow);
    window.removeEventListener("drop", swallow);
    if (previewUrl) URL.revokeObjectURL(previewUrl);
  };
}
