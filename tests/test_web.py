"""The web page (service/static) in a real browser: headless Chromium driven by Playwright, against the
service running the demo model on a free loopback port.

Needs Playwright for Python and a Chromium binary (Debian's `chromium`; Playwright's own browser
downloads are never used). Skipped, with the reason, when either is missing. FER_WEB_CHROMIUM names
another binary; screenshots of every view (desktop and phone width) are saved under
FER_WEB_SCREENSHOTS, else a pytest temporary directory (its path is printed).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from skimage import data as skimage_data

from tests.support import make_video, read_index, wait_until

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
)
expect = sync_api.expect


def _chromium() -> str | None:
    for candidate in (os.environ.get("FER_WEB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (apt-get install chromium, or set FER_WEB_CHROMIUM)"
)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 740}
TIMEOUT_MS = 15_000
# The page must work under a strict Content-Security-Policy (no inline scripts, styles or handlers);
# the tests serve it with this one, and Chromium logs any violation as a console error.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'"
)
CUSTOM_CLASSES = ["calm", "amused", "furious"]


# ---- fixtures -----------------------------------------------------------------------------------
@contextlib.contextmanager
def running(**settings):
    """The real app (demo model) under uvicorn in a thread, on a free 127.0.0.1 port; yields its URL
    once it is up (ready, unless a key locks /readyz)."""
    import uvicorn

    from service.app import create_app
    from service.settings import ServiceSettings

    app = create_app(ServiceSettings(preset="demo", device="cpu", max_wait_ms=5, **settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="web-test-server", daemon=True)
    thread.start()
    headers = {"X-API-Key": settings["api_key"]} if "api_key" in settings else {}

    def ready() -> bool:
        assert thread.is_alive(), "the demo service's server thread ended"
        try:
            return httpx.get(f"{base}/readyz", timeout=2, headers=headers).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, "the demo service's readiness", seconds=90, every=0.1)
    try:
        yield base
    finally:
        uv.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def server():
    with running() as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    playwright = sync_api.sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    except Exception as exc:  # there but broken (missing libraries, ...): a failure, not a skip
        playwright.stop()
        pytest.fail(f"Chromium at {CHROMIUM} did not start: {exc}")
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("FER_WEB_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("web-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nweb page screenshots: {path}")
    return path


class Watch:
    """Every request the page makes and every console error it logs; checked after each test."""

    def __init__(self, origin: str):
        self.origin = origin
        self.foreign: list[str] = []
        self.console: list[str] = []
        self.allowed_console: list[re.Pattern] = []
        self.predict_in_flight = 0
        self.predict_max_in_flight = 0

    def on_request(self, request) -> None:
        url = request.url
        if url.startswith(("blob:", "data:")):
            return  # the page's own object URLs never leave it
        parts = urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.foreign.append(url)
        if parts.path == "/predict":
            self.predict_in_flight += 1
            self.predict_max_in_flight = max(self.predict_max_in_flight, self.predict_in_flight)

    def on_request_done(self, request) -> None:
        if urlsplit(request.url).path == "/predict":
            self.predict_in_flight -= 1

    def on_console(self, message) -> None:
        if message.type == "error" and not any(p.search(message.text) for p in self.allowed_console):
            self.console.append(message.text)

    def allow_console(self, pattern: str) -> None:
        self.allowed_console.append(re.compile(pattern))


@pytest.fixture
def page(server, browser):
    context = browser.new_context(viewport=DESKTOP, base_url=server)
    context.set_default_timeout(TIMEOUT_MS)
    watch = Watch(server)
    context.on("request", watch.on_request)
    context.on("requestfinished", watch.on_request_done)
    context.on("requestfailed", watch.on_request_done)

    def strict_csp(route):
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": CSP})

    context.route(f"{server}/", strict_csp)
    tab = context.new_page()
    tab.on("console", watch.on_console)
    tab.on("pageerror", lambda error: watch.console.append(f"uncaught: {error}"))
    tab.watch = watch
    yield tab
    context.close()
    assert not watch.foreign, f"requests left the page's origin: {watch.foreign}"
    assert not watch.console, f"console errors: {watch.console}"


def open_page(page, view: str = "image") -> None:
    page.goto(f"/#{view}")
    expect(page.locator("body[data-ready='true']")).to_have_count(1)
    expect(page.locator("#model-status")).to_have_attribute("data-state", "ready")


def screenshot(page, shots: Path, name: str) -> None:
    """A desktop and a phone-width full-page screenshot, then back to desktop."""
    page.screenshot(path=shots / f"{name}-desktop.png", full_page=True)
    page.set_viewport_size(PHONE)
    # a shown timeline redraws at its container's new width (chart.js: never under 280 px)
    page.wait_for_function(
        """() => [...document.querySelectorAll('.chart')].every((chart) => {
            const drawn = chart.querySelector('svg');
            const wanted = Math.max(280, Math.floor(chart.clientWidth));
            return !drawn || !chart.clientWidth || Math.abs(drawn.width.baseVal.value - wanted) < 2;
        })"""
    )
    width = page.evaluate("document.documentElement.scrollWidth")
    page.screenshot(path=shots / f"{name}-phone.png", full_page=True)
    page.set_viewport_size(DESKTOP)
    assert width <= PHONE["width"], f"{name}: the page scrolls sideways at phone width ({width} px)"


# ---- media --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> Path:
    """scikit-image's astronaut photo: one face."""
    path = tmp_path_factory.mktemp("media") / "astronaut.jpg"
    Image.fromarray(skimage_data.astronaut()).save(path, "JPEG", quality=90)
    return path


def api(server: str, path: str, file: Path, mime: str, **fields) -> httpx.Response:
    with file.open("rb") as handle:
        data = {
            k: json.dumps(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in fields.items()
        }
        return httpx.post(f"{server}{path}", files={"file": (file.name, handle, mime)}, data=data, timeout=60)


# ---- tests --------------------------------------------------------------------------------------
def test_image_view_draws_the_api_faces_and_follows_the_class_list(page, server, astronaut, shots):
    expected = api(server, "/predict", astronaut, "image/jpeg").json()
    assert expected["faces"], "the face detector should find the astronaut's face"
    open_page(page)
    page.set_input_files("#image-file", str(astronaut))

    boxes = page.locator("#image-overlay .face-box")
    expect(boxes).to_have_count(len(expected["faces"]))
    assert [b.get_attribute("data-label") for b in boxes.all()] == [f["label"] for f in expected["faces"]]
    expect(page.locator("#image-summary")).to_contain_text(expected["label"])
    first_card = page.locator("#image-faces .face-card").first
    expect(first_card.locator(".bar-row")).to_have_count(len(expected["classes"]))
    assert [r.get_attribute("data-class") for r in first_card.locator(".bar-row").all()] == expected[
        "classes"
    ]
    alt = page.locator("#image-preview").get_attribute("alt")
    assert "1 face" in alt and expected["label"] in alt

    # the box sits where the API says, scaled to the displayed size of the photo
    img = page.locator("#image-preview")
    natural = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    shown, drawn = img.bounding_box(), boxes.first.bounding_box()
    scale = shown["width"] / natural[0]
    x, y, w, h = expected["faces"][0]["box"]
    assert abs(drawn["x"] - (shown["x"] + x * scale)) < 3
    assert abs(drawn["y"] - (shown["y"] + y * scale)) < 3
    assert abs(drawn["width"] - w * scale) < 4
    assert abs(drawn["height"] - h * scale) < 4
    screenshot(page, shots, "image")

    # own class words: the bars and the label follow
    custom = api(server, "/predict", astronaut, "image/jpeg", classes=",".join(CUSTOM_CLASSES)).json()
    page.fill("#custom-classes", ", ".join(CUSTOM_CLASSES))
    page.press("#custom-classes", "Enter")
    expect(first_card.locator(".bar-row")).to_have_count(len(CUSTOM_CLASSES))
    assert [r.get_attribute("data-class") for r in first_card.locator(".bar-row").all()] == CUSTOM_CLASSES
    assert [b.get_attribute("data-label") for b in boxes.all()] == [f["label"] for f in custom["faces"]]
    expect(page.locator("#image-summary")).to_contain_text(custom["label"])
    expect(page.locator("#class-preset")).to_have_value("__custom__")
    page.locator("details.prompt-details summary").click()
    expect(page.locator("#prompt-list")).to_contain_text("a photo of a face with an expression of amused.")
    screenshot(page, shots, "image-custom-classes")

    # face detection off: no boxes, the whole photo is classified
    page.uncheck("#detect-faces")
    expect(boxes).to_have_count(0)
    expect(page.locator("#image-note")).to_be_visible()
    expect(page.locator("#image-faces .bar-row")).to_have_count(len(CUSTOM_CLASSES))

    # a change made while another view is shown is applied when the image view is back
    page.click("#tab-retrieve")
    page.check("#detect-faces")
    page.click("#tab-image")
    expect(boxes).to_have_count(len(custom["faces"]))
    expect(page.locator("#image-faces .face-card")).to_have_count(len(custom["faces"]))


def test_two_faces_with_landmarks(page, server, astronaut, tmp_path, shots):
    """Every face gets its box; landmarks (when the detector gives them) are drawn as dots."""
    face = Image.open(astronaut)
    canvas = Image.new("RGB", (1000, 560), "gray")
    canvas.paste(face.resize((420, 420)), (20, 60))
    canvas.paste(face.resize((500, 500)), (480, 30))
    photo = tmp_path / "two.png"
    canvas.save(photo)
    expected = api(server, "/predict", photo, "image/png").json()
    assert len(expected["faces"]) == 2

    # the detector in use gives no landmarks: answer with the API's own body, landmarks added
    # (the browser's upload is not forwarded: Playwright's route.fetch mangles binary multipart bodies)
    for f in expected["faces"]:
        x, y, w, h = f["box"]
        marks = ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8))
        f["landmarks"] = [[x + w * a, y + h * b] for a, b in marks]
        f["score"] = 0.97

    page.route("**/predict", lambda route: route.fulfill(json=expected))
    open_page(page)
    page.set_input_files("#image-file", str(photo))
    expect(page.locator("#image-overlay .face-box")).to_have_count(2)
    expect(page.locator("#image-overlay .landmark")).to_have_count(10)
    expect(page.locator("#image-faces .face-card")).to_have_count(2)
    expect(page.locator("#image-faces")).to_contain_text("detector score 0.97")
    tags = page.locator("#image-overlay .face-tag").all_inner_texts()
    assert [t.split(" ")[1] for t in tags] == [f["label"] for f in expected["faces"]]
    screenshot(page, shots, "image-two-faces")


def test_unsupported_file_shows_the_api_detail(page, server, tmp_path, shots):
    text = tmp_path / "notes.txt"
    text.write_text("not a photo\n")
    answer = api(server, "/predict", text, "text/plain")
    assert answer.status_code == 415
    page.watch.allow_console(r"status of 415")  # Chromium logs every 4xx response
    open_page(page)
    page.set_input_files("#image-file", str(text))
    message = page.locator("#image-message")
    expect(message).to_contain_text(answer.json()["detail"])
    expect(message).to_have_attribute("role", "alert")
    expect(message).to_have_attribute("data-kind", "error")
    screenshot(page, shots, "image-error")


def test_video_view_timeline_has_a_point_per_sampled_frame(page, server, tmp_path, shots):
    clip = make_video(tmp_path / "clip.mp4", 40, fps=20, size=128)
    expected = api(server, "/predict-video", clip, "video/mp4", per_frame=True, frames=16).json()
    open_page(page, "video")
    page.set_input_files("#video-file", str(clip))

    points = page.locator("#video-chart .frame-point")
    expect(points).to_have_count(expected["frames_sampled"])
    stamps = [float(p.get_attribute("data-timestamp")) for p in points.all()]
    assert stamps == [f["timestamp"] for f in expected["timeline"]]
    expect(page.locator("#video-summary")).to_contain_text(expected["label"])
    expect(page.locator("#video-bars .bar-row")).to_have_count(len(expected["classes"]))
    expect(page.locator("#video-table tbody tr")).to_have_count(expected["frames_sampled"])

    # clicking a point seeks the clip there; so do the arrow keys and Enter
    player = page.locator("#video-player")
    page.wait_for_function("() => document.getElementById('video-player').readyState >= 1")
    points.nth(10).click()
    seeked = "t => Math.abs(document.getElementById('video-player').currentTime - t) < 0.06"
    page.wait_for_function(seeked, arg=stamps[10])
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_function(seeked, arg=stamps[11])
    assert player.evaluate("v => v.paused")
    screenshot(page, shots, "video")


@pytest.fixture(scope="module")
def two_people(tmp_path_factory) -> Path:
    """A square clip (the desktop layout letterboxes it) of two people: the second comes in partway,
    so the early sampled frames have one face and the later ones two."""
    from model.faces.synthetic import Walk, astronaut_face, people_clip, recoloured

    face = astronaut_face(context=0.3)
    walks = [
        Walk(recoloured(face, 0), (0.3, 0.35), (0.4, 0.45), (0.14, 0.14)),
        Walk(recoloured(face, 1), (0.75, 0.6), (0.65, 0.55), (0.17, 0.17), shown=(0.4, 1.0)),
    ]
    path = tmp_path_factory.mktemp("media") / "two-people.mp4"
    return people_clip(path, walks, n_frames=40, size=(480, 480), fps=20).path


@pytest.fixture(scope="module")
def two_people_gif(two_people) -> Path:
    """The same clip as a GIF (which the page draws frame by frame on a canvas)."""
    import av

    path = two_people.with_suffix(".gif")
    with av.open(str(two_people)) as source, av.open(str(path), mode="w") as container:
        stream = container.add_stream("gif", rate=20)
        stream.width, stream.height, stream.pix_fmt = 480, 480, "rgb8"
        for frame in source.decode(video=0):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def drawn_boxes(page) -> dict[str, list[float]]:
    """Each box drawn over the clip, by the person's number, back in the clip's pixels: measured from
    where the picture sits inside its element (the video's or the GIF canvas's; object-fit: contain
    letterboxes it)."""
    return page.evaluate(
        """() => {
            const v = document.querySelector('#video-stage > :is(video, canvas):not([hidden])');
            const [w, h] = v.tagName === 'VIDEO' ? [v.videoWidth, v.videoHeight] : [v.width, v.height];
            const r = v.getBoundingClientRect();
            const s = Math.min(r.width / w, r.height / h);
            const left = r.left + (r.width - w * s) / 2;
            const top = r.top + (r.height - h * s) / 2;
            return Object.fromEntries([...document.querySelectorAll('#video-overlay .face-box')].map((b) => {
                const q = b.getBoundingClientRect();
                return [b.dataset.number, [(q.left - left) / s, (q.top - top) / s, q.width / s, q.height / s]];
            }));
        }"""
    )


def assert_boxes_of_frame(page, tracks: list[dict], frame: int) -> None:
    """The boxes over the video are the API's boxes of the people in sampled frame `frame`, numbered
    by their track's place, and no one else's."""
    expect(page.locator("#video-overlay")).to_have_attribute("data-frame", str(frame))
    wanted = {str(n): f["box"] for n, t in enumerate(tracks, 1) for f in t["frames"] if f["index"] == frame}
    drawn = drawn_boxes(page)
    assert drawn.keys() == wanted.keys(), (frame, drawn, wanted)
    for number, box in wanted.items():
        assert all(abs(a - b) < 1.5 for a, b in zip(drawn[number], box, strict=True)), (number, drawn, box)


def test_video_view_boxes_each_person_and_shows_the_chosen_persons_timeline(page, server, two_people, shots):
    """A clip of two people: a choice per person (the main track first and chosen), each person's box
    over the shown frame where the API has it, and choosing person 2 (with the keyboard) shows their
    probabilities in the bars and the timeline."""
    expected = api(server, "/predict-video", two_people, "video/mp4", per_frame=True, frames=16).json()
    tracks = expected["tracks"]
    assert len(tracks) == 2, "the demo service's detector should find both people"
    late = next(f["index"] for f in tracks[1]["frames"])  # the first sampled frame with both people
    open_page(page, "video")
    page.set_input_files("#video-file", str(two_people))

    choices = page.locator("#video-people .person-choice")
    expect(choices).to_have_count(2)
    for n, (choice, track) in enumerate(zip(choices.all(), tracks, strict=True), 1):
        expect(choice).to_contain_text(f"Person {n}")
        expect(choice).to_contain_text(f"{track['label']} · {len(track['frames'])} frames")
    radios = page.locator("#video-people input[type='radio']")
    expect(radios.first).to_be_checked()
    expect(page.locator("#video-summary")).to_contain_text(f"Person 1: {tracks[0]['label']}")

    # the timeline's points are person 1's frames; choosing one seeks the clip and boxes its people
    points = page.locator("#video-chart .frame-point")
    expect(points).to_have_count(len(tracks[0]["frames"]))
    page.wait_for_function("() => document.getElementById('video-player').readyState >= 1")
    stage = page.evaluate(
        """() => { const v = document.getElementById('video-player');
                   return [v.clientWidth, v.clientHeight, v.videoWidth, v.videoHeight]; }"""
    )
    assert stage[0] / stage[2] > stage[1] / stage[3] + 0.05, f"the clip should be letterboxed here: {stage}"
    first = tracks[0]["frames"][0]["index"]
    points.first.click()
    assert_boxes_of_frame(page, tracks, first)  # person 2 is not in the clip yet: one box
    late_point = [f["index"] for f in tracks[0]["frames"]].index(late)
    points.nth(late_point).click()
    assert_boxes_of_frame(page, tracks, late)
    colours = page.locator("#video-overlay .face-box").evaluate_all(
        "boxes => boxes.map((b) => getComputedStyle(b).borderTopColor)"
    )
    assert len(set(colours)) == 2

    # person 2, chosen from the keyboard: their bars, their timeline, their box marked
    radios.first.focus()
    page.keyboard.press("ArrowRight")
    expect(radios.nth(1)).to_be_checked()
    second = tracks[1]
    expect(page.locator("#video-summary")).to_contain_text(f"Person 2: {second['label']}")
    values = page.locator("#video-bars .bar-value").all_inner_texts()
    assert values == [f"{second['probabilities'][c] * 100:.1f}%" for c in expected["classes"]]
    expect(points).to_have_count(len(second["frames"]))
    stamps = [float(p.get_attribute("data-timestamp")) for p in points.all()]
    assert stamps == [f["timestamp"] for f in second["frames"]]
    lines = page.locator("#video-chart polyline")
    heights = [
        (f["probabilities"][c], float(point.split(",")[1]))
        for c, line in zip(expected["classes"], lines.all(), strict=True)
        for f, point in zip(second["frames"], line.get_attribute("points").split(), strict=True)
    ]
    (p0, y0), (p1, y1) = min(heights), max(heights)
    assert y1 < y0
    for p, y in heights:
        assert abs(y - (y0 + (p - p0) * (y1 - y0) / (p1 - p0))) < 0.2
    expect(page.locator("#video-table tbody tr")).to_have_count(len(second["frames"]))
    expect(page.locator("#video-overlay .face-box.chosen")).to_have_attribute("data-number", "2")

    # the boxes follow the picture's displayed size
    page.set_viewport_size(PHONE)
    page.wait_for_function(
        "w => Math.abs(document.getElementById('video-overlay').getBoundingClientRect().width - w) < 1",
        arg=page.evaluate("document.getElementById('video-player').clientWidth"),
    )
    assert_boxes_of_frame(page, tracks, late)
    page.set_viewport_size(DESKTOP)
    screenshot(page, shots, "video-people")


def test_a_gif_of_people_has_their_boxes_on_the_frame_drawn(page, server, two_people_gif):
    expected = api(server, "/predict-video", two_people_gif, "image/gif", per_frame=True, frames=16).json()
    tracks = expected["tracks"]
    assert len(tracks) == 2, "the demo service's detector should find both people"
    open_page(page, "video")
    page.set_input_files("#video-file", str(two_people_gif))
    expect(page.locator("#video-people .person-choice")).to_have_count(2)
    canvas = page.locator("#video-gif")
    expect(canvas).to_have_attribute("data-frame", "0")
    expect(page.locator("#video-overlay .face-box")).to_have_count(1)  # frame 0 is nearest the first sampled
    points = page.locator("#video-chart .frame-point")
    last = tracks[0]["frames"][-1]["index"]
    points.last.click()
    expect(canvas).to_have_attribute("data-frame", str(last))
    assert_boxes_of_frame(page, tracks, last)


def test_choosing_a_clip_runs_it_once_and_run_again_or_a_new_frame_count_reruns_it(page, server, tmp_path):
    clip = make_video(tmp_path / "clip.mp4", 30, size=64)
    sent = []
    page.on("request", lambda r: sent.append(r) if urlsplit(r.url).path == "/predict-video" else None)
    open_page(page, "video")
    expect(page.locator("#video-rerun")).to_be_hidden()  # nothing to run yet, and no "Analyse" step
    with page.expect_response("**/predict-video"):
        page.set_input_files("#video-file", str(clip))
    expect(page.locator("#video-chart .frame-point")).to_have_count(16)
    assert len(sent) == 1

    with page.expect_response("**/predict-video"):
        page.click("#video-rerun")
    with page.expect_response("**/predict-video"):
        page.fill("#video-frames", "8")
        page.locator("#video-frames").dispatch_event("change")
    expect(page.locator("#video-chart .frame-point")).to_have_count(8)
    assert len(sent) == 3 and b'name="frames"\r\n\r\n8\r\n' in sent[-1].post_data_buffer


def test_a_gif_clip_is_shown_frame_by_frame_and_the_timeline_seeks_it(page, server, tmp_path, shots):
    """A <video> cannot play a GIF (the MAFW sample format): its frames are drawn on a canvas instead,
    and choosing a point of the timeline draws that very frame (each frame shows its index in binary)."""
    clip = make_video(tmp_path / "clip.gif", 24, fps=10, codec="gif", size=64)
    expected = api(server, "/predict-video", clip, "image/gif", per_frame=True, frames=16).json()
    open_page(page, "video")
    page.set_input_files("#video-file", str(clip))
    points = page.locator("#video-chart .frame-point")
    expect(points).to_have_count(16)
    expect(page.locator("#video-player")).to_be_hidden()
    canvas = page.locator("#video-gif")
    expect(canvas).to_be_visible()
    expect(canvas).to_have_attribute("data-frame", "0")

    for i in (5, 12):
        frame = expected["timeline"][i]["index"]
        points.nth(i).click()
        expect(canvas).to_have_attribute("data-frame", str(frame))
        drawn = canvas.evaluate("c => c.toDataURL('image/png')")
        image = Image.open(io.BytesIO(base64.b64decode(drawn.split(",", 1)[1])))
        assert read_index(image) == frame
    assert page.locator("#video-playback-note").is_hidden()
    screenshot(page, shots, "video-gif")


def test_retrieve_view_ranks_in_the_api_order(page, server, astronaut, shots):
    texts = ["an astronaut smiling", "a crying child", "a furious driver"]
    expected = api(server, "/retrieve", astronaut, "image/jpeg", descriptions=texts, top_k=3).json()
    open_page(page, "retrieve")
    expect(page.locator("#class-preset")).to_be_hidden()  # retrieval takes no class list
    page.set_input_files("#retrieve-file", str(astronaut))
    page.fill("#retrieve-descriptions", "\n".join(texts) + "\n\n")
    page.click("#retrieve-run")
    rows = page.locator("#retrieve-ranking .rank-text")
    expect(rows).to_have_count(3)
    assert rows.all_inner_texts() == [r["text"] for r in expected["ranking"]]
    expect(page.locator("#retrieve-summary")).to_contain_text(expected["ranking"][0]["text"])
    hint = page.locator("#retrieve-scores-hint")  # raw cosines, some negative, under relative bars
    expect(hint).to_be_visible()
    expect(hint).to_contain_text("cosine similarity")
    expect(hint).to_contain_text("from the lowest score")
    screenshot(page, shots, "retrieve")


def test_retrieve_view_draws_each_descriptions_score_over_time(page, server, astronaut, tmp_path, shots):
    """A clip's ranking comes with a line per description (the API's per-frame scores, in the order the
    descriptions were given); choosing a frame seeks the clip there. An image has no such chart."""
    clip = make_video(tmp_path / "clip.mp4", 40, fps=20, size=128)
    texts = ["a person smiling broadly", "a person frowning in anger", "a calm face"]
    expected = api(server, "/retrieve", clip, "video/mp4", descriptions=texts, top_k=3, per_frame=True).json()
    open_page(page, "retrieve")
    page.set_input_files("#retrieve-file", str(clip))
    page.fill("#retrieve-descriptions", "\n".join(texts))
    with page.expect_request("**/retrieve") as sent:
        page.click("#retrieve-run")
    assert b'name="per_frame"\r\n\r\ntrue\r\n' in sent.value.post_data_buffer

    chart = page.locator("#retrieve-chart")
    points = chart.locator(".frame-point")
    expect(points).to_have_count(len(expected["timeline"]))
    stamps = [float(p.get_attribute("data-timestamp")) for p in points.all()]
    assert stamps == [f["timestamp"] for f in expected["timeline"]]
    lines = chart.locator("polyline")
    assert [line.get_attribute("data-series") for line in lines.all()] == texts
    # every point's height is the same linear map of the API's score (higher score, higher point)
    heights = [
        (f["scores"][d], float(point.split(",")[1]))
        for d, line in enumerate(lines.all())
        for f, point in zip(expected["timeline"], line.get_attribute("points").split(), strict=True)
    ]
    (s0, y0), (s1, y1) = min(heights), max(heights)
    assert y1 < y0
    for score, y in heights:
        assert abs(y - (y0 + (score - s0) * (y1 - y0) / (s1 - s0))) < 0.2
    assert page.locator("#retrieve-legend li").all_inner_texts() == texts
    expect(page.locator("#retrieve-table tbody tr")).to_have_count(len(expected["timeline"]))
    hint = page.locator("#retrieve-timeline-hint")
    expect(hint).to_contain_text("cosine similarity")
    expect(hint).to_contain_text("not the average")
    expect(page.locator("#retrieve-scores-hint")).to_be_visible()  # the ranking's explanation stays

    page.wait_for_function("() => document.querySelector('#retrieve-media video').readyState >= 1")
    points.nth(10).click()
    seeked = "t => Math.abs(document.querySelector('#retrieve-media video').currentTime - t) < 0.06"
    page.wait_for_function(seeked, arg=stamps[10])
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_function(seeked, arg=stamps[11])
    expect(page.locator("#retrieve-frame-info")).to_contain_text(f"Frame {expected['timeline'][11]['index']}")
    screenshot(page, shots, "retrieve-over-time")

    page.set_input_files("#retrieve-file", str(astronaut))
    page.click("#retrieve-run")
    expect(page.locator("#retrieve-media img")).to_have_count(1)
    expect(page.locator("#retrieve-over-time")).to_be_hidden()


def test_a_ranking_in_flight_is_never_shown_under_the_next_file(page, server, astronaut, tmp_path):
    """The Retrieve view's answer belongs to the file it was asked about, as the image and video views'
    do: choosing another file while a ranking is in flight drops that ranking."""
    second = tmp_path / "second.png"
    Image.open(astronaut).resize((128, 128)).save(second)
    held = []
    page.route("**/retrieve", lambda route: held.append(route))  # answered when the test says
    open_page(page, "retrieve")
    # every ranking the view draws, with the file its preview names
    page.evaluate(
        """() => {
            window.drawn = [];
            new MutationObserver(() => {
                const media = document.querySelector('#retrieve-media img, #retrieve-media video');
                const top = document.querySelector('#retrieve-ranking .rank-text');
                if (top) window.drawn.push([media.alt || media.getAttribute('aria-label'), top.textContent]);
            }).observe(document.getElementById('retrieve-ranking'), { childList: true });
        }"""
    )

    def answer(top: str) -> dict:
        ranking = [{"index": 0, "text": top, "score": 0.3}, {"index": 1, "text": "frowns", "score": 0.1}]
        return {"media": "image", "ranking": ranking, "timing": {"total_ms": 5.0}}

    def next_request() -> sync_api.Route:
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while len(held) <= answered and time.monotonic() < deadline:
            page.wait_for_timeout(20)
        assert len(held) > answered, "the view sent no ranking request"
        return held[answered]

    page.set_input_files("#retrieve-file", str(astronaut))
    page.fill("#retrieve-descriptions", "smiles\nfrowns")
    answered = 0
    page.click("#retrieve-run")
    first = next_request()
    page.set_input_files("#retrieve-file", str(second))  # while the astronaut's ranking is in flight
    with contextlib.suppress(sync_api.Error):  # the page may have cancelled it already
        first.fulfill(json=answer("the astronaut's ranking"))
    answered = 1
    page.click("#retrieve-run")
    next_request().fulfill(json=answer("second.png's ranking"))
    expect(page.locator("#retrieve-ranking .rank-text").first).to_have_text("second.png's ranking")
    drawn = page.evaluate("window.drawn")
    assert drawn and all(("second.png" in name) == ("second.png" in top) for name, top in drawn), drawn


def test_webcam_snapshot_and_live_view_with_the_fake_camera(page, server, shots):
    open_page(page)
    page.click("#image-camera-open")
    expect(page.locator("#image-camera-snap")).to_be_focused()
    page.wait_for_function("() => document.getElementById('image-camera-video').videoWidth > 0")
    page.click("#image-camera-snap")
    expect(page.locator("#image-result")).to_be_visible()
    expect(page.locator("#image-camera")).to_be_hidden()
    expect(page.locator("#image-faces .bar-row")).to_have_count(7)  # the fake camera shows no face
    expect(page.locator("#image-note")).to_contain_text("no face found")

    page.click("#tab-live")
    page.click("#live-start")
    page.wait_for_function("() => Number(document.getElementById('live-count').textContent) >= 2")
    expect(page.locator("#live-rtt")).to_have_text(re.compile(r"^\d+ ms$|^\d+\.\d+ s$"))
    expect(page.locator("#live-summary")).to_be_visible()
    screenshot(page, shots, "live")
    assert page.watch.predict_max_in_flight == 1

    # leaving the view stops the camera and the requests
    page.click("#tab-image")
    expect(page.locator("#live-start")).to_be_enabled()
    assert page.evaluate("document.getElementById('live-video').srcObject") is None
    sent = int(page.locator("#live-count").inner_text())
    page.wait_for_timeout(700)
    assert int(page.locator("#live-count").inner_text()) == sent


def test_a_camera_error_leaves_no_empty_card(page, server, shots):
    page.add_init_script(
        """navigator.mediaDevices.getUserMedia = () =>
               Promise.reject(new DOMException('denied', 'NotAllowedError'));"""
    )
    open_page(page, "live")
    page.click("#live-start")
    expect(page.locator("#live-message")).to_contain_text("Webcam: camera access was refused.")
    expect(page.locator("#view-live .result-data")).to_be_hidden()  # no empty card under the message
    expect(page.locator("#live-start")).to_be_enabled()
    screenshot(page, shots, "live-camera-error")


def test_the_demo_says_its_answers_are_meaningless_and_the_footer_leads_to_the_api_docs(page, server):
    open_page(page)
    expect(page.locator("#model-warning")).to_be_visible()
    expect(page.locator("#model-warning")).to_contain_text("random weights: answers are meaningless")
    page.click("footer a:text-is('API docs')")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Zero-shot FER")


def test_loading_state_tabs_and_keyboard(page, server, shots):
    """/readyz answers 503 twice (a model still loading): the page says so, then that it is ready."""
    answered = {"n": 0}

    def loading(route):
        answered["n"] += 1
        if answered["n"] <= 2:
            route.fulfill(
                status=503,
                content_type="application/json",
                body=json.dumps({"status": "not_ready", "detail": "loading"}),
            )
        else:
            route.continue_()

    page.route("**/readyz", loading)
    page.watch.allow_console(r"status of 503")
    page.goto("/")
    # text only the loading branch of status.js sets: the page starts as "Checking the model…"
    expect(page.locator("#model-status")).to_have_text("Model loading…")
    expect(page.locator("#model-status")).to_have_attribute("data-state", "loading")
    expect(page.locator("#loading-banner")).to_be_visible()
    screenshot(page, shots, "loading")
    expect(page.locator("#model-status")).to_have_attribute("data-state", "ready", timeout=10_000)
    expect(page.locator("#loading-banner")).to_be_hidden()

    # tabs: arrow keys move between the views; every control has a label
    page.focus("#tab-image")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-live")).to_be_focused()
    expect(page.locator("#tab-live")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#view-live")).to_be_visible()
    expect(page.locator("#view-image")).to_be_hidden()
    page.keyboard.press("End")
    expect(page.locator("#view-retrieve")).to_be_visible()
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                         && !e.textContent.trim())
            .map(e => e.id || e.outerHTML)"""
    )
    assert unlabelled == []
    assert page.evaluate("document.querySelectorAll('[onclick],[onchange],[oninput],[onsubmit]').length") == 0


def test_a_locked_service_asks_for_its_key_then_works(browser, astronaut, shots):
    with running(api_key="s3cret") as base:
        context = browser.new_context(viewport=DESKTOP, base_url=base)
        context.set_default_timeout(TIMEOUT_MS)
        tab = context.new_page()
        tab.goto("/#image")
        expect(tab.locator("#model-status")).to_have_text("API key needed")
        expect(tab.locator("#api-key-field")).to_be_visible()
        screenshot(tab, shots, "locked")
        tab.locator("#api-key").fill("s3cret")
        tab.locator("#api-key").dispatch_event("change")  # the page starts over with the key
        expect(tab.locator("#model-status")).to_have_attribute("data-state", "ready")
        tab.set_input_files("#image-file", str(astronaut))
        expect(tab.locator("#image-overlay .face-box")).to_have_count(1)
        context.close()


def test_the_api_docs_load_without_a_request_off_the_host(page):
    """Swagger UI's scripts and styles come from the installed package, not a CDN (air-gapped hosts)."""
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Zero-shot FER")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()


@pytest.mark.parametrize(
    ("operation", "sample"),
    [("predict", "face.jpg"), ("predict_video", "clip.mp4"), ("retrieve", "clip.mp4")],
)
def test_try_it_out_in_the_api_docs_answers_with_the_fields_it_fills_in(page, operation, sample):
    """Swagger UI fills each form in from the schema (a preset and P-3, not `string`; a JSON array of
    descriptions, sent as the JSON part the schema declares): choosing a file and Execute gets a 200."""
    page.goto("/docs")
    block = page.locator(f"#operations-inference-{operation}")
    block.locator(".opblock-summary").click()
    block.locator("button.try-out__btn").click()
    if operation != "retrieve":
        expect(block.locator("tr[data-property-name='classes'] input[type=text]")).to_have_value("basic7")
    else:
        texts = json.loads(
            block.locator("tr[data-property-name='descriptions'] input[type=text]").input_value()
        )
        assert texts and all(isinstance(t, str) for t in texts)
    block.locator("tr[data-property-name='file'] input[type=file]").set_input_files(
        str(Path(__file__).resolve().parents[1] / "samples" / sample)
    )
    block.locator("button.execute").click()
    expect(block.locator(".live-responses-table .response .response-col_status").first).to_have_text("200")


def test_a_new_file_hides_the_last_answer_until_its_own_arrives(page, server, astronaut, tmp_path):
    """An answer, with its person picker, chart and seek buttons, belongs to the file it was asked about:
    choosing another file hides it, in the video view (whose radio buttons would act on no answer) and
    in the retrieve view (whose seek buttons would seek a clip no longer there)."""
    clip = make_video(tmp_path / "clip.mp4", 40, fps=20, size=128)
    other = make_video(tmp_path / "other.mp4", 30, fps=20, size=128)
    open_page(page, "video")
    page.set_input_files("#video-file", str(clip))
    expect(page.locator("#video-result")).to_be_visible()
    held = []
    page.route("**/predict-video", lambda route: held.append(route))  # the next answer never comes
    page.set_input_files("#video-file", str(other))
    expect(page.locator("#video-result")).to_be_hidden()

    open_page(page, "retrieve")
    page.set_input_files("#retrieve-file", str(clip))
    page.fill("#retrieve-descriptions", "smiles\nfrowns")
    page.click("#retrieve-run")
    expect(page.locator("#retrieve-result")).to_be_visible()
    page.set_input_files("#retrieve-file", str(astronaut))
    expect(page.locator("#retrieve-result")).to_be_hidden()
    for route in held:  # answered now, by the server, so that no request is left failing
        with contextlib.suppress(sync_api.Error):
            route.continue_()
