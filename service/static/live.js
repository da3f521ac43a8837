// Live view: webcam frames -> POST /predict a few times a second, never more than one request in
// flight, with the boxes and labels drawn over the video and the measured round-trip time shown.

import { ApiError, describe, postForm } from "./api.js";
import * as settings from "./settings.js";
import { recheck, whenReady } from "./status.js";
import { $, Camera, drawFaces, faceResults, grabFrame, ms, percent, say } from "./ui.js";

const MAX_SIDE = 640; // frames are scaled down before sending: faster, and plenty for detection
const canvas = document.createElement("canvas");
let camera = null; // made when the view is set up: the page's elements exist by then
let session = 0; // bumped by stop(), so a running loop knows it is over
let controller = null;
let trips = [];
let count = 0;

const message = () => $("live-message");
const sleep = (ms_) => new Promise((resolve) => setTimeout(resolve, ms_));

async function start() {
  if (camera.active) return;
  $("live-start").disabled = true;
  say(message(), "Starting the webcam…");
  $("live-result").hidden = false;
  $("live-stage").hidden = false;
  try {
    if (!(await camera.start())) return; // stop() has reset the view
  } catch (error) {
    $("live-stage").hidden = true;
    $("live-result").hidden = true; // nothing to show under the error, not even an empty card
    $("live-start").disabled = false;
    say(message(), `Webcam: ${error.message}.`, "error");
    return;
  }
  trips = [];
  count = 0;
  $("live-data").hidden = true; // until this session's first answer
  $("live-count").textContent = "0";
  $("live-rtt").textContent = "–";
  $("live-avg").textContent = "–";
  $("live-server").textContent = "–";
  $("live-stats").hidden = false;
  $("live-stop").disabled = false;
  $("live-stop").focus();
  say(message(), "Live: sending frames.");
  loop(session);
}

function stop(reason = "Stopped.", kind = "info") {
  const wasRunning = camera.active;
  session += 1;
  camera.stop();
  controller?.abort();
  controller = null;
  $("live-overlay").replaceChildren();
  $("live-stage").hidden = true;
  $("live-start").disabled = false;
  $("live-stop").disabled = true;
  if (wasRunning && reason) say(message(), reason, kind);
}

async function loop(mine) {
  const video = camera.video;
  while (mine === session) {
    const interval = 1000 / Number($("live-rate").value || 4);
    const began = performance.now();
    await whenReady();
    if (mine !== session) return;
    if (!video.videoWidth) {
      await sleep(100);
      continue;
    }
    try {
      const frame = await grabFrame(video, canvas, MAX_SIDE, 0.8);
      controller = new AbortController();
      const sent = performance.now();
      const body = await postForm("predict", { file: frame.file, ...settings.current() }, { signal: controller.signal });
      const roundTrip = performance.now() - sent;
      if (mine !== session) return;
      render(body, frame, roundTrip);
    } catch (error) {
      if (mine !== session || error.name === "AbortError") return;
      if (error instanceof ApiError && (error.status === 429 || error.status === 503)) {
        say(message(), `${error.sentence} Retrying…`, "error");
        if (error.status === 503) recheck();
        await sleep(1000 * (Number(error.retryAfter) || 1));
        continue;
      }
      stop(`Live stopped. ${describe(error)}`, "error");
      return;
    } finally {
      controller = null;
    }
    const wait = interval - (performance.now() - began);
    if (wait > 0) await sleep(wait);
  }
}

function render(body, frame, roundTrip) {
  count += 1;
  trips.push(roundTrip);
  if (trips.length > 20) trips.shift();
  const average = trips.reduce((a, b) => a + b, 0) / trips.length;
  $("live-rtt").textContent = ms(roundTrip);
  $("live-avg").textContent = ms(average);
  $("live-server").textContent = ms(body.timing?.total_ms);
  $("live-count").textContent = String(count);
  if (message().dataset.kind === "error") say(message(), "Live: sending frames.");

  const faces = body.faces || [];
  drawFaces($("live-overlay"), faces, frame.width, frame.height);
  $("live-data").hidden = false;
  $("live-summary").textContent = faces.length
    ? `${faces.length === 1 ? "1 face" : `${faces.length} faces`} · ${body.label} (${percent(body.probabilities[body.label])})`
    : `No face found · whole frame: ${body.label} (${percent(body.probabilities[body.label])})`;
  faceResults($("live-faces"), body, "Whole frame");
}

export function initLive() {
  camera = new Camera($("live-video"));
  $("live-start").addEventListener("click", start);
  $("live-stop").addEventListener("click", () => {
    stop();
    $("live-start").focus();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) stop("Stopped: the page was hidden.");
  });
  window.addEventListener("pagehide", () => stop(null));
  return {
    show() {},
    hide() {
      stop(null);
      say(message(), "");
    },
  };
}
