"""Clips crafted against the decoder's limits: how tests/test_media.py checks them and bench.abuse attacks
them (the tests do not import the benchmark, so what both need lives here). Nothing in the service uses
it."""

from __future__ import annotations

import io
from fractions import Fraction

import av
from PIL import Image


def size_changing_clip(sizes: list[tuple[int, int]]) -> bytes:
    """An MJPEG-in-MKV clip whose stream declares the first frame's size while each frame is a JPEG of
    its own size (what concatenated JPEGs or a new H.264 SPS also give). A frame is one flat colour, so a
    huge one is a small file; frames of one size share their JPEG."""
    jpegs: dict[tuple[int, int], bytes] = {}
    out = io.BytesIO()
    with av.open(out, "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height = sizes[0]
        stream.pix_fmt, stream.time_base = "yuvj420p", Fraction(1, 25)
        for index, size in enumerate(sizes):
            if size not in jpegs:
                jpeg = io.BytesIO()
                Image.new("RGB", size, (len(jpegs) * 40 % 256, 90, 160)).save(jpeg, "JPEG")
                jpegs[size] = jpeg.getvalue()
            packet = av.Packet(jpegs[size])
            packet.stream, packet.pts, packet.dts = stream, index, index
            packet.time_base, packet.is_keyframe = stream.time_base, True
            container.mux(packet)
    return out.getvalue()
