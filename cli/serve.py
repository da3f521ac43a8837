"""`fer serve`: check the configuration, the weights and the port, tune the process, then run uvicorn."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import socket
import tempfile

from model.threads import GOMP_SPIN_COUNT

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST service (configured by FER_* variables)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the service's own lines and the access log (info: the start line, each error answer, each "
        "request); `fer -v serve` adds the libraries' info lines; FER_LOG_FORMAT=json for log collectors",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes (default FER_WORKERS or 1); each loads its own model copy and batches on its "
        "own, for a GPU that one process's event loop cannot keep busy",
    )
    p.set_defaults(handler=cmd_serve, settings="service")


def check_port_free(host: str, port: int) -> None:
    """Fails at once, before a model is loaded, when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def cmd_serve(args: argparse.Namespace, settings) -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPIN_COUNT)  # before torch is imported (a user's wins)
    workers = settings.workers if args.workers is None else args.workers
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    if settings.metrics_port == args.port:  # each port would pass its own check, then the second bind fails
        raise ValueError(
            f"FER_METRICS_PORT is the service's own port ({args.port}): give /metrics another port, "
            "or unset it to serve /metrics on the service's"
        )
    settings.resolve_checked()  # missing weights, a projection for another CLIP: one line now
    from model.settings import device_for, dtype_for

    # A device or dtype this machine cannot run.
    dtype_for(settings.dtype, device_for(settings.device, settings.backend))
    for port in (args.port, settings.metrics_port):
        if port is not None:
            check_port_free(args.host, port)

    import uvicorn

    from service.app import create_app
    from service.connections import uvicorn_options
    from service.logs import log_config
    from service.metrics import serve_metrics
    from service.process import configure_process

    # A fresh configuration for each use: dictConfig consumes parts of the dict it is given.
    logging.config.dictConfig(log_config(settings.log_format, args.log_level, args.verbose))
    options = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "log_config": log_config(settings.log_format, args.log_level, args.verbose),
        **uvicorn_options(settings),
    }
    address = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    if workers == 1:
        app = create_app(configure_process(settings), address=address)
        if settings.metrics_port is not None:
            serve_metrics(args.host, settings.metrics_port, app.state.runtime.metrics.registry)
        uvicorn.run(app, **options)
        return 0
    # Several processes need an import string; each builds `service.app:app` from the same FER_* env,
    # and their metrics meet in a fresh directory (see service.metrics) unless the user names one.
    log.info("serving %s with %d workers; each says when its model is ready", address, workers)
    with tempfile.TemporaryDirectory(prefix="fer-metrics-") as fresh:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", fresh)
        if settings.metrics_port is not None:
            serve_metrics(args.host, settings.metrics_port)
        uvicorn.run("service.app:app", workers=workers, **options)
    return 0
