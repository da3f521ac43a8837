"""`python -m bench.run [--quick] [--model vit-b-32|demo] [--backend torch|openvino] [--out FILE.json]`:
one run, one device.

The raw encoder is loaded in this process and two services are started: one with batching and one with
FER_MAX_BATCH=1, both on the encoders' runtime --backend names (FER_BACKEND). First the load sweep on the
batching service (concurrency 1, 8, 32, ...); then interleaved rounds, each measuring the raw encoder,
the batching service at concurrency 32, the unbatched service at concurrency 32 and the batching service
at concurrency 1 back to back: the targets are the median of the per-round ratios. Then video (with and
without face detection) on the batching service; a clip of three people on it (every face of a frame,
linked into tracks) and on a third service that looks for one face a frame as video did before tracks,
their requests interleaved; and the long run (memory) on the batching service.

With `openvino`, every round also measures the raw torch encoder in the same precision, and a torch
service with batching (started for the rounds only) right after the batching service's concurrency-32
and concurrency-1 points; one service is under load at a time. The report's `openvino_cache_hit` says
whether the services, started after the raw encoder converted the encoders, read them from the cache.

Prints the JSON report on stdout (and to --out, rewritten after each step with `complete` false until
the end) and a table on stderr. Exit code 1 when any request failed or did not finish; the targets are
reported, never an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.inputs import cached_clip, cached_people_clip, face_jpeg
from bench.load import LoadResult, Upload, check_loopback, metric_delta, run_load
from bench.report import TARGET_CONCURRENCY, evaluate_targets, format_table, median_raw, summarise_point
from bench.server import Service
from model.files import write_text_atomic
from model.options import PipelineOptions
from model.threads import GOMP_SPIN_COUNT

log = logging.getLogger("bench")

IMAGE_SIZE = (640, 480)
VIDEO_FRAMES = 16  # frames sampled from each clip
# Video with tracks (the defaults, set so that a caller's environment does not change them), and one
# face a frame searched at 320 px: the baseline the tracks' latency target compares with.
TRACKS_ENV = {
    "FER_MAX_FACES": str(PipelineOptions().max_faces),
    "FER_VIDEO_FACE_SIDE": str(PipelineOptions().video_face_side),
}
ONE_FACE_ENV = {"FER_MAX_FACES": "1", "FER_VIDEO_FACE_SIDE": "320"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to measure: small for CI's smoke run, larger for a timed run, larger still on a GPU."""

    concurrency: tuple[int, ...]
    requests_per_worker: int  # a point sends max(min_requests, this x concurrency)
    min_requests: int
    long_requests: int  # the memory run
    clips: tuple[tuple[float, int], ...]  # (seconds, height), short first
    people_clip: tuple[int, int, int]  # the three people's clip: width, height, frames (at 25 fps)
    video_repeats: int
    time_limit_s: float  # per load point
    raw_seconds: float  # per raw batch size
    rounds: int
    client_processes: int = 1

    def requests(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_worker * concurrency)


# Tens of images/s on a CPU: 8 requests per worker keep a concurrency-32 point to about 16 batches.
CPU_PLAN = Plan(
    (1, 8, TARGET_CONCURRENCY), 8, 32, 1000, ((10, 1080), (600, 1080)), (1920, 1080, 75), 3, 300, 3.0, 5
)
# A GPU's higher rate would end a point too soon to measure well: 32 requests per worker make it last.
GPU_PLAN = dataclasses.replace(
    CPU_PLAN, concurrency=(1, 8, 32, 128, 256), requests_per_worker=32, long_requests=5000
)
QUICK_PLAN = dataclasses.replace(
    CPU_PLAN, requests_per_worker=2, long_requests=300, clips=((10, 360), (60, 360)),
    people_clip=(1920, 1080, 48), video_repeats=2, time_limit_s=60, raw_seconds=1.0, rounds=2,
)  # fmt: skip


def make_plan(quick: bool, device: str, client_processes: int | None) -> Plan:
    plan = QUICK_PLAN if quick else GPU_PLAN if device == "cuda" else CPU_PLAN
    if client_processes is None:  # a GPU outruns one client process; 2 CPU cores have none to spare
        client_processes = max(1, min(8, (os.cpu_count() or 1) // 2)) if device == "cuda" else 1
    return dataclasses.replace(plan, client_processes=client_processes)


def model_env(model: str) -> tuple[dict[str, str], str]:
    """FER_* settings of the benchmark model and its name. `vit-b-32`: ViT-B/32 with seeded random
    weights and a random 4096x512 projection, the shapes and cost of Exp-CLIP B/32, offline."""
    if model == "demo":
        return {"FER_PRESET": "demo"}, "demo (tiny random CLIP, 64 px)"
    env = {"FER_CLIP_MODEL": "ViT-B-32", "FER_CLIP_WEIGHTS": "random", "FER_PROJECTION": "random"}
    return env, "ViT-B-32 (random weights) + random 4096x512 projection"


class Bench:
    """The run's services, inputs and plan; each method measures one step."""

    def __init__(
        self, args: argparse.Namespace, plan: Plan, engines: tuple, services: tuple[Service, Service]
    ):
        """`engines`: the run's raw encoder, and the torch encoder it is compared with (None when the run
        is on torch itself)."""
        self.args, self.plan = args, plan
        self.engine, self.torch_engine = engines
        self.batching, self.unbatched = services
        self.torch_service: Service | None = None  # beside another backend's, in the rounds
        self.jpeg = face_jpeg(*IMAGE_SIZE)
        self.fields = {"detect_faces": str(args.detect_faces).lower()}
        self.image = Upload.multipart("/predict", "face.jpg", self.jpeg, "image/jpeg", self.fields)

    def load(self, service: Service, upload: Upload, concurrency: int, requests: int):
        return run_load(
            service.base_url,
            upload,
            concurrency=concurrency,
            requests=requests,
            time_limit_s=self.plan.time_limit_s,
            processes=self.plan.client_processes,
        )

    def warm(self, service: Service) -> Service:
        """First-call allocations and thread pools, before any figure is taken."""
        if self.load(service, self.image, 8, 16).ok == 0:
            raise RuntimeError(f"no warm-up request succeeded; service log:\n{service.log_tail()}")
        return service

    def point(self, service: Service, concurrency: int, batching: bool) -> dict:
        before, cpu = service.metrics(), service.cpu_seconds()
        result = self.load(service, self.image, concurrency, self.plan.requests(concurrency))
        point = summarise_point(result, batching, metric_delta(before, service.metrics()))
        point["service_cpu_cores"] = (service.cpu_seconds() - cpu) / result.wall_s
        log.info(
            "%s service, concurrency %d, batching %s: %.1f images/s",
            service.env.get("FER_BACKEND", "torch"), concurrency, batching, point["throughput"],
        )  # fmt: skip
        return point

    def raw(self) -> dict:
        from bench.raw import encoder_speed, prepare_ms

        batches = sorted({1, self.args.max_batch})
        raw = {
            "encoder": [encoder_speed(self.engine, b, self.plan.raw_seconds) for b in batches],
            "decode_prepare_ms": prepare_ms(self.engine, self.jpeg),
        }
        if self.torch_engine is not None:  # back to back with the backend's, so a slow spell hits both
            raw["torch_encoder"] = [
                encoder_speed(self.torch_engine, b, self.plan.raw_seconds) for b in batches
            ]
        return raw

    def round(self) -> dict:
        """The figures the ratio targets compare, measured back to back. With a torch service, its point
        follows the batching service's at the same concurrency, so that a slow spell hits both."""
        c, points, torch_points = TARGET_CONCURRENCY, [], []

        def batching_point(concurrency: int) -> None:
            points.append(self.point(self.batching, concurrency, True))
            if self.torch_service is not None:
                torch_points.append(self.point(self.torch_service, concurrency, True))

        batching_point(c)
        points.append(self.point(self.unbatched, c, False))
        raw = self.raw()
        batching_point(1)
        round_ = {"raw": raw, "points": points}
        if self.torch_service is not None:
            round_["torch_points"] = torch_points
        return round_

    def video(self, path: Path, seconds: float, height: int, detect: bool) -> dict:
        upload = video_upload(path, detect)
        result = run_load(
            self.batching.base_url, upload, concurrency=1, requests=self.plan.video_repeats,
            time_limit_s=self.plan.time_limit_s,
        )  # fmt: skip
        return video_row(f"{seconds:g} s {height}p", detect, upload, [result])

    def tracks_video(self, path: Path, clip: str) -> list[dict]:
        """The three people's clip on the batching service (tracks) and on a service that looks for one
        face a frame at 320 px, as video did before tracks; started here, stopped after."""
        log_path = self.args.cache_dir / "service-one-face.log"
        with Service({**self.batching.env, **ONE_FACE_ENV}, log_path) as one_face:
            services = {"tracks": self.batching, "one face": one_face}
            rows = interleaved_videos(
                {name: s.base_url for name, s in services.items()},
                video_upload(path, True),
                clip,
                self.plan.video_repeats,
                self.plan.time_limit_s,
                {name: s.cpu_seconds for name, s in services.items()},
            )
        envs = {"tracks": TRACKS_ENV, "one face": ONE_FACE_ENV}
        return [{**row, "env": envs[row["service"]]} for row in rows]

    def memory(self) -> dict:
        """RSS after the first 10% of the long run vs at its end: growth a leak would show."""
        total, c = self.plan.long_requests, TARGET_CONCURRENCY
        head = self.load(self.batching, self.image, c, max(1, total // 10))
        early, early_device = self.batching.rss_mb(), self.batching.metrics().get("fer_device_peak_bytes")
        tail = self.load(self.batching, self.image, c, total - head.requested)
        end, end_device = self.batching.rss_mb(), self.batching.metrics().get("fer_device_peak_bytes")
        return {
            "requests": total,
            "ok": head.ok + tail.ok,
            "failures": dict(head.failures + tail.failures),
            "unfinished": head.unfinished + tail.unfinished,
            "rss_after_first_10pct_mb": early,
            "rss_end_mb": end,
            "peak_rss_mb": self.batching.peak_rss_mb,  # the largest RSS read during the run
            "growth": end / early - 1,
            # A GPU's peak allocation (torch's), after the first 10% and at the end; None on a CPU.
            "device_peak_mb": [None if v is None else v / 2**20 for v in (early_device, end_device)],
        }


def openvino_cache_hit(services: Sequence[Service]) -> bool:
    """Whether every process of the services read the converted encoders from the cache, none converting
    them: what a restart does, from the line each start logs."""
    from model.openvino import CONVERTING, READ_FROM_CACHE

    logs = [(service, service.log_path.read_text(errors="replace")) for service in services]
    return all(text.count(READ_FROM_CACHE) >= s.workers and CONVERTING not in text for s, text in logs)


def video_upload(path: Path, detect: bool) -> Upload:
    fields = {"frames": str(VIDEO_FRAMES), "detect_faces": str(detect).lower()}
    return Upload.multipart("/predict-video", path.name, path.read_bytes(), "video/mp4", fields)


def video_row(clip: str, detect: bool, upload: Upload, results: list[LoadResult]) -> dict:
    """A clip's figures from its requests (one load point, or requests sent one at a time)."""
    latencies = [s for r in results for s in r.latencies_s]
    decode = [t["decode_ms"] for r in results for t in r.timings]
    failures = sum((r.failures for r in results), Counter())
    return {
        "clip": clip,
        "detect_faces": detect,
        "megabytes": len(upload.body) / 2**20,
        "ok": len(latencies),
        "requests": sum(r.requested for r in results),
        "failures": dict(failures),
        "unfinished": sum(r.unfinished for r in results),
        "latency_ms": 1000 * statistics.median(latencies) if latencies else None,
        "decode_ms": statistics.median(decode) if decode else None,
    }


def interleaved_videos(
    services: dict[str, str],
    upload: Upload,
    clip: str,
    repeats: int,
    time_limit_s: float,
    cpu_seconds: dict[str, Callable[[], float]],
) -> list[dict]:
    """One clip on several services (name -> base URL), one request at a time, taking turns (the first
    service alternating), so that a slow spell of a shared machine hits each alike. A first request to
    each, not timed, warms it up and says how many tracks and faces its answer has. Each row keeps its
    latency per repeat (None: that request failed), for ratios between services repeat by repeat.
    `cpu_seconds`: each service's CPU time so far, read around each of its requests: the work a request
    costs, which no scheduling on the machine's cores can make shorter than CPU time / cores."""
    answers = {name: video_answer(url, upload, time_limit_s) for name, url in services.items()}
    results: dict[str, list[LoadResult]] = {name: [] for name in services}
    cpu_ms: dict[str, list[float]] = {name: [] for name in services}
    for repeat in range(repeats):
        turn = list(services.items())
        for name, url in turn if repeat % 2 == 0 else reversed(turn):
            before = cpu_seconds[name]()
            results[name].append(run_load(url, upload, concurrency=1, requests=1, time_limit_s=time_limit_s))
            cpu_ms[name].append(1000 * (cpu_seconds[name]() - before))
    rows = []
    for name, parts in results.items():
        tracks = answers[name].get("tracks")
        inference = [t["inference_ms"] for p in parts for t in p.timings if "inference_ms" in t]
        rows.append(
            {
                "service": name,
                **video_row(clip, True, upload, parts),
                "latencies_ms": [1000 * p.latencies_s[0] if p.ok else None for p in parts],
                "inference_ms": statistics.median(inference) if inference else None,
                "cpu_ms": statistics.median(cpu_ms[name]),
                "tracks": None if tracks is None else len(tracks),
                "faces": None if tracks is None else sum(len(t["frames"]) for t in tracks),
            }
        )
    return rows


def video_answer(base_url: str, upload: Upload, time_limit_s: float) -> dict:
    """One request's answer ({} when it fails: its figures are then missing, not made up)."""
    check_loopback(base_url)
    try:
        answer = httpx.post(
            base_url + upload.path,
            content=upload.body,
            headers={"content-type": upload.content_type},
            timeout=time_limit_s,
        )
    except httpx.HTTPError as exc:
        log.warning("the first request to %s failed: %s", base_url, exc)
        return {}
    if answer.status_code != 200:
        log.warning("the first request to %s answered %d", base_url, answer.status_code)
        return {}
    return answer.json()


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def run_benchmark(args: argparse.Namespace, checkpoint=lambda report: None) -> dict:
    """The whole run; `checkpoint(report)` gets the report as it grows."""
    import torch

    from model.engine import create_engine
    from model.settings import ModelSettings, device_for

    device = device_for(args.device, args.backend)
    plan = make_plan(args.quick, device, args.client_processes)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    env, model_name = model_env(args.model or ("demo" if args.quick else "vit-b-32"))
    env["FER_DTYPE"] = args.dtype  # the raw encoders and both services run in the same precision
    env["FER_BACKEND"] = args.backend
    if args.backend == "openvino":  # converted once, by the raw encoder below; the services read them
        env["FER_OPENVINO_CACHE"] = str(args.cache_dir / "openvino")
    clips = [
        (cached_clip(args.cache_dir, seconds, height), seconds, height) for seconds, height in plan.clips
    ]
    width, height, n_frames = plan.people_clip
    people = cached_people_clip(args.cache_dir, (width, height), n_frames)
    people_name = f"3 people, {height}p"
    service_env = {
        **env,
        "FER_DEVICE": device,
        "FER_MAX_BATCH": str(args.max_batch),
        "FER_MAX_UPLOAD_MB": "200",  # the 10-minute 1080p clip
        "FER_WORKERS": str(args.workers),  # so a FER_WORKERS in the caller's environment is not inherited
        **TRACKS_ENV,
    }
    settings = ModelSettings(**{k.removeprefix("FER_").lower(): v for k, v in env.items()}, device=device)
    engine = create_engine(settings)
    torch_engine = None
    if args.backend != "torch":
        torch_engine = create_engine(settings.model_copy(update={"backend": "torch"}))
    report = {
        "benchmark": "exp-clip-fer service vs its raw encoder",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "complete": False,
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),  # the cores this process (and the services) may use
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg()[0],  # other work on the machine skews every figure
        },
        "device": device,
        "model": {"name": model_name, "image_size": engine.image_size, "feature_dim": engine.feature_dim},
        "dtype": engine.dtype_name,
        "backend": args.backend,
        "settings": {
            "max_batch": args.max_batch,
            "workers": args.workers,
            "service_env": service_env,
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "image": {"width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1]},
            "detect_faces": args.detect_faces,
            "plan": dataclasses.asdict(plan),
        },
        "points": [],
        "rounds": [],
        "video": [],
        "tracks_video": [],
    }
    logs = args.cache_dir
    with (
        Service(service_env, logs / "service-batching.log") as batching,
        Service({**service_env, "FER_MAX_BATCH": "1"}, logs / "service-no-batching.log") as unbatched,
    ):
        if args.backend == "openvino":  # started after this process's engine left them there
            report["openvino_cache_hit"] = openvino_cache_hit((batching, unbatched))
        bench = Bench(args, plan, (engine, torch_engine), (batching, unbatched))
        for service in (batching, unbatched):
            bench.warm(service)
        for c in plan.concurrency:
            report["points"].append(bench.point(batching, c, True))
            checkpoint(report)
        with contextlib.ExitStack() as rounds:
            if torch_engine is not None:  # its memory only while the rounds need it
                torch_env = {k: v for k, v in service_env.items() if k != "FER_OPENVINO_CACHE"}
                torch_service = Service({**torch_env, "FER_BACKEND": "torch"}, logs / "service-torch.log")
                bench.torch_service = bench.warm(rounds.enter_context(torch_service))
            for i in range(plan.rounds):
                log.info("round %d of %d", i + 1, plan.rounds)
                report["rounds"].append(bench.round())
                checkpoint(report)
        bench.torch_service = None
        report["raw"] = median_raw(report["rounds"])
        for path, seconds, height in clips:
            for detect in (False, True) if path == clips[0][0] else (False,):
                report["video"].append(bench.video(path, seconds, height, detect))
            checkpoint(report)
        report["tracks_video"] = bench.tracks_video(people, people_name)
        checkpoint(report)
        report["memory"] = bench.memory()
    if args.faces_data is not None:
        from bench.faces import measure_faces

        log.info("face detection on the development data in %s", args.faces_data)
        report["faces"] = measure_faces(args.faces_data)
    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    report["targets"] = evaluate_targets(report)
    report["complete"] = True
    checkpoint(report)
    return report


def incomplete(report: dict) -> list[str]:
    """Load points, videos or the long run with failed or unfinished requests."""
    rounds = [p for r in report["rounds"] for p in (*r["points"], *r.get("torch_points", []))]
    videos = [*report["video"], *report.get("tracks_video", [])]
    rows = [*report["points"], *rounds, *videos, report["memory"]]
    keys = ("concurrency", "clip", "service", "failures", "unfinished")
    return [json.dumps({k: r.get(k) for k in keys}) for r in rows if r.get("failures") or r.get("unfinished")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: demo model, small counts")
    parser.add_argument(
        "--model", choices=("vit-b-32", "demo"), help="default: demo with --quick, else vit-b-32"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto", help="FER_DTYPE"
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "openvino"),
        default="torch",
        help="FER_BACKEND of the raw encoder and both services; with openvino, the raw torch encoder is "
        "measured beside it in the same precision",
    )
    parser.add_argument(
        "--max-batch", type=int, default=32, help="FER_MAX_BATCH, and the raw batch it is compared with"
    )
    parser.add_argument("--workers", type=int, default=1, help="FER_WORKERS: server processes per service")
    parser.add_argument(
        "--detect-faces", action="store_true", help="/predict detects faces (default: whole image)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "fer-bench",
        help="clips and service logs",
    )
    parser.add_argument("--client-processes", type=int, help="load generator processes (default: 1 on CPU)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here, rewritten after each step")
    parser.add_argument(
        "--faces-data",
        type=Path,
        help="development data for the face detector's figures (see bench.faces); without it they are not measured",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.faces_data = None  # minutes of detection: not for the smoke run
    return args


def run_reported(args: argparse.Namespace, run, table) -> dict:
    """A benchmark's command-line run: progress logged on stderr, the report saved to `args.out` after
    each step, then printed on stdout and as `table(report)` on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress

    def save(report: dict) -> None:
        if args.out:  # whole or not at all: a stop mid-write leaves the last whole report
            write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")

    report = run(args, save)
    print(json.dumps(report, indent=2))
    print(table(report), file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPIN_COUNT)  # the raw encoder runs torch as `fer serve` does
    report = run_reported(args, run_benchmark, format_table)
    problems = incomplete(report)
    for problem in problems:
        log.error("requests failed or did not finish: %s", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    # A time limit's SIGTERM unwinds like Ctrl-C: the services are stopped, not left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
