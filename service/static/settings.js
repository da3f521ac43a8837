// The settings shared by the views: class list (a preset or the user's own words), prompt set and
// face detection. Filled from GET /labels; views read `current()` and `follow()` its changes.

import { getJSON } from "./api.js";
import { $, el } from "./ui.js";

const CUSTOM = "__custom__";
const listeners = new Set();
let labels = null;

const preset = () => $("class-preset");
const custom = () => $("custom-classes");
const promptSet = () => $("prompt-set");
const detect = () => $("detect-faces");

/** Words typed by the user, split and tidied like the API does. */
function customWords() {
  return custom()
    .value.split(",")
    .map((w) => w.trim().split(/\s+/).join(" "))
    .filter(Boolean);
}

/** The form fields every inference request takes: {classes, prompts, detect_faces}. */
export function current() {
  const usingCustom = preset().value === CUSTOM && customWords().length > 0;
  return {
    classes: usingCustom ? customWords().join(",") : preset().value === CUSTOM ? undefined : preset().value,
    prompts: promptSet().value || undefined,
    detect_faces: detect().checked,
  };
}

/** The class words the current settings stand for (shown in the hints and the exact prompts). */
function currentClassWords() {
  if (preset().value === CUSTOM) return customWords();
  return labels?.class_presets?.[preset().value] || [];
}

function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

/**
 * Keeps a view's result in step with the settings: `run` is called again when they change while the
 * view is shown, or when it is shown again after they changed. The view calls `ran()` as it sends.
 */
export function follow(run) {
  let shown = false;
  let ranWith = ""; // the settings of the last request; empty until the view has one
  subscribe(() => {
    if (shown && ranWith) run();
  });
  return {
    ran() {
      ranWith = JSON.stringify(current());
    },
    show() {
      shown = true;
      if (ranWith && ranWith !== JSON.stringify(current())) run();
    },
    hide() {
      shown = false;
    },
    get shown() {
      return shown;
    },
  };
}

function changed() {
  renderHints();
  const settings = current();
  listeners.forEach((fn) => fn(settings));
}

/**
 * The exact prompts for each class: the service's own per-class list where /labels has one
 * (`official_prompts`: prompt set -> class word -> prompts, for the official words whose wording
 * differs from the templates), else the prompt set's templates filled in the way the service does.
 */
function exactPrompts(classes, set) {
  const official = labels?.official_prompts?.[set] || {};
  const templates = labels?.prompt_sets?.[set] || [];
  return classes.map((c) => [
    c,
    Array.isArray(official[c]) ? official[c].map(String) : templates.map((t) => t.replaceAll("{}", c)),
  ]);
}

function renderHints() {
  const words = currentClassWords();
  $("class-words-hint").textContent =
    preset().value === CUSTOM
      ? words.length
        ? `Your words: ${words.join(", ")}`
        : "Type your class words below."
      : words.join(", ");
  const templates = labels?.prompt_sets?.[promptSet().value] || [];
  $("prompt-hint").textContent =
    templates.length === 1
      ? `“${templates[0].replaceAll("{}", "[class]")}”`
      : `${templates.length} templates per class, averaged (see Exact prompts)`;
  const list = $("prompt-list");
  list.replaceChildren(
    ...exactPrompts(words, promptSet().value).map(([cls, prompts]) =>
      el(
        "div",
        { className: "prompt-class" },
        el("h3", { text: cls }),
        el("ul", {}, ...prompts.map((text) => el("li", { text }))),
      ),
    ),
  );
}

export async function loadSettings() {
  labels = await getJSON("labels");
  const select = preset();
  // Presets with the same words share a line: "basic7 (= raf-db, affectnet-7, ...)"
  const groups = new Map();
  for (const [name, words] of Object.entries(labels.class_presets)) {
    const key = words.join("\u0000");
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(name);
  }
  const options = [];
  for (const names of groups.values()) {
    const [first, ...aliases] = names;
    const count = labels.class_presets[first].length;
    options.push(el("option", { value: first, text: `${first}: ${count} classes` }));
    for (const alias of aliases) {
      options.push(el("option", { value: alias, text: `${alias}: ${count} classes (same as ${first})` }));
    }
  }
  options.push(el("option", { value: CUSTOM, text: "Your own words" }));
  select.replaceChildren(...options);
  select.value = labels.default_classes;

  const prompts = promptSet();
  prompts.replaceChildren(
    ...Object.entries(labels.prompt_sets).map(([name, templates]) =>
      el("option", {
        value: name,
        text: `${name}: ${templates.length === 1 ? "1 template" : `${templates.length} templates`}`,
      }),
    ),
  );
  prompts.value = labels.default_prompts;
  renderHints();

  select.addEventListener("change", () => {
    if (select.value === CUSTOM && !customWords().length) {
      renderHints();
      custom().focus();
      return;
    }
    changed();
  });
  prompts.addEventListener("change", changed);
  detect().addEventListener("change", changed);
  // Own words: used once committed (Enter or leaving the field), not on every keystroke.
  let committed = "";
  const commit = () => {
    const words = customWords().join(",");
    if (words === committed) return;
    committed = words;
    if (words) select.value = CUSTOM;
    else if (select.value === CUSTOM) select.value = labels.default_classes;
    changed();
  };
  custom().addEventListener("change", commit);
}
