// The per-frame timeline: probability of each class over time, one line per class, drawn as SVG at
// the container's real pixel width (redrawn when it changes, so text never shrinks on a phone).
// Each sampled frame is one point group: click it, or focus the chart and use the arrow keys and
// Enter, to seek the video there (`onSeek(timestamp, frame)`).

import { colourFor, percent, ranked, seconds, svg } from "./ui.js";

const HEIGHT = 240;
const MARGIN = { top: 12, right: 16, bottom: 34, left: 44 };

/**
 * Renders `timeline` ([{index, timestamp, face_detected, label, probabilities}]) into `container`.
 * Returns {setTime(t), destroy()}.
 */
export function timelineChart(container, timeline, classes, { duration, onSeek, onFocusFrame }) {
  let selected = 0; // the frame that takes the focus
  let chosen = false; // whether a frame was chosen; until then none is marked selected
  let playhead = null;
  let x = null;
  let width = 0;
  let frame = null;
  let now = 0; // the video's current time, kept so a redraw puts the playhead back

  const end = Math.max(duration || 0, timeline.at(-1)?.timestamp || 0) || 1;

  function draw() {
    width = Math.max(280, Math.floor(container.clientWidth));
    const plotW = width - MARGIN.left - MARGIN.right;
    const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
    x = (t) => MARGIN.left + (t / end) * plotW;
    const y = (p) => MARGIN.top + (1 - p) * plotH;

    const chart = svg("svg", {
      class: "timeline",
      width,
      height: HEIGHT,
      viewBox: `0 0 ${width} ${HEIGHT}`,
      role: "group",
      "aria-label": `Timeline of ${timeline.length} sampled frames; use the arrow keys to move between frames and Enter to seek the clip`,
    });

    // grid and y axis
    const grid = svg("g", { class: "grid", "aria-hidden": "true" });
    for (const p of [0, 0.25, 0.5, 0.75, 1]) {
      grid.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(p), y2: y(p) }));
      grid.append(
        svg("text", { x: MARGIN.left - 6, y: y(p), "text-anchor": "end", "dominant-baseline": "middle", text: `${p * 100}%` }),
      );
    }
    // x axis: a tick at every sampled frame, a label where there is room
    const axis = svg("g", { class: "axis", "aria-hidden": "true" });
    axis.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(0), y2: y(0) }));
    let lastLabel = -Infinity;
    timeline.forEach((f, i) => {
      const px = x(f.timestamp);
      axis.append(svg("line", { class: "tick", x1: px, x2: px, y1: y(0), y2: y(0) + 5 }));
      const isLast = i === timeline.length - 1;
      if (px - lastLabel >= 52 && (isLast || x(timeline.at(-1).timestamp) - px >= 52)) {
        axis.append(svg("text", { x: px, y: y(0) + 18, "text-anchor": "middle", text: seconds(f.timestamp) }));
        lastLabel = px;
      }
    });
    grid.append(axis);
    chart.append(grid);

    // one line per class
    const lines = svg("g", { class: "lines", "aria-hidden": "true" });
    classes.forEach((cls, c) => {
      const points = timeline.map((f) => `${x(f.timestamp).toFixed(1)},${y(f.probabilities[cls] ?? 0).toFixed(1)}`);
      lines.append(svg("polyline", { points: points.join(" "), stroke: colourFor(c), "data-class": cls }));
    });
    chart.append(lines);

    playhead = svg("line", { class: "playhead", y1: MARGIN.top, y2: y(0), x1: MARGIN.left, x2: MARGIN.left, "aria-hidden": "true" });
    chart.append(playhead);

    // one interactive group per sampled frame
    const points = svg("g", { class: "points" });
    const spacing = timeline.length > 1 ? plotW / timeline.length : plotW;
    timeline.forEach((f, i) => {
      const px = x(f.timestamp);
      const top = ranked(f.probabilities)[0];
      const group = svg("g", {
        class: chosen && i === selected ? "frame-point selected" : "frame-point",
        role: "button",
        tabindex: i === selected ? 0 : -1,
        "data-index": i,
        "data-frame": f.index,
        "data-timestamp": f.timestamp,
        "aria-label": `Frame ${f.index} at ${seconds(f.timestamp)}: ${top[0]} ${percent(top[1])}${f.face_detected ? "" : ", no face found"}`,
      });
      group.append(
        svg("rect", { class: "hit", x: px - spacing / 2, y: MARGIN.top, width: spacing, height: plotH + 8 }),
        svg("line", { class: "guide", x1: px, x2: px, y1: MARGIN.top, y2: y(0) }),
      );
      classes.forEach((cls, c) => {
        group.append(svg("circle", { cx: px, cy: y(f.probabilities[cls] ?? 0), r: 3.5, fill: colourFor(c) }));
      });
      points.append(group);
    });
    chart.append(points);

    points.addEventListener("click", (event) => {
      const group = event.target.closest(".frame-point");
      if (group) choose(Number(group.dataset.index), true);
    });
    points.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: 1, ArrowUp: 1, ArrowLeft: -1, ArrowDown: -1 };
      let next = null;
      if (event.key in moves) next = selected + moves[event.key];
      else if (event.key === "Home") next = 0;
      else if (event.key === "End") next = timeline.length - 1;
      else if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        choose(selected, true);
        return;
      }
      if (next === null) return;
      event.preventDefault();
      choose(Math.max(0, Math.min(timeline.length - 1, next)), false, true);
    });
    points.addEventListener("focusin", (event) => {
      const group = event.target.closest(".frame-point");
      if (group) onFocusFrame?.(timeline[Number(group.dataset.index)]);
    });

    container.replaceChildren(chart);
    frame = chart;
    setTime(now);
  }

  function choose(i, seek, focus = false) {
    const groups = frame.querySelectorAll(".frame-point");
    groups[selected]?.setAttribute("tabindex", "-1");
    groups[selected]?.classList.remove("selected");
    selected = i;
    chosen = true;
    groups[i].setAttribute("tabindex", "0");
    groups[i].classList.add("selected");
    if (focus) groups[i].focus();
    onFocusFrame?.(timeline[i]);
    if (seek) onSeek?.(timeline[i].timestamp, timeline[i]);
  }

  function setTime(t) {
    now = t;
    const px = x(Math.min(Math.max(t, 0), end));
    playhead.setAttribute("x1", px);
    playhead.setAttribute("x2", px);
  }

  draw();
  let pending = false;
  const observer = new ResizeObserver(() => {
    if (pending || Math.abs(Math.floor(container.clientWidth) - width) < 2) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (!container.isConnected || Math.abs(Math.floor(container.clientWidth) - width) < 2) return;
      draw();
    });
  });
  observer.observe(container);

  return {
    setTime,
    select: (i) => choose(i, true),
    destroy: () => observer.disconnect(),
  };
}
