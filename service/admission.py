"""Admission: a request takes its places in the inference queue, counted in items (images, video frames,
texts to encode), BEFORE any work is done for it, and keeps them until it has its answer.

When there is no room it is refused at once (429) with a Retry-After estimated from the measured cost of
what is admitted. Room is shared fairly: one request may hold at most `request_share` items, and video
frames and texts may each hold only their share of the queue, so a flood of either cannot take the
places that plain images need. The places a request asks for are an upper bound (an image may hold up
to `max_faces` faces; a video as many in each frame asked for), shrunk once decoding has counted the real
items.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

IMAGE, TEXT = "image", "text"
DEFAULT_ITEM_S = {IMAGE: 0.05, TEXT: 0.05}  # until the first measurements arrive
SMOOTHING = 0.2
FULL = {
    "queue": "the inference queue is full",
    "video": "video frames have filled their share of the inference queue",
    "text": "texts to encode have filled their share of the inference queue",
}
# What each part of the queue counts, and the settings that size it: a request asking for more than the
# whole part can never be admitted (413), not even on an empty queue.
PARTS = {
    "queue": ("items (faces or images, video frames' faces, and texts to encode)", "FER_MAX_QUEUE"),
    "video": (
        "rows of video frames (each frame's faces, up to FER_MAX_FACES)",
        "FER_MAX_QUEUE x FER_VIDEO_SHARE",
    ),
    "text": ("texts to encode", "FER_MAX_QUEUE x FER_TEXT_SHARE"),
}


class QueueFull(Exception):
    """No room for the request's items now; `retry_after_s` is when there should be."""

    def __init__(self, retry_after_s: int, detail: str = "the inference queue is full, retry later"):
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class TooLarge(Exception):
    """A request that asks for more items than any one request may hold (the message says the limit)."""


@dataclass
class Places:
    images: int = 0  # still images' rows (faces or whole images)
    frames: int = 0  # video frames' rows (each sampled frame's faces, or the frame)
    texts: int = 0  # texts to encode

    @property
    def total(self) -> int:
        return self.images + self.frames + self.texts

    def __add__(self, other: Places) -> Places:
        return Places(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Places) -> Places:
        return Places(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


class Admission:
    def __init__(
        self,
        capacity: int,
        *,
        request_share: int | None = None,
        video_share: float = 1.0,
        text_share: float = 1.0,
        on_depth: Callable[[int], None] = lambda depth: None,
        on_refused: Callable[[str], None] = lambda reason: None,
    ):
        """`capacity`: items admitted at once. `request_share`: the most one request may hold (default
        the whole capacity). `video_share`, `text_share`: the fraction of the capacity that video frames
        and texts may hold together."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.request_share = min(request_share or capacity, capacity)
        self.video_capacity = max(1, int(capacity * video_share))
        self.text_capacity = max(1, int(capacity * text_share))
        self.on_depth, self.on_refused = on_depth, on_refused
        self._held = Places()
        self._item_s = dict(DEFAULT_ITEM_S)

    @property
    def depth(self) -> int:
        return self._held.total

    def reserve(self, images: int = 0, frames: int = 0, texts: int = 0, shared_texts: int = 0) -> Reservation:
        """Places for a request, or QueueFull (no room now) / TooLarge (never room: over the request's share,
        or over a part's whole capacity). `shared_texts`: texts whose features every later request shares
        (a new class list's prompts): they take room in the queue but not from the request's own share."""
        if images + frames + texts > self.request_share:
            self.on_refused("too_large")
            raise TooLarge(
                f"the request needs {images + frames + texts} items (faces or images, video frames' faces "
                f"(up to FER_MAX_FACES a frame), and texts to encode); one request may hold at most "
                f"{self.request_share} (FER_MAX_REQUEST_ITEMS)"
            )
        asked = Places(images, frames, texts + shared_texts)
        after = self._held + asked
        parts = (
            ("queue", asked.total, after.total, self.capacity),
            ("video", asked.frames, after.frames, self.video_capacity),
            ("text", asked.texts, after.texts, self.text_capacity),
        )
        for kind, need, _, room in parts:
            if need > room:
                self.on_refused("too_large")
                what, setting = PARTS[kind]
                raise TooLarge(
                    f"the request needs {need} {what}; at most {room} fit in the inference queue ({setting})"
                )
        for kind, _, held, room in parts:
            if held > room:
                self.on_refused(f"{kind}_full")
                raise QueueFull(self.retry_after(), f"{FULL[kind]}, retry later")
        self._change(asked, +1)
        return Reservation(self, asked)

    def observe(self, kind: str, items: int, seconds: float) -> None:
        """A measured cost (an encoder call over `items` images, or a text encoding): what Retry-After
        estimates from."""
        if items > 0:
            self._item_s[kind] += SMOOTHING * (seconds / items - self._item_s[kind])

    def wait_s(self) -> float:
        """Seconds until what is admitted now has run, at the measured pace."""
        held = self._held
        return (held.images + held.frames) * self._item_s[IMAGE] + held.texts * self._item_s[TEXT]

    def retry_after(self) -> int:
        return max(1, math.ceil(self.wait_s()))

    def _change(self, places: Places, sign: int) -> None:
        self._held = self._held + places if sign > 0 else self._held - places
        self.on_depth(self._held.total)


class Reservation:
    """A request's places; `shrink` once the real counts are known, `release` when done (idempotent;
    also as a context manager)."""

    def __init__(self, admission: Admission, places: Places):
        self._admission = admission
        self._places = places

    def shrink(self, images: int | None = None, frames: int | None = None) -> None:
        held = self._places
        new = Places(
            held.images if images is None else min(images, held.images),
            held.frames if frames is None else min(frames, held.frames),
            held.texts,
        )
        self._admission._change(held - new, -1)
        self._places = new

    def release(self) -> None:
        self._admission._change(self._places, -1)
        self._places = Places()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
