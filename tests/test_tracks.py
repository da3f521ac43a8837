"""People in video: the tracker on boxes and features made up here (fast), then clips of several people
moving (the astronaut's face recoloured, model.faces.synthetic) through the real detector, the tiny
model and the pipeline's video path, and the service and `fer predict-video` answers built from it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from model import pipeline
from model.faces.base import Box, Face
from model.faces.synthetic import (
    IOU_MATCH,
    PeopleClip,
    Walk,
    astronaut_face,
    iou,
    people_clip,
    three_people_clip,
)
from model.media import VideoFrames, read_video
from model.options import PipelineOptions
from model.pipeline import (
    PreparedVideo,
    classify,
    clip_people,
    crops,
    encode_in_batches,
    face_rows,
    face_tracks,
    frame_boxes,
    pool,
    predict_video,
    prepare_video,
    row_count,
)
from model.prompts import BASIC7
from model.tracks import MEMORY, link_faces, rank_tracks
from service.admission import Admission, Places, TooLarge
from tests.support import people_walks, service_settings

DIM = 32


# ---- the tracker alone -----------------------------------------------------------------------------
def looks(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(DIM, generator=generator) for _ in range(n)]


def frames_of(people: list[list[list[float] | None]], features: list[torch.Tensor], seed: int = 1):
    """Per frame, each person's box (None: not seen) -> the tracker's input, faces in a shuffled order
    (a detector lists them by size, not by person), and which person each face is."""
    generator = torch.Generator().manual_seed(seed)
    boxes, feats, whose = [], [], []
    for frame in people:
        seen = [p for p, box in enumerate(frame) if box is not None]
        order = [seen[i] for i in torch.randperm(len(seen), generator=generator).tolist()]
        boxes.append(torch.tensor([frame[p] for p in order], dtype=torch.float64).reshape(-1, 4))
        noisy = [features[p] + 0.2 * torch.randn(DIM, generator=generator) for p in order]
        feats.append(torch.stack(noisy) if noisy else torch.zeros(0, DIM))
        whose.append(order)
    return boxes, feats, whose


def owners(tracks, whose) -> list[list[int]]:
    return [[whose[frame][face] for frame, face in track] for track in tracks]


def test_two_people_crossing_keep_their_tracks_where_only_the_front_one_is_seen():
    a, b = looks(2)
    people = []
    for t in range(16):
        u = t / 15
        front = [100 + 800 * u, 300, 100, 100]
        back = [900 - 800 * u, 320, 100, 100]
        people.append([front, back if abs(front[0] - back[0]) > 80 else None])
    boxes, features, whose = frames_of(people, [a, b])
    tracks = link_faces(boxes, features)
    assert sorted(map(tuple, (set(o) for o in owners(tracks, whose)))) == [(0,), (1,)]
    assert sorted(len(t) for t in tracks) == [14, 16]


def test_motion_carries_look_alikes_through_a_crossing():
    """Two people who look the same cross, the one behind hidden around the meeting point: where they
    come out, each track's velocity (not the last place it was seen) picks its person."""
    (a,) = looks(1)
    people = []
    for t in range(12):
        front = [200 + 60 * t, 100, 80, 80]
        back = [860 - 60 * t, 100, 80, 80]
        people.append([front, back if abs(front[0] - back[0]) > 180 else None])
    assert sum(frame[1] is None for frame in people) >= 3
    boxes, features, whose = frames_of(people, [a, a])
    tracks = link_faces(boxes, features)
    assert sorted((sorted(set(o)), len(o)) for o in owners(tracks, whose)) == [([0], 12), ([1], 8)]


@pytest.mark.parametrize("seed", range(4))
def test_appearance_decides_where_the_motion_cannot(seed):
    """Two people meet at one spot, where the only face found is the one in front: it goes to the track
    it looks like, and the other track goes on past the gap."""
    a, b = looks(2)
    people = [
        [[100, 100, 80, 80], [500, 100, 80, 80]],
        [[200, 100, 80, 80], [400, 100, 80, 80]],
        [None, [300, 100, 80, 80]],  # both are predicted here; only b is seen
        [[400, 100, 80, 80], [200, 100, 80, 80]],
    ]
    boxes, features, whose = frames_of(people, [a, b], seed)  # whichever track the solver sees first
    tracks = link_faces(boxes, features)
    assert sorted((sorted(set(o)), len(o)) for o in owners(tracks, whose)) == [([0], 3), ([1], 4)]


@pytest.mark.parametrize(("hidden", "tracks_expected"), [(MEMORY, 1), (MEMORY + 1, 2)])
def test_a_track_waits_a_few_frames_for_a_hidden_person(hidden, tracks_expected):
    """Walking steadily, unseen for `hidden` sampled frames: predicted through MEMORY frames, a new track
    after that."""
    (a,) = looks(1)
    people = [[[50.0 * t, 100, 60, 60] if not 3 <= t < 3 + hidden else None] for t in range(12)]
    boxes, features, _ = frames_of(people, [a])
    assert len(link_faces(boxes, features)) == tracks_expected


def test_a_newcomer_beside_a_hidden_person_takes_neither_track():
    """A and B side by side; B goes behind something as C walks in on A's other side. The solver must
    pair as many tracks and faces as it can, so without the choice of leaving a track unmatched A took C
    and B took A's face: a swap, though A's own face was its best match by far."""
    a, b, c = looks(3)
    people = [
        [[0, 0, 50, 50], [60, 0, 50, 50], None],
        [[10, 0, 50, 50], None, [-60, 0, 50, 50]],
    ]
    boxes, features, whose = frames_of(people, [a, b, c])
    assert sorted(sorted(set(o)) for o in owners(link_faces(boxes, features), whose)) == [[0], [1], [2]]


def test_a_face_that_jumps_too_far_or_changes_size_too_much_opens_a_new_track():
    (a,) = looks(1)
    for jump in ([100, 100, 60, 60], [1000, 100, 60, 60], [100, 100, 200, 200]):
        people = [[[100, 100, 60, 60]], [[100, 100, 60, 60]], [jump]]
        boxes, features, _ = frames_of(people, [a])
        expected = 1 if jump == [100, 100, 60, 60] else 2
        assert len(link_faces(boxes, features)) == expected, jump


def test_tracks_rank_by_frames_then_by_size():
    boxes = [
        [[0, 0, 10, 10], [50, 0, 20, 20], [100, 0, 5, 5]],
        [[0, 0, 10, 10], [50, 0, 20, 20]],
    ]
    tracks = [[(0, 2)], [(0, 0), (1, 0)], [(0, 1), (1, 1)]]
    assert rank_tracks(tracks, boxes) == [2, 1, 0]


def test_rows_of_frames_with_and_without_faces():
    boxes = [[[0, 0, 10, 10], [20, 0, 10, 10]], [], [[0, 0, 10, 10]]]
    assert face_rows(boxes) == [[0, 1], [], [3]]
    features = torch.randn(4, DIM)
    tracks = face_tracks(boxes, features)
    assert [t.rows for t in tracks] == [[0, 3], [1]] and [t.frames for t in tracks] == [[0, 2], [0]]
    assert row_count(boxes) == 4
    people = clip_people(boxes, features)
    assert (people.rows, people.frames, people.groups) == ([0, 3], [0, 2], [[0, 3], [1]])
    nobody = clip_people([[], []], features[:2])  # no face: every row, the whole frames
    assert (nobody.tracks, nobody.rows, nobody.frames, nobody.groups) == ([], [0, 1], [0, 1], [[0, 1]])
    with pytest.raises(ValueError, match="feature rows"):
        face_tracks(boxes, features[:3])


def test_boxes_map_to_the_clip_s_pixels_along_each_axis(monkeypatch):
    """A frame decoded at another aspect than the clip's declared size (a stream that changes size, a
    stored aspect ratio): x and w scale by the widths, y and h by the heights."""
    frame = Image.new("RGB", (640, 360))
    clip = VideoFrames([frame], [0], [0.0], n_frames=1, fps=25.0, duration=0.04, size=(1280, 1080))
    monkeypatch.setattr(pipeline, "read_video", lambda *args, **kwargs: clip)

    class OneFace:
        def detect(self, image, max_faces, long_side=None):
            return [Face(Box(100, 100, 40, 40), 0.9, ((110.0, 110.0),) * 5)]

    def to_pixels(images):
        return torch.zeros(len(images), 3, 8, 8, dtype=torch.uint8)

    prepared = prepare_video(b"", to_pixels, OneFace(), PipelineOptions(frames=1))
    ((face,),) = prepared.faces
    assert face.box == Box(200, 300, 80, 120)
    assert face.landmarks[0] == (220.0, 330.0)


def test_a_frame_where_the_face_was_missed_is_left_out_of_a_one_person_answer():
    """docs/faces.md and docs/method.md say so: the whole frame counts only when the clip has no face."""
    faces = [[Face(Box(10, 10, 40, 40), 0.9)], [], [Face(Box(14, 10, 40, 40), 0.9)]]
    clip = VideoFrames([], [0, 5, 10], [0.0, 0.2, 0.4], n_frames=12, fps=25.0, duration=0.48, size=(64, 64))
    prepared = PreparedVideo(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), clip, faces)
    features = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))
    text = torch.nn.functional.normalize(torch.randn(len(BASIC7), 2, DIM), dim=-1)
    answer = predict_video(prepared, features, text, BASIC7, "P-3", per_frame=True)
    assert answer.probabilities == classify(pool(features[[0, 2]]).unsqueeze(0), text, BASIC7).as_dict(0)
    assert answer.probabilities != classify(pool(features).unsqueeze(0), text, BASIC7).as_dict(0)
    assert [f.index for f in answer.timeline] == [0, 10] and answer.frames_with_face == 2


# ---- clips of people, through the detector and the tiny model --------------------------------------
def predict(engine, detector, path: Path, frames: int = 16, per_frame: bool = True):
    options = PipelineOptions(frames=frames)
    with open(path, "rb") as source:
        prepared = prepare_video(source, engine.prepare_many, detector, options)
    features = encode_in_batches(engine.encode_pixels, prepared.pixels, 64)
    text = engine.class_features(BASIC7, "P-3")
    return prepared, features, predict_video(prepared, features, text, BASIC7, "P-3", per_frame)


def check_people(clip: PeopleClip, sampled: list[int], tracks) -> None:
    """One track per person, whose boxes are on that person in >= 95% of its frames and which has
    >= 90% of the sampled frames where the person is visible."""
    people = len(clip.boxes[0])
    assert len(tracks) == people, [[f.index for f in t.frames] for t in tracks]
    found = {}
    for track in tracks:
        on = []
        for frame in track.frames:
            truth = [iou(Box(*frame.box), box) if box else 0.0 for box in clip.boxes[frame.index]]
            best = max(range(people), key=truth.__getitem__)
            on.append(best if truth[best] >= IOU_MATCH else None)
        person, count = Counter(on).most_common(1)[0]
        assert person is not None and count >= 0.95 * len(on), (track.id, on)
        assert person not in found, f"two tracks on person {person}"
        found[person] = {f.index for f, p in zip(track.frames, on, strict=True) if p == person}
    for person, frames in found.items():
        visible = {i for i in sampled if clip.visible[i][person]}
        assert len(visible & frames) >= 0.9 * len(visible), (person, sorted(visible - frames))


@pytest.mark.parametrize("scene", ["sizes swap", "one enters late", "two cross", "one passes behind"])
def test_each_person_gets_one_track_that_stays_on_them(engine, detector, person, scene, tmp_path):
    clip = people_clip(tmp_path / "people.mp4", people_walks(scene, person))
    prepared, _, answer = predict(engine, detector, clip.path)
    sampled = prepared.clip.indices
    check_people(clip, sampled, answer.tracks)
    if scene == "one passes behind":  # the scene does hide someone for a few sampled frames
        assert sum(not clip.visible[i][0] for i in sampled) >= 3
    main = answer.tracks[0]
    assert answer.label == main.label and answer.probabilities == main.probabilities
    assert [f.index for f in answer.timeline] == [f.index for f in main.frames]
    assert [f.probabilities for f in answer.timeline] == [f.probabilities for f in main.frames]
    assert [t.id for t in answer.tracks] != [] and sorted(t.id for t in answer.tracks) == list(
        range(len(answer.tracks))
    )
    lengths = [len(t.frames) for t in answer.tracks]
    assert lengths == sorted(lengths, reverse=True)


def test_each_track_is_pooled_as_a_clip_is(engine, detector, person, tmp_path):
    clip = people_clip(tmp_path / "people.mp4", people_walks("sizes swap", person))
    prepared, features, answer = predict(engine, detector, clip.path, per_frame=False)
    tracks = face_tracks(frame_boxes(prepared), features)
    text = engine.class_features(BASIC7, "P-3")
    for track, answered in zip(tracks, answer.tracks, strict=True):
        expected = classify(pool(features[track.rows]).unsqueeze(0), text, BASIC7)
        assert answered.probabilities == expected.as_dict(0)
        assert all(f.label is None and f.probabilities is None for f in answered.frames)
    assert answer.timeline is None


def test_one_person_answers_exactly_as_the_largest_face_of_each_frame(engine, detector, person, tmp_path):
    """The path before tracks: each sampled frame replaced by its largest face's crop, the crops' features
    pooled. With one person the clip's answer, its timeline and its one track are those numbers."""
    walk = Walk(person, (0.3, 0.4), (0.6, 0.55), (0.1, 0.14))
    clip = people_clip(tmp_path / "one.mp4", [walk])
    prepared, _, answer = predict(engine, detector, clip.path)
    options = PipelineOptions(frames=16)
    frames = read_video(str(clip.path), 16).frames
    largest = [
        crops(frame, detector.detect(frame, 1, long_side=options.video_face_side), options)
        for frame in frames
    ]
    assert all(len(faces) == 1 for faces in prepared.faces)
    features = encode_in_batches(engine.encode_pixels, engine.prepare_many([c for (c,) in largest]), 64)
    text = engine.class_features(BASIC7, "P-3")
    before = classify(pool(features).unsqueeze(0), text, BASIC7)
    per_frame = classify(features, text, BASIC7)
    assert answer.probabilities == before.as_dict(0) and answer.label == before.label(0)
    assert [f.probabilities for f in answer.timeline] == [per_frame.as_dict(i) for i in range(16)]
    assert [f.index for f in answer.timeline] == prepared.clip.indices
    (track,) = answer.tracks
    assert track.probabilities == answer.probabilities and len(track.frames) == 16


def test_no_face_or_detection_off_pools_the_whole_frames(engine, detector, tmp_path):
    from tests.support import encode_images, make_video

    path = make_video(tmp_path / "c.mp4", 40)
    text = engine.class_features(BASIC7, "P-3")
    expected = classify(
        pool(encode_images(engine, read_video(str(path), 8).frames)).unsqueeze(0), text, BASIC7
    )
    for found in (detector, None):
        _, _, answer = predict(engine, found, path, frames=8)
        assert answer.tracks == [] and answer.frames_with_face == 0
        assert answer.probabilities == pytest.approx(expected.as_dict(0), abs=1e-6)
        assert [f.face_detected for f in answer.timeline] == [False] * 8


def test_small_faces_of_a_1080p_frame_are_found(engine, detector, tmp_path):
    """Three people at 1080p, the smallest face 60 px wide: found at the video search side (960 px) in
    most frames, where the photos' side (640 px) misses it; each person gets a track."""
    clip = three_people_clip(tmp_path / "three.mp4", astronaut_face(), n_frames=48)
    prepared, _, answer = predict(engine, detector, clip.path)
    assert prepared.clip.size == (1920, 1080)
    assert len(answer.tracks) == 3
    small = min(answer.tracks, key=lambda t: t.frames[0].box[2])
    assert len(small.frames) >= 12
    frames = read_video(str(clip.path), 16).frames
    at_photo_side = sum(len(detector.detect(frame, 10)) for frame in frames)
    assert at_photo_side <= sum(len(t.frames) for t in answer.tracks) - 10


def test_fer_eval_pools_each_clip_s_main_track(engine, detector, person, tmp_path):
    """`fer eval` (and its Ray path, which calls the same encode_chunk) scores a clip as the service
    answers it: by its main track, the plain-CLIP feature pooled over the same faces."""
    from model.evaluate.features import encode_items

    clip = people_clip(tmp_path / "people.mp4", people_walks("one enters late", person))
    encoded = encode_items(engine, [clip.path], PipelineOptions(frames=16), detector=detector)
    prepared, features, answer = predict(engine, detector, clip.path)
    main = face_tracks(frame_boxes(prepared), features)[0]
    assert [prepared.clip.indices[f] for f in main.frames] == [f.index for f in answer.tracks[0].frames]
    torch.testing.assert_close(encoded.features[0], pool(features[main.rows]))
    assert not torch.allclose(encoded.features[0], pool(features), atol=1e-3)
    raw = encode_in_batches(engine.embed_pixels, prepared.pixels, 64)
    torch.testing.assert_close(encoded.clip_features[0], pool(raw[main.rows]))


# ---- admission, the service and the command ----------------------------------------------------------
def test_a_video_is_admitted_as_its_frames_then_the_faces_they_give():
    """A place a frame before decoding; the most its frames' faces may give must fit at all."""
    from types import SimpleNamespace

    from service.inference import predict_video as video_work

    call = SimpleNamespace(
        options=PipelineOptions(frames=16, max_faces=6), runtime=SimpleNamespace(decode_pool=None)
    )
    work = video_work(call, None, False)
    assert work.rows == Places(frames=16) and work.most_rows == Places(frames=96)
    call.options = call.options.replace(detect_faces=False)
    work = video_work(call, None, False)
    assert work.rows == work.most_rows == Places(frames=16)
    admission = Admission(1000, request_share=90)
    with pytest.raises(TooLarge, match=r"FER_MAX_FACES a frame.*at most 90 \(FER_MAX_REQUEST_ITEMS\)"):
        admission.reserve(frames=16, most=Places(frames=96))


def test_settings_that_cannot_hold_a_video_of_faces_are_refused():
    from service.settings import ServiceSettings

    with pytest.raises(ValueError, match="FER_MAX_FRAMES x FER_MAX_FACES"):
        ServiceSettings(max_faces=20)  # 64 frames x 20 faces: more than one request may hold
    assert ServiceSettings(max_faces=20, max_frames=32).max_faces == 20


def test_the_service_answers_with_tracks(engine, person, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.support import wait_ready

    clip = people_clip(tmp_path / "people.mp4", people_walks("sizes swap", person))
    app = create_app(
        service_settings(face_detector="retinaface", max_faces=4), engine_factory=lambda s: engine
    )
    with TestClient(app) as client:
        wait_ready(client)
        admission, batcher = app.state.runtime.admission, app.state.runtime.batcher
        asked, held = [], []
        reserve, submit = admission.reserve, batcher.submit
        monkeypatch.setattr(admission, "reserve", lambda **places: asked.append(places) or reserve(**places))
        monkeypatch.setattr(
            batcher, "submit", lambda *a, **k: held.append(admission.depth) or submit(*a, **k)
        )
        answer = client.post(
            "/predict-video",
            files={"file": ("people.mp4", clip.path.read_bytes(), "video/mp4")},
            data={"frames": "8", "per_frame": "true"},
        )
        body = answer.json()
        assert answer.status_code == 200, body
        # before decoding, a place a frame, and every face the frames may give must fit at all
        assert asked[0]["frames"] == 8 and asked[0]["most"] == Places(frames=8 * 4)
        assert held == [8 * 2]  # once decoded, the faces found: two people in each frame
        assert admission.depth == 0
    assert len(body["tracks"]) == 2 and body["frames_with_face"] == 8
    main = body["tracks"][0]
    assert set(main) == {"id", "label", "probabilities", "frames"}
    assert set(main["frames"][0]) == {"index", "timestamp", "box", "label", "probabilities"}
    assert body["label"] == main["label"] and body["probabilities"] == main["probabilities"]
    assert [f["index"] for f in body["timeline"]] == [f["index"] for f in main["frames"]]
    assert [f["timestamp"] for f in body["timeline"]] == [f["timestamp"] for f in main["frames"]]


def test_fer_predict_video_prints_the_same_tracks(model_env, engine, detector, person, tmp_path, capsys):
    from cli.main import main

    clip = people_clip(tmp_path / "people.mp4", people_walks("two cross", person))
    assert main(["predict-video", "--per-frame", str(clip.path)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    _, _, answer = predict(engine, detector, clip.path)
    assert len(row["tracks"]) == 2
    for printed, track in zip(row["tracks"], answer.tracks, strict=True):
        assert printed["id"] == track.id and [f["box"] for f in printed["frames"]] == [
            f.box for f in track.frames
        ]
        assert printed["probabilities"] == pytest.approx(track.probabilities, abs=1e-6)
