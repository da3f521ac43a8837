// Entry point: loads the settings (GET /labels), watches readiness (GET /readyz) and switches
// between the four views (tabs, also reachable as #image, #live, #video, #retrieve).

import { describe, setApiKey } from "./api.js";
import { initImage } from "./image.js";
import { initLive } from "./live.js";
import { initRetrieve } from "./retrieve.js";
import { loadSettings } from "./settings.js";
import { startStatus } from "./status.js";
import { $, say } from "./ui.js";
import { initVideo } from "./video.js";

const VIEWS = ["image", "live", "video", "retrieve"];
const controllers = {};
let currentView = null;

function selectView(name, { focusTab = false, updateHash = true } = {}) {
  if (!VIEWS.includes(name)) name = "image";
  if (name === currentView) return;
  if (currentView) controllers[currentView]?.hide();
  for (const view of VIEWS) {
    const tab = $(`tab-${view}`);
    const on = view === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`view-${view}`).hidden = !on;
  }
  // Retrieve takes no class list or prompt set; face detection applies everywhere.
  $("settings").dataset.view = name;
  currentView = name;
  controllers[name]?.show();
  if (focusTab) $(`tab-${name}`).focus();
  if (updateHash && location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function initTabs() {
  const list = document.querySelector('[role="tablist"]');
  list.addEventListener("click", (event) => {
    const tab = event.target.closest('[role="tab"]');
    if (tab) selectView(tab.id.replace("tab-", ""));
  });
  list.addEventListener("keydown", (event) => {
    const index = VIEWS.indexOf(currentView);
    const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: VIEWS.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const next = (moves[event.key] + VIEWS.length) % VIEWS.length;
    selectView(VIEWS[next], { focusTab: true });
  });
  window.addEventListener("hashchange", () => selectView(location.hash.slice(1), { updateHash: false }));
}

async function main() {
  // A key entered for a locked service: kept for the tab, then the page starts over with it.
  $("api-key").addEventListener("change", (event) => {
    setApiKey(event.target.value.trim());
    location.reload();
  });
  startStatus();
  controllers.image = initImage();
  controllers.live = initLive();
  controllers.video = initVideo();
  controllers.retrieve = initRetrieve();
  initTabs();
  selectView(location.hash.slice(1) || "image", { updateHash: Boolean(location.hash) });
  try {
    await loadSettings();
  } catch (error) {
    say($("image-message"), `The class presets could not be loaded: ${describe(error)}`, "error");
  }
  document.body.dataset.ready = "true";
}

main();
