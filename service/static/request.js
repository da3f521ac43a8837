// One request of a view at a time: a new one cancels the last, the result is marked busy while it
// runs, and a failure shows the API's own sentence (re-checking readiness on a 503). `send.cancel()`
// drops the one in flight, for a view whose input changed without a new request.

import { ApiError, postForm } from "./api.js";
import { afterReady, recheck } from "./status.js";
import { $, say } from "./ui.js";

export function viewRequests(resultId, messageId) {
  let controller = null;
  function cancel() {
    controller?.abort();
    controller = null;
    $(resultId).removeAttribute("aria-busy");
  }
  async function send(busyText, endpoint, fields, show) {
    cancel();
    const mine = new AbortController();
    controller = mine;
    const result = $(resultId);
    const message = $(messageId);
    result.setAttribute("aria-busy", "true");
    try {
      await afterReady(message, busyText);
      if (mine.signal.aborted) return;
      const started = performance.now();
      const body = await postForm(endpoint, fields, { signal: mine.signal });
      if (mine.signal.aborted) return;
      await show(body, performance.now() - started);
      say(message, "");
    } catch (error) {
      if (error.name === "AbortError") return;
      const api = error instanceof ApiError;
      say(message, api ? error.sentence : `Something went wrong: ${error.message}`, "error");
      if (api && error.status === 503) recheck();
      result.hidden = true;
    } finally {
      if (controller === mine) {
        controller = null;
        result.removeAttribute("aria-busy");
      }
    }
  }
  send.cancel = cancel;
  return send;
}
