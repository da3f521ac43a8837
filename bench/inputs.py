"""Benchmark inputs: a photo-sized JPEG with a real face, H.264 clips of any length, an animated GIF of
the face, a clip of three people (model.faces.synthetic's, as the tests make theirs; the clip whose
frames change size is model.synthetic_media's, shared with the tests).

A random-weight model does not care what a face looks like (the face detector does), and the cost depends on
sizes: a textured 640x480 JPEG costs what a phone photo costs to upload and decode, and clips with a
2 s GOP seek like camera footage. Clips are cached on disk because a 10-minute 1080p encode takes
tens of seconds even with x264's ultrafast preset and low-detail frames.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

CLIP_FPS = 25
GOP_SECONDS = 2.0
CLIP_FORMAT_VERSION = 2  # bump when the drawing or the encoding changes, so cached clips are remade


def face_drawing(
    width: int, height: int, offset: int = 0, texture: bool = True, seed: int = 0
) -> Image.Image:
    """A real face (scikit-image's astronaut photo) on a shaded background, so face detection, landmarks
    and alignment do their real work. `offset` moves the face sideways (a clip's motion); `texture` adds
    sensor-like noise so a JPEG has a photo's size rather than a flat picture's."""
    from skimage import data

    rng = np.random.default_rng(seed)
    ramp = np.linspace(60, 170, width, dtype=np.float32)
    background = np.stack([ramp, ramp * 0.9 + 10, 200 - ramp * 0.5], axis=-1)
    pixels = np.broadcast_to(background, (height, width, 3)).copy()
    if texture:
        pixels += rng.normal(0, 12, pixels.shape).astype(np.float32)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    side = int(height * 0.7)
    face = Image.fromarray(data.astronaut()).resize((side, side))
    image.paste(face, ((width - side) // 2 + offset, (height - side) // 2))
    return image


def face_jpeg(width: int = 640, height: int = 480, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    face_drawing(width, height).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def face_gif(width: int = 400, height: int = 300, frames: int = 64, distinct: int = 16) -> bytes:
    """An animated GIF of the face moving side to side: `distinct` textured drawings in turn, each frame
    whole (not optimised into a changed rectangle) on the web palette, so its size is a camera GIF's
    (~2.8 MB at the defaults) and no palette search is paid for each frame."""
    cycle = [
        face_drawing(
            width, height, offset=int(width * 0.1 * np.sin(2 * np.pi * i / distinct)), seed=i
        ).convert("P", palette=Image.Palette.WEB, dither=Image.Dither.NONE)
        for i in range(distinct)
    ]
    images = [cycle[i % distinct] for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(
        buffer, "GIF", save_all=True, append_images=images[1:], duration=40, loop=0, optimize=False
    )
    return buffer.getvalue()


def clip_size(height: int) -> tuple[int, int]:
    """16:9 frame size for a height (720 -> 1280x720), width rounded to even for yuv420p."""
    return (height * 16 // 9) // 2 * 2, height


def make_clip(
    path: Path, seconds: float, height: int, fps: int = CLIP_FPS, preset: str = "ultrafast"
) -> Path:
    """An H.264 mp4 of a face moving side to side, one key frame every GOP_SECONDS (no scene cuts)."""
    width, height = clip_size(height)
    n_frames = round(seconds * fps)
    gop = round(GOP_SECONDS * fps)
    # One second of distinct frames, converted to yuv420p once and reused: encoding, not drawing, is the cost.
    cycle = [
        av.VideoFrame.from_image(
            face_drawing(width, height, offset=int(width * 0.1 * np.sin(2 * np.pi * i / fps)), texture=False)
        ).reformat(format="yuv420p")
        for i in range(fps)
    ]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": preset, "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for i in tqdm(range(n_frames), desc=f"encoding {path.name}", unit="frame", disable=n_frames < 2000):
            frame = cycle[i % fps]
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def cached_clip(cache_dir: Path, seconds: float, height: int, preset: str = "ultrafast") -> Path:
    """`make_clip` once per (length, height, preset); later runs reuse the file."""
    name = f"face-{seconds:g}s-{height}p-{CLIP_FPS}fps-{preset}-v{CLIP_FORMAT_VERSION}.mp4"
    return _cached(
        cache_dir / name,
        lambda path: make_clip(path, seconds, height, preset=preset),
        f"a {seconds:g} s {height}p clip",
    )


def cached_people_clip(cache_dir: Path, size: tuple[int, int], n_frames: int) -> Path:
    """`three_people_clip` (the astronaut's face as three people, the smallest 60 px wide at 1920)
    once per (size, frames); later runs reuse the file."""
    from model.faces.synthetic import astronaut_face, three_people_clip

    name = f"people-3-{size[0]}x{size[1]}-{n_frames}f-v{CLIP_FORMAT_VERSION}.mp4"
    return _cached(
        cache_dir / name,
        lambda path: three_people_clip(path, astronaut_face(), size=size, n_frames=n_frames),
        f"a {size[1]}p clip of three people",
    )


def _cached(path: Path, make: Callable[[Path], object], what: str) -> Path:
    """`make(path)` unless `path` exists, written under another name first: a run stopped midway
    leaves no half clip for the next run to reuse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        log.info("encoding %s into %s (cached for later runs)", what, path)
        partial = path.with_suffix(f".{os.getpid()}.partial.mp4")
        make(partial)
        partial.replace(path)
    return path
