// The drawing studio (#/draw): text-to-image through the OpenAI Images API, streamed with progress
// events and previews, plus this tab's history (memory + sessionStorage) with "again with this seed".
import { stream } from "../api.js";
import { clearErrors, field, formError, h, none, number, select, servedBy, showError } from "../ui.js";

export const title = "Draw";

const HISTORY_KEY = "tandem.draw.history";
const HISTORY_MAX = 40; // runs kept; each holds its (tiny) PNGs as base64
const PNG = "data:image/png;base64,";

// -- history: this tab's runs, newest first --------------------------------------------------------
function loadHistory() {
  try {
    const runs = JSON.parse(sessionStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(runs) ? runs.filter((r) => r && r.params && Array.isArray(r.images)).slice(0, HISTORY_MAX) : [];
  } catch {
    return [];
  }
}

function saveHistory(runs) {
  // Drop the oldest runs until the rest fit in sessionStorage (a few MB per origin).
  for (let keep = runs.length; keep >= 0; keep -= 1) {
    try {
      if (keep) sessionStorage.setItem(HISTORY_KEY, JSON.stringify(runs.slice(0, keep)));
      else sessionStorage.removeItem(HISTORY_KEY);
      return;
    } catch { /* quota: try with fewer */ }
  }
}

// The text-to-image models, one per name (the READY version's card when there are several).
function drawModels(served) {
  return servedBy(served, (m) => (m.kind === "diffusion" || m.card?.task === "text-to-image") && !!m.card);
}

function intOr(value, fallback) {
  const n = Number.parseInt(value, 10);
  return Number.isFinite(n) ? n : fallback;
}

export async function mount(root, ctx) {
  const models = drawModels(ctx.models);
  root.append(h("h1", {}, "Draw"));
  if (!models.length) {
    root.append(none("text-to-image"));
    return null;
  }

  let history = loadHistory();
  let controller = null;
  let running = false;
  let alive = true;

  // -- the form ------------------------------------------------------------------------------------
  const modelSelect = select(models.map((m) => [m.name, m.state === "READY" ? m.name : `${m.name} (${m.state})`]),
    models[0].name);
  modelSelect.id = "draw-model";
  modelSelect.dataset.testid = "draw-model";
  const prompt = h("textarea", { id: "draw-prompt", rows: 3, dataset: { testid: "draw-prompt" },
    placeholder: "a red circle on a blue background" });
  const negative = h("textarea", { id: "draw-negative", rows: 2, dataset: { testid: "draw-negative" },
    placeholder: "what the image should not show" });
  const size = h("select", { id: "draw-size", dataset: { testid: "draw-size" } });
  const sampler = h("select", { id: "draw-sampler", dataset: { testid: "draw-sampler" } });
  const steps = number("", { min: 1, step: 1 });
  steps.id = "draw-steps";
  steps.dataset.testid = "draw-steps";
  steps.inputMode = "numeric";
  const guidance = number("", { min: 0, step: 0.5 });
  guidance.id = "draw-guidance";
  guidance.dataset.testid = "draw-guidance";
  const n = number(1, { min: 1, step: 1 });
  n.id = "draw-n";
  n.dataset.testid = "draw-n";
  n.inputMode = "numeric";
  // Text, not type=number: seeds go up to 2**63 and a bad one is passed on for the server to name.
  const seed = h("input", { id: "draw-seed", type: "text", inputmode: "numeric", autocomplete: "off",
    spellcheck: "false", placeholder: "random", dataset: { testid: "draw-seed" } });
  const random = h("input", { id: "draw-random", type: "checkbox", checked: true,
    dataset: { testid: "draw-random" } });
  const randomLabel = h("label", { class: "draw-check", for: "draw-random" }, random, " Random seed");
  seed.addEventListener("input", () => { random.checked = seed.value.trim() === ""; });

  const modelField = models.length > 1
    ? field("Model", modelSelect, { param: "model" })
    : h("div", { class: "field", dataset: { param: "model" } },
      h("p", { class: "draw-model-name", id: "draw-model-name" }, h("span", { class: "muted" }, "Model: "),
        models[0].name, models[0].state === "READY" ? "" : ` (${models[0].state})`),
      h("p", { class: "field-error", role: "alert", hidden: true }));
  const seedField = field("Seed", seed, { param: "seed",
    hint: "Random: a new seed each run (the one used is filled in). Type one to reuse it." });
  seedField.control.after(randomLabel);

  const errorBox = formError();
  errorBox.id = "draw-form-error";
  errorBox.dataset.testid = "draw-form-error";
  const generateButton = h("button", { type: "submit", id: "draw-generate", dataset: { testid: "draw-generate" } },
    "Generate");
  const cancelButton = h("button", { type: "button", class: "ghost", id: "draw-cancel", disabled: true,
    dataset: { testid: "draw-cancel" }, onclick: () => controller?.abort() }, "Cancel");

  const wide = (el) => { el.classList.add("wide"); return el; };
  const form = h("form", { class: "panel draw-form", id: "draw-form", novalidate: true, "aria-label": "Image settings" },
    h("div", { class: "fields" },
      wide(modelField),
      wide(field("Prompt", prompt, { param: "prompt", hint: "Ctrl+Enter generates." })),
      wide(field("Negative prompt", negative, { param: "negative_prompt" })),
      field("Size", size, { param: "size" }),
      field("Sampler", sampler, { param: "sampler" }),
      field("Steps", steps, { param: "steps" }),
      field("Guidance", guidance, { param: "guidance_scale" }),
      seedField,
      field("Images", n, { param: "n" })),
    errorBox,
    h("div", { class: "row draw-actions" }, generateButton, cancelButton));

  // -- the output ----------------------------------------------------------------------------------
  const progress = h("progress", { id: "draw-progress", max: 1, value: 0, "aria-label": "Generation progress",
    dataset: { testid: "draw-progress" } });
  const status = h("p", { id: "draw-status", role: "status", "aria-live": "polite", class: "muted",
    dataset: { testid: "draw-status", state: "idle" } }, "Describe an image and press Generate.");
  const results = h("div", { id: "draw-results", class: "draw-results", dataset: { testid: "draw-results" } });
  const seedUsed = h("p", { id: "draw-seed-used", class: "draw-seed-used", hidden: true,
    dataset: { testid: "draw-seed-used" } });
  const output = h("section", { class: "panel draw-output", id: "draw-output", "aria-label": "Result" },
    progress, status, results, seedUsed);

  const gallery = h("div", { class: "gallery draw-history", id: "draw-history", dataset: { testid: "draw-history" } });
  const clearButton = h("button", { type: "button", class: "ghost", id: "draw-clear",
    dataset: { testid: "draw-clear" } }, "Clear history");
  const historySection = h("section", { class: "draw-history-section", "aria-labelledby": "draw-history-title" },
    h("div", { class: "row draw-history-head" }, h("h2", { id: "draw-history-title" }, "History"), clearButton),
    h("p", { class: "hint" }, `This tab's last ${HISTORY_MAX} runs (kept until the tab closes).`),
    gallery);

  root.append(h("div", { class: "split draw" }, form, output), historySection);

  // -- model settings ------------------------------------------------------------------------------
  function current() {
    return models.find((m) => m.name === modelSelect.value) || models[0];
  }

  function applyCard(keep = false) {
    const c = current().card;
    const sizes = c.sizes?.length ? c.sizes : [];
    const samplers = c.samplers?.length ? c.samplers : [];
    const was = { size: size.value, sampler: sampler.value };
    size.replaceChildren(...sizes.map((s) => h("option", { value: s }, s)));
    sampler.replaceChildren(...samplers.map((s) => h("option", { value: s }, s)));
    size.value = keep && sizes.includes(was.size) ? was.size : sizes[0] || "";
    sampler.value = keep && samplers.includes(was.sampler) ? was.sampler : c.default_sampler || samplers[0] || "";
    steps.min = c.min_steps ?? 1;
    if (c.max_steps) steps.max = c.max_steps;
    if (!keep || steps.value === "") steps.value = c.default_steps ?? 20;
    if (c.max_guidance !== undefined) guidance.max = c.max_guidance;
    if (!keep || guidance.value === "") guidance.value = c.default_guidance ?? 7.5;
    if (c.max_images) n.max = c.max_images;
  }
  modelSelect.addEventListener("change", () => applyCard(true));
  applyCard();

  // -- a run ---------------------------------------------------------------------------------------
  function setStatus(text, state) {
    status.textContent = text;
    status.dataset.state = state;
  }

  function setRunning(on) {
    running = on;
    generateButton.disabled = on;
    cancelButton.disabled = !on;
    form.setAttribute("aria-busy", on ? "true" : "false");
  }

  // The request body from the form; a field the console cannot read goes in as typed, so the
  // server's message about it is what the user sees.
  function readForm() {
    const params = {
      model: current().name,
      prompt: prompt.value,
      negative_prompt: negative.value,
      size: size.value,
      sampler: sampler.value,
    };
    for (const [key, el, parse] of [["steps", steps, Number], ["guidance_scale", guidance, Number], ["n", n, Number]]) {
      if (el.validity.badInput) {
        throw Object.assign(new Error(`${key} must be a number`), { param: key });
      }
      if (el.value.trim() !== "") params[key] = parse(el.value);
    }
    const s = seed.value.trim();
    if (!random.checked && s !== "") {
      params.seed = /^-?\d+$/.test(s) && Number.isSafeInteger(Number(s)) ? Number(s) : s;
    }
    return params;
  }

  // What the server used for the fields left empty: the model's defaults (its card).
  function defaults(params) {
    const c = models.find((m) => m.name === params.model)?.card || {};
    const out = {};
    if (params.steps === undefined && c.default_steps !== undefined) out.steps = c.default_steps;
    if (params.guidance_scale === undefined && c.default_guidance !== undefined) out.guidance_scale = c.default_guidance;
    return out;
  }

  function fillForm(p) {
    if (models.some((m) => m.name === p.model)) modelSelect.value = p.model;
    applyCard(true);
    prompt.value = p.prompt ?? "";
    negative.value = p.negative_prompt ?? "";
    if (p.size) size.value = p.size;
    if (p.sampler) sampler.value = p.sampler;
    steps.value = p.steps ?? "";
    guidance.value = p.guidance_scale ?? "";
    n.value = p.n ?? 1;
    if (p.seed !== undefined && p.seed !== null) {
      seed.value = String(p.seed);
      random.checked = false;
    }
  }

  function slot(i, total) {
    let img = results.querySelector(`img[data-index="${i}"]`);
    if (!img) {
      img = h("img", { class: "result", alt: `Image ${i + 1} of ${total}`, dataset: { index: String(i),
        testid: `draw-image-${i}` } });
      results.append(img);
    }
    return img;
  }

  async function generate() {
    if (running) return;
    clearErrors(form);
    let params;
    try {
      params = readForm();
    } catch (e) {
      showError(form, e, errorBox);
      return;
    }
    if (!models.some((m) => m.name === params.model)) {
      showError(form, new Error(`model ${params.model} is not served any more`), errorBox);
      return;
    }
    const total = Number.isInteger(params.n) && params.n > 0 && params.n <= 64 ? params.n : 1;
    const body = { ...params, stream: true, progress: true, partial_images: 3, output_format: "png" };
    const mine = new AbortController();
    controller = mine;
    setRunning(true);
    setStatus("Starting…", "starting");
    progress.removeAttribute("value"); // indeterminate until the first step
    progress.dataset.step = "0";
    results.replaceChildren();
    results.setAttribute("aria-busy", "true");
    seedUsed.hidden = true;
    const finals = [];
    let usedSeed = null;
    let partialIndex = -1;
    let partialCount = 0;
    const started = performance.now();

    const onEvent = (data) => {
      if (!alive || !data || typeof data !== "object") return;
      if (data.type === "image_generation.progress") {
        if (data.kind === "queued") {
          setStatus(`Waiting: queue position ${data.queue_position}`, "queued");
        } else if (data.kind === "step" && data.steps) {
          progress.max = data.steps;
          progress.value = data.step;
          progress.dataset.step = String(data.step);
          setStatus(`Step ${data.step} of ${data.steps}`, "running");
        }
      } else if (data.type === "image_generation.partial_image" && data.b64_json) {
        if (data.partial_image_index !== partialIndex) { partialIndex = data.partial_image_index; partialCount = 0; }
        const i = partialCount++;
        if (i >= finals.length) { // a final image is never replaced by a preview
          const img = slot(i, total);
          img.dataset.state = "preview";
          img.src = PNG + data.b64_json;
        }
      } else if (data.type === "image_generation.completed" && data.b64_json) {
        const i = finals.length;
        finals.push(data.b64_json);
        if (data.seed !== undefined) usedSeed = data.seed;
        const img = slot(i, total);
        img.dataset.state = "final";
        img.src = PNG + data.b64_json;
      }
    };

    try {
      await stream("/v1/images/generations", body, onEvent, { signal: mine.signal });
      if (!alive) return;
      if (!finals.length) throw new Error("the server ended the stream without an image");
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const run = { id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, created: Date.now(),
        params: { ...params, ...defaults(params), seed: usedSeed, n: finals.length }, images: finals };
      progress.max = 1;
      progress.value = 1;
      if (usedSeed !== null) {
        seed.value = String(usedSeed);
        seedUsed.replaceChildren("Seed used: ", h("code", { id: "draw-seed-value", dataset: { testid: "draw-seed-value" } },
          String(usedSeed)));
        seedUsed.hidden = false;
      }
      setStatus(`Done: ${finals.length} image${finals.length > 1 ? "s" : ""} in ${seconds} s`, "done");
      history = [run, ...history].slice(0, HISTORY_MAX);
      saveHistory(history);
      renderHistory();
    } catch (e) {
      if (!alive) return;
      progress.value = 0;
      if (e.name === "AbortError") {
        setStatus("Cancelled.", "cancelled");
      } else {
        showError(form, e, errorBox);
        setStatus(`Failed: ${e.message}`, "error");
      }
    } finally {
      if (controller === mine) controller = null;
      results.removeAttribute("aria-busy");
      if (alive) setRunning(false);
    }
  }

  form.addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  });

  // -- history -------------------------------------------------------------------------------------
  function entry(run) {
    const p = run.params;
    const rows = [["Prompt", p.prompt], ["Negative", p.negative_prompt || "—"], ["Size", p.size], ["Steps", p.steps],
      ["Guidance", p.guidance_scale], ["Sampler", p.sampler], ["Seed", p.seed], ["Images", p.n], ["Model", p.model]];
    const list = h("dl", { class: "draw-params" });
    for (const [k, v] of rows) {
      list.append(h("dt", {}, k), h("dd", { dataset: { key: k.toLowerCase() } }, v === undefined || v === null ? "default" : String(v)));
    }
    const images = h("div", { class: "draw-entry-images" }, run.images.map((b64, i) => h("img", {
      src: PNG + b64, alt: `${p.prompt} (seed ${p.seed}${run.images.length > 1 ? `, image ${i + 1}` : ""})`,
      dataset: { testid: "draw-entry-image" }, loading: "lazy" })));
    const downloads = run.images.map((b64, i) => h("a", {
      class: "button draw-download", href: PNG + b64, download: `tandem-${p.seed}${run.images.length > 1 ? `-${i + 1}` : ""}.png`,
      dataset: { testid: "draw-download" },
    }, run.images.length > 1 ? `Download PNG ${i + 1}` : "Download PNG"));
    const again = h("button", { type: "button", class: "draw-again", dataset: { testid: "draw-again" },
      onclick: () => {
        if (running) return;
        fillForm(p);
        output.scrollIntoView({ block: "nearest" });
        generate();
      } }, "Again with this seed");
    return h("figure", { class: "draw-entry", dataset: { testid: "draw-entry", id: run.id, seed: String(p.seed) } },
      images, h("figcaption", {}, list), h("div", { class: "row draw-entry-actions" }, again, ...downloads));
  }

  function renderHistory() {
    gallery.replaceChildren(...(history.length ? history.map(entry)
      : [h("p", { class: "muted draw-history-empty" }, "No images yet.")]));
    clearButton.disabled = !history.length;
  }
  clearButton.addEventListener("click", () => {
    history = [];
    saveHistory(history);
    renderHistory();
  });
  renderHistory();

  return () => {
    alive = false;
    controller?.abort();
  };
}
