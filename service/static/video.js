// Video view: a clip -> POST /predict-video (per_frame=true) -> each person's face boxed on the shown
// frame, a person picker, and the chosen person's bars and timeline of every class's probability at
// each sampled frame (the whole clip's when no face was found); choosing a frame seeks the <video>
// there, or, for a GIF (which a <video> cannot play), draws that frame of it. Choosing a file runs it;
// "Run again" and a new frame count run it again.

import { timelineChart } from "./chart.js";
import * as settings from "./settings.js";
import { viewRequests } from "./request.js";
import { $, bars, drawFaces, dropzone, el, filePicker, ms, percent, ranked, lineLegend, seconds, seekCell } from "./ui.js";

let file = null;
let clipUrl = null;
let gif = null; // the ImageDecoder of a GIF shown frame by frame
let gifTime = 0; // the timestamp of the GIF frame shown
const send = viewRequests("video-result", "video-message");
let chart = null;
const following = settings.follow(run);

// The answer shown, and its people: one per track, in the API's order (the main track first).
let answer = null;
let people = [];
let chosen = 0; // the person whose bars and timeline are shown
let sampled = []; // every sampled frame the answer names, [{index, timestamp}] by time
let reach = Infinity; // how far from a sampled frame (in seconds) its boxes are still drawn

// Light colours, each under dark text in the box's tag and apart from the others on any picture; the
// first is the Image view's box colour.
const PERSON_COLOURS = ["#ffd400", "#00e5ff", "#ff8ad8", "#7cfc00", "#ffa64d", "#c9b6ff", "#ffffff", "#5cffc8"];
const personColour = (i) => PERSON_COLOURS[i % PERSON_COLOURS.length];


function setFile(next) {
  file = next;
  answer = null; // the last clip's answer is not this one's: hidden, with its picker and chart
  people = [];
  drawPeople(0);
  $("video-result").hidden = true;
  chart?.destroy();
  chart = null;
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
  gifTime = 0;
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
    drawPeople(gifTime);
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
    gifTime = t;
    if (gif) drawGifFrame(frame.index);
    chart?.setTime(t);
    return;
  }
  $("video-player").currentTime = t;
}

function show(body, roundTrip) {
  const classes = body.classes;
  answer = body;
  people = (body.tracks || []).map((track, i) => ({
    track,
    number: i + 1,
    colour: personColour(i),
    byIndex: new Map(track.frames.map((f) => [f.index, f])),
  }));
  const frames = new Map([...(body.timeline || []), ...people.flatMap((p) => p.track.frames)].map((f) => [f.index, f]));
  sampled = [...frames.values()].sort((a, b) => a.timestamp - b.timestamp);
  // Sampled frames lie about n/frames apart (give or take a frame): beyond half that, the shown frame
  // is nearer another sampled frame, one in which no face was found. One frame more, as a time falls
  // anywhere within the frame shown (the end of the clip, a frame after the last one's start).
  reach = body.fps > 0 ? (body.n_frames / body.frames_sampled / 2 + 1) / body.fps : Infinity;

  const t = body.timing || {};
  $("video-meta").textContent = [
    `${body.frames_sampled} of ${body.n_frames} frames sampled`,
    `${seconds(body.duration_s)} at ${body.fps} fps`,
    `a face in ${body.frames_with_face} of ${body.frames_sampled}`,
    people.length ? (people.length === 1 ? "1 person" : `${people.length} people`) : null,
    `server ${ms(t.total_ms)}, round trip ${ms(roundTrip)}`,
  ]
    .filter(Boolean)
    .join(" · ");

  $("video-legend").replaceChildren(lineLegend(classes));
  renderPeople();
  $("video-result").hidden = false;
  showPerson(0);
}

/** One radio button per person, in the answer's order (the main track first, and chosen). */
function renderPeople() {
  $("video-people").hidden = people.length < 2; // one person's box and bars need no choosing
  $("video-people-title").textContent = people.length === 1 ? "1 person" : `${people.length} people`;
  $("video-people-list").replaceChildren(
    ...people.map((person, i) => {
      const input = el("input", {
        type: "radio",
        name: "video-person",
        className: "visually-hidden",
        value: String(i),
        checked: i === 0,
      });
      input.addEventListener("change", () => {
        if (input.checked) showPerson(i);
      });
      const swatch = el("span", { className: "person-swatch", "aria-hidden": "true" });
      swatch.style.backgroundColor = person.colour;
      const n = person.track.frames.length;
      return el(
        "label",
        { className: "person-choice", dataset: { person: person.number, track: person.track.id } },
        input,
        swatch,
        el("span", { className: "person-name", text: `Person ${person.number}` }),
        el("span", { className: "person-meta", text: `${person.track.label} · ${n} ${n === 1 ? "frame" : "frames"}` }),
      );
    }),
  );
}

/** The bars, timeline and table of person `i`, or of the whole clip when no face was found. */
function showPerson(i) {
  chosen = i;
  const person = people[i];
  const body = answer;
  const classes = body.classes;
  const label = person ? person.track.label : body.label;
  const probabilities = person ? person.track.probabilities : body.probabilities;
  // a track's frames are all faces; the chart and the table read that from `face_detected`
  const timeline = person ? person.track.frames.map((f) => ({ ...f, face_detected: true })) : body.timeline || [];
  const who = person ? `Person ${person.number}` : "Clip";
  $("video-summary").textContent = `${who}: ${label} (${percent(probabilities[label])})`;
  $("video-bars").replaceChildren(bars(probabilities, { order: classes, caption: `${who} probabilities` }));
  $("timeline-title").textContent = person && people.length > 1 ? `Timeline of person ${person.number}` : "Timeline";

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
  chart.setTime(currentTime());
  info.textContent = person
    ? `Probability of each class at every sampled frame in which person ${person.number} is found. Choose a frame (or focus the chart and use the arrow keys) to seek the clip there.`
    : "Probability of each class at every sampled frame. Choose a frame (or focus the chart and use the arrow keys) to seek the clip there.";
  renderTable(timeline, classes);
  drawPeople(currentTime());
}

function currentTime() {
  return file && isGif(file) ? gifTime : $("video-player").currentTime;
}

/** The picture on show and its own size (the boxes' pixels), or null while there is none. */
function shownPicture() {
  if (!file) return null;
  if (!isGif(file)) {
    const player = $("video-player");
    return player.videoWidth ? { node: player, width: player.videoWidth, height: player.videoHeight } : null;
  }
  const canvas = $("video-gif");
  return !canvas.hidden && canvas.dataset.frame !== undefined
    ? { node: canvas, width: canvas.width, height: canvas.height }
    : null;
}

/** The sampled frame nearest `t`, or null when the shown frame is nearer one the answer does not name. */
function nearestSampled(t) {
  let best = null;
  for (const f of sampled) if (!best || Math.abs(f.timestamp - t) < Math.abs(best.timestamp - t)) best = f;
  return best && Math.abs(best.timestamp - t) <= reach ? best : null;
}

/**
 * Boxes each person found in the sampled frame nearest `t` over the shown picture, in their colour
 * and with their number. The overlay covers the picture's own area inside its element (both letterbox
 * it to keep its shape), so the boxes, placed in percent of the picture's size, land on the faces.
 */
function drawPeople(t) {
  const overlay = $("video-overlay");
  const picture = people.length ? shownPicture() : null;
  const at = picture ? nearestSampled(t) : null;
  overlay.hidden = !at;
  if (!at) {
    overlay.replaceChildren();
    delete overlay.dataset.frame;
    return;
  }
  const { node, width, height } = picture;
  const scale = Math.min(node.clientWidth / width, node.clientHeight / height);
  overlay.style.left = `${node.offsetLeft + (node.clientWidth - width * scale) / 2}px`;
  overlay.style.top = `${node.offsetTop + (node.clientHeight - height * scale) / 2}px`;
  overlay.style.width = `${width * scale}px`;
  overlay.style.height = `${height * scale}px`;
  const here = people.filter((p) => p.byIndex.has(at.index));
  drawFaces(
    overlay,
    here.map((p) => p.byIndex.get(at.index)),
    width,
    height,
    { numbers: here.map((p) => p.number), colours: here.map((p) => p.colour) },
  );
  overlay.querySelectorAll(".face-box").forEach((box) => {
    box.classList.toggle("chosen", people.length > 1 && Number(box.dataset.number) === chosen + 1);
  });
  overlay.dataset.frame = String(at.index);
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
    return el(
      "tr",
      {},
      seekCell(f.timestamp, () => chart?.select(i)),
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
  const player = $("video-player");
  const follow = () => {
    chart?.setTime(player.currentTime);
    drawPeople(player.currentTime);
  };
  for (const event of ["timeupdate", "seeked", "loadedmetadata"]) player.addEventListener(event, follow);
  // every frame shown while the clip plays, where the browser says (timeupdate comes a few times a second)
  if ("requestVideoFrameCallback" in player) {
    const onFrame = (_, shown) => {
      drawPeople(shown.mediaTime);
      player.requestVideoFrameCallback(onFrame);
    };
    player.requestVideoFrameCallback(onFrame);
  }
  // the overlay follows the picture's displayed size (the window, a phone turned)
  new ResizeObserver(() => drawPeople(currentTime())).observe($("video-stage"));
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
