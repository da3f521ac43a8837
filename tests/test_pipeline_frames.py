"""A clip's sampled frames searched for faces on several threads (`prepare_video`'s `workers`): frames
really are searched at once, the answer is the one-thread answer, and a stop or a failure ends the work
with nothing left running."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from model import pipeline
from model.faces.base import Box, Face
from model.faces.synthetic import people_clip
from model.media import DecodeStopped, VideoFrames
from model.options import PipelineOptions
from model.pipeline import FrameWorkers, prepare_clip, prepare_video
from tests.support import people_walks, wait_until

FRAMES = 8
# Long enough for any frame searched alone to show: a detector left waiting past it fails the test.
MEET_S = 10.0


class WatchedSlots(threading.Semaphore):
    """Slots that note which threads found none free: how a test knows a clip is waiting for one."""

    def __init__(self, value: int):
        super().__init__(value)
        self.refused: set[int] = set()

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        got = super().acquire(blocking, timeout)
        if not got:
            self.refused.add(threading.get_ident())
        return got


@contextlib.contextmanager
def frame_workers(threads: int, slots: int | None = None):
    """A pool of `threads` for frames' searches, `slots` of them (default: as many as threads) for
    frames at once over every clip."""
    with ThreadPoolExecutor(threads) as pool:
        yield FrameWorkers(pool, WatchedSlots(slots or threads))


def to_pixels(images):
    return torch.zeros(len(images), 3, 8, 8, dtype=torch.uint8)


@pytest.fixture
def frames(monkeypatch) -> list[Image.Image]:
    """`FRAMES` small frames, each knowing its place, as `read_video` gives them to `prepare_video`."""
    images = []
    for i in range(FRAMES):
        image = Image.new("RGB", (64, 48), (i * 20, 0, 0))
        image.info["frame"] = i
        images.append(image)
    stamps = [i / 25 for i in range(FRAMES)]
    clip = VideoFrames(images, list(range(FRAMES)), stamps, FRAMES, fps=25.0, duration=0.32, size=(64, 48))
    monkeypatch.setattr(pipeline, "read_video", lambda *args, **kwargs: clip)
    return images


class ScriptedDetector:
    """A detector that runs `script(frame)` for each frame before finding one face in it, and says which
    frames it searched and which of those searches are still going on."""

    name = "scripted"

    def __init__(self, script=None):
        self.script = script or (lambda frame: None)
        self.lock = threading.Lock()
        self.searched: list[int] = []
        self.running = 0

    def detect(self, image, max_faces, long_side=None):
        frame = image.info["frame"]
        with self.lock:
            self.searched.append(frame)
            self.running += 1
        try:
            self.script(frame)
            return [
                Face(
                    Box(frame, 2, 20, 20),
                    0.9,
                    ((frame + 6.0, 8.0), (frame + 14.0, 8.0)) + ((10.0, 14.0),) * 3,
                )
            ]
        finally:
            with self.lock:
                self.running -= 1


def test_two_frames_are_searched_at_once_on_two_threads(frames):
    """Each search waits for a second one to meet it: one thread after another, the first never would."""
    meet = threading.Barrier(2, timeout=MEET_S)
    detector = ScriptedDetector(lambda frame: meet.wait())
    with frame_workers(2) as workers:
        prepared = prepare_video(b"", to_pixels, detector, PipelineOptions(frames=FRAMES), workers=workers)
    assert sorted(detector.searched) == list(range(FRAMES))
    assert [faces[0].box.x for faces in prepared.faces] == list(range(FRAMES))  # in frame order


def test_without_workers_the_frames_are_searched_one_after_another_in_order(frames):
    detector = ScriptedDetector()
    prepare_video(b"", to_pixels, detector, PipelineOptions(frames=FRAMES))
    assert detector.searched == list(range(FRAMES))


def test_on_threads_the_clip_is_prepared_exactly_as_on_one(engine, detector, person, tmp_path):
    """Three people through the real detector: the same rows, pixel for pixel, the same faces, in the
    same order, whichever thread searched which frame."""
    clip = people_clip(tmp_path / "people.mp4", people_walks("one enters late", person), n_frames=32)
    options = PipelineOptions(frames=16)
    alone = prepare_video(str(clip.path), engine.prepare_many, detector, options)
    with frame_workers(3) as workers:
        pooled = prepare_video(str(clip.path), engine.prepare_many, detector, options, workers=workers)
        as_clip = prepare_clip(
            str(clip.path), engine.prepare_many, detector, options, workers=workers, still=False
        )
    assert max(len(faces) for faces in alone.faces) == 3
    for prepared in (pooled, as_clip):
        assert torch.equal(prepared.pixels, alone.pixels)
        assert prepared.faces == alone.faces
        assert prepared.clip == alone.clip


def test_a_stop_ends_the_work_and_no_search_outlives_it(frames):
    """Frame 1's search is when the client leaves: the frames after it are not searched, and frame 0's
    search, still going on, ends before `prepare_video` does."""
    stop, searching = threading.Event(), threading.Event()

    def script(frame):
        if frame == 0:
            searching.set()
            assert stop.wait(MEET_S)
            time.sleep(0.2)
        elif frame == 1:
            assert searching.wait(MEET_S)
            stop.set()

    detector = ScriptedDetector(script)
    with frame_workers(2) as workers, pytest.raises(DecodeStopped):
        prepare_video(b"", to_pixels, detector, PipelineOptions(frames=FRAMES), stop, workers=workers)
    assert detector.running == 0
    assert sorted(detector.searched) == [0, 1]


def test_a_failing_frame_fails_the_clip_and_no_search_outlives_it(frames):
    """Frame 1's search fails while frame 0's goes on: the failure is the clip's, raised once frame 0's
    search has ended, and the frames still queued are cancelled."""
    failed, searching = threading.Event(), threading.Event()

    def script(frame):
        if frame == 0:
            searching.set()
            assert failed.wait(MEET_S)
            time.sleep(0.2)
        elif frame == 1:
            assert searching.wait(MEET_S)
            failed.set()
            raise RuntimeError("the detector broke")

    detector = ScriptedDetector(script)
    with frame_workers(2) as workers, pytest.raises(RuntimeError, match="the detector broke"):
        prepare_video(b"", to_pixels, detector, PipelineOptions(frames=FRAMES), workers=workers)
    assert detector.running == 0
    assert sorted(detector.searched) == [0, 1]  # frame 1's slot came back with its failure known


def test_a_still_image_is_prepared_on_the_calling_thread(tmp_path):
    """/retrieve prepares a still image in the decode pool it would give a clip's frames to: a one-thread
    pool whose thread waits on a task queued behind it would never finish."""
    Image.new("RGB", (64, 48), "grey").save(tmp_path / "still.png")
    with frame_workers(1) as workers:
        task = workers.pool.submit(
            prepare_clip,
            str(tmp_path / "still.png"),
            to_pixels,
            None,
            PipelineOptions(),
            workers=workers,
            still=True,
        )
        prepared = task.result(timeout=MEET_S)
    assert len(prepared.pixels) == 1


def test_other_work_in_the_pool_waits_behind_one_round_of_frames_not_every_clips(frames):
    """Two clips share one slot: an image's task submitted while the first clip's frame is searched
    runs next, before either clip's next frame, however many clips wait for the pool."""
    order: list[str] = []
    first_frame_started, image_queued = threading.Event(), threading.Event()

    def script(frame):
        order.append(f"frame {frame}")
        if not first_frame_started.is_set():
            first_frame_started.set()
            assert image_queued.wait(MEET_S)

    detector = ScriptedDetector(script)
    with frame_workers(1) as workers:
        clips = [
            threading.Thread(
                target=prepare_video,
                args=(b"", to_pixels, detector, PipelineOptions()),
                kwargs={"workers": workers},
            )
            for _ in range(2)
        ]
        clips[0].start()
        assert first_frame_started.wait(MEET_S)
        clips[1].start()
        second = clips[1].ident
        wait_until(lambda: second in workers.slots.refused, "the second clip waiting for a slot", MEET_S)
        image = workers.pool.submit(order.append, "image")
        image_queued.set()
        image.result(timeout=MEET_S)
        for clip in clips:
            clip.join(MEET_S)
    assert order[:2] == ["frame 0", "image"]
    assert order.count("image") == 1 and len(order) == 2 * FRAMES + 1


def test_a_stop_is_seen_while_the_frames_wait_for_a_busy_pool(frames):
    """The pool's one thread is busy with other work: a client that leaves meanwhile ends its clip's
    wait at once, not when its first frame reaches a thread."""
    detector, stop, release = ScriptedDetector(), threading.Event(), threading.Event()
    with frame_workers(1, slots=2) as workers:
        workers.pool.submit(release.wait, MEET_S)
        timer = threading.Timer(0.2, stop.set)
        timer.start()
        started = time.monotonic()
        with pytest.raises(DecodeStopped):
            prepare_video(b"", to_pixels, detector, PipelineOptions(), stop, workers=workers)
        waited = time.monotonic() - started
        release.set()
    assert waited < MEET_S / 2 and detector.searched == []


def test_a_pool_shut_down_under_a_clip_ends_it_as_a_stop(frames):
    """The service stopping shuts its pool down, cancelling queued searches and refusing new ones: the
    clip ends as stopped, not with an error of its own."""
    release = threading.Event()
    with frame_workers(1, slots=2) as workers:
        workers.pool.submit(release.wait, MEET_S)
        threading.Timer(0.2, lambda: workers.pool.shutdown(wait=False, cancel_futures=True)).start()
        with pytest.raises(DecodeStopped):
            prepare_video(b"", to_pixels, ScriptedDetector(), PipelineOptions(), workers=workers)
        release.set()
        with pytest.raises(DecodeStopped):  # a clip that comes after
            prepare_video(b"", to_pixels, ScriptedDetector(), PipelineOptions(), workers=workers)


def test_the_frames_searches_run_in_the_callers_context(frames):
    """The request id, a context variable, reaches the log lines written while a frame is searched."""
    request = contextvars.ContextVar("request", default=None)
    seen: list[str | None] = []
    detector = ScriptedDetector(lambda frame: seen.append(request.get()))
    request.set("r-1")
    with frame_workers(2) as workers:
        prepare_video(b"", to_pixels, detector, PipelineOptions(), workers=workers)
    assert seen == ["r-1"] * FRAMES
