"""Admission: places counted in items, taken before any work, refused at once with a Retry-After
estimated from the measured cost of what is admitted."""

from __future__ import annotations

import math

import pytest

from model.prompts import MAX_CLASSES, PROMPT_SETS
from service.admission import IMAGE, TEXT, Admission, Places, QueueFull, TooLarge
from service.runtime import Runtime
from service.settings import ServiceSettings
from tests.support import run_bounded


def test_places_are_taken_settled_and_given_back():
    depths = []
    admission = Admission(10, on_depth=depths.append)
    with admission.reserve(images=6, texts=2) as places:
        assert admission.depth == 8
        places.settle(images=1)  # decoding found one face where up to six were possible
        assert admission.depth == 3
    assert admission.depth == 0 and depths[-1] == 0
    places.release()  # twice is harmless
    assert admission.depth == 0


def test_a_clip_takes_a_place_a_frame_then_claims_the_faces_it_found():
    """Every face its frames may give (here 3 a frame) would let one clip in at a time."""
    refused = []
    admission = Admission(100, video_share=0.5, on_refused=refused.append)  # 50 video places
    first = admission.reserve(frames=16, most=Places(frames=48))
    second = admission.reserve(frames=16, most=Places(frames=48))
    assert admission.depth == 32
    first.settle(frames=20)  # four frames with two faces
    assert admission.depth == 36
    second.settle(frames=10)  # a clip shorter than asked: fewer rows, given back
    assert admission.depth == 30
    third = admission.reserve(frames=16, most=Places(frames=48))
    assert admission.depth == 46 and refused == []
    third.release()
    first.release()
    second.release()
    assert admission.depth == 0


def test_faces_found_beyond_the_room_left_refuse_the_request_and_give_back_all_its_places():
    refused = []
    admission = Admission(100, video_share=0.5, on_refused=refused.append)
    for _ in range(100):
        admission.observe(IMAGE, 1, 0.5)
    others = admission.reserve(frames=30, texts=5)
    clip = admission.reserve(frames=16, texts=3, most=Places(frames=48))
    with pytest.raises(QueueFull, match="video frames") as full:
        clip.settle(frames=30)  # 14 more; 4 are left
    assert refused == ["video_full"] and admission.depth == 35
    assert full.value.retry_after_s == math.ceil(30 * 0.5 + 5 * 0.05) == admission.retry_after()
    clip.release()  # as the request's `with` does: nothing more to give back
    assert admission.depth == 35
    others.release()


def test_a_clip_whose_most_faces_could_never_fit_is_too_large_before_it_takes_a_place():
    admission = Admission(1000, request_share=90, video_share=0.05)  # 50 video places
    with pytest.raises(TooLarge, match=r"at most 90 \(FER_MAX_REQUEST_ITEMS\)"):
        admission.reserve(frames=16, most=Places(frames=96))
    with pytest.raises(TooLarge, match="at most 50 fit"):
        admission.reserve(frames=16, most=Places(frames=64))
    assert admission.depth == 0
    admission.reserve(frames=16, most=Places(frames=48)).release()


def test_a_full_queue_refuses_at_once_with_an_estimate_from_measured_costs():
    admission = Admission(10)
    for _ in range(100):  # the estimate settles on the measured costs
        admission.observe(IMAGE, 4, 2.0)  # 0.5 s an image
        admission.observe(TEXT, 10, 1.0)  # 0.1 s a text
    held = admission.reserve(images=6, texts=4)
    with pytest.raises(QueueFull) as refused:
        admission.reserve(images=1)
    assert refused.value.retry_after_s == math.ceil(admission.wait_s())
    assert admission.wait_s() == pytest.approx(6 * 0.5 + 4 * 0.1)
    held.release()
    admission.reserve(images=10).release()  # room again


def test_the_estimate_follows_the_measured_pace():
    admission = Admission(100)
    admission.reserve(images=10)
    before = admission.wait_s()
    for _ in range(50):
        admission.observe(IMAGE, 10, 5.0)  # half a second an image
    assert admission.wait_s() == pytest.approx(10 * 0.5, rel=0.01) and admission.wait_s() > before
    assert admission.retry_after() == 5


def test_one_request_cannot_take_more_than_its_share():
    admission = Admission(100, request_share=25)
    with pytest.raises(TooLarge, match="at most 25"):
        admission.reserve(images=16, texts=10)
    admission.reserve(images=16, texts=9).release()


def test_a_new_class_list_takes_room_in_the_queue_but_not_from_the_request_s_share():
    admission = Admission(1000, request_share=20, text_share=0.7)
    held = admission.reserve(images=10, shared_texts=640)  # 64 classes x 10 prompts, encoded once for all
    assert admission.depth == 650
    with pytest.raises(QueueFull, match="texts to encode"):
        admission.reserve(images=1, shared_texts=100)  # over the texts' 700 places
    held.release()
    with pytest.raises(TooLarge):
        admission.reserve(images=10, texts=11)  # a request's own texts (descriptions) count


@pytest.mark.parametrize(
    ("admission", "ask", "words"),
    [
        (Admission(1000, text_share=0.5), {"images": 1, "shared_texts": 640}, "texts to encode"),
        (Admission(1000, video_share=0.1), {"frames": 101}, "video frames"),
        (Admission(700), {"images": 100, "shared_texts": 640}, "items"),
    ],
)
def test_a_request_larger_than_what_its_kind_may_ever_hold_is_too_large(admission, ask, words):
    """On an empty queue, so never room: 413, not a 429 to retry forever."""
    refused = []
    admission.on_refused = refused.append
    with pytest.raises(TooLarge, match=words):
        admission.reserve(**ask)
    assert refused == ["too_large"] and admission.depth == 0


@pytest.mark.parametrize("overrides", [{"max_queue": 1024, "video_share": 1.0}, {"text_share": 0.3}])
def test_settings_whose_queue_cannot_hold_a_new_class_list_are_refused(overrides):
    """A new list of 64 classes with P-5 (640 texts) must fit the texts' share of the queue."""
    with pytest.raises(ValueError, match="FER_TEXT_SHARE"):
        ServiceSettings(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"max_queue": 1280},
        {"text_share": 0.32},
        {"max_queue": 704, "text_share": 1.0, "video_share": 0.1, "max_faces": 1, "max_request_items": 576},
    ],
)
def test_every_request_the_field_checks_accept_fits_an_empty_queue(overrides):
    settings = ServiceSettings(**overrides)
    runtime = Runtime(settings)
    largest_class_list = MAX_CLASSES * len(PROMPT_SETS["P-5"])
    video = Places(frames=settings.max_frames * settings.max_faces)  # a clip's faces, claimed once decoded
    try:
        for ask, most in (
            ({"images": settings.max_faces, "shared_texts": largest_class_list}, None),  # /predict
            ({"frames": settings.max_frames, "shared_texts": largest_class_list}, video),  # /predict-video
            ({"frames": settings.max_frames, "texts": settings.max_descriptions}, video),  # /retrieve
        ):
            with runtime.admission.reserve(**ask, most=most) as places:
                if most is not None:
                    places.settle(frames=most.frames)
    finally:
        run_bounded(runtime.close())
