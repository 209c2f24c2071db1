// The chat playground (#/chat): an LLM or one of its adapters through OpenAI chat completions,
// streamed token by token. Model output only ever enters the page as text nodes.
import { getJSON, stream } from "../api.js";
import { clearErrors, field, formError, h, none, number, select, servedBy, showError } from "../ui.js";

export const title = "Chat";

// What to type for models whose prompt format is not an ordinary chat (by LLM name).
const PROMPT_HINTS = {
  "tiny-llm": "tiny-llm is a 4-layer character-level toy, not a chat model: its chat template sends only "
    + "your last message, followed by \"=\". The base weights copy it (hello → hello); the adapters "
    + "reverse (abc → cba), upper (abc → ABC), sort (cba → abc) or increment (129 → 230) it. "
    + "Type a short word (prompt and answer share 64 tokens, one per character) and keep temperature 0.",
};

// The LLMs served, one per name (the READY version when there are several).
function llmsOf(served) {
  return servedBy(served, (m) => m.kind === "llm" || m.card?.task === "text-generation");
}

// Stop sequences from a textarea: one per line; \n and \t may be typed as escapes.
function stops(text) {
  return text.split("\n").filter((s) => s !== "")
    .map((s) => s.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]));
}

function numberOf(input) {
  const v = input.value.trim();
  if (v === "") return undefined;
  const n = Number(v);
  return Number.isFinite(n) ? n : v; // the server names the field if it is not a number
}

export async function mount(root, ctx) {
  const llms = llmsOf(ctx.models);
  root.append(h("h1", {}, "Chat"));
  if (!llms.length) {
    root.append(none("text-generation (LLM)"));
    return null;
  }
  // Rendered into a holder appended now: if the user leaves while GET /v1/models is under way,
  // the next page replaces the holder and this mount stops.
  const page = h("div", { class: "chat-page" });
  root.append(page);
  const controllers = new Set();
  let alive = true;
  let running = null; // the AbortController of the answer being streamed
  let history = []; // [{role, content}] sent with the next message
  let epoch = 0; // bumped by "Clear": answers of an older conversation stay out of the new one

  // The OpenAI model ids (GET /v1/models): every LLM and every loaded adapter, by LLM.
  let openaiIds = null;
  try {
    openaiIds = (await getJSON("/v1/models")).data || [];
  } catch (e) {
    console.warn("GET /v1/models failed; using the configured adapters", e);
  }
  if (!page.isConnected) return null;

  function adaptersOf(llm) {
    if (openaiIds) {
      return openaiIds.filter((c) => c.root === llm.name && c.parent)
        .map((c) => [c.id, c.id.startsWith(`${llm.name}/`) ? c.id.slice(llm.name.length + 1) : c.id]);
    }
    return (llm.card?.adapters || []).map((a) => [`${llm.name}/${a}`, a]);
  }

  // -- the form ------------------------------------------------------------------------------------
  const llmSelect = select(llms.map((m) => [m.name, m.state === "READY" ? m.name : `${m.name} (${m.state})`]),
    llms[0].name);
  llmSelect.id = "chat-llm";
  llmSelect.dataset.testid = "chat-llm";
  const adapterSelect = h("select", { id: "chat-adapter", dataset: { testid: "chat-adapter" } });
  const temperature = number(0, { min: 0, max: 2, step: 0.1 });
  temperature.id = "chat-temperature";
  const topP = number(1, { min: 0, max: 1, step: 0.05 });
  topP.id = "chat-top-p";
  const maxTokens = number("", { min: 1, step: 1 });
  maxTokens.id = "chat-max-tokens";
  maxTokens.inputMode = "numeric";
  maxTokens.placeholder = "auto";
  const seed = number("", { step: 1 });
  seed.id = "chat-seed";
  seed.inputMode = "numeric";
  seed.placeholder = "random";
  const stop = h("textarea", { id: "chat-stop", rows: 2, spellcheck: "false", placeholder: "one per line" });
  const system = h("textarea", { id: "chat-system", rows: 2, placeholder: "optional" });
  for (const el of [temperature, topP, maxTokens, seed, stop, system]) el.dataset.testid = el.id;

  const modelHint = h("p", { class: "hint", id: "chat-model-hint", dataset: { testid: "chat-model-hint" } });
  const adapterField = field("Weights", adapterSelect, { param: "model",
    hint: "The base weights, or a LoRA adapter of this LLM (GET /v1/models lists them)." });

  function fillAdapters() {
    const llm = llms.find((m) => m.name === llmSelect.value) || llms[0];
    const base = [llm.name, "base weights"];
    adapterSelect.replaceChildren(...[base, ...adaptersOf(llm)].map(([v, label]) =>
      h("option", { value: v }, label)));
    const total = llm.card?.max_total_tokens;
    modelHint.textContent = PROMPT_HINTS[llm.name]
      || "Each turn sends the whole conversation, rendered by the model's chat template."
        + (total ? ` Prompt and answer share at most ${total} tokens.` : "");
  }
  llmSelect.addEventListener("change", fillAdapters);
  fillAdapters();

  // The sampling fields fold away (closed at first on a phone, so the conversation is in view).
  const sampling = h("details", { class: "sampling", id: "chat-sampling" },
    h("summary", {}, "Sampling"),
    h("div", { class: "fields" },
      field("Temperature", temperature, { param: "temperature", hint: "0 = greedy (deterministic)" }),
      field("Top p", topP, { param: "top_p", hint: "nucleus sampling, 1 = off" }),
      field("Max tokens", maxTokens, { param: "max_tokens", hint: "empty: the rest of the budget" }),
      field("Seed", seed, { param: "seed", hint: "for reproducible sampling" }),
      h("div", { class: "wide" }, field("Stop sequences", stop, { param: "stop",
        hint: "up to 4, one per line (\\n for a newline)" })),
      h("div", { class: "wide" }, field("System message", system, {
        hint: "sent first in every request; tiny-llm ignores it" }))));
  sampling.open = !window.matchMedia("(max-width: 760px)").matches;
  const settings = h("div", { class: "panel", id: "chat-settings" },
    h("h2", {}, "Model and sampling"),
    h("div", { class: "fields" },
      h("div", { class: "wide" }, field("LLM", llmSelect)),
      h("div", { class: "wide" }, adapterField)),
    sampling);

  // -- the conversation ------------------------------------------------------------------------------
  const log = h("div", { class: "chat-log", id: "chat-log", role: "log", "aria-label": "Conversation",
    "aria-live": "polite", tabindex: 0, dataset: { testid: "chat-log" } });
  const empty = h("p", { class: "muted", id: "chat-empty" }, "No messages yet: type one below.");
  const message = h("textarea", { id: "chat-message", rows: 3, dataset: { testid: "chat-message" },
    placeholder: "hello" });
  const send = h("button", { type: "submit", id: "chat-send", dataset: { testid: "chat-send" } }, "Send");
  const stopButton = h("button", { type: "button", class: "ghost", id: "chat-stop-button", disabled: true,
    dataset: { testid: "chat-stop-button" } }, "Stop");
  const clear = h("button", { type: "button", class: "ghost", id: "chat-clear", dataset: { testid: "chat-clear" } },
    "Clear");
  const status = h("p", { class: "hint", id: "chat-status", role: "status", dataset: { testid: "chat-status" } });
  const error = formError();
  error.id = "chat-error";
  error.dataset.testid = "chat-error";
  const messageField = field("Message", message, { param: "messages",
    hint: "Enter sends, Shift+Enter starts a new line." });

  const conversation = h("div", { class: "panel chat-panel", id: "chat-conversation" },
    h("h2", {}, "Conversation"), modelHint, empty, log, messageField,
    h("div", { class: "row" }, send, stopButton, clear), status, error);
  const form = h("form", { class: "split pg", id: "chat-form", novalidate: true }, settings, conversation);
  page.append(form);

  function bubble(role, text, who) {
    const body = h("span", { class: "text" }, text);
    const el = h("div", { class: `msg ${role}`, dataset: { testid: `msg-${role}` } },
      h("span", { class: "who" }, who), body);
    el.body = body;
    log.append(el);
    empty.hidden = true;
    log.scrollTop = log.scrollHeight;
    return el;
  }

  function fail(e) {
    showError(form, e, error);
    const bad = form.querySelector(".field.invalid");
    if (bad && sampling.contains(bad)) {
      sampling.open = true;
      bad.scrollIntoView({ block: "nearest" });
    }
  }

  function setRunning(on) {
    send.disabled = on;
    stopButton.disabled = !on;
    log.setAttribute("aria-busy", on ? "true" : "false");
  }

  function request() {
    const body = { model: adapterSelect.value, messages: [], stream: true, stream_options: { include_usage: true } };
    if (system.value.trim()) body.messages.push({ role: "system", content: system.value });
    body.messages.push(...history);
    for (const [key, input] of [["temperature", temperature], ["top_p", topP], ["max_tokens", maxTokens],
      ["seed", seed]]) {
      const v = numberOf(input);
      if (v !== undefined) body[key] = v;
    }
    const s = stops(stop.value);
    if (s.length) body.stop = s.length === 1 ? s[0] : s;
    return body;
  }

  async function submit() {
    if (running) return;
    const text = message.value;
    clearErrors(form);
    if (!text.trim()) {
      showError(form, { param: "messages", message: "Type a message first." }, error);
      message.focus();
      return;
    }
    const mine = epoch;
    history.push({ role: "user", content: text });
    const body = request();
    const model = body.model;
    const userEl = bubble("user", text, "You");
    const answer = bubble("assistant", "", model);
    answer.classList.add("streaming");
    message.value = "";
    status.textContent = "Generating…";
    const controller = new AbortController();
    running = controller;
    controllers.add(controller);
    setRunning(true);
    let content = "", finish = null, usage = null, started = false;
    try {
      await stream("/v1/chat/completions", body, (data) => {
        if (data === "[DONE]" || !data || typeof data !== "object") return;
        started = true;
        if (data.usage) usage = data.usage;
        const choice = (data.choices || [])[0];
        if (!choice) return;
        const delta = choice.delta?.content;
        if (delta) {
          content += delta;
          answer.body.append(delta);
          log.scrollTop = log.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }, { signal: controller.signal });
      if (mine === epoch) history.push({ role: "assistant", content });
      const tokens = usage ? ` · ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : "";
      status.textContent = `Done (finish: ${finish || "?"})${tokens}.`;
      answer.dataset.finish = finish || "";
      if (!content) answer.append(h("span", { class: "who" }, "(empty answer)"));
    } catch (e) {
      if (!alive || mine !== epoch) return;
      if (e.name === "AbortError") {
        history.push({ role: "assistant", content });
        status.textContent = "Stopped.";
        answer.dataset.finish = "stopped";
        answer.append(h("span", { class: "who stopped" }, "(stopped)"));
      } else if (!started) {
        // Nothing was generated: take the message back so it can be fixed and sent again.
        history.pop();
        userEl.remove();
        answer.remove();
        empty.hidden = log.childElementCount > 0;
        message.value = text;
        status.textContent = "";
        fail(e);
      } else {
        history.push({ role: "assistant", content });
        answer.dataset.finish = "error";
        status.textContent = "";
        fail(e);
      }
    } finally {
      controllers.delete(controller);
      answer.classList.remove("streaming");
      if (running === controller) running = null;
      if (alive) setRunning(false);
    }
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  message.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  stopButton.addEventListener("click", () => running?.abort());
  clear.addEventListener("click", () => {
    epoch += 1;
    running?.abort();
    history = [];
    log.replaceChildren();
    empty.hidden = false;
    status.textContent = "";
    clearErrors(form);
    message.focus();
  });

  return () => {
    alive = false;
    for (const c of controllers) c.abort();
  };
}
