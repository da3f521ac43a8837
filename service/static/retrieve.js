// Retrieve view: a clip (or an image) and descriptions, one a line -> POST /retrieve (per_frame=true)
// -> the descriptions ranked by similarity, with their scores as bars, and for a clip each
// description's score at every sampled frame, a line each; choosing a frame seeks the clip there.

import { timelineChart } from "./chart.js";
import * as settings from "./settings.js";
import { viewRequests } from "./request.js";
import { $, dropzone, el, filePicker, ms, lineLegend, say, seconds, seekCell } from "./ui.js";

let file = null;
let mediaUrl = null;
let chart = null;
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
  $("retrieve-result").hidden = true; // the last file's ranking, whose seek buttons played its clip
  chart?.destroy();
  chart = null;
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
    per_frame: true,
  };
  const busy = `Ranking ${texts.length} description${texts.length === 1 ? "" : "s"}…`;
  const asked = { name: file.name || "upload", url: mediaUrl, texts }; // what this ranking is of
  await send(busy, "retrieve", fields, (body, roundTrip) => show(body, roundTrip, asked));
}

function show(body, roundTrip, { name, url, texts }) {
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
  showOverTime(body, texts, preview);
}

/** A clip's per-frame scores as a chart (a line per description, in the order they were given) and
 * a table; a still image has one frame, so nothing over time to show. */
function showOverTime(body, texts, player) {
  chart?.destroy();
  chart = null;
  const timeline = body.media === "video" ? body.timeline || [] : [];
  const section = $("retrieve-over-time");
  section.hidden = !timeline.length;
  if (!timeline.length) return;

  $("retrieve-legend").replaceChildren(lineLegend(texts));
  // cosines of one clip sit close together: the axis spans the scores shown, with a margin
  const all = timeline.flatMap((f) => f.scores);
  const low = Math.min(...all);
  const high = Math.max(...all);
  const margin = Math.max((high - low) * 0.1, 0.005);
  const info = $("retrieve-frame-info");
  info.textContent = "";
  const mine = timelineChart($("retrieve-chart"), timeline, texts, {
    value: (f, _text, d) => f.scores[d],
    range: [low - margin, high + margin],
    tick: (v) => v.toFixed(3),
    describe: (f) => {
      const best = bestAt(f);
      return `“${texts[best]}” scores highest, ${f.scores[best].toFixed(3)}`;
    },
    onSeek: (t) => {
      player.currentTime = t;
    },
    onFocusFrame: (f) => {
      const scores = texts.map((text, d) => `“${text}” ${f.scores[d].toFixed(3)}`).join(", ");
      info.textContent = `Frame ${f.index} at ${seconds(f.timestamp)}: ${scores}. Enter seeks the clip here.`;
    },
  });
  chart = mine;
  const follow = () => chart === mine && mine.setTime(player.currentTime);
  player.addEventListener("timeupdate", follow);
  player.addEventListener("seeked", follow);
  renderTable(timeline, texts);
}

function bestAt(frame) {
  return frame.scores.reduce((best, score, d) => (score > frame.scores[best] ? d : best), 0);
}

function renderTable(timeline, texts) {
  const head = el(
    "tr",
    {},
    el("th", { scope: "col", text: "Time" }),
    el("th", { scope: "col", text: "Frame" }),
    ...texts.map((text) => el("th", { scope: "col", text })),
  );
  const rows = timeline.map((f, i) => {
    return el(
      "tr",
      {},
      seekCell(f.timestamp, () => chart?.select(i)),
      el("td", { text: String(f.index) }),
      ...f.scores.map((score) => el("td", { text: score.toFixed(3) })),
    );
  });
  $("retrieve-table").replaceChildren(
    el("caption", { className: "visually-hidden", text: "Each description's score per sampled frame" }),
    el("thead", {}, head),
    el("tbody", {}, ...rows),
  );
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
