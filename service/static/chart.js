// A per-frame timeline: a value of each series over time, one line per series, drawn as SVG at the
// container's real pixel width (redrawn when it changes, so text never shrinks on a phone). The Video
// view draws each class's probability; the Retrieve view each description's score. Each sampled frame
// is one point group: click it, or focus the chart and use the arrow keys and Enter, to seek the video
// there (`onSeek(timestamp, frame)`).

import { colourFor, percent, ranked, seconds, svg } from "./ui.js";

const HEIGHT = 240;
const MARGIN = { top: 12, right: 16, bottom: 34, left: 44 };

// The Video view's series: class words, read from each frame's probabilities on a 0 to 1 scale.
const probability = (frame, cls) => frame.probabilities[cls] ?? 0;
const asPercent = (p) => `${p * 100}%`;

function describeClasses(f) {
  const top = ranked(f.probabilities)[0];
  return `${top[0]} ${percent(top[1])}${f.face_detected ? "" : ", no face found"}`;
}

/**
 * Renders `timeline` ([{index, timestamp, ...}]) into `container`, a line per entry of `series`. By
 * default the series are class words and each frame is a /predict-video timeline entry; `value(frame,
 * name, i)`, `range` ([low, high]), `tick(v)` (a y-axis label) and `describe(frame)` (what a point says
 * to a screen reader) draw any other values. Returns {setTime(t), select(i), destroy()}.
 */
export function timelineChart(
  container,
  timeline,
  series,
  { duration, onSeek, onFocusFrame, value = probability, range = [0, 1], tick = asPercent, describe = describeClasses },
) {
  const [low, high] = range;
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
    const y = (v) => MARGIN.top + (1 - (v - low) / (high - low)) * plotH;
    const bottom = MARGIN.top + plotH;

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
    for (const q of [0, 0.25, 0.5, 0.75, 1]) {
      const v = low + q * (high - low);
      grid.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(v), y2: y(v) }));
      grid.append(
        svg("text", { x: MARGIN.left - 6, y: y(v), "text-anchor": "end", "dominant-baseline": "middle", text: tick(v) }),
      );
    }
    // x axis: a tick at every sampled frame, a label where there is room
    const axis = svg("g", { class: "axis", "aria-hidden": "true" });
    axis.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: bottom, y2: bottom }));
    let lastLabel = -Infinity;
    timeline.forEach((f, i) => {
      const px = x(f.timestamp);
      axis.append(svg("line", { class: "tick", x1: px, x2: px, y1: bottom, y2: bottom + 5 }));
      const isLast = i === timeline.length - 1;
      if (px - lastLabel >= 52 && (isLast || x(timeline.at(-1).timestamp) - px >= 52)) {
        axis.append(svg("text", { x: px, y: bottom + 18, "text-anchor": "middle", text: seconds(f.timestamp) }));
        lastLabel = px;
      }
    });
    grid.append(axis);
    chart.append(grid);

    // one line per series
    const lines = svg("g", { class: "lines", "aria-hidden": "true" });
    series.forEach((name, c) => {
      const points = timeline.map((f) => `${x(f.timestamp).toFixed(1)},${y(value(f, name, c)).toFixed(1)}`);
      lines.append(svg("polyline", { points: points.join(" "), stroke: colourFor(c), "data-series": name }));
    });
    chart.append(lines);

    playhead = svg("line", { class: "playhead", y1: MARGIN.top, y2: bottom, x1: MARGIN.left, x2: MARGIN.left, "aria-hidden": "true" });
    chart.append(playhead);

    // one interactive group per sampled frame
    const points = svg("g", { class: "points" });
    const spacing = timeline.length > 1 ? plotW / timeline.length : plotW;
    timeline.forEach((f, i) => {
      const px = x(f.timestamp);
      const group = svg("g", {
        class: chosen && i === selected ? "frame-point selected" : "frame-point",
        role: "button",
        tabindex: i === selected ? 0 : -1,
        "data-index": i,
        "data-frame": f.index,
        "data-timestamp": f.timestamp,
        "aria-label": `Frame ${f.index} at ${seconds(f.timestamp)}: ${describe(f)}`,
      });
      group.append(
        svg("rect", { class: "hit", x: px - spacing / 2, y: MARGIN.top, width: spacing, height: plotH + 8 }),
        svg("line", { class: "guide", x1: px, x2: px, y1: MARGIN.top, y2: bottom }),
      );
      series.forEach((name, c) => {
        group.append(svg("circle", { cx: px, cy: y(value(f, name, c)), r: 3.5, fill: colourFor(c) }));
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
