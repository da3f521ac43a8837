"""The service's settings: the model's (FER_*, model.settings) plus batching, queue, limits and workers."""

from __future__ import annotations

from pydantic import Field, model_validator

from model.settings import ModelSettings


class ServiceSettings(ModelSettings):
    max_batch: int = Field(32, ge=1, le=4096, description="items (images or frames) per encoder call")
    max_wait_ms: float = Field(10.0, ge=0, le=1000, description="how long a batch waits for more items")
    max_queue: int = Field(2048, ge=1, description="items waiting or decoding before requests get 429")
    max_upload_mb: float = Field(50.0, gt=0, description="largest accepted upload, checked while streaming")
    workers: int = Field(1, ge=1, le=64, description="server processes, each with its own model and batcher")
    device_threads: int | None = Field(
        None, ge=1, description="torch threads of the encoder calls (default: the CPUs torch sees)"
    )
    decode_workers: int | None = Field(
        None, ge=1, description="threads that decode, detect faces and score (default: the CPUs torch sees)"
    )
    max_frames: int = Field(64, ge=1, le=512, description="largest `frames` a video request may ask for")
    max_descriptions: int = Field(512, ge=1, description="most descriptions one /retrieve may rank")
    max_description_chars: int = Field(1000, ge=1, description="longest description, in characters")

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
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
