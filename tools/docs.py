"""`python -m tools.docs`: writes the pages generated from the code and from committed data, so they
cannot drift: docs/configuration.md from the settings classes, docs/benchmarks.md from the reports in
bench/results/. tests/test_docs.py fails when either is out of date."""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from bench.report import TARGET_CONCURRENCY, fmt, verdict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Every setting in exactly one group (the generator refuses to leave one out).
GROUPS = {
    "Model": [
        "preset", "clip_model", "clip_weights", "projection", "projection_any_clip", "preprocess", "device",
        "dtype", "backend", "openvino_cache", "weights_dir", "weights_mirror",
    ],
    "Faces": ["face_detector", "face_threshold", "align_faces", "video_face_side", "max_faces", "face_margin"],
    "Media limits and the decode budget": [
        "max_image_pixels", "max_video_pixels", "max_video_seconds", "max_video_frames", "max_decode_frames",
        "max_decode_megapixels", "max_decode_seconds",
    ],
    "Batching and admission (service)": [
        "max_batch", "max_wait_ms", "max_queue", "max_request_items", "video_share", "text_share",
    ],
    "Request limits (service)": ["max_upload_mb", "max_frames", "max_descriptions", "max_description_chars"],
    "Threads and processes (service)": ["workers", "device_threads", "decode_workers", "video_decode_workers"],
    "Connections (`fer serve`)": [
        "keep_alive_s", "header_timeout_s", "body_timeout_s", "max_header_kb", "max_connections",
        "max_uploads_mb", "shutdown_grace_s", "linger_s", "linger_mb",
    ],
    "Access (service)": ["api_key", "cors_origins", "metrics_port"],
    "Logging (`fer serve`)": ["log_format"],
}  # fmt: skip

CONFIGURATION_INTRO = """# Configuration

Every setting is an environment variable. The `fer` commands and the service read the same ones, once per
process; a value that cannot be used stops the process with one line naming the variable. The service's
settings (marked "service") apply to `fer serve`, `uvicorn service.app:app` and the Ray deployment; the
connection settings only to `fer serve`, which configures its HTTP server with them (behind another
server, set the same limits there: [serving.md](serving.md)).

Setting any of `FER_CLIP_MODEL`, `FER_CLIP_WEIGHTS`, `FER_PROJECTION` or `FER_PREPROCESS` makes the
model `custom` in answers. Weights are never downloaded implicitly: a missing file is one error message
naming the command that gets it ([weights.md](weights.md)).

This page is generated from the settings classes (`python -m tools.docs`).
"""


def shown_command(report: dict) -> str:
    """A report's command, with the development data's folder (outside the repository, on the team's
    machines only) named for what it is."""
    return re.sub(r"(--faces-data) \S+", r"\1 DATA", report.get("command") or "")


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str) and not value:
        return "empty"
    return f"`{value}`"


def configuration() -> str:
    from service.settings import ServiceSettings

    fields = ServiceSettings.model_fields
    grouped = [name for names in GROUPS.values() for name in names]
    missing, unknown = set(fields) - set(grouped), set(grouped) - set(fields)
    if missing or unknown or len(grouped) != len(set(grouped)):
        raise SystemExit(f"tools/docs.py GROUPS: missing {sorted(missing)}, unknown {sorted(unknown)}")
    lines = [CONFIGURATION_INTRO]
    for title, names in GROUPS.items():
        lines += [f"## {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for name in names:
            field = fields[name]
            lines.append(f"| `FER_{name.upper()}` | {_default(field)} | {field.description} |")
        lines.append("")
    return "\n".join(lines)


def _answered(row: dict) -> str:
    """`ok/requests`, and what went wrong with the rest."""
    failures = ", ".join(f"{k}: {n}" for k, n in sorted((row.get("failures") or {}).items()))
    return f"{row.get('ok')}/{row.get('requests')}" + (f" ({failures})" if failures else "")


def benchmarks() -> str:
    """docs/benchmarks.md: each committed report's machine, settings, figures and targets."""
    lines = [
        "# Benchmarks",
        "",
        "Every figure on this page comes from a JSON report committed in `bench/results/`, written by the",
        "command it names; the page is generated from them (`python -m tools.docs`). Ratios are taken within",
        "one run (the targets compare figures from the same run), because these machines are shared and their",
        "speed drifts. How to run them: [serving.md](serving.md#benchmarks). A run with `--backend openvino`",
        "serves with the OpenVINO encoders ([serving.md](serving.md#openvino-on-cpu)) and measures, in each",
        "round and in the same precision, the raw torch encoder beside the raw OpenVINO one and a torch service",
        "(batching on) beside the OpenVINO one.",
        "",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        report = json.loads(path.read_text())
        lines += _report(path.name, report)
    lines += _abuse_scenarios()
    return "\n".join(lines) + "\n"


def _abuse_scenarios() -> list[str]:
    """What `bench.abuse` runs, from its registry: each attacker as its docstring says, its sizes, and
    the targets judged beside it (a report lists the scenarios the benchmark had when it ran)."""
    from bench.abuse import ATTACKS, evaluate_targets

    lines = [
        "## Abuse scenarios",
        "",
        "Each scenario runs its attacker beside the victim (an ordinary client's `POST /predict`, one at a "
        "time) on a fresh service; the sizes are the benchmark's (`--quick` uses smaller ones). Every "
        "scenario has the victim's targets; some also judge what the attacker's requests got and the "
        "service's memory. This list is generated from `bench/abuse.py`; a report above holds the "
        "scenarios that existed when it ran.",
        "",
        "| scenario | attacker | sizes | targets |",
        "|---|---|---|---|",
    ]
    for name, attack in ATTACKS.items():
        what = " ".join(inspect.getdoc(attack.run).split())
        sizes = ", ".join(
            f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in attack.full.items()
        )
        targets = "; ".join(
            f"`{t['name']}` {t['op']} {t['threshold']:g} ({t['detail']})"
            for t in evaluate_targets([{"name": name}])
        )
        lines.append(f"| {name} | {what} | {sizes} | {targets} |")
    return [*lines, ""]


def _rounds(rounds: list[dict]) -> list[str]:
    """The interleaved rounds behind the ratio targets, batching off included (the point table above
    keeps one figure a load point)."""
    if not rounds:
        return []
    # The run's raw encoder, and torch's beside it in a run on another backend.
    encoders = [k for k in ("encoder", "torch_encoder") if k in rounds[0]["raw"]]
    names = {"encoder": "raw encoder", "torch_encoder": "raw torch encoder"}
    lines = [
        "",
        "Interleaved rounds (images/s; the targets take the median of the per-round ratios):",
        "",
        "| round | "
        + " | ".join(
            f"c{p['concurrency']} batching {'on' if p['batching'] else 'off'}" for p in rounds[0]["points"]
        )
        + "".join(f" | {names[k]} batch 1 | {names[k]} max batch" for k in encoders)
        + " |",
        "|---" * (len(rounds[0]["points"]) + 1 + 2 * len(encoders)) + "|",
    ]
    for i, rd in enumerate(rounds, 1):
        raw = "".join(
            f" | {fmt(rd['raw'][k][0]['images_per_s'], '.1f')} | {fmt(rd['raw'][k][-1]['images_per_s'], '.1f')}"
            for k in encoders
        )
        lines.append(f"| {i} | " + " | ".join(fmt(p["throughput"], ".1f") for p in rd["points"]) + raw + " |")
    return lines + _torch_service(rounds)


def _torch_service(rounds: list[dict]) -> list[str]:
    """A run on another backend: its batching service beside the torch service in each round, the
    figures the service targets compare (a report from before the torch service has none)."""
    if "torch_points" not in rounds[0]:
        return []
    c = TARGET_CONCURRENCY

    def figure(points: list[dict], concurrency: int, key: str, spec: str) -> str:
        return fmt(
            next((p[key] for p in points if p["concurrency"] == concurrency and p["batching"]), None), spec
        )

    lines = [
        "",
        "The service beside a torch service (batching on, same precision) in each round:",
        "",
        f"| round | c1 p50 ms | torch c1 p50 ms | c{c} images/s | torch c{c} images/s |",
        "|---|---|---|---|---|",
    ]
    for i, rd in enumerate(rounds, 1):
        torch_points = rd.get("torch_points", [])
        cells = [
            figure(points, concurrency, key, spec)
            for concurrency, key, spec in ((1, "p50_ms", ".0f"), (c, "throughput", ".1f"))
            for points in (rd["points"], torch_points)
        ]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return lines


def _cache_hit(r: dict) -> str:
    """Whether the OpenVINO services read the encoders that the benchmark's own load had cached, as a
    restart does (a report on torch, or from before this was recorded, says nothing)."""
    if "openvino_cache_hit" not in r:
        return ""
    answer = "yes" if r["openvino_cache_hit"] else "**no**"
    return (
        f" The OpenVINO services, started after the benchmark's own load, read the cached encoders: {answer}."
    )


def _report(name: str, r: dict) -> list[str]:
    if "baseline" in r:
        return _abuse_report(name, r)
    host = r.get("machine", {})
    where = host.get("gpu") or f"{host.get('cpus')} CPU cores, no GPU"
    lines = [
        f"## {name}",
        "",
        f"`{shown_command(r)}` on commit {r.get('commit')}, {r.get('date')}: {where}, {host.get('platform')}, "
        f"torch {host.get('torch')}; load average {fmt(host.get('load_average_at_start'), '.1f')} at the start.",
        "",
    ]
    if "targets" in r and r.get("points"):
        lines += [
            f"Model: {r['model']['name']}, {r['dtype']} on {r.get('backend', 'torch')}, device {r['device']}, "
            f"max batch {r['settings']['max_batch']}.{_cache_hit(r)}",
            "",
            "| concurrency | batching | answered | images/s | p50 ms | p99 ms | mean batch |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in r["points"]:
            lines.append(
                f"| {p['concurrency']} | {'on' if p['batching'] else 'off'} | {_answered(p)} | {fmt(p['throughput'], '.1f')} | "
                f"{fmt(p['p50_ms'], '.0f')} | {fmt(p['p99_ms'], '.0f')} | {fmt(p['mean_batch'], '.1f')} |"
            )
        lines += _rounds(r.get("rounds", []))
        lines += ["", "| video | faces | answered | latency ms | decode ms |", "|---|---|---|---|---|"]
        for v in r.get("video", []):
            lines.append(
                f"| {v['clip']} | {'on' if v['detect_faces'] else 'off'} | {_answered(v)} | {fmt(v['latency_ms'], '.0f')} | "
                f"{fmt(v['decode_ms'], '.0f')} |"
            )
        lines += _tracks_video(r.get("tracks_video", []))
        m = r.get("memory", {})
        lines += [
            "",
            f"Memory: peak RSS {fmt(m.get('peak_rss_mb'), '.0f')} MiB, growth {fmt(m.get('growth'), '.1%')} over {m.get('requests')} requests.",
            "",
        ]
    if r.get("faces") and r["faces"].get("canvases"):
        f = r["faces"]
        name_ = f["detector"]
        lines += [
            "| face detector | canvas recall | MAFW frames with a face | ms a 640x480 image |",
            "|---|---|---|---|",
            f"| {name_} | {fmt(f['canvases'][name_]['recall'])} | {fmt(f['mafw_frames'][name_]['share'])} | "
            f"{fmt(f['timing'][name_ + '_ms'], '.1f')} |",
            f"| haar | {fmt(f['canvases']['haar']['recall'])} | {fmt(f['mafw_frames']['haar']['share'])} | "
            f"{fmt(f['timing']['haar_ms'], '.1f')} |",
            "",
        ]
    lines += _ferplus(r.get("faces") or {})
    lines += _alignment(r.get("faces") or {})
    lines += _targets(r.get("targets", []))
    return lines


def _tracks_video(rows: list[dict]) -> list[str]:
    """A clip of three people on a service with tracks and on one that looks for one face a frame, as
    video did before tracks (reports from before tracks have neither)."""
    if not rows:
        return []
    lines = [
        "",
        "Three people in one clip, faces detected: the same requests taking turns on the batching service "
        "(tracks) and on a service that looks for one face a frame at a small search size (its settings "
        "below), as video did before tracks. Tracks and faces: those of one answer. Encoder ms: the answer's `inference_ms`; CPU ms: the "
        "service's CPU time during one request, all threads (medians).",
        "",
        "| video | service | settings | answered | latency ms | decode ms | encoder ms | CPU ms | tracks | faces |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in rows:
        env = ", ".join(f"`{k}={value}`" for k, value in v.get("env", {}).items())
        lines.append(
            f"| {v['clip']} | {v['service']} | {env} | {_answered(v)} | {fmt(v['latency_ms'], '.0f')} | "
            f"{fmt(v['decode_ms'], '.0f')} | {fmt(v.get('inference_ms'), '.0f')} | "
            f"{fmt(v.get('cpu_ms'), '.0f')} | {fmt(v.get('tracks'), 'd')} | {fmt(v.get('faces'), 'd')} |"
        )
    return lines


def _ferplus(faces: dict) -> list[str]:
    """The share of FER+ images in which a face is found: each is one 48x48 face, what scaling small
    images up is for."""
    f = faces.get("ferplus")
    if not f:
        return []
    name = faces["detector"]
    return [
        f"| detector on {f['images']} FER+ validation images (one 48x48 face each) | share with a face found |",
        "|---|---|",
        f"| {name} | {fmt(f['found'])} |",
        f"| {name}, small images not scaled up | {fmt(f['found_without_small_input_handling'])} |",
        f"| haar | {fmt(f['haar_found'])} |",
        "",
    ]


def _alignment(faces: dict) -> list[str]:
    """What an aligned crop costs over a plain one, and how level it leaves the eyes."""
    a = faces.get("alignment")
    if not a:
        return []
    turned = fmt(a["turned_degrees"], "g")
    lines = [
        f"Alignment, on {a['faces']} faces in the MAFW frames: median {fmt(a['aligned_ms'], '.2f')} ms a face "
        f"for an aligned crop, {fmt(a['plain_ms'], '.2f')} ms for a plain one. How level the eyes are after "
        f"it: each frame turned by {turned} degrees about the face, the eye line's angle measured again by "
        "the detector on each crop:",
        "",
        "| crop | faces measured | median degrees | p90 degrees |",
        "|---|---|---|---|",
    ]
    for crop in ("aligned", "plain"):
        spread = a[f"eye_line_degrees_{crop}"]
        lines.append(
            f"| {crop} | {spread['faces']} | {fmt(spread.get('median'), '.1f')} | {fmt(spread.get('p90'), '.1f')} |"
        )
    return [*lines, ""]


def _abuse_report(name: str, r: dict) -> list[str]:
    """A bench.abuse report: the victim's figures in each scenario, then the per-attack targets."""
    host, settings = r.get("machine", {}), r.get("settings", {})
    window = settings.get("plan", {}).get("window_s")
    lines = [
        f"## {name}",
        "",
        f"`{shown_command(r)}` on commit {r.get('commit')}, {r.get('date')}: {host.get('cpus')} CPU cores, "
        f"{host.get('platform')}; load average {fmt(host.get('load_average_at_start'), '.1f')} at the start.",
        "",
        f"Model: {settings.get('model')}. Each scenario is a fresh service and a {fmt(window, 'g')} s window; "
        "the victim sends one `POST /predict` at a time on a fresh connection. Recovery: how long after the "
        "window until a victim request succeeds within the latency target.",
        "",
        "| scenario | victim requests | succeeded | p50 ms | p95 ms | max ms | recovered after | attacker's outcomes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in [x for x in (r.get("baseline"), *r.get("attacks", [])) if x]:
        v, rec = row.get("victim") or {}, row.get("recovery") or {}
        recovered = "-" if not rec else f"{rec['after_s']:.1f} s" if rec.get("recovered") else "**no**"
        outcomes = row.get("error") or ", ".join(
            f"{k}: {n}" for k, n in sorted(row.get("attacker", {}).items())
        )
        lines.append(
            f"| {row['name']} | {v.get('requests', '-')} | {fmt(v.get('success_share'), '.0%')} | "
            f"{fmt(v.get('p50_ms'), '.0f')} | {fmt(v.get('p95_ms'), '.0f')} | {fmt(v.get('max_ms'), '.0f')} | "
            f"{recovered} | {outcomes or '-'} |"
        )
    lines += ["", "| attack | target | value | passes when | verdict |", "|---|---|---|---|---|"]
    for t in r.get("targets", []):
        lines.append(
            f"| {t['attack']} | {t['name']} | {fmt(t['value'])} | {t['op']} {t['threshold']:g} | {_verdict(t)} |"
        )
    return [*lines, ""]


def _targets(targets: list[dict]) -> list[str]:
    if not targets:
        return []
    lines = ["| target | value | passes when | verdict |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['detail']} | {fmt(t['value'])} | {t['op']} {t['threshold']:g} | {_verdict(t)} |")
    return [*lines, ""]


def _verdict(target: dict) -> str:
    """A failed target stands out on the page."""
    word = verdict(target["passed"])
    return f"**{word}**" if target["passed"] is False else word


PAGES = {"configuration.md": configuration, "benchmarks.md": benchmarks}


def main() -> int:
    for name, build in PAGES.items():
        (ROOT / "docs" / name).write_text(build(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
