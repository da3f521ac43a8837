"""The options that travel together through the pipeline (model.pipeline), apart from it so that
settings can be read before torch is imported."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from model.media import MediaLimits


@dataclass(frozen=True)
class PipelineOptions:
    """What travels together through the stages; built once from settings, then per request or command
    with its own choices (`replace`)."""

    detect_faces: bool = True
    max_faces: int = 10
    face_margin: float = 0.25
    align_faces: bool = True
    frames: int = 16
    video_face_side: int = 960  # a video frame's long side for face detection (see model.pipeline)
    limits: MediaLimits = field(default_factory=MediaLimits)

    def replace(self, **changes) -> PipelineOptions:
        """A copy with the given fields changed; None leaves a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
