"""Admission: a request takes its places in the inference queue, counted in items (images, video
frames, texts to encode), BEFORE any work is done for it, and keeps them until it has its answer.
When there is no room it is refused at once (429) with a Retry-After estimated from the measured cost
of what is admitted. The places a request asks for are an upper bound (an image may hold up to
`max_faces` faces; the frames asked for), shrunk once decoding has counted the real items.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

IMAGE, TEXT = "image", "text"
DEFAULT_ITEM_S = {IMAGE: 0.05, TEXT: 0.05}  # until the first measurements arrive
SMOOTHING = 0.2


class QueueFull(Exception):
    """No room for the request's items now; `retry_after_s` is when there should be."""

    def __init__(self, retry_after_s: int, detail: str = "the inference queue is full, retry later"):
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class TooLarge(Exception):
    """A request that asks for more items than any one request may hold (the message says the limit)."""


@dataclass
class Places:
    images: int = 0
    texts: int = 0

    @property
    def total(self) -> int:
        return self.images + self.texts


class Admission:
    def __init__(
        self,
        capacity: int,
        *,
        request_share: int | None = None,
        on_depth: Callable[[int], None] = lambda depth: None,
    ):
        """`capacity`: items admitted at once. `request_share`: the most one request may hold (its
        share of the queue), so that one client cannot fill it alone; default the whole capacity."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.request_share = min(request_share or capacity, capacity)
        self.on_depth = on_depth
        self._held = Places()
        self._item_s = dict(DEFAULT_ITEM_S)

    @property
    def depth(self) -> int:
        return self._held.total

    def reserve(self, images: int = 0, texts: int = 0) -> Reservation:
        """Places for a request, or QueueFull (no room now) / TooLarge (never room)."""
        asked = Places(images, texts)
        if asked.total > self.request_share:
            raise TooLarge(
                f"the request needs {asked.total} items (images, frames and texts to encode); "
                f"one request may hold at most {self.request_share}"
            )
        if self._held.total + asked.total > self.capacity:
            raise QueueFull(self.retry_after())
        self._change(asked, +1)
        return Reservation(self, asked)

    def observe(self, kind: str, items: int, seconds: float) -> None:
        """A measured cost (an encoder call over `items` images, or a text encoding): what Retry-After
        estimates from."""
        if items > 0:
            self._item_s[kind] += SMOOTHING * (seconds / items - self._item_s[kind])

    def wait_s(self) -> float:
        """Seconds until what is admitted now has run, at the measured pace."""
        return self._held.images * self._item_s[IMAGE] + self._held.texts * self._item_s[TEXT]

    def retry_after(self) -> int:
        return max(1, math.ceil(self.wait_s()))

    def _change(self, places: Places, sign: int) -> None:
        self._held.images += sign * places.images
        self._held.texts += sign * places.texts
        self.on_depth(self._held.total)


class Reservation:
    """A request's places; `shrink` once the real counts are known, `release` when done (idempotent;
    also as a context manager)."""

    def __init__(self, admission: Admission, places: Places):
        self._admission = admission
        self._places = places

    def shrink(self, images: int | None = None, texts: int | None = None) -> None:
        new = Places(
            self._places.images if images is None else min(images, self._places.images),
            self._places.texts if texts is None else min(texts, self._places.texts),
        )
        self._admission._change(Places(self._places.images - new.images, self._places.texts - new.texts), -1)
        self._places = new

    def release(self) -> None:
        self._admission._change(self._places, -1)
        self._places = Places()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
