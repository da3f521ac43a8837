"""Service settings: the model selection (FER_*) plus batching, limits and worker sizes."""

from __future__ import annotations

import os

from pydantic import Field, model_validator

from model.config import ModelSettings
from model.media import MediaLimits


class ServiceSettings(ModelSettings):
    max_batch: int = Field(32, ge=1, le=4096, description="items (images or frames) per encoder call")
    max_wait_ms: float = Field(10.0, ge=0, le=1000, description="how long a batch waits for more items")
    max_queue: int = Field(2048, ge=1, description="items waiting before requests get 429")
    max_upload_mb: float = Field(50.0, gt=0, description="largest accepted upload, checked while streaming")
    decode_workers: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1)
    workers: int = Field(1, ge=1, le=64, description="server processes, each with its own model and batcher")
    max_frames: int = Field(64, ge=1, le=512, description="largest `frames` a video request may ask for")
    max_descriptions: int = Field(512, ge=1)
    max_description_chars: int = Field(1000, ge=1)
    max_faces: int = Field(10, ge=1)
    face_margin: float = Field(0.25, ge=0, le=1)
    max_image_pixels: int = Field(MediaLimits.max_image_pixels, ge=1)
    max_video_pixels: int = Field(MediaLimits.max_video_pixels, ge=1)
    max_video_seconds: float = Field(MediaLimits.max_video_seconds, gt=0)
    max_video_frames: int = Field(MediaLimits.max_video_frames, ge=1)

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> ServiceSettings:
        # A video request enqueues one item per sampled frame (its largest face), an image one per face.
        largest = max(self.max_batch, self.max_frames, self.max_faces)
        if self.max_queue < largest:
            raise ValueError(
                "FER_MAX_QUEUE must hold at least one batch and the largest request: "
                f"max(FER_MAX_BATCH, FER_MAX_FRAMES, FER_MAX_FACES) = {largest}"
            )
        return self

    @property
    def media_limits(self) -> MediaLimits:
        return MediaLimits(
            self.max_image_pixels, self.max_video_pixels, self.max_video_seconds, self.max_video_frames
        )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
