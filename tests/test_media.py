"""Decoding, frame sampling and the limits that protect memory."""

from __future__ import annotations

import io
import struct
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageFile

from model.media import (
    MAX_FRAME_SIDE,
    DecodeBudget,
    DecodeStopped,
    MediaError,
    MediaLimits,
    MediaTooLarge,
    decode_image,
    plan_decoding,
    read_video,
    sample_frame_indices,
)
from model.synthetic_media import size_changing_clip
from tests.support import make_video, read_index


def test_sampling_rule_on_reference_lengths():
    def rule(n):
        tick = n / 16
        return [int(tick / 2 + tick * i) for i in range(16)]

    assert sample_frame_indices(1) == [0] * 16
    assert sample_frame_indices(16) == list(range(16))
    assert sample_frame_indices(17) == rule(17) == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16]
    assert sample_frame_indices(1000)[:3] == [31, 93, 156] and sample_frame_indices(1000)[-1] == 968
    assert sample_frame_indices(1000) == rule(1000)
    short = sample_frame_indices(15)
    assert short == rule(15) and sorted(set(short)) == list(range(15))  # every frame used, one twice
    assert sample_frame_indices(8) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert sample_frame_indices(100, count=4) == [12, 37, 62, 87]


@pytest.mark.parametrize(
    ("suffix", "codec"),
    [(".mp4", "libx264"), (".webm", "libvpx-vp9"), (".avi", "mpeg4"), (".mov", "libx264"), (".gif", "gif")],
)
def test_formats_decode_to_the_sampled_frames(tmp_path, suffix, codec):
    path = make_video(tmp_path / f"clip{suffix}", 40, codec=codec)
    clip = read_video(str(path), 16)
    assert clip.n_frames == 40 and len(clip.frames) == 16
    assert [read_index(f) for f in clip.frames] == sample_frame_indices(40)


def test_long_video_is_sampled_without_decoding_it_all(tmp_path):
    path = make_video(tmp_path / "long.mp4", 3000, fps=25, gop=25)
    clip = read_video(str(path), 16)
    assert clip.n_frames == 3000
    assert [read_index(f) for f in clip.frames] == sample_frame_indices(3000)
    assert clip.decoded < 3000 / 4, f"decoded {clip.decoded} of 3000 frames"
    assert clip.timestamps[0] == pytest.approx(sample_frame_indices(3000)[0] / 25, abs=0.05)


def test_a_clip_with_one_key_frame_is_decoded_forward_once(tmp_path):
    """Every seek would land on the single key frame: the plan decodes forward instead, so no frame is
    decoded twice (the old seeking decoded about count x n / 2 frames)."""
    path = make_video(tmp_path / "one-key.mp4", 1200, fps=25, gop=100_000)
    clip = read_video(str(path), 16)
    assert [read_index(f) for f in clip.frames] == sample_frame_indices(1200)
    assert clip.decoded <= sample_frame_indices(1200)[-1] + 1


def test_the_decode_plan_never_goes_back():
    assert plan_decoding([10, 300, 900], [0, 250, 500, 750]) == [(0, 10), (250, 300), (750, 900)]
    assert plan_decoding([10, 300, 900], [0]) == [(0, 900)]  # one key frame: forward once
    assert plan_decoding([10, 40, 900], [0, 25, 50]) == [(0, 40), (50, 900)]  # 40 is near: no seek


def test_a_decode_bomb_is_refused_before_decoding(tmp_path):
    """An animated GIF whose small frames sit on a large canvas: every decoded frame is the whole canvas."""
    canvas = Image.new("P", (600, 600))
    frames = [canvas] + [Image.new("P", (600, 600), color=i % 2) for i in range(1, 60)]
    path = tmp_path / "bomb.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=20)
    budget = MediaLimits(max_decode_megapixels=10)  # 60 frames of 0.36 MP = 21.6 MP to reach the last sample
    with pytest.raises(MediaTooLarge, match=r"needs decoding .* megapixels, over the limit of 10"):
        read_video(str(path), 16, budget)
    with pytest.raises(MediaTooLarge, match=r"needs decoding .* frames, over the limit of 20"):
        read_video(str(path), 16, MediaLimits(max_decode_frames=20))
    assert len(read_video(str(path), 16).frames) == 16  # within the default budget


def test_decoding_stops_when_told(tmp_path):
    path = make_video(tmp_path / "c.mp4", 200)
    stop = threading.Event()
    stop.set()
    charged = []
    original = DecodeBudget.charge

    def counting(self, pixels):
        charged.append(pixels)
        original(self, pixels)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DecodeBudget, "charge", counting)
        with pytest.raises(DecodeStopped):
            read_video(str(path), 16, stop=stop)
    assert len(charged) == 1  # the first decoded frame sees the stop


def test_video_from_bytes_and_limits(tmp_path):
    data = make_video(tmp_path / "c.mp4", 30).read_bytes()
    assert len(read_video(data, 4).frames) == 4
    with pytest.raises(MediaError, match="over the limit"):
        read_video(data, 4, MediaLimits(max_video_pixels=32 * 32))
    with pytest.raises(MediaError, match="frames, over the limit"):
        read_video(data, 4, MediaLimits(max_video_frames=10))
    with pytest.raises(MediaError, match="s, over the limit"):
        read_video(data, 4, MediaLimits(max_video_seconds=0.5))


@pytest.mark.parametrize("payload", [b"", b"hello world", b"\x00" * 1000])
def test_non_media_is_a_media_error(payload):
    with pytest.raises(MediaError):
        decode_image(payload)
    with pytest.raises(MediaError):
        read_video(payload)


def test_truncated_files_are_media_errors(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200), "red").save(buffer, "PNG")
    with pytest.raises(MediaError):
        decode_image(buffer.getvalue()[:300])
    video = make_video(tmp_path / "c.mp4", 30).read_bytes()
    with pytest.raises(MediaError):
        read_video(video[: len(video) // 20])


def test_image_bomb_is_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, "PNG")  # compresses to a few kB
    with pytest.raises(MediaError, match="64,000,000 pixels"):
        decode_image(buffer.getvalue())


def test_a_header_past_pillows_own_bomb_guard_is_media_too_large():
    """A 20000x20000 PNG header (400M pixels) makes Pillow raise in Image.open itself."""
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 20_000, 20_000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    with pytest.raises(MediaTooLarge):
        decode_image(bytes(data))


def test_large_frames_are_scaled_down_when_sampled(tmp_path):
    path = make_video(tmp_path / "big.mp4", 8, size=1280)
    clip = read_video(str(path), 4)
    assert max(clip.frames[0].size) == MAX_FRAME_SIDE
    assert [read_index(f) for f in clip.frames] == sample_frame_indices(8, 4)


def test_grey_and_exif_rotated_images_become_upright_rgb():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("L", (40, 20), 128).save(buffer, "JPEG", exif=exif)
    image = decode_image(buffer.getvalue())
    assert image.mode == "RGB" and image.size == (20, 40)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_a_thin_strip_is_refused_as_an_image_and_as_video_frames(tmp_path):
    assert decode_image(_encoded(Image.new("RGB", (400, 4)), "PNG")).size == (400, 4)  # 100:1 still serves
    for size in ((401, 4), (2, 3000), (400000, 1)):
        with pytest.raises(MediaError, match="over 100 times the other"):
            decode_image(_encoded(Image.new("L", size), "PNG"))
    path = tmp_path / "strip.mkv"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 2000, 2, "yuv420p"
        for _ in range(3):
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.zeros((2, 2000, 3), np.uint8), "rgb24"))
            )
        container.mux(stream.encode())
    with pytest.raises(MediaError, match="a video frame is 2000x2"):
        read_video(path.read_bytes(), 2)


@pytest.mark.parametrize(
    "error",
    [
        SyntaxError("APNG contains frame sequence errors"),
        struct.error("unpack"),
        NotImplementedError,
        EOFError,
    ],
)
def test_any_reader_failure_on_a_malformed_image_is_a_media_error(monkeypatch, error):
    """Pillow's readers fail in many ways on malformed files (these were seen from fuzzed uploads)."""
    data = _encoded(Image.new("RGB", (32, 32)), "PNG")

    def failing_load(self):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", failing_load)
    with pytest.raises(MediaError, match="truncated or corrupt"):
        decode_image(data)


def test_only_common_photo_formats_are_read():
    dds = (
        b"DDS " + (124).to_bytes(4, "little") + bytes(120)
    )  # a DDS header (Pillow raised NotImplementedError)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # Pillow would run Ghostscript on it
    for data in (dds, eps):
        with pytest.raises(MediaError, match="not a decodable image"):
            decode_image(data)


def test_a_video_codec_ffmpeg_cannot_decode_is_a_media_error(tmp_path):
    clip = bytearray(make_video(tmp_path / "c.mkv", 5, codec="mpeg4").read_bytes())
    at = clip.find(b"V_MPEG4/ISO/ASP")
    clip[at : at + 15] = b"V_MPEX4/ISO/ASP"  # a codec id no decoder knows
    with pytest.raises(MediaError, match="codec"):
        read_video(bytes(clip))


def test_an_uploaded_concat_list_cannot_read_local_files(tmp_path, monkeypatch):
    make_video(tmp_path / "secret.mp4", 10)
    monkeypatch.chdir(tmp_path)  # where a relative name in the list resolves
    listing = b"ffconcat version 1.0\nfile 'secret.mp4'\n"
    with pytest.raises(MediaError):
        read_video(listing)
    assert read_video(Path("secret.mp4"), 4).n_frames == 10  # a local path is still read from disk


def test_a_file_naming_network_resources_is_not_followed():
    """An SDP file makes FFmpeg bind the UDP ports it names and wait ~20 s on them."""
    sdp = b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 7100 RTP/AVP 96\n"
    started = time.monotonic()
    with pytest.raises(MediaError):
        read_video(sdp + b"a=rtpmap:96 H264/90000\n")
    assert time.monotonic() - started < 5  # refused at once, not after FFmpeg's 10 s network timeouts


def charged_pixels(monkeypatch) -> list[int]:
    """What the decode budget is charged, frame by frame."""
    charged = []
    original = DecodeBudget.charge
    monkeypatch.setattr(DecodeBudget, "charge", lambda self, px: charged.append(px) or original(self, px))
    return charged


def test_frames_larger_than_the_stream_declares_are_charged_at_their_size(monkeypatch):
    charged = charged_pixels(monkeypatch)
    clip = size_changing_clip([(64, 64)] + [(120, 120)] * 10)  # each within the frame limit below
    limits = MediaLimits(max_video_pixels=128 * 128, max_decode_megapixels=0.05)
    with pytest.raises(MediaTooLarge, match="FER_MAX_DECODE_MEGAPIXELS"):
        read_video(clip, 16, limits)
    assert charged[:2] == [64 * 64, 120 * 120]


def test_a_frame_over_the_pixel_limit_is_refused_whatever_the_stream_declares():
    clip = size_changing_clip([(64, 64)] + [(160, 160)] * 10)
    with pytest.raises(MediaTooLarge, match="160x160, over the limit of 16,384 pixels"):
        read_video(clip, 16, MediaLimits(max_video_pixels=128 * 128))


def test_the_decoder_refuses_to_make_a_frame_far_over_the_limit(monkeypatch):
    """FFmpeg's own `max_pixels`: the huge frame is never allocated, so it never reaches the budget."""
    charged = charged_pixels(monkeypatch)
    clip = size_changing_clip([(64, 64)] + [(1024, 1024)] * 3)
    with pytest.raises(MediaTooLarge, match="16,384 pixels"):
        read_video(clip, 16, MediaLimits(max_video_pixels=128 * 128))
    assert charged == [64 * 64]
