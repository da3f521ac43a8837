// Model readiness: polls GET /readyz until it answers 200, shows the state in the header, and lets
// views wait for it. A view that gets a 503 calls `recheck()` to start polling again.

import { readiness } from "./api.js";
import { $, say } from "./ui.js";

const listeners = new Set();
let ready = false;
let timer = null;
let delay = 1000;
let polling = false;

/** Calls fn(ready) now and on every change. */
function onReadiness(fn) {
  listeners.add(fn);
  fn(ready);
  return () => listeners.delete(fn);
}

/** Resolves when the model is ready. */
export function whenReady() {
  if (ready) return Promise.resolve();
  return new Promise((resolve) => {
    const off = onReadiness((now) => {
      if (now) {
        off();
        resolve();
      }
    });
  });
}

/** Says `busy` in `region`, first waiting for the model (and saying so) when it is not ready. */
export async function afterReady(region, busy) {
  if (!ready) {
    say(region, "Waiting for the model to finish loading; this runs as soon as it is ready.");
    await whenReady();
  }
  say(region, busy);
}

function render(body) {
  const status = $("model-status");
  const banner = $("loading-banner");
  // A model whose answers mean nothing (the demo's random weights) says so for as long as it serves.
  const warning = $("model-warning");
  warning.hidden = !(body.ready && body.model_warning);
  warning.textContent = warning.hidden
    ? ""
    : `The ${body.model} model has ${body.model_warning}. It shows how the page and the API work; serve a preset with real weights for real answers.`;
  if (body.ready) {
    const where = [body.device, body.dtype].filter(Boolean).join(", ");
    status.textContent = `Ready: ${body.model || "model"}${where ? ` (${where})` : ""}`;
    status.dataset.state = "ready";
    banner.hidden = true;
    const footer = $("footer-model");
    if (footer && body.model) footer.textContent = body.model;
  } else if (body.status === "locked") {
    status.textContent = "API key needed";
    status.dataset.state = "error";
    banner.hidden = false;
    banner.textContent = "This service needs an API key: enter it under Settings.";
    $("api-key-field").hidden = false;
  } else if (body.status === "unreachable") {
    status.textContent = "Service unreachable";
    status.dataset.state = "error";
    banner.hidden = false;
    banner.textContent = "The service cannot be reached. This page keeps checking.";
  } else if (body.detail && body.detail !== "loading") {
    // a load error: the detail says why (e.g. missing weights)
    status.textContent = "Model not ready";
    status.dataset.state = "error";
    banner.hidden = false;
    banner.textContent = `The model is not ready: ${body.detail}`;
  } else {
    status.textContent = "Model loading…";
    status.dataset.state = "loading";
    banner.hidden = false;
    banner.textContent =
      "The model is still loading. Requests will work as soon as it is ready; this page checks every few seconds.";
  }
}

async function poll() {
  timer = null;
  polling = true;
  const body = await readiness();
  polling = false;
  render(body);
  const changed = body.ready !== ready;
  ready = body.ready;
  if (changed) listeners.forEach((fn) => fn(ready));
  if (!ready) {
    timer = setTimeout(poll, delay);
    delay = Math.min(delay * 1.5, 5000);
  }
}

/** Starts polling (again), e.g. after a request answered 503. */
export function recheck() {
  if (timer || polling) return;
  delay = 1000;
  if (ready) {
    ready = false;
    listeners.forEach((fn) => fn(ready));
  }
  poll();
}

export function startStatus() {
  poll();
}
