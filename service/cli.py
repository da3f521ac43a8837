"""`fer serve`: validate the configuration, check the weights are on disk, then run uvicorn."""

from __future__ import annotations

import argparse
import os
import tempfile

# How long an idle OpenMP thread spins before it sleeps, read once by libgomp when torch loads it. The
# default (300,000 spins) keeps the encoder's idle worker busy on a core long after each call, taking the
# core from decoding and the event loop; 10,000 still spans the gaps between one call's ops. Measured in
# two alternating pairs of `python -m bench.run` runs, with this setting and with GOMP_SPINCOUNT=300000
# (2 cores, ViT-B/32 bfloat16, 2026-11-24; the reports are not kept in the repository): 36.0 and 36.6
# vs 31.8 and 28.7 images/s at concurrency 1, 63.4 and 62.7 vs 54.9 and 56.8 at concurrency 32.
# Absolute figures move between runs on a shared machine; the pairs compare within minutes.
GOMP_SPIN_COUNT = "10000"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST service (configured by FER_* variables)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes (default FER_WORKERS or 1); each loads its own model copy and batches on its "
        "own, for a GPU that one process's event loop cannot keep busy",
    )
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPIN_COUNT)  # before torch is imported (a user's wins)
    import uvicorn
    from pydantic import ValidationError

    from model.config import device_for, dtype_for
    from model.engine import check_weights_present
    from service.app import create_app
    from service.config import ServiceSettings

    try:
        settings = ServiceSettings()
    except ValidationError as exc:
        raise ValueError(f"invalid FER_* configuration: {exc}") from None
    check_weights_present(settings.resolve())  # fail in one line now, not in the background later
    dtype_for(settings.dtype, device_for(settings.device))  # so does a device or dtype that cannot work
    workers = settings.workers if args.workers is None else args.workers
    if workers < 1:  # FER_WORKERS is checked by ServiceSettings; `--workers 0` was silently the setting
        raise ValueError("--workers must be at least 1")
    if workers == 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
        return 0
    # Several processes need an import string; each builds `service.app:app` from the same FER_* env,
    # and their metrics meet in a fresh directory (see service.metrics) unless the user names one.
    with tempfile.TemporaryDirectory(prefix="fer-metrics-") as fresh:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", fresh)
        uvicorn.run(
            "service.app:app", host=args.host, port=args.port, log_level=args.log_level, workers=workers
        )
    return 0
