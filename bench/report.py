"""Pure parts of the benchmark: summarising a load point, evaluating the targets, printing the table.

The targets are ratios of figures measured in the same run, so they hold on any machine; only the
GPU target is an absolute rate (5x clip-as-service's published 286 images/s on one Titan RTX). The
ratios of throughput and latency are computed in each interleaved round and their median is the
target's value: on a shared machine whose speed drifts, figures taken minutes apart don't compare.
"""

from __future__ import annotations

import operator
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from bench.load import LoadResult

CLIP_AS_SERVICE_IMAGES_PER_S = 286.0  # ViT-B/32 image embedding, one Titan RTX (published)
TARGET_CONCURRENCY = 32
GPU_CONCURRENCY = 256
COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


def histogram_mean(metrics_delta: dict[str, float], name: str, scale: float = 1.0) -> float | None:
    """The mean observation of a Prometheus histogram during a point, from the change in its
    `_sum` and `_count` (e.g. `fer_batch_size`: items per encoder call), times `scale`."""
    count = metrics_delta.get(f"{name}_count", 0.0)
    return scale * metrics_delta.get(f"{name}_sum", 0.0) / count if count else None


def mean_timing(timings: Sequence[dict]) -> dict[str, float]:
    """Mean of each numeric field of the responses' `timing` objects (the service's own breakdown)."""
    keys = sorted({k for t in timings for k, v in t.items() if isinstance(v, int | float)})
    return {k: sum(t.get(k, 0.0) for t in timings) / len(timings) for k in keys}


def summarise_point(result: LoadResult, batching: bool, metrics_delta: dict[str, float]) -> dict:
    latencies_ms = [1000 * s for s in result.latencies_s]
    per_second = 1 / result.wall_s if result.wall_s else None
    # numpy's default linear interpolation between ranks; no latency at all (every request failed): None.
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
        "mean_batch": histogram_mean(metrics_delta, "fer_batch_size"),
        "mean_queue_wait_ms": histogram_mean(metrics_delta, "fer_queue_wait_seconds", 1000),
        "mean_model_ms_per_call": histogram_mean(metrics_delta, "fer_model_seconds", 1000),
        # Share of the point's wall time the encoder was running: near 1, the encoder is the bottleneck.
        "encoder_busy": per_second and metrics_delta.get("fer_model_seconds_sum", 0.0) * per_second,
        # Cores the load generator kept busy: on a small machine it competes with the service.
        "client_cpu_cores": per_second and result.client_cpu_s * per_second,
        "client_processes": len(set(result.client_pids)),
        "server_timing_ms": mean_timing(result.timings),
    }


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None  # None: not measured in this run (e.g. the GPU target on a CPU)
    op: str
    threshold: float
    detail: str
    raw_value: float | None = None  # the same ratio for the raw encoder alone, where one exists
    rounds: tuple[float | None, ...] = ()  # the per-round values whose median is `value`

    @property
    def passed(self) -> bool | None:
        return None if self.value is None else COMPARE[self.op](self.value, self.threshold)

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _find(rows: Sequence[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def median_raw(rounds: list[dict]) -> dict:
    """Each raw figure's median over the rounds (the table's raw line). A call's time follows from the
    median rate, so the two agree (medians taken apart do not, over an even number of rounds)."""
    encoder = []
    for i, batch in enumerate(r["batch"] for r in rounds[0]["raw"]["encoder"]):
        images_per_s = statistics.median(r["raw"]["encoder"][i]["images_per_s"] for r in rounds)
        encoder.append(
            {"batch": batch, "images_per_s": images_per_s, "ms_per_call": 1000 * batch / images_per_s}
        )
    decode = statistics.median(r["raw"]["decode_prepare_ms"] for r in rounds)
    return {"encoder": encoder, "decode_prepare_ms": decode}


def round_ratios(round_: dict, max_batch: int) -> dict[str, float | None]:
    """One round's ratios (None where a figure is missing): service vs raw, batching on vs off (and
    the raw encoder's own batch-1 vs max-batch gain), concurrency-1 latency vs raw encode + decode."""
    raw = round_["raw"]["encoder"]
    raw_batch = (_find(raw, batch=max_batch) or {}).get("images_per_s")
    raw_one = _find(raw, batch=1)
    points = round_["points"]
    on = (_find(points, concurrency=TARGET_CONCURRENCY, batching=True) or {}).get("throughput")
    off = (_find(points, concurrency=TARGET_CONCURRENCY, batching=False) or {}).get("throughput")
    single = (_find(points, concurrency=1, batching=True) or {}).get("p50_ms")
    reference_ms = raw_one["ms_per_call"] + round_["raw"]["decode_prepare_ms"] if raw_one else None
    return {
        "service_vs_raw_encoder": _ratio(on, raw_batch),
        "batching_gain": _ratio(on, off),
        "raw_batching_gain": _ratio(raw_batch, raw_one["images_per_s"] if raw_one else None),
        "single_request_latency": _ratio(single, reference_ms),
    }


def _median(values: Sequence[float | None]) -> float | None:
    """The median, or None when any round lacks the figure (a missing figure is not a pass)."""
    return None if not values or None in values else statistics.median(values)


def evaluate_targets(report: dict) -> list[Target]:
    """The issue's targets, each a comparison of figures from this report."""
    gpu = report["device"] == "cuda"
    max_batch = report["settings"]["max_batch"]
    per_round = [round_ratios(r, max_batch) for r in report["rounds"]]

    def rounds(name: str) -> dict:
        values = tuple(r[name] for r in per_round)
        return {"value": _median(values), "rounds": values}

    videos = report["video"]
    short, long = (videos[0], videos[-1]) if len(videos) >= 2 else ({}, {})
    gpu_point = (_find(report["points"], concurrency=GPU_CONCURRENCY, batching=True) or {}).get("throughput")
    batching_gain = 4.0 if gpu else 2.0
    return [
        Target(
            "service_vs_raw_encoder",
            op=">=",
            threshold=0.8,
            detail=f"service images/s at concurrency {TARGET_CONCURRENCY} / raw encoder images/s at batch {max_batch}",
            **rounds("service_vs_raw_encoder"),
        ),
        Target(
            "batching_gain",
            op=">=",
            threshold=batching_gain,
            detail=f"images/s at concurrency {TARGET_CONCURRENCY}, batching on / off (FER_MAX_BATCH=1)",
            raw_value=rounds("raw_batching_gain")["value"],  # what batching gains the encoder itself
            **rounds("batching_gain"),
        ),
        Target(
            "single_request_latency",
            op="<=",
            threshold=1.3,
            detail="p50 latency at concurrency 1 / (raw batch-1 encode + in-process decode and prepare)",
            **rounds("single_request_latency"),
        ),
        Target(
            "long_video_latency",
            _ratio(long.get("latency_ms"), short.get("latency_ms")),
            "<=",
            3.0,
            f"/predict-video latency, {long.get('clip', 'long clip')} / {short.get('clip', 'short clip')}",
        ),
        Target(
            "memory_growth",
            report["memory"].get("growth"),
            "<",
            0.10,
            "service RSS at the end of the long run / after its first 10% of requests, minus 1",
        ),
        Target(
            "gpu_throughput",
            gpu_point if gpu else None,
            ">=",
            5 * CLIP_AS_SERVICE_IMAGES_PER_S,
            f"images/s at concurrency {GPU_CONCURRENCY} on a GPU (5 x clip-as-service's 286 on a Titan RTX)",
        ),
    ]


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """The human-readable summary printed after the JSON."""
    s = report["settings"]
    host = report["machine"]
    lines = [
        f"load average {host['load_average_at_start']:.1f} at start, {host['load_average_at_end']:.1f} at end "
        f"(work besides the benchmark on {host['cpus']} cores skews every figure)",
        f"device {report['device']} ({report['machine']['gpu'] or str(report['machine']['cpus']) + ' CPU cores'}), "
        f"model {report['model']['name']}, {report['dtype']}, max batch {s['max_batch']}, "
        f"image {s['image']['width']}x{s['image']['height']} JPEG {s['image']['bytes'] // 1024} KiB",
        "raw encoder (median of the rounds): "
        + ", ".join(f"batch {r['batch']} {r['images_per_s']:.1f} img/s" for r in report["raw"]["encoder"])
        + f"; decode+prepare {report['raw']['decode_prepare_ms']:.1f} ms",
        "",
        f"{'conc':>5} {'batching':>8} {'ok/req':>9} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>6} "
        f"{'busy':>5} {'cores':>9}",
    ]
    for p in report["points"]:
        lines.append(
            f"{p['concurrency']:>5} {'on' if p['batching'] else 'off':>8} {str(p['ok']) + '/' + str(p['requests']):>9} "
            f"{p['throughput']:>8.1f} {_fmt(p['p50_ms']):>8} {_fmt(p['p95_ms']):>8} {_fmt(p['p99_ms']):>8} "
            f"{_fmt(p['mean_batch']):>6} {_fmt(p.get('encoder_busy'), '.2f'):>5} "
            f"{_fmt(p.get('service_cpu_cores'), '.2f') + '+' + _fmt(p.get('client_cpu_cores'), '.2f'):>9}"
        )
    lines.append(
        "(busy: share of the time the encoder ran; cores: CPU cores used by the service + the load generator)"
    )
    lines.append("")
    for i, r in enumerate(report["rounds"], 1):
        raw = ", ".join(f"batch {e['batch']} {e['images_per_s']:.1f}" for e in r["raw"]["encoder"])
        served = ", ".join(
            f"c={p['concurrency']} {'on' if p['batching'] else 'off'} {p['throughput']:.1f} img/s p50 {_fmt(p['p50_ms'], '.0f')} ms"
            for p in r["points"]
        )
        lines.append(f"round {i}: raw {raw} img/s; {served}")
    lines.append("")
    for v in report["video"]:
        lines.append(
            f"video {v['clip']}: latency {_fmt(v['latency_ms'], '.0f')} ms, decode {_fmt(v['decode_ms'], '.0f')} ms"
        )
    m = report["memory"]
    device = (
        f"; device peak {_fmt(m['device_peak_after_first_10pct_mb'], '.0f')} -> {_fmt(m['device_peak_end_mb'], '.0f')} MiB"
        if m.get("device_peak_end_mb") is not None
        else ""
    )
    lines.append(
        f"memory: peak RSS {_fmt(m.get('peak_rss_mb'), '.0f')} MiB, growth {_fmt(100 * m['growth'] if m.get('growth') is not None else None)}% "
        f"over {m.get('requests', 0)} requests{device}"
    )
    lines.append("")
    for t in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        raw = f"; raw encoder alone: {t['raw_value']:.3g}" if t.get("raw_value") is not None else ""
        rounds = f"; rounds: {' '.join(_fmt(v, '.3g') for v in t['rounds'])}" if t.get("rounds") else ""
        lines.append(
            f"{verdict} {t['name']}: {_fmt(t['value'], '.3g')} {t['op']} {t['threshold']:g}  ({t['detail']}{raw}{rounds})"
        )
    return "\n".join(lines)
