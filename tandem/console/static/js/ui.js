// DOM helpers. Text always goes in as text nodes (never innerHTML), so model output and server
// messages can never become markup.

// h("div", {class: "x", onclick: fn}, "text", child, ...): an element.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (v === false && !(k in el)) continue; // an absent boolean attribute
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

let ids = 0;
export function uid(prefix = "f") {
  ids += 1;
  return `${prefix}-${ids}`;
}

// A labelled control with an error slot; `param` names the request field its errors come under.
// Returns the wrapper; the control is wrapper.control.
export function field(label, control, { param, hint } = {}) {
  control.id ||= uid(param || "f");
  const error = h("p", { class: "field-error", id: `${control.id}-error`, role: "alert", hidden: true });
  const described = [error.id];
  let hintEl = null;
  if (hint) {
    hintEl = h("p", { class: "hint", id: `${control.id}-hint` }, hint);
    described.push(hintEl.id);
  }
  control.setAttribute("aria-describedby", described.join(" "));
  const wrap = h("div", { class: "field", dataset: { param: param || "" } },
    h("label", { for: control.id }, label), control, hintEl, error);
  wrap.control = control;
  return wrap;
}

// Show `err` (an ApiError or Error) next to the field it names inside `form`, else in `fallback`.
export function showError(form, err, fallback) {
  clearErrors(form);
  const param = err && err.param;
  const slot = param ? form.querySelector(`.field[data-param="${CSS.escape(param)}"]`) : null;
  if (slot) {
    const p = slot.querySelector(".field-error");
    p.textContent = err.message;
    p.hidden = false;
    slot.classList.add("invalid");
    slot.control?.setAttribute?.("aria-invalid", "true");
    slot.querySelector("input,select,textarea")?.setAttribute("aria-invalid", "true");
    return;
  }
  if (fallback) {
    fallback.textContent = err ? err.message : "";
    fallback.hidden = !err;
  }
}

export function clearErrors(form) {
  for (const slot of form.querySelectorAll(".field.invalid")) {
    slot.classList.remove("invalid");
    slot.querySelector(".field-error").hidden = true;
    slot.querySelector("[aria-invalid]")?.removeAttribute("aria-invalid");
  }
  for (const p of form.querySelectorAll(".form-error")) p.hidden = true;
}

// A form-level error paragraph (role=alert), hidden until set.
export function formError() {
  return h("p", { class: "form-error", role: "alert", hidden: true });
}

export function select(options, value) {
  const s = h("select");
  for (const o of options) {
    const [v, label] = Array.isArray(o) ? o : [o, o];
    s.append(h("option", { value: v, selected: v === value }, label));
  }
  return s;
}

export function number(value, { min, max, step } = {}) {
  return h("input", { type: "number", value, min, max, step, inputmode: "decimal" });
}

export function bytes(n) {
  if (!n) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// A page-level empty state: no model of this kind is served.
export function none(what) {
  return h("p", { class: "empty" }, `This server serves no ${what} model. `,
    h("a", { href: "#/models" }, "See the models page."));
}

// The served models `wanted(m)` picks, one per name: the READY version when there are several.
export function servedBy(served, wanted) {
  const byName = new Map();
  for (const m of served || []) {
    if (!wanted(m)) continue;
    const seen = byName.get(m.name);
    if (!seen || (seen.state !== "READY" && m.state === "READY")) byName.set(m.name, m);
  }
  return [...byName.values()];
}
