"""The service's settings: the model's (FER_*, model.settings) plus batching, admission, connection limits,
workers and access."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from model.prompts import MAX_CLASSES, most_prompt_texts
from model.settings import ModelSettings


class ServiceSettings(ModelSettings):
    # ---- batching and admission
    max_batch: int = Field(32, ge=1, le=4096, description="items (images or frames) per encoder call")
    max_wait_ms: float = Field(10.0, ge=0, le=1000, description="how long a batch waits for more items")
    max_queue: int = Field(
        2048,
        ge=1,
        description="items (faces or images, video frames' faces or frames, texts) admitted at once; beyond, "
        "requests get 429",
    )
    max_request_items: int = Field(
        1152, ge=1, description="most items one request may hold (its share of the queue)"
    )
    video_share: float = Field(
        0.5, gt=0, le=1, description="share of the queue that video requests may hold together"
    )
    text_share: float = Field(
        0.5, gt=0, le=1, description="share of the queue that texts to encode may hold together"
    )
    # ---- request limits
    max_upload_mb: float = Field(50.0, gt=0, description="largest upload, checked while it streams in")
    max_frames: int = Field(64, ge=1, le=512, description="largest `frames` a video request may ask for")
    max_descriptions: int = Field(512, ge=1, description="most descriptions one /retrieve may rank")
    max_description_chars: int = Field(1000, ge=1, description="longest description, in characters")
    # ---- threads and processes
    workers: int = Field(1, ge=1, le=64, description="server processes, each with its own model and batcher")
    device_threads: int | None = Field(
        None, ge=1, description="torch threads of the encoder calls (default: the CPUs torch sees)"
    )
    decode_workers: int | None = Field(
        None,
        ge=1,
        description="threads that decode images, detect faces (a video's frames' too) and score "
        "(default: the CPUs torch sees)",
    )
    video_decode_workers: int | None = Field(
        None,
        ge=1,
        description="threads that decode videos, apart from images', and hand their frames to the decode "
        "workers (default: half the CPUs)",
    )
    # ---- connections (enforced by `fer serve`; behind another server, set them there)
    keep_alive_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection whose request headers are not complete by then is closed"
    )
    body_timeout_s: float = Field(
        120.0,
        gt=0,
        description="an upload not received whole by then gets 408 (a 50 MB upload at ~3.5 Mbit/s)",
    )
    max_header_kb: int = Field(16, ge=1, description="largest request head (request line and headers)")
    max_connections: int = Field(512, ge=1, description="open connections; more are refused (503 or closed)")
    max_uploads_mb: float = Field(
        200.0,
        gt=0,
        description="upload bytes received and not yet answered, over all requests (counted as they "
        "arrive, not as declared); beyond, 503",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long requests in flight may take to finish"
    )
    linger_s: float = Field(
        10.0,
        gt=0,
        description="after an answer given before the request was read whole (a refusal), how long the "
        "rest is read and dropped, so that the client gets the answer rather than a reset",
    )
    linger_mb: float = Field(64.0, gt=0, description="how much of that rest is read and dropped at most")
    # ---- access
    api_key: SecretStr | None = Field(
        None,
        description="when set, every endpoint but /livez and the page needs `X-API-Key: <key>`; set but "
        "empty, the service refuses to start",
    )
    cors_origins: str = Field(
        "", description="comma-separated origins allowed to call the API from a browser (CORS); empty: none"
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics on this port (same host) instead of the API's"
    )
    # ---- logging
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`fer serve`'s log: `text` for people, or `json` for log collectors (one JSON object a "
        "line, the request id a field)",
    )

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: SecretStr | None) -> SecretStr | None:
        # An empty key would match a request that sends none (`-e FER_API_KEY=$KEY` with KEY unset).
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("the key is empty: set one, or unset FER_API_KEY to serve without a key")
        return key

    @model_validator(mode="after")
    def _limits_fit_together(self) -> ServiceSettings:
        # A video request holds one item per face of each sampled frame (or per frame), an image one per
        # face, a /retrieve a video's items and its descriptions: the largest request.
        video = self.max_frames * self.max_faces
        largest = video + self.max_descriptions
        if self.max_request_items < largest:
            raise ValueError(
                "FER_MAX_REQUEST_ITEMS must hold the largest request, a /retrieve: FER_MAX_FRAMES x "
                f"FER_MAX_FACES + FER_MAX_DESCRIPTIONS, {largest}"
            )
        if self.max_queue * self.video_share < video:
            raise ValueError(
                "FER_MAX_QUEUE x FER_VIDEO_SHARE must hold one video of FER_MAX_FRAMES frames with "
                f"FER_MAX_FACES faces each, {video}"
            )
        # A new class list's prompts are encoded once for every later request: they take places in the
        # queue (the texts' share) but not from the request's own share.
        class_texts = most_prompt_texts()
        texts = max(self.max_descriptions, class_texts)
        if self.max_queue * self.text_share < texts:
            raise ValueError(
                f"FER_MAX_QUEUE x FER_TEXT_SHARE must hold one request's texts, {texts}: FER_MAX_DESCRIPTIONS, "
                f"and a new list of {MAX_CLASSES} classes with the most prompts ({class_texts})"
            )
        if self.max_queue < video + class_texts:
            raise ValueError(
                "FER_MAX_QUEUE must hold a video with a new class list: FER_MAX_FRAMES x FER_MAX_FACES, "
                f"plus {class_texts} texts"
            )
        if self.max_queue < max(self.max_batch, self.max_request_items):
            raise ValueError(
                "FER_MAX_QUEUE must hold at least one batch and the largest request: "
                f"max(FER_MAX_BATCH, FER_MAX_REQUEST_ITEMS) = {max(self.max_batch, self.max_request_items)}"
            )
        return self

    @model_validator(mode="after")
    def _limits_agree(self) -> ServiceSettings:
        # Each pair would refuse what the other allows, on every request and however idle the server.
        if self.max_upload_mb > self.max_uploads_mb:
            raise ValueError(
                f"FER_MAX_UPLOAD_MB ({self.max_upload_mb:g}) is above FER_MAX_UPLOADS_MB "
                f"({self.max_uploads_mb:g}): an upload between the two could never be received"
            )
        if self.max_decode_frames < self.max_frames:
            raise ValueError(
                f"FER_MAX_DECODE_FRAMES ({self.max_decode_frames}) is below FER_MAX_FRAMES ({self.max_frames}): "
                "a request sampling that many frames decodes at least as many"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_uploads_bytes(self) -> int:
        return int(self.max_uploads_mb * 2**20)

    @property
    def linger_bytes(self) -> int:
        return int(self.linger_mb * 2**20)

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def with_threads(self, cpus: int) -> ServiceSettings:
        """The thread counts left unset, resolved for a process given `cpus` CPUs (the field defaults)."""
        return self.model_copy(
            update={
                "device_threads": self.device_threads or cpus,
                "decode_workers": self.decode_workers or cpus,
                "video_decode_workers": self.video_decode_workers or max(1, cpus // 2),
            }
        )
