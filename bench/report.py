"""Pure parts of the benchmark: a load point's summary, the targets, the table.

The targets are ratios of figures measured in the same run, so they hold on any machine; only the GPU
target is an absolute rate (5x clip-as-service's published 286 images/s on one Titan RTX). Ratios of
throughput and latency are taken in each interleaved round and their median is the target's value:
on a shared machine whose speed drifts, figures taken minutes apart don't compare.
"""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable, Sequence

import numpy as np

from bench.load import LoadResult

CLIP_AS_SERVICE_IMAGES_PER_S = 286.0  # ViT-B/32 image embedding, one Titan RTX (published)
TARGET_CONCURRENCY = 32
GPU_CONCURRENCY = 256
COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
# A target's verdict; a missing figure is not measured, never a pass.
VERDICTS = {True: "pass", False: "fail", None: "not measured"}


def fmt(value: float | None, spec: str = ".3g") -> str:
    """A figure for a table; "-" when it is missing."""
    return "-" if value is None else format(value, spec)


def verdict(passed: bool | None) -> str:
    return VERDICTS[passed]


def target_line(t: dict, name: str | None = None) -> str:
    """A target's verdict on one line, e.g. `FAIL batching_gain: 1.8 >= 2`; `name` for the target's."""
    value = "missing" if t["value"] is None else fmt(t["value"])
    return f"{verdict(t['passed']).upper()} {name or t['name']}: {value} {t['op']} {t['threshold']:g}"


def histogram_mean(delta: dict[str, float], name: str, scale: float = 1.0) -> float | None:
    """A Prometheus histogram's mean observation during a point, from the change in _sum and _count."""
    count = delta.get(f"{name}_count", 0.0)
    return scale * delta.get(f"{name}_sum", 0.0) / count if count else None


def summarise_point(result: LoadResult, batching: bool, delta: dict[str, float]) -> dict:
    latencies_ms = [1000 * s for s in result.latencies_s]
    per_second = 1 / result.wall_s if result.wall_s else None
    quantiles = {
        f"p{q}_ms": float(np.percentile(latencies_ms, q)) if latencies_ms else None for q in (50, 95, 99)
    }
    return {
        "concurrency": result.concurrency,
        "batching": batching,
        "requests": result.requested,
        "ok": result.ok,
        "failures": dict(result.failures),
        "unfinished": result.unfinished,
        "wall_s": result.wall_s,
        "throughput": result.throughput,
        **quantiles,
        "mean_batch": histogram_mean(delta, "fer_batch_size"),
        "mean_model_ms_per_call": histogram_mean(delta, "fer_model_seconds", 1000),
        # The share of the point's wall time the encoder ran: near 1, the encoder is the bottleneck.
        "encoder_busy": per_second and delta.get("fer_model_seconds_sum", 0.0) * per_second,
        "client_cpu_cores": per_second and result.client_cpu_s * per_second,  # it competes with the service
        "client_processes": len(set(result.client_pids)),
    }


def _find(rows: Sequence[dict], **match) -> dict:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), {})


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _median(values: Sequence[float | None]) -> float | None:
    """The median, or None when any round lacks the figure (a missing figure is not a pass)."""
    return None if not values or None in values else statistics.median(values)


RAW_ENCODERS = ("encoder", "torch_encoder")  # the run's backend; torch beside it when that is another


def median_raw(rounds: list[dict]) -> dict:
    """Each raw figure's median over the rounds; a call's time follows from the median rate."""
    raw: dict = {}
    for key in (k for k in RAW_ENCODERS if k in rounds[0]["raw"]):
        raw[key] = []
        for i, batch in enumerate(r["batch"] for r in rounds[0]["raw"][key]):
            rate = statistics.median(r["raw"][key][i]["images_per_s"] for r in rounds)
            raw[key].append({"batch": batch, "images_per_s": rate, "ms_per_call": 1000 * batch / rate})
    raw["decode_prepare_ms"] = statistics.median(r["raw"]["decode_prepare_ms"] for r in rounds)
    return raw


def round_ratios(round_: dict, max_batch: int) -> dict[str, float | None]:
    """One round's ratios: service vs raw, batching on vs off (and the raw encoder's own gain from batch
    1 to the max batch), concurrency-1 latency vs raw encode + decode; when the run's backend is another,
    the raw encoder against torch's at batch 1 and the max batch, and the service against the torch
    service's concurrency-1 p50 and concurrency-32 throughput (`torch_points`)."""
    raw, points = round_["raw"]["encoder"], round_["points"]
    torch_raw, torch_points = round_["raw"].get("torch_encoder", []), round_.get("torch_points", [])
    raw_batch, raw_one = _find(raw, batch=max_batch).get("images_per_s"), _find(raw, batch=1)
    on = _find(points, concurrency=TARGET_CONCURRENCY, batching=True).get("throughput")
    off = _find(points, concurrency=TARGET_CONCURRENCY, batching=False).get("throughput")
    single = _find(points, concurrency=1, batching=True).get("p50_ms")
    reference_ms = raw_one["ms_per_call"] + round_["raw"]["decode_prepare_ms"] if raw_one else None
    return {
        "service_vs_raw_encoder": _ratio(on, raw_batch),
        "batching_gain": _ratio(on, off),
        "raw_batching_gain": _ratio(raw_batch, raw_one.get("images_per_s")),
        "single_request_latency": _ratio(single, reference_ms),
        **{
            f"raw_vs_torch_{name}": _ratio(
                _find(raw, batch=batch).get("images_per_s"), _find(torch_raw, batch=batch).get("images_per_s")
            )
            for name, batch in (("batch_1", 1), ("max_batch", max_batch))
        },
        "service_p50_c1_vs_torch": _ratio(single, _find(torch_points, concurrency=1).get("p50_ms")),
        "service_throughput_c32_vs_torch": _ratio(
            on, _find(torch_points, concurrency=TARGET_CONCURRENCY).get("throughput")
        ),
    }


def target(name: str, value, op: str, threshold: float, detail: str, rounds=(), raw_value=None) -> dict:
    passed = None if value is None else COMPARE[op](value, threshold)
    return {
        "name": name,
        "value": value,
        "op": op,
        "threshold": threshold,
        "detail": detail,
        "rounds": list(rounds),
        "raw_value": raw_value,
        "passed": passed,
    }


def evaluate_targets(report: dict) -> list[dict]:
    """The targets, each a comparison of figures from this report."""
    gpu = report["device"] == "cuda"
    max_batch = report["settings"]["max_batch"]
    per_round = [round_ratios(r, max_batch) for r in report["rounds"]]

    def rounds(name: str) -> dict:
        values = [r[name] for r in per_round]
        return {"value": _median(values), "rounds": values}

    videos = [v for v in report["video"] if not v["detect_faces"]]
    short, long = (videos[0], videos[-1]) if len(videos) >= 2 else ({}, {})
    faces = _find(report["video"], clip=short.get("clip"), detect_faces=True)
    return [
        target(
            "service_vs_raw_encoder",
            op=">=",
            threshold=0.8,
            detail=f"service images/s at concurrency {TARGET_CONCURRENCY} / raw encoder images/s at batch {max_batch}",
            **rounds("service_vs_raw_encoder"),
        ),
        target(
            "batching_gain",
            op=">=",
            threshold=4.0 if gpu else 2.0,
            detail=f"images/s at concurrency {TARGET_CONCURRENCY}, batching on / off (FER_MAX_BATCH=1)",
            raw_value=rounds("raw_batching_gain")["value"],
            **rounds("batching_gain"),
        ),
        target(
            "single_request_latency",
            op="<=",
            threshold=1.3,
            detail="p50 latency at concurrency 1 / (raw batch-1 encode + in-process decode and prepare)",
            **rounds("single_request_latency"),
        ),
        target(
            "long_video_latency",
            _ratio(long.get("latency_ms"), short.get("latency_ms")),
            "<=",
            3.0,
            f"/predict-video latency, {long.get('clip')} / {short.get('clip')}",
        ),
        target(
            "video_face_detection",
            _ratio(faces.get("latency_ms"), short.get("latency_ms")),
            "<=",
            2.0,
            f"/predict-video latency of the {short.get('clip')} clip, 16 frames, faces detected / not",
        ),
        tracks_target(report.get("tracks_video", []), report["machine"]["cpus"]),
        target(
            "memory_growth",
            report["memory"].get("growth"),
            "<",
            0.10,
            "service RSS at the end of the long run / after its first 10% of requests, minus 1",
        ),
        *face_targets(report.get("faces") or {}),
        *(backend_targets(report, rounds) if report.get("backend", "torch") != "torch" else []),
        target(
            "gpu_throughput",
            _find(report["points"], concurrency=GPU_CONCURRENCY).get("throughput") if gpu else None,
            ">=",
            5 * CLIP_AS_SERVICE_IMAGES_PER_S,
            f"images/s at concurrency {GPU_CONCURRENCY} on a GPU (5 x clip-as-service's 286 on a Titan RTX)",
        ),
    ]


def backend_targets(report: dict, rounds: Callable[[str], dict]) -> list[dict]:
    """A run on another backend (--backend openvino) against torch beside it, round by round: the raw
    encoders, and the two services. A run on torch itself has nothing to compare."""
    max_batch, backend = report["settings"]["max_batch"], report.get("backend")
    return [
        *(
            target(
                f"raw_vs_torch_{name}",
                op=">=",
                threshold=threshold,
                detail=f"raw encoder images/s at batch {batch}, FER_BACKEND={backend} / torch, "
                "same precision",
                **rounds(f"raw_vs_torch_{name}"),
            )
            for name, batch, threshold in (("batch_1", 1, 1.4), ("max_batch", max_batch, 1.05))
        ),
        target(
            "service_p50_c1_vs_torch",
            op="<=",
            threshold=0.75,
            detail=f"service p50 latency at concurrency 1, FER_BACKEND={backend} / torch, "
            "batching on, same precision",
            **rounds("service_p50_c1_vs_torch"),
        ),
        target(
            "service_throughput_c32_vs_torch",
            op=">=",
            threshold=1.0,
            detail=f"service images/s at concurrency {TARGET_CONCURRENCY}, FER_BACKEND={backend} "
            "/ torch, batching on, same precision",
            **rounds("service_throughput_c32_vs_torch"),
        ),
    ]


def tracks_target(rows: list[dict], cpus: int) -> dict:
    """Video with tracks against video as it was (one face a frame, searched at 320 px): the median of
    the ratios of their interleaved requests, repeat by repeat. `floor`: the tracks request's CPU time
    spread over every core, against one face's latency: what that request's work costs the machine, below
    which no scheduling of the same work brings the ratio (None where CPU time was not measured)."""
    tracks, one_face = _find(rows, service="tracks"), _find(rows, service="one face")
    pairs = zip(tracks.get("latencies_ms", []), one_face.get("latencies_ms", []), strict=False)
    ratios = [_ratio(a, b) for a, b in pairs]
    cpu_ms = tracks.get("cpu_ms")
    floor = None if cpu_ms is None else _ratio(cpu_ms / cpus, one_face.get("latency_ms"))

    def settings(row: dict) -> str:
        env = ", ".join(f"{k}={v}" for k, v in row.get("env", {}).items())
        return f" ({env})" if env else ""

    found = "" if tracks.get("tracks") is None else f", {tracks['tracks']} tracks found"
    bound = "" if floor is None else f"; the tracks request's CPU time on all {cpus} cores: {floor:.2f}"
    return {
        **target(
            "tracks_vs_one_face_latency",
            _median(ratios),
            "<=",
            1.5,
            f"/predict-video latency of the {tracks.get('clip', '3 people')} clip{found}, with tracks"
            f"{settings(tracks)} / one face a frame as before tracks{settings(one_face)}, per interleaved "
            f"request{bound}",
            rounds=ratios,
        ),
        "floor": floor,
    }


def face_targets(faces: dict) -> list[dict]:
    """The face detector's targets, from bench.faces' figures (None without the development data)."""
    name = faces.get("detector")
    canvases, frames, timing = faces.get("canvases"), faces.get("mafw_frames"), faces.get("timing")
    speed = timing and _ratio(timing[f"{name}_ms"], timing["haar_ms"])
    return [
        target(
            "face_recall",
            canvases and canvases[name]["recall"],
            ">=",
            0.95,
            "faces found (IoU >= 0.3) on canvases of 1, 4 and 16 MAFW faces, 36-44 or 70-120 px wide, rotated or mirrored",
        ),
        target(
            "face_in_video_frames",
            frames and frames[name]["share"],
            ">=",
            0.99,
            "MAFW frames with a face found",
        ),
        target(
            "face_detector_speed", speed, "<=", 1.0, "ms per 640x480 image on one thread, detector / haar"
        ),
    ]


def _torch_service_line(rounds: list[dict]) -> list[str]:
    """The torch service's figures in a run on another backend, each the median of the rounds."""
    if not rounds or "torch_points" not in rounds[0]:
        return []
    figures = {
        key: _median([_find(r.get("torch_points", []), concurrency=c).get(key) for r in rounds])
        for c, key in ((1, "p50_ms"), (TARGET_CONCURRENCY, "throughput"))
    }
    return [
        f"torch service beside it (median of the rounds): concurrency 1 p50 {fmt(figures['p50_ms'], '.1f')} ms, "
        f"concurrency {TARGET_CONCURRENCY} {fmt(figures['throughput'], '.1f')} img/s"
    ]


def format_table(report: dict) -> str:
    """The human-readable summary printed after the JSON."""
    host, s = report["machine"], report["settings"]
    lines = [
        f"load average {host['load_average_at_start']:.1f} at start, {host['load_average_at_end']:.1f} at end "
        f"(other work on {host['cpus']} cores skews every figure)",
        f"device {report['device']} ({host['gpu'] or str(host['cpus']) + ' CPU cores'}), model "
        f"{report['model']['name']}, {report['dtype']}, {report.get('backend', 'torch')}, max batch {s['max_batch']}",
        "raw encoder (median of the rounds): "
        + ", ".join(f"batch {r['batch']} {r['images_per_s']:.1f} img/s" for r in report["raw"]["encoder"])
        + f"; decode+prepare {report['raw']['decode_prepare_ms']:.1f} ms",
        *(
            [
                "raw torch encoder beside it: "
                + ", ".join(
                    f"batch {r['batch']} {r['images_per_s']:.1f} img/s"
                    for r in report["raw"]["torch_encoder"]
                )
            ]
            if "torch_encoder" in report["raw"]
            else []
        ),
        *_torch_service_line(report["rounds"]),
        "",
        f"{'conc':>5} {'batching':>8} {'ok/req':>9} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'busy':>5}",
    ]
    for p in report["points"]:
        lines.append(
            f"{p['concurrency']:>5} {'on' if p['batching'] else 'off':>8} {p['ok']:>4}/{p['requests']:<4} "
            f"{p['throughput']:>8.1f} {fmt(p['p50_ms'], '.1f'):>8} {fmt(p['p99_ms'], '.1f'):>8} {fmt(p['mean_batch'], '.1f'):>6} "
            f"{fmt(p['encoder_busy'], '.2f'):>5}"
        )
    for v in report["video"]:
        faces = "faces" if v["detect_faces"] else "no faces"
        lines.append(
            f"video {v['clip']} ({faces}): {fmt(v['latency_ms'], '.0f')} ms, decode {fmt(v['decode_ms'], '.0f')} ms"
        )
    for v in report.get("tracks_video", []):
        lines.append(
            f"video {v['clip']} ({v['service']}): {fmt(v['latency_ms'], '.0f')} ms, decode "
            f"{fmt(v['decode_ms'], '.0f')} ms, {fmt(v['tracks'], 'd')} tracks, {fmt(v['faces'], 'd')} faces"
        )
    m = report["memory"]
    growth = None if m.get("growth") is None else 100 * m["growth"]
    lines += [
        f"memory: peak RSS {fmt(m.get('peak_rss_mb'), '.0f')} MiB, growth {fmt(growth, '.1f')}% over {m['requests']} requests",
        "",
    ]
    for t in report["targets"]:
        rounds = f"; rounds {' '.join(fmt(v) for v in t['rounds'])}" if t["rounds"] else ""
        lines.append(f"{target_line(t)}  ({t['detail']}{rounds})")
    return "\n".join(lines)
