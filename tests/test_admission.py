"""Admission: places counted in items, taken before any work, refused at once with a Retry-After
estimated from the measured cost of what is admitted."""

from __future__ import annotations

import math

import pytest

from service.admission import IMAGE, TEXT, Admission, QueueFull, TooLarge


def test_places_are_taken_shrunk_and_given_back():
    depths = []
    admission = Admission(10, on_depth=depths.append)
    with admission.reserve(images=6, texts=2) as places:
        assert admission.depth == 8
        places.shrink(images=1)  # decoding found one face where up to six were possible
        assert admission.depth == 3
        places.shrink(images=5)  # never grows back
        assert admission.depth == 3
    assert admission.depth == 0 and depths[-1] == 0
    places.release()  # twice is harmless
    assert admission.depth == 0


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
