"""The one path from an input to an answer, in stages every entry point calls (the service, the `fer`
commands, `fer eval`, training's CLIP side):

    decode (model.media) -> find faces -> crop -> prepare (uint8 pixels) -> encode -> project
      -> (a clip's faces linked into one track per person, model.tracks) -> score

The CPU stages (`prepare_image`, `prepare_video`, `prepare_clip`) turn a file into the encoder's uint8
input plus what the answer needs to say about it (faces, sampled frames). They take the preprocessing
itself (`Preprocess`: the engine's `prepare_many`, or a `model.clip.ToPixels` where no model is loaded),
a face detector and the options, never the engine. Encoding is the caller's
choice of encoder (`encode_in_batches` on the engine, or the service's cross-request batcher), since
only the caller knows what else shares the device. The score stage (`predict_image`, `predict_video`,
`rank_descriptions`) turns projected features and text features into result objects that the
service's schemas and the CLI's JSON lines are built from, so both answer alike.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Literal

import torch
import torch.nn.functional as F

from model.faces.align import crop_face
from model.media import DecodeStopped, VideoFrames, decode_image, read_video
from model.options import PipelineOptions
from model.tracks import link_faces, rank_tracks

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from model.faces.base import Face, FaceDetector

STOP_POLL_S = 0.05  # how often a clip waiting on its frames' searches looks at its `stop`
LOGIT_SCALE = 100.0  # CLIP's logit scale (exp of the stored value), as the official scoring uses
NO_FACE_NOTE = "no face found: the whole image was classified"
Source = BinaryIO | bytes | str
Encode = Callable[[torch.Tensor], torch.Tensor]
Preprocess = Callable[[Sequence["Image.Image"]], torch.Tensor]  # images -> uint8 [N, 3, S, S]
# Per sampled frame, its faces' boxes [x, y, w, h] in the order of their rows; [] for a frame without a
# face, whose one row is the whole frame.
FrameBoxes = Sequence[Sequence[Sequence[float]]]


# ---- CPU stages: decode -> faces -> crop -> prepare --------------------------------------------------
@dataclass
class PreparedImage:
    pixels: torch.Tensor  # [faces or 1, 3, S, S] uint8
    faces: list[Face]  # empty: no face found (or detection off); pixels hold the whole image


@dataclass
class PreparedVideo:
    """One row per face of each sampled frame (largest first), or the whole frame where none is found,
    frame after frame: `faces` says which rows are whose."""

    pixels: torch.Tensor  # [rows, 3, S, S] uint8
    clip: VideoFrames  # the sampling facts (indices, timestamps, fps, ...); its frames are dropped
    faces: list[list[Face]]  # per sampled frame: its faces in the clip's pixels; [] -> the whole frame

    @property
    def face_found(self) -> list[bool]:
        return [bool(faces) for faces in self.faces]


def find_faces(
    image: Image.Image,
    detector: FaceDetector | None,
    options: PipelineOptions,
    max_faces: int | None = None,
    long_side: int | None = None,
) -> list[Face]:
    """`long_side`: the side the detector searches the image at (None: its own, tuned for photos)."""
    if not options.detect_faces or detector is None:
        return []
    return detector.detect(image, max_faces or options.max_faces, long_side=long_side)


def crops(image: Image.Image, faces: Sequence[Face], options: PipelineOptions) -> list[Image.Image]:
    """One crop per face, or the whole image when there is none."""
    return [crop_face(image, face, options.face_margin, options.align_faces) for face in faces] or [image]


def prepare_image(
    source: Source,
    to_pixels: Preprocess,
    detector: FaceDetector | None,
    options: PipelineOptions,
    stop: threading.Event | None = None,
) -> PreparedImage:
    """`stop`, set from another thread (the client left), ends the work before face detection."""
    image = decode_image(source, options.limits)
    if stop is not None and stop.is_set():
        raise DecodeStopped()
    faces = find_faces(image, detector, options)
    return PreparedImage(to_pixels(crops(image, faces, options)), faces)


def faces_in_frame(frame: Image.Image, detector: FaceDetector | None, options: PipelineOptions) -> list[Face]:
    """A video frame's faces, at most `max_faces`, largest first, searched with the frame's long side at
    `video_face_side`: large enough for each face of a group (about 60 px and up in a 1080p frame), in
    pixels of `frame`."""
    return find_faces(frame, detector, options, long_side=options.video_face_side)


def max_frame_rows(options: PipelineOptions) -> int:
    """The most rows one image or frame gives: its faces, or itself."""
    return options.max_faces if options.detect_faces else 1


def max_video_rows(options: PipelineOptions) -> int:
    """The most rows `prepare_video` gives: every sampled frame's faces, or the frame itself."""
    return options.frames * max_frame_rows(options)


def prepare_video(
    source: Source,
    to_pixels: Preprocess,
    detector: FaceDetector | None,
    options: PipelineOptions,
    stop: threading.Event | None = None,
    *,
    workers: FrameWorkers | None = None,
) -> PreparedVideo:
    """Each sampled frame becomes its faces' crops (`max_faces` at most), or the whole frame when none
    is found. `stop`, set from another thread (the client left), ends decoding and detection early.
    `workers`: where the frames' faces are found and cropped, several at once (None: one after another
    on the calling thread). The answer is the same either way. The calling thread waits for their
    tasks, so it must not be one of their threads."""
    clip = read_video(source, options.frames, options.limits, stop)

    def faces_and_crops(frame: Image.Image) -> tuple[list[Face], list[Image.Image]]:
        if stop is not None and stop.is_set():
            raise DecodeStopped()
        faces = faces_in_frame(frame, detector, options)
        return faces, crops(frame, faces, options)

    if workers is None:
        searched = [faces_and_crops(frame) for frame in clip.frames]
    else:
        searched = _on_workers(workers, faces_and_crops, clip.frames, stop)
    rows, found = [], []
    for frame, (faces, frame_crops) in zip(clip.frames, searched, strict=True):
        rows.extend(frame_crops)
        # The frame may have been decoded smaller than the clip, or at another aspect (a stream that
        # changes size), so each axis maps by its own ratio.
        fx, fy = clip.size[0] / frame.width, clip.size[1] / frame.height
        found.append([face.scaled(fx, fy) for face in faces] if (fx, fy) != (1, 1) else faces)
    # The decoded frames (up to ~100 MB at 1080p) are not kept while the request waits for the encoder.
    return PreparedVideo(to_pixels(rows), dataclasses.replace(clip, frames=[]), found)


@dataclass(frozen=True)
class FrameWorkers:
    """Threads that search sampled frames for faces, shared by every clip: at most `slots` frames
    queued or running at once over all clips, so that a clip alone has every thread while other work in
    the same pool (the service's images) waits behind one round of frames, not behind every clip's."""

    pool: Executor
    slots: threading.Semaphore

    @classmethod
    def sharing(cls, pool: Executor, threads: int) -> FrameWorkers:
        """`threads`: the pool's size."""
        return cls(pool, threading.Semaphore(threads))


def _on_workers(workers: FrameWorkers, task: Callable, items: Sequence, stop: threading.Event | None) -> list:
    """`task` of each item as a task of `workers`, the results in the items' order. A stop, or the first
    failure, cancels the tasks not started and is raised once the started ones have ended, so none
    outlives the call; a stop is seen while waiting too, not only when a task starts. Tasks the pool
    cancels or refuses (the service is stopping) end the work as a stop. Each task runs in the caller's
    context, which carries a request's id to the log lines written there."""
    tasks: list[Future] = []

    def failed() -> bool:
        return any(t.done() and not t.cancelled() and t.exception() is not None for t in tasks)

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    try:
        for item in items:
            while not workers.slots.acquire(timeout=STOP_POLL_S):
                if stopped():
                    raise DecodeStopped()
            if stopped() or failed():
                workers.slots.release()
                break
            try:
                task_of_item = workers.pool.submit(contextvars.copy_context().run, task, item)
            except RuntimeError as exc:  # the pool was shut down: the service is stopping
                workers.slots.release()
                raise DecodeStopped() from exc
            # A cancelled task's callbacks run too: its slot comes back either way.
            task_of_item.add_done_callback(lambda _: workers.slots.release())
            tasks.append(task_of_item)
        while not all(t.done() for t in tasks) and not failed():
            if stopped():
                raise DecodeStopped()
            wait([t for t in tasks if not t.done()], STOP_POLL_S, FIRST_EXCEPTION)
        if stopped():
            raise DecodeStopped()
    finally:
        # Only the tasks that could not be cancelled (running, or done) are waited for: a cancelled one
        # counts as done for `wait` only once a pool thread has dequeued it, which a shut-down pool never does.
        wait([t for t in tasks if not t.cancel()])
    results = []
    for done in tasks:  # a failure comes before the tasks cancelled after it, which started later
        if done.cancelled():
            raise DecodeStopped()  # cancelled by the pool's shutdown
        results.append(done.result())
    return results


def prepare_clip(
    source: Source,
    to_pixels: Preprocess,
    detector: FaceDetector | None,
    options: PipelineOptions,
    stop: threading.Event | None = None,
    *,
    still: bool,
    workers: FrameWorkers | None = None,
) -> PreparedImage | PreparedVideo:
    """An input as a clip (retrieval, evaluation): a still image is a one-frame clip of its largest face
    (or of the whole image); a video gives every face of each sampled frame, as `prepare_video`, for its
    faces to be linked into tracks. `workers` search a video's frames; a still image is prepared on the
    calling thread, which may be one of `workers` and so must not wait on them."""
    if still:
        return prepare_image(source, to_pixels, detector, options.replace(max_faces=1), stop)
    return prepare_video(source, to_pixels, detector, options, stop, workers=workers)


def open_source(path: str | Path) -> BinaryIO:
    """A local file for the stages (the caller closes it)."""
    return open(path, "rb")


# ---- encode -------------------------------------------------------------------------------------
def encode_in_batches(encode: Encode, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The direct encoder of the CLI, evaluation and training: `encode` on chunks of `batch_size` rows,
    the features brought back to the CPU."""
    if batch_size < 1:
        raise ValueError("the batch size must be at least 1")
    return torch.cat([encode(pixels[i : i + batch_size]).cpu() for i in range(0, len(pixels), batch_size)])


def split_rows(
    features: torch.Tensor, prepared: Sequence[PreparedImage | PreparedVideo]
) -> list[torch.Tensor]:
    """The features of several inputs encoded together, back to one tensor per input."""
    return list(torch.split(features, [len(p.pixels) for p in prepared]))


# ---- score --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """Per-row probabilities over `classes` (rows sum to 1)."""

    classes: tuple[str, ...]
    probabilities: torch.Tensor  # [N, C], float32, CPU

    def label(self, row: int) -> str:
        return self.classes[int(self.probabilities[row].argmax())]

    def as_dict(self, row: int) -> dict[str, float]:
        return {c: float(p) for c, p in zip(self.classes, self.probabilities[row].tolist(), strict=True)}


def classify(features: torch.Tensor, text: torch.Tensor, classes: tuple[str, ...]) -> Scores:
    """features [N, D] (projected) -> L2 -> softmax over classes of the logits averaged over each
    class's prompts (the official ensemble averages logits, not text embeddings). text: [C, P, D]."""
    n_classes, n_prompts, dim = text.shape
    features = F.normalize(features.float().to(text.device), dim=-1)
    logits = LOGIT_SCALE * features @ text.reshape(-1, dim).T  # [N, C*P]
    logits = logits.view(-1, n_classes, n_prompts).mean(dim=-1)
    return Scores(classes, logits.softmax(dim=-1).float().cpu())


def pool(frame_features: torch.Tensor) -> torch.Tensor:
    """A clip's feature: the mean of its projected (un-normalised) frame features, then L2."""
    return F.normalize(frame_features.float().mean(dim=0), dim=-1)


# ---- people: a clip's faces linked into tracks ----------------------------------------------------
def frame_boxes(prepared: PreparedImage | PreparedVideo) -> list[list[list[int]]]:
    """The boxes of a prepared input's faces, per frame (a still image is one frame)."""
    frames = prepared.faces if isinstance(prepared, PreparedVideo) else [prepared.faces]
    return [[face.box.as_list() for face in faces] for faces in frames]


def row_count(boxes: FrameBoxes) -> int:
    """How many rows `prepare_video` lays out for these frames: one per face, and one for a frame
    without a face (its whole frame)."""
    return sum(max(1, len(faces)) for faces in boxes)


def face_rows(boxes: FrameBoxes) -> list[list[int]]:
    """Each frame's faces' rows in the clip's features, laid out as `prepare_video` lays them: a frame's
    faces one after another, and one row for a frame without a face (its whole frame, listed nowhere)."""
    rows, start = [], 0
    for faces in boxes:
        rows.append(list(range(start, start + len(faces))))
        start += row_count([faces])
    return rows


@dataclass(frozen=True)
class FaceTrack:
    """One person's faces across a clip's sampled frames, one face per frame at most."""

    id: int  # by first appearance in the clip, from 0
    frames: list[int]  # positions among the sampled frames, in order
    rows: list[int]  # each face's row in the clip's features
    boxes: list[list[int]]  # each face's [x, y, w, h]


def face_tracks(boxes: FrameBoxes, features: torch.Tensor) -> list[FaceTrack]:
    """The people of a clip (model.tracks): its faces (`boxes`, and their projected `features`, one row
    each as `face_rows` says) linked across frames; the main track first (the most frames; ties: the
    larger mean box). Empty when no face was found."""
    rows = face_rows(boxes)
    if len(features) != row_count(boxes):
        raise ValueError(f"{len(features)} feature rows for frames that give {rows}")
    linked = link_faces(boxes, [features[frame_rows] for frame_rows in rows])
    return [
        FaceTrack(
            id=i,
            frames=[frame for frame, _ in linked[i]],
            rows=[rows[frame][face] for frame, face in linked[i]],
            boxes=[[round(v) for v in boxes[frame][face]] for frame, face in linked[i]],
        )
        for i in rank_tracks(linked, boxes)
    ]


@dataclass(frozen=True)
class ClipPeople:
    """A clip's people, and the rows its own answer pools: the main track's faces, or every row (the
    whole frames) when no face was found."""

    tracks: list[FaceTrack]  # main first; empty when no face was found
    rows: list[int]  # the clip's answer's rows, in frame order
    frames: list[int]  # each of `rows`' position among the sampled frames: the clip's timeline

    @property
    def groups(self) -> list[list[int]]:
        """The rows each scored alone, as a clip: each track's, or the whole frames' when there is no
        track. The first group is the clip's answer. Scored alone, the main track's numbers do not
        depend on how many other people there are."""
        return [track.rows for track in self.tracks] or [self.rows]


def clip_people(boxes: FrameBoxes, features: torch.Tensor) -> ClipPeople:
    """A clip's faces (`boxes`, and their projected `features`) as people (`face_tracks`); the clip's
    answer is the main track's, as every endpoint and `fer eval` answer it."""
    tracks = face_tracks(boxes, features)
    if tracks:
        return ClipPeople(tracks, tracks[0].rows, tracks[0].frames)
    every = list(range(len(features)))  # without a face each frame is one row, the whole frame's
    return ClipPeople([], every, every)


@dataclass(frozen=True)
class FacePrediction:
    box: list[int]  # [x, y, w, h] in the original image's pixels
    score: float  # the detector's confidence
    landmarks: list[list[float]] | None  # five [x, y] points (see model.faces.base.Face)
    label: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class ImagePrediction:
    label: str  # of the largest face, or of the whole image
    probabilities: dict[str, float]
    faces: list[FacePrediction]  # largest first
    face_detected: bool
    note: str | None
    classes: list[str]
    prompts: str


@dataclass(frozen=True)
class FramePrediction:
    index: int
    timestamp: float
    face_detected: bool
    label: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class TrackFramePrediction:
    index: int
    timestamp: float
    box: list[int]  # [x, y, w, h] in the clip's pixels
    label: str | None  # with per_frame only
    probabilities: dict[str, float] | None


@dataclass(frozen=True)
class TrackPrediction:
    id: int
    label: str
    probabilities: dict[str, float]  # of the track's pooled frame features
    frames: list[TrackFramePrediction]


@dataclass(frozen=True)
class VideoPrediction:
    label: str  # the main track's (the first), or the whole frames' when no face was found
    probabilities: dict[str, float]
    frames_sampled: int
    n_frames: int
    fps: float
    duration_s: float
    frames_with_face: int
    timeline: list[FramePrediction] | None  # the main track's frames, or every frame
    tracks: list[TrackPrediction]  # main first
    classes: list[str]
    prompts: str


def predict_image(
    prepared: PreparedImage,
    features: torch.Tensor,
    text: torch.Tensor,
    classes: tuple[str, ...],
    prompt_set: str,
    options: PipelineOptions,
) -> ImagePrediction:
    scores = classify(features, text, classes)
    faces = [
        FacePrediction(
            box=face.box.as_list(),
            score=round(float(face.score), 4),
            landmarks=None
            if face.landmarks is None
            else [[round(x, 1), round(y, 1)] for x, y in face.landmarks],
            label=scores.label(row),
            probabilities=scores.as_dict(row),
        )
        for row, face in enumerate(prepared.faces)
    ]
    return ImagePrediction(
        label=scores.label(0),
        probabilities=scores.as_dict(0),
        faces=faces,
        face_detected=bool(faces),
        note=NO_FACE_NOTE if options.detect_faces and not faces else None,
        classes=list(classes),
        prompts=prompt_set,
    )


def sampled_frames(prepared: PreparedImage | PreparedVideo) -> list[tuple[int, float]]:
    """Each sampled frame as answers name it: its index in the clip and its time in seconds (rounded to
    0.1 ms), by its place among the sampled frames. A still image is a one-frame clip: frame 0 at 0 s."""
    if isinstance(prepared, PreparedImage):
        return [(0, 0.0)]
    return [
        (index, round(timestamp, 4))
        for index, timestamp in zip(prepared.clip.indices, prepared.clip.timestamps, strict=True)
    ]


def predict_video(
    prepared: PreparedVideo,
    features: torch.Tensor,
    text: torch.Tensor,
    classes: tuple[str, ...],
    prompt_set: str,
    per_frame: bool,
) -> VideoPrediction:
    """Each person's track pooled and scored as a clip; the clip's answer is the main track's. Without a
    face, the whole frames are pooled as one clip and there is no track."""
    clip = prepared.clip
    people = clip_people(frame_boxes(prepared), features)
    scores = [classify(pool(features[rows]).unsqueeze(0), text, classes) for rows in people.groups]
    clip_scores = scores[0]
    frame_scores = classify(features, text, classes) if per_frame else None

    stamps = sampled_frames(prepared)
    timeline = None
    if frame_scores is not None:
        timeline = [
            FramePrediction(
                index=stamps[frame][0],
                timestamp=stamps[frame][1],
                face_detected=bool(people.tracks),
                label=frame_scores.label(row),
                probabilities=frame_scores.as_dict(row),
            )
            for frame, row in zip(people.frames, people.rows, strict=True)
        ]
    answers = [
        TrackPrediction(
            id=track.id,
            label=track_scores.label(0),
            probabilities=track_scores.as_dict(0),
            frames=[
                TrackFramePrediction(
                    index=stamps[frame][0],
                    timestamp=stamps[frame][1],
                    box=box,
                    label=None if frame_scores is None else frame_scores.label(row),
                    probabilities=None if frame_scores is None else frame_scores.as_dict(row),
                )
                for frame, row, box in zip(track.frames, track.rows, track.boxes, strict=True)
            ],
        )
        for track, track_scores in zip(people.tracks, scores[: len(people.tracks)], strict=True)
    ]
    return VideoPrediction(
        label=clip_scores.label(0),
        probabilities=clip_scores.as_dict(0),
        frames_sampled=len(clip.indices),
        n_frames=clip.n_frames,
        fps=round(clip.fps, 3),
        duration_s=round(clip.duration, 3),
        frames_with_face=sum(prepared.face_found),
        timeline=timeline,
        tracks=answers,
        classes=list(classes),
        prompts=prompt_set,
    )


def media_of(prepared: PreparedImage | PreparedVideo) -> Literal["image", "video"]:
    return "image" if isinstance(prepared, PreparedImage) else "video"


@dataclass(frozen=True)
class RankedDescription:
    index: int  # position in the given descriptions
    text: str
    score: float  # cosine similarity of the projected features


@dataclass(frozen=True)
class FrameScores:
    index: int
    timestamp: float
    scores: list[float]  # each description's cosine with this frame's feature, in the given order


@dataclass(frozen=True)
class TrackFrameScores:
    index: int
    timestamp: float
    box: list[int]  # [x, y, w, h] in the clip's pixels
    scores: list[float] | None  # with per_frame only, as `FrameScores.scores`


@dataclass(frozen=True)
class TrackRanking:
    id: int
    ranking: list[RankedDescription]  # by the cosine with this person's pooled feature
    frames: list[TrackFrameScores]


@dataclass(frozen=True)
class Ranking:
    media: Literal["image", "video"]
    ranking: list[RankedDescription]  # the main track's, or the whole frames' when no face was found
    timeline: list[FrameScores] | None  # the main track's frames, or every frame
    tracks: list[TrackRanking]  # main first


@dataclass(frozen=True)
class GroupScores:
    """Descriptions scored against a group of rows: a clip's frames, or one person's faces."""

    ranking: list[RankedDescription]  # best first, `top_k` at most
    rows: list[list[float]] | None  # when asked for: each row's scores, in the order of the descriptions


def score_descriptions(
    features: torch.Tensor,
    text: torch.Tensor,
    descriptions: Sequence[str],
    top_k: int | None = None,
    per_row: bool = False,
) -> GroupScores:
    """Descriptions ranked by the cosine of their projected, L2-normalised text features ([T, D]) with
    the group's pooled feature (`features`: its rows'); ties keep the given order. `per_row` asks for
    each row's own scores as well: the cosine of its L2-normalised feature with each description's,
    which says when in a clip a description fits."""
    text = text.float()
    scores = (text @ pool(features).to(text.device)).cpu()
    order = torch.argsort(scores, descending=True, stable=True)[:top_k]
    rows = None
    if per_row:
        rows = (F.normalize(features.float(), dim=-1).to(text.device) @ text.T).cpu().tolist()
    return GroupScores(
        [RankedDescription(int(i), descriptions[int(i)], float(scores[i])) for i in order], rows
    )


def rank_descriptions(
    prepared: PreparedImage | PreparedVideo,
    features: torch.Tensor,
    text: torch.Tensor,
    descriptions: Sequence[str],
    top_k: int | None = None,
    per_frame: bool = False,
) -> Ranking:
    """Each person's track ranks the descriptions as a clip would (`score_descriptions` on its faces);
    the clip's ranking and timeline are the main track's, as /predict-video's answer is. Without a face,
    the whole frames rank them and there is no track. A still image is a one-frame clip."""
    people = clip_people(frame_boxes(prepared), features)
    groups = [
        score_descriptions(features[rows], text, descriptions, top_k, per_frame) for rows in people.groups
    ]
    clip = groups[0]
    stamps = sampled_frames(prepared)
    timeline = None
    if clip.rows is not None:
        timeline = [
            FrameScores(*stamps[frame], row) for frame, row in zip(people.frames, clip.rows, strict=True)
        ]
    answers = [
        TrackRanking(
            id=track.id,
            ranking=group.ranking,
            frames=[
                TrackFrameScores(*stamps[frame], box, None if group.rows is None else group.rows[i])
                for i, (frame, box) in enumerate(zip(track.frames, track.boxes, strict=True))
            ],
        )
        for track, group in zip(people.tracks, groups[: len(people.tracks)], strict=True)
    ]
    return Ranking(media_of(prepared), clip.ranking, timeline, answers)
