// Small DOM helpers shared by the views: element building, messages, probability bars, face
// overlays, drop zones and the webcam. Everything is built with the DOM API (never innerHTML), so
// class words typed by a user are always text, and no inline styles or handlers are needed.

/** el("p", {className: "x", text: "hi"}, child, ...) */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, String(value));
  }
  return node;
}

export const $ = (id) => document.getElementById(id);

export function percent(p, digits = 1) {
  return `${(p * 100).toFixed(digits)}%`;
}

export function ms(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
}

export function seconds(value) {
  return `${Number(value).toFixed(2)} s`;
}

/** A chart's legend: one swatch of `colourFor(i)` per label, in order. */
export function lineLegend(labels) {
  return el(
    "ul",
    { "aria-label": "Line colours" },
    ...labels.map((text, i) => {
      const swatch = el("span", { className: "swatch", "aria-hidden": "true" });
      swatch.style.backgroundColor = colourFor(i);
      return el("li", {}, swatch, el("span", { text }));
    }),
  );
}

/** A frame table's first cell: the frame's time as a button that picks the frame (`select`: the
 * chart's, which seeks the clip as it selects). */
export function seekCell(timestamp, select) {
  const button = el("button", { type: "button", className: "link-button", text: seconds(timestamp) });
  button.setAttribute("aria-label", `Seek to ${seconds(timestamp)}`);
  button.addEventListener("click", select);
  return el("th", { scope: "row" }, button);
}

/** Classes sorted by probability, highest first: [[name, p], ...]. */
export function ranked(probabilities) {
  return Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
}

// Distinct hues (Okabe-Ito first), each at least 3:1 against the white page, so lines and swatches
// stay visible.
const PALETTE = [
  "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#8C6D00", "#6A5ACD",
  "#333333", "#007C89", "#C0392B", "#B8860B", "#882255", "#5B6B00",
];

export function colourFor(index) {
  return PALETTE[index % PALETTE.length];
}

/** A message region: kind is "error", "info" or "" (clears). */
export function say(region, text, kind = "info") {
  region.textContent = text || "";
  region.dataset.kind = text ? kind : "";
  region.setAttribute("role", kind === "error" ? "alert" : "status");
}

/** A probability bar chart: one row per class, in the given class order, the top class marked. */
export function bars(probabilities, { order = null, caption = null } = {}) {
  const names = order || Object.keys(probabilities);
  const top = ranked(probabilities)[0]?.[0];
  const list = el("ul", { className: "bars", "aria-label": caption || "Class probabilities" });
  names.forEach((name) => {
    const p = probabilities[name] ?? 0;
    const fill = el("span", { className: "bar-fill" });
    fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    const row = el(
      "li",
      { className: name === top ? "bar-row top" : "bar-row", dataset: { class: name } },
      el("span", { className: "bar-name", text: name }),
      el("span", { className: "bar-track", "aria-hidden": "true" }, fill),
      el("span", { className: "bar-value", text: percent(p) }),
    );
    list.append(row);
  });
  return list;
}

/**
 * Draws face boxes (and landmarks when given) over a picture. Positions are percentages of the
 * picture's natural size, so the overlay follows whatever size the picture is displayed at. Each face
 * is numbered by its place (when there are several) unless `numbers` gives its own number (always
 * shown); `colours` gives each box its own colour instead of the one box colour.
 */
export function drawFaces(overlay, faces, width, height, { numbers = null, colours = null } = {}) {
  overlay.replaceChildren();
  overlay.classList.toggle("many", faces.length > 1);
  if (!width || !height) return;
  faces.forEach((face, i) => {
    const [x, y, w, h] = face.box;
    const number = numbers ? numbers[i] : faces.length > 1 ? i + 1 : null;
    const box = el("div", { className: "face-box", dataset: { index: i, label: face.label } });
    if (number !== null) box.dataset.number = String(number);
    box.style.left = `${(x / width) * 100}%`;
    box.style.top = `${(y / height) * 100}%`;
    box.style.width = `${(w / width) * 100}%`;
    box.style.height = `${(h / height) * 100}%`;
    const p = face.probabilities?.[face.label];
    // the tag sits above the box, inside it at the top edge, and leans towards the photo's middle
    const where = [y / height < 0.08 ? "inside" : "", (x + w / 2) / width > 0.5 ? "right" : ""];
    const tag = el(
      "span",
      { className: ["face-tag", ...where].join(" ").trim() },
      number !== null ? el("span", { className: "tag-number", text: `${number}.` }) : null,
      number !== null && face.label ? " " : null,
      face.label
        ? el("span", { className: "tag-label", text: `${face.label}${p !== undefined ? ` ${percent(p, 0)}` : ""}` })
        : null,
    );
    if (colours) {
      box.style.borderColor = colours[i];
      tag.style.backgroundColor = colours[i];
    }
    box.append(tag);
    // landmarks live in the box (so their size can follow the box's); positions relative to it
    for (const point of face.landmarks || []) {
      if (!Array.isArray(point) || point.length < 2 || !w || !h) continue;
      const dot = el("span", { className: "landmark" });
      dot.style.left = `${((point[0] - x) / w) * 100}%`;
      dot.style.top = `${((point[1] - y) / h) * 100}%`;
      box.append(dot);
    }
    overlay.append(box);
  });
}

/**
 * A /predict answer's results in `container`: a card per face (heading with its top label, the detector's
 * score if any, and the bars), or the whole image's bars when no face was found.
 */
export function faceResults(container, body, wholeCaption) {
  const faces = body.faces || [];
  const classes = body.classes;
  if (!faces.length) {
    container.replaceChildren(bars(body.probabilities, { order: classes, caption: wholeCaption }));
    return;
  }
  container.replaceChildren(
    ...faces.map((face, i) => {
      const heading = `Face ${i + 1}: ${face.label} (${percent(face.probabilities[face.label] ?? 0)})`;
      const details = [`box ${face.box.join(", ")}`];
      if (typeof face.score === "number") details.push(`detector score ${face.score.toFixed(2)}`);
      return el(
        "section",
        { className: "face-card", "aria-label": `Face ${i + 1}` },
        el("h4", { text: heading }),
        el("p", { className: "meta", text: details.join(" · ") }),
        bars(face.probabilities, { order: classes, caption: `Face ${i + 1} probabilities` }),
      );
    }),
  );
}

/** Makes `zone` accept dropped files; calls onFile(file). */
export function dropzone(zone, onFile) {
  let depth = 0;
  zone.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
  });
  zone.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) zone.classList.remove("dragging");
  });
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    zone.classList.remove("dragging");
    const file = event.dataTransfer?.files?.[0];
    if (file) onFile(file);
  });
}

/** Wires a file input: calls onFile(file) on pick, then clears it so picking the same file again works. */
export function filePicker(input, onFile) {
  input.addEventListener("change", () => {
    const file = input.files?.[0];
    if (file) onFile(file);
    input.value = "";
  });
}

/**
 * The webcam shown in one view's `video`. `start()` resolves to true once it runs, to false when
 * `stop()` cancelled it meanwhile (the camera is then released), and throws an Error with a sentence
 * when the camera cannot start; a start while it runs or starts does nothing.
 */
export class Camera {
  constructor(video) {
    this.video = video;
    this.stream = null;
    this.starting = null; // the AbortController of a start in progress
  }

  get active() {
    return Boolean(this.stream || this.starting);
  }

  async start() {
    if (this.active) return false;
    const mine = new AbortController();
    this.starting = mine;
    try {
      this.stream = await startCamera(this.video, { signal: mine.signal });
      return true;
    } catch (error) {
      if (error.name === "AbortError") return false;
      throw error;
    } finally {
      if (this.starting === mine) this.starting = null;
    }
  }

  stop() {
    this.starting?.abort();
    this.starting = null;
    stopCamera(this.stream, this.video);
    this.stream = null;
  }
}

/**
 * Starts the webcam into `video`; resolves to the MediaStream, or throws an Error with a sentence.
 * Aborting `signal` cancels the start: the camera is released and an AbortError thrown.
 */
async function startCamera(video, { signal } = {}) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error(
      "this browser gives no camera access here (a camera needs https or http://localhost)",
    );
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 1280 }, height: { ideal: 720 }, facingMode: "user" },
      audio: false,
    });
  } catch (error) {
    const reasons = {
      NotAllowedError: "camera access was refused",
      NotFoundError: "no camera was found",
      NotReadableError: "the camera is in use by another program",
    };
    throw new Error(reasons[error.name] || `the camera could not be started (${error.message})`);
  }
  // the caller holds no stream until this returns, so a cancelled start must release the camera here
  const cancelled = () => {
    stream.getTracks().forEach((track) => track.stop());
    if (video.srcObject === stream) video.srcObject = null; // a newer start may own the video by now
    return new DOMException("the webcam start was cancelled", "AbortError");
  };
  if (signal?.aborted) throw cancelled();
  video.srcObject = stream;
  await video.play().catch(() => {});
  if (!video.videoWidth && !signal?.aborted) {
    // an abort ends the wait too: a cleared video never loads its metadata
    await new Promise((resolve) => {
      video.addEventListener("loadedmetadata", resolve, { once: true });
      signal?.addEventListener("abort", resolve, { once: true });
    });
  }
  if (signal?.aborted) throw cancelled();
  return stream;
}

function stopCamera(stream, video) {
  stream?.getTracks().forEach((track) => track.stop());
  if (video) video.srcObject = null;
}

/**
 * Grabs the video's current frame as a JPEG File, scaled so its longer side is at most maxSide.
 * Returns {file, width, height} (the grabbed frame's size, the coordinate space of any boxes).
 */
export async function grabFrame(video, canvas, maxSide = 1280, quality = 0.85) {
  const scale = Math.min(1, maxSide / Math.max(video.videoWidth, video.videoHeight));
  const width = Math.round(video.videoWidth * scale);
  const height = Math.round(video.videoHeight * scale);
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").drawImage(video, 0, 0, width, height);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", quality));
  if (!blob) throw new Error("the camera frame could not be encoded");
  return { file: new File([blob], "webcam.jpg", { type: "image/jpeg" }), width, height };
}
