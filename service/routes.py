"""HTTP endpoints. Each handler reads as the data flows: request -> decode (thread pool) -> batcher
(shared encoder call) -> score (thread pool) -> response."""

from __future__ import annotations

import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from model.engine import FerEngine, Scores
from model.prompts import (
    CLASS_PRESETS,
    DEFAULT_CLASSES,
    DEFAULT_PROMPTS,
    PROMPT_SETS,
    resolve_classes,
    resolve_prompt_set,
)
from service.app import Runtime
from service.errors import InvalidField, UnsupportedMediaType
from service.prepare import PreparedImage, prepare_clip, prepare_image, prepare_video
from service.schemas import (
    ErrorResponse,
    FaceResult,
    FrameResult,
    Health,
    LabelsResponse,
    PredictResponse,
    RankedDescription,
    RetrieveResponse,
    Timing,
    VideoResponse,
)

GENERIC_TYPES = {"", "application/octet-stream"}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 429, 500, 503)}


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on every request
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ClassesField = Annotated[str | None, Form(description="a class preset or comma-separated class words")]
PromptsField = Annotated[str | None, Form(description="prompt set P-1..P-5 (default P-3)")]
DetectField = Annotated[bool, Form(description="crop detected faces before classifying")]

router = APIRouter()


# ---- health, labels, metrics --------------------------------------------------------------------
@router.get("/livez", response_model=Health)
async def livez() -> Health:
    return Health(status="alive")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(runtime: RuntimeDep):
    if runtime.ready:
        engine = runtime.engine
        return Health(
            status="ready",
            model=engine.name,
            device=str(engine.device),
            dtype=engine.dtype_name,
        )
    detail = runtime.load_error or "loading"
    return JSONResponse(Health(status="not_ready", detail=detail).model_dump(), status_code=503)


@router.get("/labels", response_model=LabelsResponse)
async def labels() -> LabelsResponse:
    return LabelsResponse(
        class_presets={name: list(words) for name, words in CLASS_PRESETS.items()},
        prompt_sets={name: list(templates) for name, templates in PROMPT_SETS.items()},
        default_classes=DEFAULT_CLASSES,
        default_prompts=DEFAULT_PROMPTS,
    )


@router.get("/metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# ---- inference ----------------------------------------------------------------------------------
@router.post("/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(
    request: Request,
    runtime: RuntimeDep,
    file: Annotated[UploadFile, File(description="an image")],
    classes: ClassesField = None,
    prompts: PromptsField = None,
    detect_faces: DetectField = True,
) -> PredictResponse:
    started = time.perf_counter()
    engine, _ = runtime.require()
    class_list, prompt_set = resolve_classes(classes), resolve_prompt_set(prompts)
    _accept(file, "image/")
    s = runtime.settings
    prepared, features, decoded = await runtime.prepare_and_encode(
        request, prepare_image, file.file, s.media_limits, detect_faces, s.max_faces, s.face_margin
    )
    text = await runtime.class_features(class_list, prompt_set)
    scores = await runtime.offload(engine.classify, features, class_list, prompt_set, text)
    faces = [
        FaceResult(box=box.as_list(), label=scores.label(i), probabilities=scores.as_dict(i))
        for i, box in enumerate(prepared.boxes)
    ]
    return PredictResponse(
        label=scores.label(0),
        probabilities=scores.as_dict(0),
        faces=faces,
        face_detected=bool(faces),
        note=None if faces or not detect_faces else "no face found: the whole image was classified",
        model=engine.name,
        classes=list(class_list),
        prompts=prompt_set,
        timing=_timing(started, decoded),
    )


@router.post("/predict-video", response_model=VideoResponse, responses=ERRORS)
async def predict_video(
    request: Request,
    runtime: RuntimeDep,
    file: Annotated[UploadFile, File(description="a clip: mp4, webm, mov, avi, mkv, animated gif, ...")],
    classes: ClassesField = None,
    prompts: PromptsField = None,
    detect_faces: DetectField = True,
    frames: Annotated[int, Form(ge=1, description="frames sampled (16-segment middle-frame rule)")] = 16,
    per_frame: Annotated[bool, Form(description="add a per-frame timeline")] = False,
) -> VideoResponse:
    started = time.perf_counter()
    engine, _ = runtime.require()
    class_list, prompt_set = resolve_classes(classes), resolve_prompt_set(prompts)
    s = runtime.settings
    _check_frames(frames, s.max_frames)
    _accept(file, "video/", "image/gif")
    prepared, features, decoded = await runtime.prepare_and_encode(
        request, prepare_video, file.file, s.media_limits, frames, detect_faces, s.face_margin
    )
    text = await runtime.class_features(class_list, prompt_set)
    clip_scores, frame_scores = await runtime.offload(
        _score_clip, engine, features, class_list, prompt_set, text, per_frame
    )
    clip = prepared.clip
    timeline = None
    if frame_scores is not None:
        timeline = [
            FrameResult(
                index=index,
                timestamp=round(timestamp, 4),
                face_detected=found,
                label=frame_scores.label(row),
                probabilities=frame_scores.as_dict(row),
            )
            for row, (index, timestamp, found) in enumerate(
                zip(clip.indices, clip.timestamps, prepared.face_found, strict=True)
            )
        ]
    return VideoResponse(
        label=clip_scores.label(0),
        probabilities=clip_scores.as_dict(0),
        frames_sampled=len(clip.indices),
        n_frames=clip.n_frames,
        fps=round(clip.fps, 3),
        duration_s=round(clip.duration, 3),
        frames_with_face=sum(prepared.face_found),
        timeline=timeline,
        model=engine.name,
        classes=list(class_list),
        prompts=prompt_set,
        timing=_timing(started, decoded),
    )


@router.post("/retrieve", response_model=RetrieveResponse, responses=ERRORS)
async def retrieve(
    request: Request,
    runtime: RuntimeDep,
    file: Annotated[UploadFile, File(description="a video (or an image)")],
    descriptions: Annotated[str, Form(description='a JSON array of strings, e.g. ["smiles", "frowns"]')],
    top_k: Annotated[int, Form(ge=1, description="how many ranked descriptions to return")] = 10,
    frames: Annotated[int, Form(ge=1)] = 16,
    detect_faces: DetectField = True,
) -> RetrieveResponse:
    started = time.perf_counter()
    engine, batcher = runtime.require()
    s = runtime.settings
    texts = _parse_descriptions(descriptions, s.max_descriptions, s.max_description_chars)
    _check_frames(frames, s.max_frames)
    _accept(file, "video/", "image/")
    prepared, features, decoded = await runtime.prepare_and_encode(
        request,
        prepare_clip,
        file.file,
        file.content_type,
        s.media_limits,
        frames,
        detect_faces,
        s.face_margin,
    )
    media = "image" if isinstance(prepared, PreparedImage) else "video"
    ranking = await batcher.run(lambda: engine.rank(engine.pool(features), texts), items=len(texts))
    return RetrieveResponse(
        media=media,
        ranking=[RankedDescription(index=i, text=texts[i], score=score) for i, score in ranking[:top_k]],
        model=engine.name,
        timing=_timing(started, decoded),
    )


# ---- helpers ------------------------------------------------------------------------------------
def _score_clip(
    engine: FerEngine, features, classes, prompt_set, text, per_frame: bool
) -> tuple[Scores, Scores | None]:
    clip_scores = engine.classify(engine.pool(features).unsqueeze(0), classes, prompt_set, text)
    return clip_scores, engine.classify(features, classes, prompt_set, text) if per_frame else None


def _check_frames(frames: int, max_frames: int) -> None:
    if frames > max_frames:
        raise InvalidField(f"frames: at most {max_frames} frames may be sampled")


def _accept(file: UploadFile, *prefixes: str) -> None:
    """A declared type must fit the endpoint; a missing or generic one is sniffed by the decoder."""
    declared = (file.content_type or "").split(";")[0].strip().lower()
    if declared in GENERIC_TYPES or any(declared.startswith(p) for p in prefixes):
        return
    raise UnsupportedMediaType(f"{declared} is not accepted here; send {' or '.join(prefixes)}")


def _parse_descriptions(raw: str, max_count: int, max_chars: int) -> list[str]:
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


def _timing(started: float, decoded: float) -> Timing:
    now = time.perf_counter()
    return Timing(
        decode_ms=round((decoded - started) * 1000, 2),
        inference_ms=round((now - decoded) * 1000, 2),
        total_ms=round((now - started) * 1000, 2),
    )
