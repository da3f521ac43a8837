"""The abuse benchmark's parts: its decode bombs are what they claim, its victim summary and target
verdicts, and its clients (against a stand-in server) stay on 127.0.0.1 and close every socket. The
end-to-end smoke run against `fer serve` is in the slow tier."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import pytest
from PIL import Image

from bench.abuse import (
    ATTACKS,
    SIZE_CHANGING_FRAMES,
    Inputs,
    Target,
    answer_label,
    cached_mp4_bomb,
    connections,
    descriptions,
    disconnects,
    evaluate_targets,
    format_table,
    gif_canvas_bomb,
    silent_lockout,
    size_changing_video,
    summarise_victim,
    upload_flood,
    video_flood,
)
from bench.inputs import face_gif
from bench.server import Service
from model.synthetic_media import size_changing_clip

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_gif_bomb_is_a_huge_canvas_of_one_pixel_frames():
    data = gif_canvas_bomb()
    assert len(data) < 500_000  # a small file whose header says a 9-megapixel canvas...
    assert data[:6] == b"GIF89a" and struct.unpack("<HH", data[6:10]) == (3000, 3000)
    image = Image.open(io.BytesIO(data))
    assert image.size == (3000, 3000) and image.n_frames == 20_000
    image.seek(1)
    (tile,) = image.tile
    assert tile.extents == (37, 101, 38, 102)  # ...and frames of one pixel each


def test_mp4_bomb_has_one_key_frame_and_every_frame(tmp_path):
    data = cached_mp4_bomb(tmp_path, 300, 64, 48)
    [path] = tmp_path.glob("*.mp4")  # no partial file left behind
    assert path.read_bytes() == data and cached_mp4_bomb(tmp_path, 300, 64, 48) == data
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    assert len(packets) == 300 and sum(p.is_keyframe for p in packets) == 1 and packets[0].is_keyframe
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 300 and (frames[0].width, frames[0].height) == (64, 48)


def test_the_flood_gif_is_a_camera_gif_of_whole_frames():
    data = face_gif()
    assert 2.5 * 2**20 < len(data) < 3 * 2**20  # over the upload budget with 150 clients at once
    image = Image.open(io.BytesIO(data))
    assert image.size == (400, 300) and image.n_frames == 64  # enough for frames=64
    image.seek(5)
    (tile,) = image.tile
    assert tile.extents == (0, 0, 400, 300)  # each frame whole, not a changed rectangle


def test_the_size_changing_clip_declares_its_first_frame_s_size():
    clip = size_changing_clip([(64, 64), (96, 80), (96, 80)])
    with av.open(io.BytesIO(clip)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 64)
        sizes = [(frame.width, frame.height) for frame in container.decode(stream)]
    assert sizes == [(64, 64), (96, 80), (96, 80)]
    assert SIZE_CHANGING_FRAMES[0] == (64, 64) and min(SIZE_CHANGING_FRAMES[1:]) == (12000, 12000)


def test_answers_are_labelled_with_their_code_and_a_missing_retry_after():
    def answer(status: int, body: object = None, **headers) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)  # no body without `body`

    assert answer_label(answer(200, {"error": "not an error"})) == "200"
    assert answer_label(answer(413, {"error": "media_too_large", "detail": "x"})) == "413 media_too_large"
    assert answer_label(answer(503, {"error": "uploads_full"}, **{"Retry-After": "1"})) == "503 uploads_full"
    assert answer_label(answer(429, {"error": "queue_full"})) == "429 queue_full without Retry-After"
    assert answer_label(answer(503)) == "503 without Retry-After"  # not JSON: an HTTP server's own page
    assert answer_label(answer(400, ["a list"])) == "400"


def test_descriptions_are_the_documented_maximum():
    latin, cjk = descriptions("latin"), descriptions("cjk")
    for texts in (latin, cjk):
        assert len(set(texts)) == 512 and {len(t) for t in texts} == {1000}
    assert all(t.isascii() and t == t.strip() for t in latin)
    assert all("\u4e00" <= c <= "\u9fff" for t in cjk for c in t)
    assert len(json.dumps(cjk, ensure_ascii=False).encode()) > 3 * 512 * 1000  # three bytes a character


def test_victim_summary_counts_every_request_s_wait():
    answers = [("200", s) for s in (0.1, 0.2, 0.3, 0.4)] + [("429", 0.05), ("ReadTimeout", 15.0)]
    summary = summarise_victim(answers)
    assert summary["requests"] == 6 and summary["ok"] == 4
    assert summary["success_share"] == pytest.approx(4 / 6)
    assert summary["outcomes"] == {"200": 4, "429": 1, "ReadTimeout": 1}
    # Linear interpolation over every request, failures included: the timeout is the worst wait.
    assert summary["p50_ms"] == pytest.approx(250.0)
    assert summary["p95_ms"] == pytest.approx(400 + 0.75 * (15000 - 400))
    assert summary["max_ms"] == pytest.approx(15000.0)
    empty = summarise_victim([])
    assert empty["requests"] == 0 and empty["success_share"] is None and empty["max_ms"] is None


def row(name: str, max_ms: float | None = 800.0, share: float | None = 1.0, **extra) -> dict:
    return {"name": name, "victim": {"max_ms": max_ms, "success_share": share}, **extra}


def test_targets_pass_and_fail_and_missing_figures_are_not_a_pass():
    attacks = [
        row("edge", max_ms=5000.0, share=0.9),  # the thresholds themselves pass
        row("slow", max_ms=5001.0),
        row("refused", share=0.89),
        row("silent", max_ms=None, share=None),  # the victim sent nothing
        row("broken", error="RuntimeError: the attack failed"),  # good figures, but no attack ran
        {"name": "unstarted", "error": "RuntimeError: no warm-up request succeeded"},
    ]
    targets = evaluate_targets(attacks)
    verdicts = [(t["attack"], t["passed"]) for t in targets]
    assert verdicts == [
        ("edge", True), ("edge", True), ("slow", False), ("slow", True), ("refused", True),
        ("refused", False), ("silent", None), ("silent", None), ("broken", None), ("broken", None),
        ("unstarted", None), ("unstarted", None),
    ]  # fmt: skip
    assert targets[2]["value"] == pytest.approx(5.001) and targets[2]["name"] == "victim_worst_latency_s"
    report = {
        "settings": {"model": "demo", "quick": False},
        "machine": {"cpus": 2},
        "commit": "abc1234",
        "baseline": row("baseline", recovery={"recovered": True, "after_s": 0.1}),
        "attacks": attacks,
        "targets": targets,
    }
    table = format_table(report)
    assert "FAIL slow victim_worst_latency_s: 5 <= 5" in table
    assert "NOT MEASURED silent victim_success_share: missing >= 0.9" in table
    assert "no warm-up request succeeded" in table


def own_targets(name: str, **row) -> dict:
    """The verdicts of an attack's own targets on a row (the victim's two come first)."""
    targets = evaluate_targets([{"name": name, "victim": {"max_ms": 100.0, "success_share": 1.0}, **row}])
    return {t["name"]: (t["value"], t["passed"]) for t in targets[2:]}


def test_an_attack_s_own_targets_judge_its_outcomes_and_readings():
    flood = {"200": 16, "429 queue_full": 59, "503 uploads_full": 75}
    assert own_targets("upload_flood", attacker=flood) == {
        "attacker_requests_without_status": (0, True),
        "refusals_without_retry_after": (0, True),
    }
    broken = {**flood, "ReadError": 40, "abandoned": 2, "503 uploads_full without Retry-After": 3}
    assert own_targets("upload_flood", attacker=broken) == {
        "attacker_requests_without_status": (42, False),
        "refusals_without_retry_after": (3, False),
    }
    refused = {"start_rss_mb": 1000.0, "peak_rss_mb": 1100.0}
    assert own_targets("size_changing_video", attacker={"413 media_too_large": 4}, service=refused) == {
        "attacker_refused_media_too_large": (1.0, True),
        "service_rss_growth_mb": (100.0, True),
        "refusals_without_retry_after": (0, True),
    }
    decoded = {"start_rss_mb": 1000.0, "peak_rss_mb": 1617.0}
    verdicts = own_targets("size_changing_video", attacker={"413 media_too_large": 3, "abandoned": 1},
                           service=decoded)  # fmt: skip
    assert verdicts["attacker_refused_media_too_large"] == (0.75, False)
    assert verdicts["service_rss_growth_mb"] == (617.0, False)
    # A scenario that failed, or one with nothing to judge, is not a pass.
    for row in ({"error": "RuntimeError: x", "attacker": flood, "service": refused}, {"attacker": {}}):
        assert {passed for _, passed in own_targets("size_changing_video", **row).values()} == {None}
        assert {passed for _, passed in own_targets("upload_flood", **row).values()} == {None}
    assert own_targets("silent_lockout", attacker={"held": 4}) == {}  # the victim's targets are its own


def test_targets_are_loopback_only_and_carry_the_service_s_key(tmp_path):
    for url in ("http://example.com:80", "http://10.0.0.1:80", "http://0.0.0.0:80", "http://[::1]:80"):
        with pytest.raises(ValueError, match=r"only targets 127\.0\.0\.1"):
            Target(url)
    service = Service({"FER_API_KEY": "k"}, tmp_path / "service.log")  # not started
    assert Target(service.base_url, service.headers).headers == {"X-API-Key": "k"}
    assert Service({}, tmp_path / "service.log").headers == {}


class StandIn:
    """A server on 127.0.0.1 that answers any whole request 200 and holds any other connection until
    the client goes; it keeps the request heads and counts the connections open."""

    def __init__(self):
        self.open = 0
        self.heads: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:  # keep-alive: the next request, until the client goes
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = next((int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                               if k.lower() == b"content-length"), 0)  # fmt: skip
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (OSError, EOFError, asyncio.LimitOverrunError, ValueError):
            pass  # the client left, or sent a head over the limit
        finally:
            self.open -= 1
            writer.close()


def test_clients_stay_on_loopback_send_the_key_and_close_every_socket(monkeypatch):
    hosts, writers = [], []
    real_open = asyncio.open_connection

    async def spy(host, port, **kwargs):  # keeps each writer, so no garbage collection closes its socket
        hosts.append(host)
        reader, writer = await real_open(host, port, **kwargs)
        writers.append(writer)
        return reader, writer

    monkeypatch.setattr(asyncio, "open_connection", spy)
    stand_in = StandIn()
    inputs = Inputs(jpeg=b"", gif_bomb=b"", mp4_bomb=b"", clip=b"clip" * 100, gif=b"gif" * 100,
                    size_changing_clip=b"mkv" * 100)  # fmt: skip
    held = {"idle": 2, "slowloris": 1, "slow_bodies": 1, "held_uploads": 1, "held_upload_mb": 0.2,
            "huge_headers": 1, "huge_header_mb": 3, "interval_s": 0.05}  # fmt: skip

    async def scenario():
        server = await asyncio.start_server(stand_in.handle, "127.0.0.1", 0, limit=2 * 2**20)
        async with server:
            target = Target(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", {"X-API-Key": "k"})
            start = time.monotonic()
            results = await asyncio.gather(
                connections(target, inputs, start + 1.0, **held),
                disconnects(target, inputs, start + 1.0, uploads=4, body_mb=0.05),
                video_flood(target, inputs, start + 1.0, clients=2, per_client=2),
                upload_flood(
                    target, inputs, start + 1.0, clients=3, frames=64, detect_faces=False, timeout_s=5
                ),
                silent_lockout(target, inputs, start + 1.0, silent=2, declared_mb=0.5),
                size_changing_video(target, inputs, start + 1.0, clients=1, per_client=2),
            )
            took = time.monotonic() - start
            for _ in range(100):  # the server side sees each close a moment later
                if not stand_in.open:
                    break
                await asyncio.sleep(0.02)
            return results, took

    (held_ends, dropped, flooded, uploaded, silent, changing), took = asyncio.run(scenario())
    assert held_ends["held"] == 5 and held_ends["closed"] + held_ends["reset"] == 1  # the 3 MB header
    assert dropped == {"dropped": 4} and flooded == {"200": 4} and uploaded == {"200": 3}
    assert silent == {"held": 2} and changing == {"200": 2}
    assert 1.0 <= took < 2.0 and stand_in.open == 0  # stopped by itself at the window, every socket closed
    assert hosts and set(hosts) == {"127.0.0.1"} and all(w.transport.is_closing() for w in writers)
    assert len(stand_in.heads) == 17 and all(b"x-api-key: k\r\n" in h.lower() for h in stand_in.heads)
    assert sum(b"content-length: 524288\r\n" in h.lower() for h in stand_in.heads) == 2  # the declarations
    assert sum(h.startswith(b"POST /predict-video ") for h in stand_in.heads) == 4 + 3 + 2


@pytest.mark.slow
def test_quick_abuse_run_against_the_demo_service(tmp_path):
    out = tmp_path / "abuse.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.abuse", "--quick", "--api-key", "k", "--cache-dir", str(tmp_path),
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text()) and report["complete"]
    assert report["settings"]["service_env"]["FER_API_KEY"] == "<set>"
    assert report["baseline"]["victim"]["ok"] == report["baseline"]["victim"]["requests"] > 0
    assert [a["name"] for a in report["attacks"]] == list(ATTACKS)
    for attack in report["attacks"]:
        assert "error" not in attack, attack["error"]
        assert attack["victim"]["requests"] > 0 and sum(attack["attacker"].values()) > 0
        assert attack["recovery"]["probes"] >= 1 and attack["service"]["fds"] > 0
        assert attack["service"]["peak_rss_mb"] >= attack["service"]["start_rss_mb"] > 0
        assert not [label for label in attack["attacker"] if label.startswith("401")]  # the key went along
    assert len(report["targets"]) == sum(2 + len(ATTACKS[a["name"]].targets) for a in report["attacks"])
    assert "victim_worst_latency_s" in done.stderr  # the table
    # The scenarios no test of the service holds; their own targets hold at quick sizes too.
    attacks = {a["name"]: a for a in report["attacks"]}
    assert "503 uploads_full" in attacks["upload_flood"]["attacker"]  # refused while still sending
    assert attacks["silent_lockout"]["attacker"] == {"held": 4}  # declared, silent, for the whole window
    verdicts = {(t["attack"], t["name"]): t["passed"] for t in report["targets"]}
    judged = [
        *(("upload_flood", t) for t in ("attacker_requests_without_status", "refusals_without_retry_after")),
        *(("silent_lockout", t) for t in ("victim_success_share", "victim_worst_latency_s")),
        *(("size_changing_video", t) for t in ("attacker_refused_media_too_large", "service_rss_growth_mb")),
    ]
    assert {key: verdicts[key] for key in judged} == dict.fromkeys(judged, True)
