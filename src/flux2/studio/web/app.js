// The page's start: the service's configuration, then each part; tabs and the light/dark switch.

import { api } from "./api.js";
import { setupCanvas } from "./canvas.js";
import { $, $$ } from "./dom.js";
import { setupEditModes } from "./editmodes.js";
import { setupProjects } from "./elements.js";
import { setupGallery } from "./gallery.js";
import { setupGenerate } from "./generate.js";
import { setupQueue } from "./queue.js";
import { setupLoras, setupReferences } from "./refs.js";
import { on, state } from "./state.js";

const THEME = "flux2.theme";

function setupTabs() {
  const tabs = $$("[role=tab]");
  const select = (tab) => {
    for (const other of tabs) {
      const chosen = other === tab;
      other.setAttribute("aria-selected", String(chosen));
      other.tabIndex = chosen ? 0 : -1;
      $(`#${other.getAttribute("aria-controls")}`).hidden = !chosen;
    }
  };
  for (const [i, tab] of tabs.entries()) {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => { // arrow keys move between tabs (the ARIA tabs pattern)
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      select(next);
      next.focus();
    });
  }
  on("tab", (name) => select($(`#tab-${name}`)));
}

function setupTheme() {
  const dark = window.matchMedia("(prefers-color-scheme: dark)").matches;
  const apply = (theme) => {
    document.documentElement.dataset.theme = theme;
    $("#theme").textContent = theme === "dark" ? "Light" : "Dark";
    $("#theme").setAttribute("aria-label", `Switch to the ${theme === "dark" ? "light" : "dark"} theme`);
    localStorage.setItem(THEME, theme);
  };
  apply(localStorage.getItem(THEME) || (dark ? "dark" : "light"));
  $("#theme").addEventListener("click", () => apply(document.documentElement.dataset.theme === "dark" ? "light" : "dark"));
}

async function start() {
  setupTheme();
  setupTabs();
  state.config = await api("/web/config");
  $("#served").textContent = `model: ${state.config.served}`;
  setupGenerate();
  setupReferences();
  setupGallery();
  setupCanvas();
  setupEditModes();
  setupQueue();
  await setupLoras();
  await setupProjects();
  document.body.dataset.ready = "true"; // for tests and scripts: every part is wired
}

start().catch((err) => {
  document.body.prepend(Object.assign(document.createElement("p"), { className: "error", role: "alert",
    textContent: `The page could not start: ${err.message}` }));
});
