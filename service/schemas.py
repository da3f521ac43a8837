"""Request/response models: what /docs shows and what the handlers return."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MODEL_WARNING = Field(
    None,
    description="set when the model's answers mean nothing: `random weights: answers are meaningless` for "
    "the demo preset; null for a model with real weights",
)


class Timing(BaseModel):
    decode_ms: float = Field(description="decoding, face detection and preprocessing (thread pool)")
    queue_ms: float = Field(description="waiting for the shared encoder, until a call took the first rows")
    inference_ms: float = Field(description="the shared encoder call(s), the text features and scoring")
    total_ms: float


class FaceResult(BaseModel):
    box: list[int] = Field(description="[x, y, w, h] in the original image's pixels")
    score: float = Field(description="the face detector's confidence (1 for `haar`, which gives none)")
    landmarks: list[list[float]] | None = Field(
        description="five [x, y] points in the original image's pixels: the eyes, the nose tip and the mouth "
        "corners, each pair in image order (left first); null for a detector without landmarks"
    )
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    label: str = Field(description="the top class of the largest face (or of the whole image)")
    probabilities: dict[str, float] = Field(description="per-class probabilities, summing to 1")
    faces: list[FaceResult] = Field(description="one entry per detected face, largest first")
    face_detected: bool
    note: str | None = Field(None, description="e.g. that no face was found and the whole image was used")
    model: str
    model_warning: str | None = MODEL_WARNING
    classes: list[str]
    prompts: str
    timing: Timing


class FrameResult(BaseModel):
    index: int = Field(description="frame index in the clip")
    timestamp: float = Field(description="seconds from the start of the clip")
    face_detected: bool
    label: str
    probabilities: dict[str, float]


class TrackFrame(BaseModel):
    index: int = Field(description="frame index in the clip, as in `timeline`")
    timestamp: float = Field(description="seconds from the start of the clip")
    box: list[int] = Field(description="the person's face, [x, y, w, h] in the clip's pixels")
    label: str | None = Field(None, description="this face's top class, when per_frame=true")
    probabilities: dict[str, float] | None = Field(None, description="this face's, when per_frame=true")


class Track(BaseModel):
    id: int = Field(description="the person's number, by first appearance in the clip (from 0)")
    label: str = Field(description="the top class of this person's frames, pooled")
    probabilities: dict[str, float] = Field(
        description="from the mean of this person's projected face features"
    )
    frames: list[TrackFrame] = Field(
        description="one entry per sampled frame in which this person's face is found"
    )


class VideoResponse(BaseModel):
    label: str = Field(
        description="the main track's (the first), or the whole frames' when no face was found"
    )
    probabilities: dict[str, float] = Field(
        description="the main track's: from the mean of its projected face features (of the whole frames' "
        "when no face was found)"
    )
    frames_sampled: int
    n_frames: int
    fps: float
    duration_s: float
    frames_with_face: int = Field(description="sampled frames in which any face was found")
    timeline: list[FrameResult] | None = Field(
        None,
        description="the main track's frames (every sampled frame when no face was found), when per_frame=true",
    )
    tracks: list[Track] = Field(
        description="one per person, most frames first (ties: the larger mean box); empty when no face was "
        "found or detection is off"
    )
    model: str
    model_warning: str | None = MODEL_WARNING
    classes: list[str]
    prompts: str
    timing: Timing


class RankedDescription(BaseModel):
    index: int = Field(description="position in the submitted `descriptions` array")
    text: str
    score: float = Field(description="cosine similarity of the projected features")


class FrameScores(BaseModel):
    index: int = Field(description="frame index in the clip (0 for a still image)")
    timestamp: float = Field(description="seconds from the start of the clip (0 for a still image)")
    scores: list[float] = Field(
        description="each description's score at this frame, in the order of `descriptions`: the cosine "
        "of the main track's face at this frame (the whole frame where no face was found), its projected, "
        "L2-normalised feature, with the description's text feature. The ranking's `score` is the cosine "
        "with that person's pooled feature instead (the mean of their frames' projected features, then "
        "L2), which is not the mean of these; for a still image the two are equal"
    )


class TrackFrameScores(BaseModel):
    index: int = Field(description="frame index in the clip, as in `timeline` (0 for a still image)")
    timestamp: float = Field(description="seconds from the start of the clip (0 for a still image)")
    box: list[int] = Field(description="the person's face, [x, y, w, h] in the clip's pixels")
    scores: list[float] | None = Field(
        None,
        description="with per_frame=true, each description's score at this face, in the order of "
        "`descriptions` (as `timeline[].scores`); else null",
    )


class TrackRanking(BaseModel):
    id: int = Field(description="the person's number, by first appearance in the clip (from 0)")
    ranking: list[RankedDescription] = Field(
        description="the best `top_k` descriptions for this person, best first: the cosine with the mean "
        "of their projected face features, then L2"
    )
    frames: list[TrackFrameScores] = Field(
        description="one entry per sampled frame in which this person's face is found"
    )


class RetrieveResponse(BaseModel):
    media: Literal["image", "video"]
    ranking: list[RankedDescription] = Field(
        description="the main track's (the first), or the whole frames' when no face was found"
    )
    timeline: list[FrameScores] | None = Field(
        None,
        description="with per_frame=true, one entry per sampled frame of the main track (every sampled "
        "frame when no face was found; a still image: one entry); else null",
    )
    tracks: list[TrackRanking] = Field(
        description="one per person, most frames first (ties: the larger mean box), as /predict-video's; "
        "a still image: its largest face, one track; empty when no face was found or detection is off"
    )
    model: str
    model_warning: str | None = MODEL_WARNING
    timing: Timing


class LabelsResponse(BaseModel):
    class_presets: dict[str, list[str]]
    prompt_sets: dict[str, list[str]] = Field(
        description="each set's templates (`{}` = the class word), used for any class word of your own"
    )
    official_prompts: dict[str, dict[str, list[str]]] = Field(
        description="prompt set -> official class word -> its exact prompts, where the official code's "
        "wording differs from the templates (the lists behind the paper's tables)"
    )
    default_classes: str
    default_prompts: str


class Health(BaseModel):
    status: str
    model: str | None = None
    model_warning: str | None = MODEL_WARNING
    device: str | None = None  # where the encoders run, e.g. "cuda:0" or "cpu"
    dtype: str | None = None  # their precision (FER_DTYPE), e.g. "float16"
    face_detector: str | None = None  # FER_FACE_DETECTOR's model, e.g. "retinaface-mnet0.25", or "none"
    detail: str | None = None


class ErrorResponse(BaseModel):
    error: str = Field(description="a stable code, e.g. `invalid_field`, `queue_full`, `media_too_large`")
    detail: str = Field(description="one sentence for people: what was wrong and what is accepted")
    request_id: str | None = Field(None, description="also in the X-Request-ID header and the server's log")
