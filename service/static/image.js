// Image view: a photo (picked, dropped, pasted or a webcam snapshot) -> POST /predict -> the photo
// with every face's box and top label, and a bar chart per face.

import * as settings from "./settings.js";
import { viewRequests } from "./request.js";
import { $, Camera, drawFaces, dropzone, faceResults, filePicker, grabFrame, ms, percent, say } from "./ui.js";

let file = null; // the photo being shown
let previewUrl = null;
const send = viewRequests("image-result", "image-message");
let camera = null; // made when the view is set up: the page's elements exist by then
const following = settings.follow(run);

const message = () => $("image-message");

function setFile(next) {
  file = next;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(next);
  $("image-rerun").hidden = false;
  run();
}

async function run() {
  if (!file) return;
  following.ran();
  await send(`Analysing ${file.name || "the photo"}…`, "predict", { file, ...settings.current() }, show);
}

async function show(body, roundTrip) {
  const img = $("image-preview");
  if (img.src !== previewUrl) {
    img.src = previewUrl;
    try {
      await img.decode();
    } catch {
      /* the browser cannot display this format; the results still show */
    }
  }
  const faces = body.faces || [];
  const count = faces.length === 1 ? "1 face" : `${faces.length} faces`;
  img.alt = faces.length
    ? `The photo, with ${count} outlined: ${faces.map((f, i) => `face ${i + 1} ${f.label}`).join(", ")}`
    : `The photo, no face found; the whole photo reads as ${body.label}`;
  drawFaces($("image-overlay"), faces, img.naturalWidth, img.naturalHeight);
  $("image-summary").textContent = faces.length
    ? `${count} found · top label: ${body.label} (${percent(body.probabilities[body.label])})`
    : `Top label: ${body.label} (${percent(body.probabilities[body.label])})`;
  const note = $("image-note");
  note.hidden = !(body.note || !faces.length);
  note.textContent =
    body.note || (faces.length ? "" : "Face detection is off: the whole photo was classified.");
  faceResults($("image-faces"), body, "Whole photo");
  const t = body.timing || {};
  $("image-meta").textContent = [
    img.naturalWidth ? `${img.naturalWidth}×${img.naturalHeight} px` : null,
    `prompts ${body.prompts}`,
    `server ${ms(t.total_ms)} (decode ${ms(t.decode_ms)}, queue ${ms(t.queue_ms)}, inference ${ms(t.inference_ms)})`,
    `round trip ${ms(roundTrip)}`,
  ]
    .filter(Boolean)
    .join(" · ");
  $("image-result").hidden = false;
}

async function openCamera() {
  if (camera.active) return;
  say(message(), "Starting the webcam…");
  $("image-camera").hidden = false;
  try {
    if (!(await camera.start())) {
      if (!camera.active) say(message(), ""); // closed while starting, and not opened again since
      return;
    }
    say(message(), "");
    $("image-camera-snap").focus();
  } catch (error) {
    closeCamera();
    say(message(), `Webcam: ${error.message}.`, "error");
  }
}

function closeCamera() {
  camera.stop();
  $("image-camera").hidden = true;
}

async function snapshot() {
  const video = camera.video;
  if (!camera.stream || !video.videoWidth) return;
  const { file: shot } = await grabFrame(video, document.createElement("canvas"), 1920, 0.92);
  closeCamera();
  $("image-camera-open").focus();
  setFile(shot);
}

export function initImage() {
  camera = new Camera($("image-camera-video"));
  filePicker($("image-file"), setFile);
  dropzone($("image-drop"), setFile);
  $("image-rerun").addEventListener("click", run);
  $("image-camera-open").addEventListener("click", openCamera);
  $("image-camera-close").addEventListener("click", () => {
    closeCamera();
    $("image-camera-open").focus();
  });
  $("image-camera-snap").addEventListener("click", snapshot);
  document.addEventListener("paste", (event) => {
    if (!following.shown) return;
    const item = [...(event.clipboardData?.files || [])][0];
    if (item) {
      event.preventDefault();
      setFile(item);
    }
  });
  return {
    show() {
      following.show();
    },
    hide() {
      following.hide();
      closeCamera();
    },
  };
}
