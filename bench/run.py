"""`python -m bench.run [--quick] [--model vit-b-32|demo] [--out FILE.json]`: one run, one device.

The raw encoder is loaded in this process and two services are started: one with batching and one
with FER_MAX_BATCH=1. First the load sweep on the batching service (concurrency 1, 8, 32, ...); then
`rounds` interleaved rounds, each measuring the raw encoder, the batching service at concurrency 32,
the unbatched service at concurrency 32 and the batching service at concurrency 1, one right after the
other: the targets are the median of the per-round ratios, so a slow spell of a shared machine hits
both sides of a ratio or only one round. Then video and the long run (memory) on the batching service.

Prints the JSON report on stdout (and to --out) and a short table on stderr. Exit code 1 when any
request failed or did not finish in time: the service, not the targets, is then what needs looking at.
Targets are reported pass/fail and do not change the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bench.inputs import cached_clip, clip_size, face_jpeg
from bench.load import Upload, metric_delta, run_load
from bench.report import (
    GPU_CONCURRENCY,
    TARGET_CONCURRENCY,
    evaluate_targets,
    format_table,
    median_raw,
    summarise_point,
)
from bench.server import Service
from cli.serve import GOMP_SPIN_COUNT
from model.files import write_text_atomic

if TYPE_CHECKING:
    from model.engine import FerEngine

log = logging.getLogger("bench")

IMAGE_SIZE = (640, 480)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to measure: small for the CI smoke run, larger for a timed run, larger still on a GPU."""

    concurrency: tuple[int, ...]
    min_requests: int  # per load point
    requests_per_worker: int  # a point sends max(min_requests, requests_per_worker * concurrency)
    long_requests: int  # the memory run
    clips: tuple[tuple[float, int], ...]  # (seconds, height), short first
    video_repeats: int
    time_limit_s: float  # per load point
    raw_seconds: float  # per raw batch size
    rounds: int  # interleaved raw / batching on / off / concurrency-1 rounds the targets are read from
    client_processes: int = 1  # load generator processes for the image points (see bench.load)

    def requests(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_worker * concurrency)


# A CPU encodes ViT-B/32 at tens of images/s (README, rounds table, raw columns: 13-24 in float32,
# 41-82 in bfloat16 on 2 cores): counts that keep one run to a few minutes there. 8 requests per
# worker: a concurrency-32 point then spans about 16 batches, not the 8 where filling and draining the
# pipeline weighed.
CPU_PLAN = Plan(
    concurrency=(1, 8, TARGET_CONCURRENCY),
    min_requests=32,
    requests_per_worker=8,
    long_requests=1000,
    clips=((10, 1080), (600, 1080)),
    video_repeats=3,
    time_limit_s=300,
    raw_seconds=3.0,
    rounds=5,
)
# A GPU serves on the order of a thousand images/s: 32 requests per worker (at least 1,024) keep a point
# to seconds rather than a fraction of one; the long run is longer too.
GPU_PLAN = dataclasses.replace(
    CPU_PLAN,
    concurrency=(1, 8, TARGET_CONCURRENCY, 128, GPU_CONCURRENCY),
    min_requests=1024,
    requests_per_worker=32,
    long_requests=5000,
)
# CI's smoke run: small counts, short low-resolution clips.
QUICK_PLAN = dataclasses.replace(
    CPU_PLAN,
    requests_per_worker=2,
    long_requests=300,
    clips=((10, 360), (60, 360)),
    video_repeats=2,
    time_limit_s=60,
    raw_seconds=1.0,
    rounds=2,
)


def make_plan(quick: bool, device: str, client_processes: int | None = None) -> Plan:
    plan = QUICK_PLAN if quick else GPU_PLAN if device == "cuda" else CPU_PLAN
    # A GPU outruns one client process; a small CPU machine has no cores to spare for more.
    if client_processes is None:
        client_processes = max(1, min(8, (os.cpu_count() or 1) // 2)) if device == "cuda" else 1
    return dataclasses.replace(plan, client_processes=client_processes)


def model_env(model: str) -> tuple[dict[str, str], str]:
    """FER_* settings for the benchmark model, and its name for the report.

    `vit-b-32` is ViT-B/32 with seeded random weights (the loader's own `random`) and a random
    4096 x 512 projection: the shapes and cost of Exp-CLIP B/32, offline."""
    if model == "demo":
        return {"FER_PRESET": "demo"}, "demo (tiny random CLIP, 64 px)"
    env = {
        "FER_CLIP_MODEL": "ViT-B-32",
        "FER_CLIP_WEIGHTS": "random",
        "FER_PROJECTION": "random",
        "FER_PREPROCESS": "exp-clip",
    }
    return env, "ViT-B-32 (random weights) + random 4096x512 projection"


def raw_engine(env: dict[str, str], device: str) -> FerEngine:
    """The services' engine, loaded in this process for the raw limit (it stays for the whole run, so
    the rounds can measure it between service points)."""
    from model.engine import create_engine
    from model.settings import ModelSettings

    fields = {k.removeprefix("FER_").lower(): v for k, v in env.items()}
    return create_engine(ModelSettings(**fields, device=device))


def measure_raw(engine: FerEngine, plan: Plan, max_batch: int, jpeg: bytes) -> dict:
    """The encoder's limit at batch 1 and at the service's max batch, and the in-process decode cost."""
    from bench.raw import encoder_speed, prepare_ms

    speeds = [encoder_speed(engine, b, plan.raw_seconds) for b in sorted({1, max_batch})]
    return {"encoder": [s.as_dict() for s in speeds], "decode_prepare_ms": prepare_ms(engine, jpeg)}


def measure_round(
    engine: FerEngine,
    batching: Service,
    unbatched: Service,
    upload: Upload,
    plan: Plan,
    jpeg: bytes,
    max_batch: int,
) -> dict:
    """The figures the ratio targets compare, measured back to back."""
    raw = measure_raw(engine, plan, max_batch, jpeg)
    c = TARGET_CONCURRENCY
    points = [
        measure_point(batching, upload, c, plan.requests(c), True, plan),
        measure_point(unbatched, upload, c, plan.requests(c), False, plan),
        measure_point(batching, upload, 1, plan.requests(1), True, plan),
    ]
    return {"raw": raw, "points": points}


def measure_point(
    service: Service, upload: Upload, concurrency: int, requests: int, batching: bool, plan: Plan
) -> dict:
    before, service_cpu = service.metrics(), service.cpu_seconds()
    result = run_load(
        service.base_url,
        upload,
        concurrency=concurrency,
        requests=requests,
        time_limit_s=plan.time_limit_s,
        processes=plan.client_processes,
    )
    point = summarise_point(result, batching, metric_delta(before, service.metrics()))
    if service_cpu is not None:
        point["service_cpu_cores"] = (service.cpu_seconds() - service_cpu) / result.wall_s
    log.info(
        "concurrency %d, batching %s: %d/%d ok, %.1f images/s, p50 %s ms, mean batch %s",
        concurrency,
        "on" if batching else "off",
        result.ok,
        requests,
        point["throughput"],
        f"{point['p50_ms']:.0f}" if point["p50_ms"] is not None else "-",
        f"{point['mean_batch']:.1f}" if point["mean_batch"] is not None else "-",
    )
    return point


def warm_up(service: Service, upload: Upload, concurrency: int, plan: Plan) -> None:
    """A few uncounted requests (first-call allocations, thread pools); fails loudly if none succeeds."""
    result = run_load(
        service.base_url,
        upload,
        concurrency=concurrency,
        requests=2 * concurrency,
        time_limit_s=plan.time_limit_s,
    )
    if result.ok == 0:
        raise RuntimeError(
            f"no warm-up request succeeded ({dict(result.failures)}); service log:\n{service.log_tail()}"
        )


def measure_video(
    service: Service, path: Path, seconds: float, height: int, fields: dict[str, str], plan: Plan
) -> dict:
    fields = {**fields, "frames": "16"}
    upload = Upload.multipart("/predict-video", path.name, path.read_bytes(), "video/mp4", fields)
    result = run_load(
        service.base_url, upload, concurrency=1, requests=plan.video_repeats, time_limit_s=plan.time_limit_s
    )
    latencies = [1000 * s for s in result.latencies_s]
    decode = [t["decode_ms"] for t in result.timings if isinstance(t.get("decode_ms"), int | float)]
    width, height = clip_size(height)
    row = {
        "clip": f"{seconds:g} s {height}p",
        "seconds": seconds,
        "width": width,
        "height": height,
        "megabytes": len(upload.body) / 2**20,
        "ok": result.ok,
        "requests": result.requested,
        "failures": dict(result.failures),
        "latency_ms": statistics.median(latencies) if latencies else None,
        "decode_ms": statistics.median(decode) if decode else None,
    }
    log.info("video %s: latency %s ms, decode %s ms", row["clip"], row["latency_ms"], row["decode_ms"])
    return row


def long_run(service: Service, upload: Upload, requests: int, plan: Plan) -> dict:
    """RSS after the first 10% of `requests` vs at the end: growth a leak would show."""
    first = max(1, requests // 10)
    kwargs = {
        "concurrency": TARGET_CONCURRENCY,
        "time_limit_s": max(plan.time_limit_s, 600),
        "processes": plan.client_processes,
    }
    head = run_load(service.base_url, upload, requests=first, **kwargs)
    early, early_device = service.memory_mb(), service.metrics().get("fer_device_peak_bytes")
    tail = run_load(service.base_url, upload, requests=requests - first, **kwargs)
    end, end_device = service.memory_mb(), service.metrics().get("fer_device_peak_bytes")
    growth = end["rss_mb"] / early["rss_mb"] - 1 if early and end else None
    log.info("long run: %d requests, RSS %s -> %s MiB", requests, early.get("rss_mb"), end.get("rss_mb"))
    return {
        "requests": requests,
        "ok": head.ok + tail.ok,
        "failures": dict(head.failures + tail.failures),
        "unfinished": head.unfinished + tail.unfinished,
        "throughput": tail.throughput,
        "rss_after_first_10pct_mb": early.get("rss_mb"),
        "rss_end_mb": end.get("rss_mb"),
        "peak_rss_mb": end.get("peak_rss_mb"),
        "growth": growth,
        # A GPU's peak allocation (torch's), after the first 10% and at the end; None on a CPU.
        "device_peak_after_first_10pct_mb": None if early_device is None else early_device / 2**20,
        "device_peak_end_mb": None if end_device is None else end_device / 2**20,
    }


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg()[0],  # other work on the machine skews every figure
    }


def run_benchmark(args: argparse.Namespace, checkpoint: Callable[[dict], None] = lambda report: None) -> dict:
    """The whole run; `checkpoint(report)` gets the report as it grows (`complete` false until the end),
    so a run stopped by a time limit keeps what it measured."""
    import torch

    from model.settings import device_for

    host = machine()
    device = device_for(args.device)
    plan = make_plan(args.quick, device, args.client_processes)
    cache = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    model = args.model or ("demo" if args.quick else "vit-b-32")
    env, model_name = model_env(model)
    env["FER_DTYPE"] = args.dtype  # the raw encoder and both services run in the same precision
    jpeg = face_jpeg(*IMAGE_SIZE)
    clips = [(cached_clip(cache, seconds, height), seconds, height) for seconds, height in plan.clips]

    upload_mb = max(100, math.ceil(max(p.stat().st_size for p, _, _ in clips) / 2**20) + 1)
    service_env = {
        **env,
        "FER_DEVICE": device,
        "FER_MAX_BATCH": str(args.max_batch),
        "FER_MAX_UPLOAD_MB": str(upload_mb),
        "FER_WORKERS": str(args.workers),  # set here, so a FER_WORKERS in the caller's env is not inherited
    }
    fields = {"detect_faces": str(args.detect_faces).lower()}
    image = Upload.multipart("/predict", "face.jpg", jpeg, "image/jpeg", fields)
    log.info("raw encoder on %s; services with and without batching", device)
    engine = raw_engine(env, device)
    report = {
        "benchmark": "exp-clip-fer service vs its raw encoder",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "complete": False,
        "quick": args.quick,
        "machine": host,
        "device": device,
        "model": {"name": model_name, "image_size": engine.image_size, "feature_dim": engine.feature_dim},
        "dtype": engine.dtype_name,
        "settings": {
            "max_batch": args.max_batch,
            "service_env": {k: v for k, v in {**os.environ, **service_env}.items() if k.startswith("FER_")},
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "image": {"width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1], "bytes": len(jpeg)},
            "detect_faces": args.detect_faces,
            "plan": dataclasses.asdict(plan),
        },
        "raw": None,  # the median over the rounds, once they are all measured
        "points": [],
        "rounds": [],
        "video": [],
        "memory": None,
    }
    with (
        Service(service_env, cache / "service-batching.log") as service,
        Service({**service_env, "FER_MAX_BATCH": "1"}, cache / "service-no-batching.log") as unbatched,
    ):
        warm_up(service, image, 8, plan)
        warm_up(unbatched, image, 8, plan)
        for c in plan.concurrency:
            report["points"].append(measure_point(service, image, c, plan.requests(c), True, plan))
            checkpoint(report)
        for i in range(plan.rounds):
            log.info("round %d of %d: raw encoder, batching on, off, concurrency 1", i + 1, plan.rounds)
            report["rounds"].append(
                measure_round(engine, service, unbatched, image, plan, jpeg, args.max_batch)
            )
            checkpoint(report)
        report["raw"] = {
            **median_raw(report["rounds"]),
            "dtype": engine.dtype_name,
            "torch_threads": torch.get_num_threads(),
        }
        warm_up(
            service,
            Upload.multipart("/predict-video", "w.mp4", clips[0][0].read_bytes(), "video/mp4", fields),
            1,
            plan,
        )
        for path, seconds, height in clips:
            report["video"].append(measure_video(service, path, seconds, height, fields, plan))
            checkpoint(report)
        report["memory"] = long_run(service, image, plan.long_requests, plan)

    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    report["targets"] = [t.as_dict() for t in evaluate_targets(report)]
    report["complete"] = True
    checkpoint(report)
    return report


def incomplete(report: dict) -> list[str]:
    """Load points, videos or the long run with failed or unfinished requests."""
    rows = [
        *report["points"],
        *(p for r in report["rounds"] for p in r["points"]),
        *report["video"],
        report["memory"],
    ]
    return [
        json.dumps(
            {
                k: r.get(k)
                for k in ("concurrency", "batching", "clip", "requests", "failures", "unfinished")
                if k in r
            }
        )
        for r in rows
        if r.get("failures") or r.get("unfinished")
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: demo model, small counts, short clips"
    )
    parser.add_argument(
        "--model", choices=("vit-b-32", "demo"), help="default: demo with --quick, else vit-b-32"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="FER_DTYPE for the raw encoder and the services (auto: float16 on CUDA, bfloat16 on CPUs "
        "with native bfloat16, else float32)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=32, help="FER_MAX_BATCH, and the raw batch it is compared with"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="FER_WORKERS: server processes per service (each batches on its own; memory and CPU are "
        "summed over them)",
    )
    parser.add_argument(
        "--detect-faces", action="store_true", help="ask /predict to detect faces (default: whole image)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "fer-bench",
        help="clips and service logs",
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        help="load generator processes (default: 1 on CPU, cores/2 up to 8 on CUDA)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="also write the JSON report here, rewritten after each step (`complete` is false until the end)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The raw encoder runs with the OpenMP setting `fer serve` gives the service (set before torch loads).
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPIN_COUNT)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress

    def save(report: dict) -> None:
        if args.out:  # whole or not at all: a stop in the middle of a write leaves the last whole one
            write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")

    report = run_benchmark(args, save)
    print(json.dumps(report, indent=2))
    print(format_table(report), file=sys.stderr)
    problems = incomplete(report)
    for problem in problems:
        log.error("requests failed or did not finish: %s", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    # A time limit's SIGTERM unwinds like Ctrl-C: the services are stopped, not left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
