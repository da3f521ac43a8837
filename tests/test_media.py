"""Decoding, frame sampling and the limits that protect memory."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from model.media import (
    MAX_FRAME_SIDE,
    MediaError,
    MediaLimits,
    MediaTooLarge,
    decode_image,
    read_video,
    sample_frame_indices,
)
from tests.conftest import make_video, read_index


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
    import struct
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
