// Video view: a clip -> POST /predict-video (per_frame=true) -> clip-level bars, and a timeline of
// every class's probability at each sampled frame; choosing a frame seeks the <video> there, or, for a
// GIF (which a <video> cannot play), draws that frame of it. Choosing a file runs it; "Run again" and a
// new frame count run it again.

import { timelineChart } from "./chart.js";
import * as settings from "./settings.js";
import { viewRequests } from "./request.js";
import { $, bars, colourFor, dropzone, el, filePicker, ms, percent, ranked, seconds } from "./ui.js";

let file = null;
let clipUrl = null;
let gif = null; // the ImageDecoder of a GIF shown frame by frame
const send = viewRequests("video-result", "video-message");
let chart = null;
const following = settings.follow(run);


function setFile(next) {
  file = next;
  if (clipUrl) URL.revokeObjectURL(clipUrl);
  clipUrl = URL.createObjectURL(next);
  showClip(next);
  $("video-rerun").hidden = false;
  run();
}

const isGif = (f) => f.type === "image/gif" || /\.gif$/i.test(f.name || "");

/** The clip in a <video>; a GIF frame by frame on a canvas where the browser decodes single frames
 * (ImageDecoder), else as an animated image. */
function showClip(next) {
  const player = $("video-player");
  const asGif = isGif(next);
  gif?.close();
  gif = null;
  player.hidden = asGif;
  $("video-gif").hidden = true;
  $("video-gif-image").hidden = true;
  $("video-gif-note").hidden = true;
  $("video-playback-note").hidden = true;
  if (!asGif) {
    player.src = clipUrl;
    player.setAttribute("aria-label", `Clip: ${next.name || "uploaded clip"}`);
    return;
  }
  player.removeAttribute("src");
  player.load();
  if (!("ImageDecoder" in window)) {
    $("video-gif-image").src = clipUrl;
    $("video-gif-image").hidden = false;
    $("video-gif-note").hidden = false;
    return;
  }
  gif = new ImageDecoder({ data: next.stream(), type: "image/gif" });
  $("video-gif").hidden = false;
  drawGifFrame(0);
}

/** Draws frame `index` of the GIF (the decoder composes it with the frames before it). */
async function drawGifFrame(index) {
  const decoder = gif;
  try {
    await decoder.completed; // the whole file read: the frame count is final
    const last = decoder.tracks.selectedTrack.frameCount - 1;
    const { image } = await decoder.decode({ frameIndex: Math.max(0, Math.min(index, last)) });
    if (decoder !== gif) {
      image.close(); // another file was chosen meanwhile
      return;
    }
    const canvas = $("video-gif");
    canvas.width = image.displayWidth;
    canvas.height = image.displayHeight;
    canvas.getContext("2d").drawImage(image, 0, 0);
    canvas.dataset.frame = String(index);
    image.close();
  } catch (error) {
    if (decoder !== gif || error.name === "AbortError") return; // closed for another file
    $("video-gif").hidden = true;
    $("video-gif-image").src = clipUrl;
    $("video-gif-image").hidden = false;
    $("video-gif-note").hidden = false;
  }
}

function frameCount() {
  const input = $("video-frames");
  const n = Math.round(Number(input.value));
  return Number.isFinite(n) && n >= 1 ? n : 16;
}

async function run() {
  if (!file) return;
  const fields = { ...settings.current(), frames: frameCount(), per_frame: true };
  following.ran();
  await send(`Analysing ${file.name || "the clip"}…`, "predict-video", { file, ...fields }, show);
}

function seek(t, frame) {
  if (file && isGif(file)) {
    if (gif) drawGifFrame(frame.index);
    chart?.setTime(t);
    return;
  }
  $("video-player").currentTime = t;
}

function show(body, roundTrip) {
  const classes = body.classes;
  const timeline = body.timeline || [];
  $("video-summary").textContent = `Clip: ${body.label} (${percent(body.probabilities[body.label])})`;
  $("video-bars").replaceChildren(bars(body.probabilities, { order: classes, caption: "Clip probabilities" }));
  const t = body.timing || {};
  $("video-meta").textContent = [
    `${body.frames_sampled} of ${body.n_frames} frames sampled`,
    `${seconds(body.duration_s)} at ${body.fps} fps`,
    `a face in ${body.frames_with_face} of ${body.frames_sampled}`,
    `server ${ms(t.total_ms)}, round trip ${ms(roundTrip)}`,
  ].join(" · ");

  $("video-legend").replaceChildren(
    el(
      "ul",
      { "aria-label": "Line colours" },
      ...classes.map((cls, c) => {
        const swatch = el("span", { className: "swatch", "aria-hidden": "true" });
        swatch.style.backgroundColor = colourFor(c);
        return el("li", {}, swatch, el("span", { text: cls }));
      }),
    ),
  );

  $("video-result").hidden = false;
  chart?.destroy();
  const info = $("timeline-hint");
  chart = timelineChart($("video-chart"), timeline, classes, {
    duration: body.duration_s,
    onSeek: seek,
    onFocusFrame: (f) => {
      const top = ranked(f.probabilities)[0];
      info.textContent = `Frame ${f.index} at ${seconds(f.timestamp)}: ${top[0]} ${percent(top[1])}${f.face_detected ? ", face found" : ", no face found"}. Enter seeks the clip here.`;
    },
  });
  info.textContent =
    "Probability of each class at every sampled frame. Choose a frame (or focus the chart and use the arrow keys) to seek the clip there.";
  renderTable(timeline, classes);
}

function renderTable(timeline, classes) {
  const table = $("video-table");
  const head = el(
    "tr",
    {},
    el("th", { scope: "col", text: "Time" }),
    el("th", { scope: "col", text: "Frame" }),
    el("th", { scope: "col", text: "Face" }),
    el("th", { scope: "col", text: "Top label" }),
    ...classes.map((c) => el("th", { scope: "col", text: c })),
  );
  const rows = timeline.map((f, i) => {
    const button = el("button", { type: "button", className: "link-button", text: seconds(f.timestamp) });
    button.setAttribute("aria-label", `Seek to ${seconds(f.timestamp)}`);
    button.addEventListener("click", () => chart?.select(i)); // the chart seeks the clip as it selects
    return el(
      "tr",
      {},
      el("th", { scope: "row" }, button),
      el("td", { text: String(f.index) }),
      el("td", { text: f.face_detected ? "yes" : "no" }),
      el("td", { text: f.label }),
      ...classes.map((c) => el("td", { text: percent(f.probabilities[c] ?? 0) })),
    );
  });
  table.replaceChildren(
    el("caption", { className: "visually-hidden", text: "Per-frame probabilities" }),
    el("thead", {}, head),
    el("tbody", {}, ...rows),
  );
}

export function initVideo() {
  filePicker($("video-file"), setFile);
  dropzone($("video-drop"), setFile);
  $("video-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  $("video-frames").addEventListener("change", run);
  $("video-player").addEventListener("timeupdate", () => chart?.setTime($("video-player").currentTime));
  $("video-player").addEventListener("seeked", () => chart?.setTime($("video-player").currentTime));
  $("video-player").addEventListener("error", () => {
    if (!file || isGif(file)) return;
    $("video-playback-note").hidden = false;
  });
  $("video-player").addEventListener("loadedmetadata", () => {
    $("video-playback-note").hidden = true;
  });
  return {
    show() {
      following.show();
    },
    hide() {
      following.hide();
      $("video-player").pause();
    },
  };
}
