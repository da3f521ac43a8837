"""HTTP endpoints. A handler parses its fields, hands them to the request pipeline (service.inference)
and builds the response schema from the result; nothing else happens here."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from model.media import WrongMediaKind, is_still_image
from model.prompts import (
    CLASS_PRESETS,
    CLASS_WORDS,
    DEFAULT_CLASSES,
    DEFAULT_PROMPTS,
    PROMPT_SETS,
    prompt_table,
)
from service import inference
from service.deps import DetectField, FramesField, LabelsDep, RuntimeDep
from service.errors import InvalidField, NotFound, UnsupportedMediaType
from service.schemas import (
    ErrorResponse,
    Health,
    LabelsResponse,
    PredictResponse,
    RetrieveResponse,
    Timing,
    VideoResponse,
)

STATIC_DIR = Path(__file__).parent / "static"
GENERIC_TYPES = {"", "application/octet-stream"}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 422, 429, 499, 500, 503)}

router = APIRouter()


# ---- the page, health, labels, metrics -----------------------------------------------------------
@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/livez", response_model=Health)
async def livez() -> Health:
    return Health(status="alive")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(runtime: RuntimeDep):
    if runtime.ready:
        engine = runtime.engine
        detector = runtime.detector.name if runtime.detector else "none"
        return Health(
            status="ready",
            **_model(runtime),
            device=str(engine.device),
            dtype=engine.dtype_name,
            face_detector=detector,
        )
    detail = runtime.load_error or "loading"
    return JSONResponse(Health(status="not_ready", detail=detail).model_dump(), status_code=503)


@router.get("/labels", response_model=LabelsResponse)
async def labels() -> LabelsResponse:
    return _labels()


@functools.cache  # built from constants: the same answer for the process's life
def _labels() -> LabelsResponse:
    official = {}
    for name, templates in PROMPT_SETS.items():
        official[name] = {
            w: prompts
            for w, prompts in prompt_table(CLASS_WORDS, name).items()
            if prompts != [t.format(w) for t in templates]
        }
    return LabelsResponse(
        class_presets={name: list(words) for name, words in CLASS_PRESETS.items()},
        prompt_sets={name: list(templates) for name, templates in PROMPT_SETS.items()},
        official_prompts=official,
        default_classes=DEFAULT_CLASSES,
        default_prompts=DEFAULT_PROMPTS,
    )


@router.get("/metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    if runtime.settings.metrics_port is not None:  # served on its own port instead (fer serve)
        raise NotFound("/metrics is served on FER_METRICS_PORT")
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# ---- inference ----------------------------------------------------------------------------------
@router.post("/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(
    request: Request,
    runtime: RuntimeDep,
    labels: LabelsDep,
    file: Annotated[UploadFile, File(description="an image")],
    detect_faces: DetectField = True,
) -> PredictResponse:
    runtime.require()  # "still loading" comes before any complaint about the upload
    _accept(file, "image/", other="video/", other_kind="video")
    result, clock = await inference.predict_image(
        runtime,
        file.file,
        labels.classes,
        labels.prompt_set,
        _options(runtime, detect_faces),
        request.is_disconnected,
    )
    return PredictResponse(**asdict(result), **_model(runtime), timing=_timing(clock))


@router.post("/predict-video", response_model=VideoResponse, responses=ERRORS)
async def predict_video(
    request: Request,
    runtime: RuntimeDep,
    labels: LabelsDep,
    file: Annotated[UploadFile, File(description="a clip: mp4, webm, mov, avi, mkv, animated gif, ...")],
    detect_faces: DetectField = True,
    frames: FramesField = 16,
    per_frame: Annotated[bool, Form(description="add a per-frame timeline")] = False,
) -> VideoResponse:
    runtime.require()
    _check_frames(frames, runtime.settings.max_frames)
    _accept(file, "video/", "image/gif", other="image/", other_kind="image")
    result, clock = await inference.predict_video(
        runtime,
        file.file,
        labels.classes,
        labels.prompt_set,
        _options(runtime, detect_faces, frames),
        per_frame,
        request.is_disconnected,
    )
    return VideoResponse(**asdict(result), **_model(runtime), timing=_timing(clock))


@router.post("/retrieve", response_model=RetrieveResponse, responses=ERRORS)
async def retrieve(
    request: Request,
    runtime: RuntimeDep,
    file: Annotated[UploadFile, File(description="a video (or an image)")],
    descriptions: Annotated[
        str | None, Form(description='a JSON array of strings, e.g. ["smiles", "frowns"] (required)')
    ] = None,
    top_k: Annotated[int, Form(ge=1, description="how many ranked descriptions to return")] = 10,
    frames: FramesField = 16,
    detect_faces: DetectField = True,
) -> RetrieveResponse:
    runtime.require()
    s = runtime.settings
    texts = _parse_descriptions(descriptions, s.max_descriptions, s.max_description_chars)
    _check_frames(frames, s.max_frames)
    _accept(file, "video/", "image/")
    result, clock = await inference.retrieve(
        runtime,
        file.file,
        await runtime.offload(is_still_image, file.file, file.content_type),  # reads the file's head
        texts,
        top_k,
        _options(runtime, detect_faces, frames),
        request.is_disconnected,
    )
    return RetrieveResponse(**asdict(result), **_model(runtime), timing=_timing(clock))


# ---- field checks -------------------------------------------------------------------------------
def _options(runtime, detect_faces: bool, frames: int | None = None):
    return runtime.settings.pipeline_options(detect_faces=detect_faces, frames=frames)


def _check_frames(frames: int, max_frames: int) -> None:
    if frames > max_frames:
        raise InvalidField(f"frames: at most {max_frames} frames may be sampled")


def _accept(
    file: UploadFile, *prefixes: str, other: str | None = None, other_kind: str | None = None
) -> None:
    """A declared type must fit the endpoint; a missing or generic one is sniffed by the decoder. A type
    of the other endpoint's kind (`other`) says where to send the file."""
    declared = (file.content_type or "").split(";")[0].strip().lower()
    if declared in GENERIC_TYPES or any(declared.startswith(p) for p in prefixes):
        return
    if other is not None and declared.startswith(other):
        raise WrongMediaKind(other_kind)
    raise UnsupportedMediaType(declared, prefixes)


def _parse_descriptions(raw: str | None, max_count: int, max_chars: int) -> list[str]:
    if raw is None or not raw.strip():  # missing, or empty (the form parser makes that "missing")
        raise InvalidField(
            'descriptions: give a JSON array of at least one string, e.g. ["smiles", "frowns"]'
        )
    try:
        texts = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: thousands of nested brackets
        raise InvalidField(
            'descriptions: must be a JSON array of strings, e.g. ["smiles", "frowns"]'
        ) from None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidField("descriptions: must be a JSON array of strings")
    if not all(_is_unicode(t) for t in texts):
        raise InvalidField("descriptions: a string holds an unpaired surrogate escape (e.g. \\ud800)")
    texts = [t.strip() for t in texts]
    if not texts or any(not t for t in texts):
        raise InvalidField("descriptions: give at least one, and no empty strings")
    if len(texts) > max_count:
        raise InvalidField(f"descriptions: {len(texts)} given, at most {max_count} are allowed")
    if any(len(t) > max_chars for t in texts):
        raise InvalidField(f"descriptions: each is limited to {max_chars} characters")
    return texts


def _is_unicode(text: str) -> bool:
    """False for a string that JSON's \\uXXXX escapes left holding a lone surrogate (no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _model(runtime) -> dict:
    """The model's name, and beside it what its answers are worth (the demo's random weights)."""
    return {"model": runtime.engine.name, "model_warning": runtime.engine.warning}


def _timing(clock: inference.Clock) -> Timing:
    now = time.perf_counter()
    decoded = clock.decoded or now
    return Timing(
        decode_ms=round((decoded - clock.started) * 1000, 2),
        inference_ms=round((now - decoded) * 1000, 2),
        total_ms=round((now - clock.started) * 1000, 2),
    )
