// The console shell: hash routes to page modules, the key dialog, the banner.
// A page module (pages/NAME.js) exports `title` and `mount(root, ctx)`, which may return a
// cleanup function that runs when the user leaves the page (stop timers, abort requests).
import { getKey, models, session, setKey } from "./api.js";
import { h } from "./ui.js";

const PAGES = ["draw", "chat", "embed", "classify", "models", "metrics"];
let cleanup = null;
let generation = 0;

function banner(message) {
  const el = document.getElementById("banner");
  el.replaceChildren(...(message ? [message] : []));
  el.hidden = !message;
}

async function who() {
  try {
    return await session();
  } catch (e) {
    return { auth: false, access: null, error: e };
  }
}

async function show() {
  const name = (location.hash.match(/^#\/([a-z]+)/) || [])[1] || "draw";
  const page = PAGES.includes(name) ? name : "draw";
  const mine = ++generation;
  if (cleanup) { try { cleanup(); } catch (e) { console.warn(e); } cleanup = null; }
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = document.getElementById("main");
  delete main.dataset.page;
  main.replaceChildren(h("p", { class: "loading" }, "Loading…"));
  const me = await who();
  updateKeyButton(me);
  if (me.auth && !me.access) {
    banner("This server needs an API key: set it with the key button at the top right.");
  } else {
    banner("");
  }
  let served = [];
  try {
    served = await models();
  } catch (e) {
    if (mine !== generation) return;
    main.replaceChildren(h("h1", {}, "Tandem"), h("p", { class: "form-error", role: "alert" },
      `Could not list the models: ${e.message}`));
    return;
  }
  const module = await import(`./pages/${page}.js`);
  if (mine !== generation) return;
  document.title = `${module.title} · Tandem console`;
  main.replaceChildren();
  const ctx = { models: served, session: me, banner, refresh: () => show() };
  const done = (await module.mount(main, ctx)) || null;
  if (mine !== generation) { // the user moved on while the page was mounting
    if (done) done();
    return;
  }
  cleanup = done;
  main.dataset.page = page; // mounted (tests wait for it)
}

function updateKeyButton(me) {
  const button = document.getElementById("key-button");
  const access = me.access === "admin" ? "admin key" : me.access === "user" ? "API key" : "no key";
  button.textContent = me.auth ? `Key: ${getKey() ? access : "not set"}` : "API key";
  button.title = me.auth ? "This server checks API keys" : "This server checks no keys";
}

function keyDialog() {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-button").addEventListener("click", async () => {
    const me = await who();
    document.getElementById("key-status").textContent = !me.auth
      ? "This server checks no keys: every page works without one."
      : me.access === "admin" ? "The key set is the admin key: every page, including model management."
        : me.access === "user" ? "The key set is the API key: every page; loading and unloading models needs the admin key."
          : "No valid key is set.";
    input.value = getKey();
    dialog.showModal();
    input.focus();
  });
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "save") setKey(input.value.trim());
    if (dialog.returnValue === "clear") setKey("");
    if (dialog.returnValue === "save" || dialog.returnValue === "clear") show();
  });
}

keyDialog();
window.addEventListener("hashchange", show);
show();
