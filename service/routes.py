"""HTTP endpoints. An inference handler takes the loaded model for its request first (so "still loading"
comes before any complaint about the upload), checks its fields, and runs its endpoint's work through
the request path (service.inference), which answers with the response schema; nothing else happens
here."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from starlette.datastructures import UploadFile as StarletteUploadFile

from model.media import WrongMediaKind
from model.prompts import (
    CLASS_PRESETS,
    CLASS_WORDS,
    DEFAULT_CLASSES,
    DEFAULT_PROMPTS,
    PROMPT_SETS,
    prompt_table,
)
from service import inference
from service.deps import DetectField, Flag, FramesField, Labels, LabelsDep, RuntimeDep
from service.errors import InvalidField, NotFound, UnsupportedMediaType
from service.runtime import Runtime
from service.schemas import (
    ErrorResponse,
    Health,
    LabelsResponse,
    PredictResponse,
    RetrieveResponse,
    VideoResponse,
)

STATIC_DIR = Path(__file__).parent / "static"
GENERIC_TYPES = {"", "application/octet-stream"}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 422, 429, 499, 500, 503)}
# FastAPI spells an upload `contentMediaType: application/octet-stream` (OpenAPI 3.1's way); client
# generators (openapi-python-client, ng-openapi-gen, ...) take only OpenAPI 3.0's `format: binary` for a
# file, and type the field as text without it. An empty file is refused (400).
UPLOAD = {"format": "binary", "minLength": 1}
# /retrieve's `descriptions`: one part holding a JSON array; service.app gives the part its content type
# (application/json) in the schema, so Swagger UI sends the text as it is (as a file part: see
# `_part_text`), where a text field holding a JSON array is sent comma-joined. The example is what
# "Try it out" fills the field in with.
DESCRIPTIONS_EXAMPLE = '["raises the eyebrows", "smiles broadly"]'
DESCRIPTIONS = {"minLength": 1, "example": DESCRIPTIONS_EXAMPLE}


def _part_text(value: object) -> object:
    """A text field sent as a file part (Swagger UI, `curl -F descriptions=@texts.json`) is its text."""
    if not isinstance(value, StarletteUploadFile):
        return value
    value.file.seek(0)
    try:
        return value.file.read().decode("utf-8")
    except UnicodeDecodeError:
        raise PydanticCustomError("unicode_decode", "give UTF-8 text") from None


INFERENCE, INFO, OPERATIONS = "inference", "labels", "operations"
TAGS = [
    {"name": INFERENCE, "description": "an upload in, per-class probabilities or a ranking out"},
    {"name": INFO, "description": "the class presets and prompt sets the inference endpoints take"},
    {"name": OPERATIONS, "description": "for load balancers, orchestrators and Prometheus"},
]

# operationId = the handler's name (`predict`, `predict_video`, ...): the method names of a generated
# client, where FastAPI's default adds the path and method (`predict_predict_post`).
router = APIRouter(generate_unique_id_function=lambda route: route.name)


# ---- the page, health, labels, metrics -----------------------------------------------------------
@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/livez", response_model=Health, tags=[OPERATIONS], summary="Whether the process is up")
async def livez() -> Health:
    """200 while the process is up, whether or not the model is loaded."""
    return Health(status="alive")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "the model is loading, or failed to load"}},
    tags=[OPERATIONS],
    summary="Whether the model is loaded and warm",
)
async def readyz(runtime: RuntimeDep):
    """200 with the model, device, precision and face detector once the model answers; 503 with the
    reason until then. It stays 200 under overload, when requests get 429 instead."""
    if runtime.ready:
        engine = runtime.engine
        detector = runtime.detector.name if runtime.detector else "none"
        return Health(
            status="ready",
            **inference.model_fields(runtime.engine),
            device=str(engine.device),
            dtype=engine.dtype_name,
            face_detector=detector,
        )
    detail = runtime.load_error or "loading"
    return JSONResponse(Health(status="not_ready", detail=detail).model_dump(), status_code=503)


@router.get("/labels", response_model=LabelsResponse, tags=[INFO], summary="Class presets and prompt sets")
async def labels() -> LabelsResponse:
    """The values `classes` and `prompts` take, with the exact official prompts of each set."""
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


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        404: {"model": ErrorResponse, "description": "served on FER_METRICS_PORT instead"},
    },
    tags=[OPERATIONS],
    summary="Prometheus metrics",
)
async def metrics(runtime: RuntimeDep) -> Response:
    """Request counts and latencies, queue depth, refusals and batch sizes, in Prometheus' text format."""
    if runtime.settings.metrics_port is not None:  # served on its own port instead (fer serve)
        raise NotFound("/metrics is served on FER_METRICS_PORT")
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# ---- inference ----------------------------------------------------------------------------------
@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    tags=[INFERENCE],
    summary="Expression probabilities of the faces in an image",
)
async def predict(
    request: Request,
    runtime: RuntimeDep,
    labels: LabelsDep,
    file: Annotated[UploadFile, File(description="an image", json_schema_extra=UPLOAD)],
    detect_faces: DetectField = True,
) -> PredictResponse:
    """Per-class probabilities for every face found (largest first) and for the image as a whole. The
    classes are plain words, scored zero-shot: a preset or words of your own."""
    call = _call(runtime, request, file, detect_faces)
    _accept(file, "image/", other="video/", other_kind="video")
    return await inference.run(call, inference.predict_image(call, _prompts(labels)))


@router.post(
    "/predict-video",
    response_model=VideoResponse,
    responses=ERRORS,
    tags=[INFERENCE],
    summary="Expression probabilities of a clip",
)
async def predict_video(
    request: Request,
    runtime: RuntimeDep,
    labels: LabelsDep,
    file: Annotated[
        UploadFile,
        File(description="a clip: mp4, webm, mov, avi, mkv, animated gif, ...", json_schema_extra=UPLOAD),
    ],
    detect_faces: DetectField = True,
    frames: FramesField = 16,
    per_frame: Annotated[
        Flag, Form(description="add the per-frame timeline, and each track's per-frame answers")
    ] = False,
) -> VideoResponse:
    """One track per person: each person's faces over the sampled frames, linked across frames, with
    per-class probabilities from the mean of their features. The clip's answer (and the per-frame
    timeline, on request) is the main track's: the person seen in the most frames. Without any face the
    whole frames are pooled."""
    call = _call(runtime, request, file, detect_faces, frames)
    _check_frames(frames, runtime.settings.max_frames)
    _accept(file, "video/", "image/gif", other="image/", other_kind="image")
    return await inference.run(call, inference.predict_video(call, _prompts(labels), per_frame))


@router.post(
    "/retrieve",
    response_model=RetrieveResponse,
    responses=ERRORS,
    tags=[INFERENCE],
    summary="Descriptions ranked by how well they fit a clip",
)
async def retrieve(
    request: Request,
    runtime: RuntimeDep,
    file: Annotated[UploadFile, File(description="a video (or an image)", json_schema_extra=UPLOAD)],
    descriptions: Annotated[
        str,
        BeforeValidator(_part_text),
        Form(
            description='a JSON array of non-blank strings, e.g. ["smiles", "frowns"]',
            examples=[DESCRIPTIONS_EXAMPLE],
            json_schema_extra=DESCRIPTIONS,
        ),
    ],
    top_k: Annotated[int, Form(ge=1, description="how many ranked descriptions to return")] = 10,
    frames: FramesField = 16,
    detect_faces: DetectField = True,
    per_frame: Annotated[
        Flag,
        Form(description="add each sampled frame's scores (`timeline`, and each track's frames' `scores`)"),
    ] = False,
) -> RetrieveResponse:
    """The descriptions ranked by the cosine similarity of their features with each person's pooled
    feature (one track per person, as for /predict-video). The clip's ranking is the main track's: the
    person seen in the most frames. Without any face the whole frames are pooled; an image is a
    one-frame clip."""
    call = _call(runtime, request, file, detect_faces, frames)
    s = runtime.settings
    texts = _parse_descriptions(descriptions, s.max_descriptions, s.max_description_chars)
    _check_frames(frames, s.max_frames)
    _accept(file, "video/", "image/")
    return await inference.run(call, await inference.retrieve(call, texts, top_k, per_frame))


# ---- a request as the request path takes it ----------------------------------------------------
def _call(
    runtime: Runtime, request: Request, file: UploadFile, detect_faces: bool, frames: int | None = None
) -> inference.Call:
    """The request's values, with the loaded model taken once: NotReady (503) while it loads."""
    return inference.Call(
        runtime=runtime,
        model=runtime.require(),
        source=file.file,
        media_type=file.content_type,
        options=runtime.settings.pipeline_options(detect_faces=detect_faces, frames=frames),
        is_disconnected=request.is_disconnected,
    )


def _prompts(labels: Labels) -> inference.ClassPrompts:
    return inference.ClassPrompts(labels.classes, labels.prompt_set)


# ---- field checks -------------------------------------------------------------------------------


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


def _parse_descriptions(raw: str, max_count: int, max_chars: int) -> list[str]:
    if not raw.strip():
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
