// Retrieve view: a clip (or an image) and descriptions, one a line -> POST /retrieve -> the
// descriptions ranked by similarity, with their scores as bars.

import * as settings from "./settings.js";
import { viewRequests } from "./request.js";
import { $, dropzone, el, filePicker, ms, say } from "./ui.js";

let file = null;
let mediaUrl = null;
const send = viewRequests("retrieve-result", "retrieve-message");

const message = () => $("retrieve-message");

function descriptions() {
  return $("retrieve-descriptions")
    .value.split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
}

function setFile(next) {
  send.cancel(); // a ranking still in flight is the previous file's
  file = next;
  $("retrieve-file-name").textContent = next.name || "snapshot";
  if (mediaUrl) URL.revokeObjectURL(mediaUrl);
  mediaUrl = URL.createObjectURL(next);
  updateButton();
  say(message(), "");
}

function updateButton() {
  $("retrieve-run").disabled = !file || !descriptions().length;
}

async function run() {
  if (!file) {
    say(message(), "Choose a clip or an image first.", "error");
    return;
  }
  const texts = descriptions();
  if (!texts.length) {
    say(message(), "Write at least one description.", "error");
    return;
  }
  const fields = {
    file,
    descriptions: JSON.stringify(texts),
    top_k: texts.length,
    detect_faces: settings.current().detect_faces,
  };
  const busy = `Ranking ${texts.length} description${texts.length === 1 ? "" : "s"}…`;
  const asked = { name: file.name || "upload", url: mediaUrl }; // what this ranking is of
  await send(busy, "retrieve", fields, (body, roundTrip) => show(body, roundTrip, asked));
}

function show(body, roundTrip, { name, url }) {
  const media = $("retrieve-media");
  const preview =
    body.media === "image"
      ? el("img", { src: url, alt: `The image the descriptions were ranked against: ${name}` })
      : el("video", { src: url, controls: true, playsInline: true, preload: "metadata", "aria-label": `The clip: ${name}` });
  media.replaceChildren(
    preview,
    el("p", { className: "meta", text: `${body.media} · server ${ms(body.timing?.total_ms)}, round trip ${ms(roundTrip)}` }),
  );

  const ranking = body.ranking || [];
  const scores = ranking.map((r) => r.score);
  // Cosine similarities: bars run from min(0, lowest) to the highest score.
  const low = Math.min(0, ...scores);
  const high = Math.max(...scores, low + 1e-6);
  $("retrieve-summary").textContent = ranking.length
    ? `Best match: “${ranking[0].text}”`
    : "No descriptions came back.";
  $("retrieve-ranking").replaceChildren(
    ...ranking.map((r, i) => {
      const fill = el("span", { className: "bar-fill" });
      fill.style.width = `${((r.score - low) / (high - low)) * 100}%`;
      return el(
        "li",
        { className: i === 0 ? "rank-row top" : "rank-row", dataset: { index: r.index } },
        el("span", { className: "rank-text", text: r.text }),
        el(
          "span",
          { className: "rank-score" },
          el("span", { className: "bar-track", "aria-hidden": "true" }, fill),
          el("span", { className: "bar-value", text: r.score.toFixed(3) }),
        ),
      );
    }),
  );
  $("retrieve-result").hidden = false;
}

export function initRetrieve() {
  filePicker($("retrieve-file"), setFile);
  dropzone($("retrieve-drop"), setFile);
  $("retrieve-descriptions").addEventListener("input", updateButton);
  $("retrieve-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  return { show() {}, hide() {} };
}
