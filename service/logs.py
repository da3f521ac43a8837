"""What `fer serve` writes to stderr: as text for people, or as one JSON object a line for log collectors
(FER_LOG_FORMAT=json), with each request's id as a field.

At the default level (`--log-level info`) a person sees the start line once the model is ready (model,
device, precision, face detector, load time, address), one line per error answer (request id, status,
the sentence the client got) and the access log; `fer -v serve` adds the libraries' own info lines.
The configuration is uvicorn's `log_config`, so the worker processes of `--workers N` apply it too."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from service.errors import REQUEST_ID

PROJECT_LOGGERS = ("cli", "service", "model")
ACCESS_LOGGER = "uvicorn.access"


class RequestIdFilter(logging.Filter):
    """Tags a record with the id of the request it was written under, if any (the access log's lines
    are written inside the request too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """`LEVEL message`; an access line ends with its request id, to find the error line that goes with it."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.getMessage()}"
        request_id = getattr(record, "request_id", None)
        if record.name == ACCESS_LOGGER and request_id:
            line += f" [{request_id}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the request id where there is one, and an
    access line's client, method, path and status as fields of their own."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.name == ACCESS_LOGGER and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _, status = record.args
            entry |= {"client": client, "method": method, "path": path, "status": status}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_config(log_format: str, level: str, verbose: bool) -> dict:
    """A `logging.config.dictConfig` for the service's processes: the project's and the server's loggers
    at `level`, everything else (libraries) at WARNING, or INFO when `verbose`; one stderr handler."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"fer": {"()": formatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "fer",
                "filters": ["request_id"],
            }
        },
        "root": {"level": "INFO" if verbose else "WARNING", "handlers": ["stderr"]},
        "loggers": {
            name: {"level": level.upper(), "handlers": [], "propagate": True}
            for name in (*PROJECT_LOGGERS, "uvicorn", "uvicorn.error", ACCESS_LOGGER)
        },
    }
