"""Admission: a request takes its places in the inference queue, counted in items (images, video frames,
texts to encode), BEFORE any work is done for it, and keeps them until it has its answer.

When there is no room it is refused at once (429) with a Retry-After estimated from the measured cost of
what is admitted. Room is shared fairly: one request may hold at most `request_share` items, and video
frames and texts may each hold only their share of the queue, so a flood of either cannot take the
places that plain images need.

A request's rows are settled once decoding has counted them. An image takes the most it may give (up to
`max_faces` faces) and gives back what it did not find. A clip takes one place a frame, and its frames'
further faces are claimed once found, refused then as at admission when there is no room: taking every
face its frames may give would let one long clip hold the whole video share. The most a request may
give is still checked on arrival, so a request that could never fit is refused before any work.
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

    def reserve(
        self,
        images: int = 0,
        frames: int = 0,
        texts: int = 0,
        shared_texts: int = 0,
        *,
        most: Places | None = None,
    ) -> Reservation:
        """Places for a request, or QueueFull (no room now) / TooLarge (never room: over the request's share,
        or over a part's whole capacity). `shared_texts`: texts whose features every later request shares
        (a new class list's prompts): they take room in the queue but not from the request's own share.
        `most`: the most rows (images, frames) its input may give, where more than it takes now; they
        must fit at all, and are claimed by `Reservation.settle` once counted."""
        asked = Places(images, frames, texts + shared_texts)
        bound = (
            asked if most is None else Places(max(images, most.images), max(frames, most.frames), asked.texts)
        )
        self._check_size(bound, own=bound.total - shared_texts)
        if full := self._full(asked):
            raise self._refuse(full)
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

    def _check_size(self, bound: Places, own: int) -> None:
        """TooLarge when `bound` could never be held, however empty the queue."""
        if own > self.request_share:
            self.on_refused("too_large")
            raise TooLarge(
                f"the request may need up to {own} {PARTS['queue'][0]}, a clip's faces counted at "
                f"FER_MAX_FACES a frame; one request may hold at most {self.request_share} "
                f"(FER_MAX_REQUEST_ITEMS)"
            )
        for kind, need, room in self._parts(bound):
            if need > room:
                self.on_refused("too_large")
                what, setting = PARTS[kind]
                raise TooLarge(
                    f"the request needs {need} {what}; at most {room} fit in the inference queue ({setting})"
                )

    def _full(self, asked: Places) -> str | None:
        """The part of the queue that has no room for `asked` now, if any."""
        return next((kind for kind, held, room in self._parts(self._held + asked) if held > room), None)

    def _parts(self, places: Places) -> list[tuple[str, int, int]]:
        """What `places` hold of each part of the queue, and the part's capacity."""
        return [
            ("queue", places.total, self.capacity),
            ("video", places.frames, self.video_capacity),
            ("text", places.texts, self.text_capacity),
        ]

    def _refuse(self, kind: str) -> QueueFull:
        self.on_refused(f"{kind}_full")
        return QueueFull(self.retry_after(), f"{FULL[kind]}, retry later")

    def _change(self, places: Places, sign: int) -> None:
        self._held = self._held + places if sign > 0 else self._held - places
        self.on_depth(self._held.total)


class Reservation:
    """A request's places; `settle` once decoding has counted its rows, `release` when done (idempotent;
    also as a context manager)."""

    def __init__(self, admission: Admission, places: Places):
        self._admission = admission
        self._places = places

    def settle(self, images: int | None = None, frames: int | None = None) -> None:
        """Hold the rows decoding counted (None: as held): those not given go back; those beyond what is
        held are claimed now, or, with no room for them, every place of the request is given back and it
        is refused as at admission (QueueFull, the wait being for what the others hold)."""
        admission, held = self._admission, self._places
        given = Places(
            held.images if images is None else images, held.frames if frames is None else frames, held.texts
        )
        more = Places(max(0, given.images - held.images), max(0, given.frames - held.frames))
        if more.total and (full := admission._full(more)):
            self.release()  # a retry asks for them again
            raise admission._refuse(full)
        admission._change(given - held, +1)  # the rows not given go back and the further ones come, at once
        self._places = given

    def release(self) -> None:
        self._admission._change(self._places, -1)
        self._places = Places()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
