// The embeddings playground (#/embed): a few texts through OpenAI /v1/embeddings, shown as their
// cosine-similarity matrix. Texts (the user's) enter the page as text nodes only.
import { postJSON } from "../api.js";
import { clearErrors, field, formError, h, none, select, servedBy, showError } from "../ui.js";

export const title = "Embeddings";

const EXAMPLES = [
  "A cat sleeps on the warm windowsill.",
  "A kitten is napping in the sun by the window.",
  "The stock market fell sharply on Monday.",
  "Shares dropped as investors worried about rates.",
].join("\n");

// The embedding models served, one per name (the READY version when there are several).
function embeddingModels(served) {
  return servedBy(served, (m) => m.card?.task === "embeddings");
}

// Cosine similarities of the rows of `vectors` (n x n).
export function cosineMatrix(vectors) {
  const norms = vectors.map((v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0)) || 1);
  return vectors.map((a, i) => vectors.map((b, j) => {
    let dot = 0;
    for (let k = 0; k < a.length; k += 1) dot += a[k] * b[k];
    return dot / (norms[i] * norms[j]);
  }));
}

function cell(value, i, j) {
  const td = h("td", { dataset: { testid: "sim", i: String(i), j: String(j), value: String(value) } },
    value.toFixed(3));
  // Shade by similarity (negative similarities stay white); set from script, which the CSP allows.
  const alpha = Math.max(0, Math.min(1, value));
  td.style.backgroundColor = `rgb(47 95 224 / ${(alpha * 0.85).toFixed(3)})`;
  if (alpha > 0.55) td.classList.add("strong");
  return td;
}

function matrixTable(texts, sims) {
  const head = h("tr", {}, h("th", { scope: "col" }, "Text"),
    texts.map((_, j) => h("th", { scope: "col", title: texts[j] }, String(j + 1))));
  const rows = texts.map((text, i) => h("tr", {},
    h("th", { scope: "row", class: "text-cell", title: text },
      h("span", { class: "t" }, h("span", { class: "n" }, `${i + 1}. `), text)),
    sims[i].map((v, j) => cell(v, i, j))));
  return h("table", { class: "matrix", id: "embed-matrix", dataset: { testid: "embed-matrix" } },
    h("caption", {}, "Cosine similarity of each pair of texts (1 = same direction)"),
    h("thead", {}, head), h("tbody", {}, rows));
}

export async function mount(root, ctx) {
  const models = embeddingModels(ctx.models);
  root.append(h("h1", {}, "Embeddings"));
  if (!models.length) {
    root.append(none("embedding"));
    return null;
  }
  let controller = null;

  const modelSelect = select(models.map((m) => [m.name, m.state === "READY" ? m.name : `${m.name} (${m.state})`]),
    models[0].name);
  modelSelect.id = "embed-model";
  modelSelect.dataset.testid = "embed-model";
  const texts = h("textarea", { id: "embed-texts", rows: 7, dataset: { testid: "embed-texts" } });
  texts.value = EXAMPLES;
  const run = h("button", { type: "submit", id: "embed-run", dataset: { testid: "embed-run" } }, "Embed");
  const error = formError();
  error.id = "embed-error";
  error.dataset.testid = "embed-error";
  const modelHint = h("p", { class: "hint", id: "embed-model-hint" });
  function describe() {
    const m = models.find((x) => x.name === modelSelect.value);
    const dim = m?.card?.embedding_dim;
    modelHint.textContent = dim ? `${m.name} returns ${dim}-dimensional vectors.` : "";
  }
  modelSelect.addEventListener("change", describe);
  describe();

  const form = h("form", { class: "panel", id: "embed-form", novalidate: true },
    h("div", { class: "fields" },
      h("div", { class: "wide" }, field("Model", modelSelect, { param: "model" }), modelHint),
      h("div", { class: "wide" }, field("Texts, one per line", texts, { param: "input",
        hint: "Each non-empty line is one input; all go in one request." }))),
    h("div", { class: "row actions" }, run), error);

  const summary = h("p", { id: "embed-summary", role: "status", dataset: { testid: "embed-summary" } });
  const matrix = h("div", { class: "table-wrap", id: "embed-matrix-wrap", hidden: true });
  const results = h("section", { class: "panel", id: "embed-results", "aria-labelledby": "embed-results-title" },
    h("h2", { id: "embed-results-title" }, "Similarity"),
    summary, matrix);
  summary.textContent = "Press Embed to compare the texts.";
  root.append(h("div", { class: "split pg" }, form, results));

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors(form);
    const input = texts.value.split("\n").map((t) => t.trim()).filter(Boolean);
    if (!input.length) {
      showError(form, { param: "input", message: "Type at least one text." }, error);
      texts.focus();
      return;
    }
    controller?.abort();
    const mine = controller = new AbortController();
    run.disabled = true;
    summary.textContent = "Embedding…";
    const started = performance.now();
    try {
      const out = await postJSON("/v1/embeddings", { model: modelSelect.value, input },
        { signal: mine.signal });
      const vectors = [...out.data].sort((a, b) => a.index - b.index).map((d) => d.embedding);
      const ms = performance.now() - started;
      const dim = vectors[0]?.length ?? 0;
      const tokens = out.usage?.prompt_tokens;
      summary.replaceChildren(
        h("span", { dataset: { testid: "embed-count" } }, `${vectors.length} text${vectors.length === 1 ? "" : "s"}`),
        " · ", h("span", { dataset: { testid: "embed-dim" } }, `${dim} dimensions`),
        " · ", h("span", { dataset: { testid: "embed-tokens" } }, `${tokens ?? "?"} tokens`),
        " · ", `${Math.round(ms)} ms`, ` · model ${out.model}`);
      matrix.replaceChildren(matrixTable(input, cosineMatrix(vectors)));
      matrix.hidden = false;
    } catch (err) {
      if (err.name === "AbortError") return;
      summary.textContent = "";
      matrix.hidden = true;
      showError(form, err, error);
    } finally {
      if (controller === mine) {
        controller = null;
        run.disabled = false;
      }
    }
  });

  return () => controller?.abort();
}
