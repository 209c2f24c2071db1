// The console's only way to the server: fetch with the key, errors normalised, SSE streams read.
// Every route used here is a public API route of the server; nothing is console-only but
// /tandem/v1/session (who am I) and /tandem/v1/models (what is served).

const KEY = "tandem.key";

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

// An error answer of the server, whatever its API's shape (plain, OpenAI, TGI, A1111/FastAPI).
export class ApiError extends Error {
  constructor(status, message, param, body) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.param = param || null; // the request field the error is about, when the server says
    this.body = body;
  }
}

// {status, message, param} from an error body of any of the server's APIs.
export function errorOf(status, body) {
  let message = "", param = null;
  if (body && typeof body === "object") {
    const e = body.error;
    if (e && typeof e === "object") { // OpenAI
      message = String(e.message ?? "");
      param = e.param ?? null;
    } else if (typeof e === "string") { // plain / TGI
      message = e;
      param = body.field ?? body.param ?? null;
    }
    if (body.detail !== undefined && (!message || typeof body.error === "string" && body.error === body.error_type)) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } else if (typeof body === "string") {
    message = body;
  }
  if (!message) message = `HTTP ${status}`;
  if (status === 401) message += " (set the API key with the key button at the top right)";
  if (status === 403) message += " (this needs the admin key)";
  return new ApiError(status, message, param, body);
}

function headers(extra) {
  const h = new Headers(extra || {});
  const key = getKey();
  if (key && !h.has("Authorization")) h.set("Authorization", `Bearer ${key}`);
  return h;
}

async function raise(response) {
  const text = await response.text();
  let body = text;
  try { body = JSON.parse(text); } catch { /* not JSON: keep the text */ }
  throw errorOf(response.status, body);
}

// fetch(path) with the key; throws ApiError unless 2xx. `json` sends a JSON body.
export async function call(method, path, { json, body, signal, accept, contentType } = {}) {
  const h = headers();
  if (json !== undefined) {
    h.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  } else if (contentType) {
    h.set("Content-Type", contentType);
  }
  if (accept) h.set("Accept", accept);
  let response;
  try {
    response = await fetch(path, { method, headers: h, body, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server did not answer (${e.message}); is it still running?`, null, null);
  }
  if (!response.ok) await raise(response);
  return response;
}

export async function getJSON(path, opts = {}) {
  return (await call("GET", path, opts)).json();
}

export async function postJSON(path, json, opts = {}) {
  return (await call("POST", path, { ...opts, json })).json();
}

// POST `json` to an SSE route and call onEvent(data, eventName) for each event until the stream
// ends; `data` is parsed JSON ("[DONE]" stays a string). An `{"error": ...}` event throws ApiError.
export async function stream(path, json, onEvent, { signal } = {}) {
  const response = await call("POST", path, { json, signal, accept: "text/event-stream" });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const event = parseFrame(frame);
      if (event === null) continue;
      if (event.data && typeof event.data === "object" && event.data.error !== undefined && !event.data.type) {
        throw errorOf(400, event.data);
      }
      onEvent(event.data, event.name);
    }
  }
}

function parseFrame(frame) {
  let name = "message";
  const data = [];
  for (const line of frame.split(/\r?\n/)) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return null;
  const text = data.join("\n");
  if (text === "[DONE]") return { name, data: text };
  try { return { name, data: JSON.parse(text) }; } catch { return { name, data: text }; }
}

// The server's view of this tab: {auth: bool, access: "admin" | "user" | null}.
export function session() {
  return getJSON("/tandem/v1/session");
}

// Every model version: {models: [{name, version, kind, state, reason, card, replicas, ...}]}.
export async function models() {
  return (await getJSON("/tandem/v1/models")).models;
}
