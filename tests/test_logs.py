"""`fer serve`'s log at its default level: the start line once the model is ready, one line per error
answer with its request id and the reason, and the access log; as text, or as one JSON object a line
(FER_LOG_FORMAT=json) with the request id as a field. The server is a real `fer serve` process, whose
stderr pytest captures at the file-descriptor level."""

from __future__ import annotations

import json
import re

from tests.support import fer_serve

REQUEST_ID = "first-try-1"
REFUSAL = "415 unsupported_media_type: text/plain is not accepted here: send an image (image/*)"


def serve_and_refuse(capfd, env: dict) -> tuple[int, str]:
    """A demo `fer serve` at the default level (`--log-level info`: the helper quiets it otherwise), one
    refused upload with a known request id; returns the port and what the server wrote to stderr."""
    capfd.readouterr()
    with fer_serve({"FER_PRESET": "demo", **env}, "--log-level", "info") as (http, _):
        port = http.base_url.port
        answer = http.post(
            "/predict",
            files={"file": ("notes.txt", b"not a photo", "text/plain")},
            headers={"X-Request-ID": REQUEST_ID},
        )
        assert answer.status_code == 415
    return port, capfd.readouterr().err


def test_the_text_log_has_the_start_line_each_error_and_the_access_log(capfd):
    port, err = serve_and_refuse(capfd, {})
    start = re.search(
        r"^INFO ready: model demo on cpu \(float32\), face detector (\S+), loaded in [\d.]+ s; "
        rf"answering at http://127\.0\.0\.1:{port}; random weights: answers are meaningless$",
        err,
        flags=re.M,
    )
    assert start and start[1] == "retinaface-mnet0.25", err
    assert f"INFO request {REQUEST_ID}: {REFUSAL}\n" in err
    assert re.search(
        rf'^INFO 127\.0\.0\.1:\d+ - "POST /predict HTTP/1\.1" 415 \[{REQUEST_ID}\]$', err, flags=re.M
    )
    assert "No pretrained weights" not in err  # open_clip's notice: the start line says it better


def test_the_json_log_is_one_object_a_line_with_the_request_id(capfd):
    _, err = serve_and_refuse(capfd, {"FER_LOG_FORMAT": "json"})
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(r["message"].startswith("ready: model demo on cpu") for r in records)
    (refusal,) = [r for r in records if r["logger"] == "service.errors"]
    assert refusal["request_id"] == REQUEST_ID and refusal["message"] == f"request {REQUEST_ID}: {REFUSAL}"
    (access,) = [r for r in records if r["logger"] == "uvicorn.access" and r["path"] == "/predict"]
    assert access["request_id"] == REQUEST_ID
    assert (access["method"], access["status"]) == ("POST", 415)
    assert {"time", "level"} <= set(access)
