"""The sample inputs the README's quick start uses (samples/): `python -m tools.samples` makes the photo
and the clip again from scikit-image's astronaut photo (Eileen Collins, NASA: public domain), which the
development extra installs. The text files beside them are written by hand."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CLIP_FRAMES = 30
CLIP_FPS = 10
CLIP_SIDE = 256
# The photo's whole square, then a square around the face (near x 177, y 67, side 93 of 512).
WIDE = (0.0, 0.0, 512.0)
CLOSE = (110.0, 10.0, 230.0)


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def zoom_frames(photo: Image.Image, count: int, side: int) -> list[Image.Image]:
    """A slow zoom from the whole photo to the face and back: a clip whose frames differ, with a face
    the detector finds in each."""
    frames = []
    for i in range(count):
        t = 1 - abs(2 * i / (count - 1) - 1)  # 0 -> 1 -> 0
        x, y, size = (a + (b - a) * t for a, b in zip(WIDE, CLOSE, strict=True))
        frames.append(photo.resize((side, side), Image.BICUBIC, box=(x, y, x + size, y + size)))
    return frames


def write_clip(frames: list[Image.Image], path: Path, fps: int) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "28", "preset": "veryslow"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main() -> None:
    photo = astronaut()
    photo.save(SAMPLES / "face.jpg", quality=85)
    write_clip(zoom_frames(photo, CLIP_FRAMES, CLIP_SIDE), SAMPLES / "clip.mp4", CLIP_FPS)
    for name in ("face.jpg", "clip.mp4"):
        print(f"samples/{name}: {(SAMPLES / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
