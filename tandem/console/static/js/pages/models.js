// The models page (#/models): every served model with its versions, state, replicas and memory,
// and the Triton repository actions: load (re-read the folder: start the new version beside the
// old, then retire the old) and unload. Both need the admin key; the table refreshes every 5 s.
import { call, models as listModels } from "../api.js";
import { bytes, formError, h } from "../ui.js";

export const title = "Models";

const REFRESH_MS = 5000;

// The entries of one name, newest version last (versions are strings: numeric when they look so).
function group(entries) {
  const byName = new Map();
  for (const m of entries || []) {
    if (!byName.has(m.name)) byName.set(m.name, []);
    byName.get(m.name).push(m);
  }
  const cmp = (a, b) => String(a.version).localeCompare(String(b.version), undefined, { numeric: true });
  return new Map([...byName.entries()].sort(([a], [b]) => a.localeCompare(b))
    .map(([name, list]) => [name, list.slice().sort(cmp)]));
}

// replaceChildren / append without the null placeholders of optional parts.
function kids(...parts) {
  return parts.flat().filter((p) => p !== null && p !== undefined && p !== false);
}

function stateOf(list) {
  return list.some((m) => m.state === "READY") ? "READY" : "UNAVAILABLE";
}

function kindCell(list) {
  const known = list.find((m) => m.kind) || list[0];
  const task = known?.card?.task;
  return [h("span", { class: "kind" }, known?.kind || "–"), task ? h("span", { class: "sub" }, task) : null];
}

function versionCell(list) {
  return list.map((m) => h("span", { class: "line" }, m.version || "–"));
}

function stateCell(list) {
  return list.map((m) => h("span", { class: "line" },
    h("span", { class: `state state-${m.state}` }, m.state),
    list.length > 1 ? h("span", { class: "sub inline" }, ` v${m.version}`) : null,
    m.state !== "READY" && m.reason ? h("span", { class: "sub reason" }, m.reason) : null));
}

function replicaCell(list) {
  const items = [];
  for (const m of list) {
    for (const r of m.replicas || []) {
      items.push(h("li", { dataset: { pid: String(r.pid) } },
        list.length > 1 ? `v${m.version} ` : "",
        `#${r.replica} `, h("span", { class: "device" }, r.device || "?"),
        ` · pid ${r.pid} · `,
        h("span", { class: r.ready ? "ok" : "warn" }, r.ready ? "ready" : "starting"),
        ` · ${r.restarts} restart${r.restarts === 1 ? "" : "s"}`));
    }
  }
  return items.length ? h("ul", { class: "replicas" }, items) : h("span", { class: "muted" }, "none");
}

function memoryCell(list) {
  const rss = list.flatMap((m) => m.replicas || []).reduce((a, r) => a + (r.rss_bytes || 0), 0);
  const limit = Math.max(0, ...list.map((m) => m.memory_limit || 0));
  return [h("span", { class: "rss", dataset: { bytes: String(rss) } }, bytes(rss)),
    limit ? h("span", { class: "sub" }, `limit ${bytes(limit)} per replica`) : null];
}

export async function mount(root, ctx) {
  const needsAdmin = Boolean(ctx.session?.auth && ctx.session.access !== "admin");
  const controller = new AbortController();
  const busy = new Map(); // name -> {op, started}
  const rows = new Map(); // name -> {tr, cells, load, unload, progress}
  let grouped = group(ctx.models);
  let refreshing = null;
  let alive = true;

  const status = h("p", { id: "models-status", class: "hint", role: "status", "aria-live": "polite" });
  const error = formError();
  error.id = "models-error";
  const updated = h("span", { id: "models-updated", class: "hint" });
  const refreshButton = h("button", { type: "button", class: "ghost", id: "models-refresh", onclick: () => refresh() },
    "Refresh");
  const tbody = h("tbody");
  const table = h("table", { id: "models-table" },
    h("caption", { class: "sr-only" }, "Served models, their versions, state, replicas and memory"),
    h("thead", {}, h("tr", {}, ["Model", "Kind", "Version", "State", "Replicas", "Memory", "Actions"]
      .map((c) => h("th", { scope: "col" }, c)))),
    tbody);

  // The unload confirmation: a modal dialog (Escape or Cancel keeps the model; focus returns).
  const confirmText = h("p", { id: "unload-text" });
  const confirmButton = h("button", { type: "submit", value: "unload", class: "danger", id: "unload-confirm" }, "Unload");
  const dialog = h("dialog", { id: "unload-dialog", "aria-labelledby": "unload-title", "aria-describedby": "unload-text" },
    h("form", { method: "dialog" },
      h("h2", { id: "unload-title" }, "Unload model?"), confirmText,
      h("div", { class: "row" }, confirmButton,
        h("button", { type: "submit", value: "cancel", class: "ghost", id: "unload-cancel", autofocus: true }, "Cancel"))));
  let pendingUnload = null;
  dialog.addEventListener("close", () => {
    const name = pendingUnload;
    pendingUnload = null;
    if (dialog.returnValue === "unload" && name) act(name, "unload");
  });

  root.append(...kids(
    h("h1", {}, "Models"),
    h("p", { class: "hint intro" }, "Every model the server serves. ",
      h("strong", {}, "Load"), " re-reads the model's repository folder: a new version starts beside the old one, ",
      "which retires once the new one serves. ", h("strong", {}, "Unload"), " retires every version."),
    needsAdmin ? h("p", { id: "models-admin-note", class: "notice", role: "note" },
      "Loading and unloading needs the admin key: set it with the key button at the top right. ",
      "With the API key this page only shows the models.") : null,
    h("div", { class: "row toolbar" }, refreshButton, updated),
    status, error,
    h("div", { class: "table-wrap models-wrap" }, table),
    dialog));

  function askUnload(name) {
    pendingUnload = name;
    confirmText.textContent = `Every version of ${name} stops serving: its requests fail until it is loaded again.`;
    dialog.querySelector("h2").textContent = `Unload ${name}?`;
    dialog.returnValue = "";
    dialog.showModal();
  }

  function rowFor(name) {
    let row = rows.get(name);
    if (row) return row;
    const cells = ["name", "kind", "version", "state", "replicas", "memory"].map((c) => h("td", { class: `c-${c}` }));
    const hidden = (text) => h("span", { class: "sr-only" }, text);
    const load = h("button", { type: "button", dataset: { action: "load" }, disabled: needsAdmin,
      title: "Re-read the repository folder: start the newest version beside the old one, then retire the old",
      onclick: () => act(name, "load") }, h("span", { class: "label" }, "Load"), hidden(` ${name}`));
    const unload = h("button", { type: "button", class: "ghost danger-ghost", dataset: { action: "unload" },
      disabled: needsAdmin, title: "Retire every version of this model", onclick: () => askUnload(name) },
    "Unload", hidden(` ${name}`));
    const progress = h("div", { class: "op", hidden: true },
      h("progress", { "aria-label": `${name}: operation in progress` }), h("span", { class: "op-text" }));
    const actions = h("td", { class: "c-actions" }, h("div", { class: "row" }, load, unload), progress);
    const tr = h("tr", { dataset: { model: name } }, cells, actions);
    row = { tr, cells: Object.fromEntries(cells.map((td) => [td.className.slice(2), td])), load, unload, progress };
    rows.set(name, row);
    return row;
  }

  function renderRow(name) {
    const list = grouped.get(name) || [];
    const row = rowFor(name);
    const state = stateOf(list);
    row.tr.dataset.state = state;
    row.cells.name.replaceChildren(h("strong", {}, name));
    row.cells.kind.replaceChildren(...kids(kindCell(list)));
    row.cells.version.replaceChildren(...kids(versionCell(list)));
    row.cells.state.replaceChildren(...kids(stateCell(list)));
    row.cells.replicas.replaceChildren(replicaCell(list));
    row.cells.memory.replaceChildren(...kids(memoryCell(list)));
    row.load.querySelector(".label").textContent = state === "READY" ? "Roll over" : "Load";
    const op = busy.get(name);
    row.load.disabled = needsAdmin || Boolean(op);
    row.unload.disabled = needsAdmin || Boolean(op) || state !== "READY";
    row.tr.dataset.busy = op ? op.op : "";
    row.progress.hidden = !op;
    if (op) {
      const s = Math.floor((Date.now() - op.started) / 1000);
      row.progress.querySelector(".op-text").textContent = `${op.op === "load" ? "Loading" : "Unloading"}… ${s} s`;
    }
  }

  function render() {
    const names = [...grouped.keys()];
    for (const name of [...rows.keys()]) {
      if (!grouped.has(name) && !busy.has(name)) { rows.get(name).tr.remove(); rows.delete(name); }
    }
    for (const name of names) renderRow(name);
    const want = names.map((n) => rows.get(n).tr);
    const have = [...tbody.children];
    if (want.length !== have.length || want.some((tr, i) => tr !== have[i])) tbody.replaceChildren(...want);
    if (!names.length) {
      tbody.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "This server serves no model.")));
    }
    const ready = names.filter((n) => stateOf(grouped.get(n)) === "READY").length;
    table.dataset.count = String(names.length);
    updated.textContent = `${names.length} model${names.length === 1 ? "" : "s"}, ${ready} ready · updated ${new Date().toLocaleTimeString()}`;
  }

  async function refresh() {
    if (refreshing) return refreshing;
    refreshing = (async () => {
      try {
        const entries = await listModels();
        if (!alive) return;
        grouped = group(entries);
        render();
        if (error.dataset.source === "refresh") { error.hidden = true; error.dataset.source = ""; }
      } catch (e) {
        if (!alive || e.name === "AbortError") return;
        error.textContent = `Could not refresh the models: ${e.message}`;
        error.dataset.source = "refresh";
        error.hidden = false;
      } finally {
        refreshing = null;
      }
    })();
    return refreshing;
  }

  async function act(name, op) {
    if (busy.has(name)) return;
    busy.set(name, { op, started: Date.now() });
    error.hidden = true;
    status.textContent = op === "load"
      ? `Loading ${name}: starting the new version (this takes a few seconds)…`
      : `Unloading ${name}…`;
    renderRow(name);
    try {
      await call("POST", `/v2/repository/models/${encodeURIComponent(name)}/${op}`, { signal: controller.signal });
      if (!alive) return;
      status.textContent = op === "load" ? `${name} loaded: the new version serves.` : `${name} unloaded.`;
    } catch (e) {
      if (!alive || e.name === "AbortError") return;
      status.textContent = "";
      error.textContent = `${op === "load" ? "Loading" : "Unloading"} ${name} failed: ${e.message}`;
      error.dataset.source = "action";
      error.hidden = false;
    } finally {
      busy.delete(name);
      if (alive) {
        await refresh();
        if (rows.has(name)) renderRow(name);
      }
    }
  }

  render();
  const timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  const ticker = setInterval(() => { for (const name of busy.keys()) renderRow(name); }, 1000);

  return () => {
    alive = false;
    clearInterval(timer);
    clearInterval(ticker);
    controller.abort();
    if (dialog.open) dialog.close();
  };
}
