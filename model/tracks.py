"""A clip's faces linked into one track per person, across its sampled frames.

The frames are sparse (16 to 64 over a whole clip), so a person moves far between two of them and may
be hidden behind another for a few. Each track keeps a constant-velocity motion model of its box
(centre and log size, per sampled frame) and an appearance: a running mean of its faces' projected
CLIP features, which the encoder computes anyway. At each frame, every live track's predicted box is
compared with every face found there, and the one-to-one matching of least total cost is solved
exactly (`scipy.optimize.linear_sum_assignment`). The cost adds how little the boxes overlap, how far
the face is from the prediction (in box sizes per sampled frame), and how unlike the track's appearance
it looks; a face too far or too differently sized from every prediction opens a track of its own, and a
track may take no face rather than a poor one (UNMATCHED_COST). A track that finds no face keeps
predicting for up to MEMORY sampled frames, so a person hidden for a moment keeps their track; one gone
longer gets a new track when they come back.

Why our own cost over scipy's solver rather than a tracking library: the SORT family (SORT, ByteTrack,
OC-SORT, norfair) assumes dense frames, where boxes overlap from one frame to the next and a Kalman
filter's noise is tuned per frame, and DeepSORT-style appearance needs a re-identification network of
its own. Here the appearance comes free from the encoder, the steps are long, and the whole problem is
a few faces over a few dozen frames: small enough to solve exactly.

Pure functions of boxes `[x, y, w, h]` (any pixel unit) and feature tensors: nothing here knows the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# A track unmatched for more than this many sampled frames ends: a person hidden behind another for a
# few frames keeps their track, while a stale prediction does not wander into a newcomer.
MEMORY = 4
# Gates: a face whose centre is more than MAX_SHIFT box sizes per sampled frame from a track's
# prediction, or whose size differs from it by more than MAX_SIZE_RATIO, is never that track's.
MAX_SHIFT = 1.5
MAX_SIZE_RATIO = 1.8
# The cost's parts, each in [0, 1] or near it: overlap, distance and appearance weigh alike; a track
# seen less recently pays a little more, so that a visible person's track wins a tie with a hidden one's.
WEIGHT_OVERLAP = 1.0
WEIGHT_SHIFT = 1.0
WEIGHT_APPEARANCE = 1.0
GAP_COST = 0.1
# How much of a track's velocity and appearance is kept when it takes a new face: smoothing over the
# detector's jitter without losing a real change of direction.
KEEP_VELOCITY = 0.5
KEEP_APPEARANCE = 0.7
IMPOSSIBLE = 1e6  # the cost given to a gated pair, so the solver uses it only when nothing else is left
# What a live track pays for taking no face at a frame. The solver pairs as many rows and columns as it
# can, so without this choice a hidden person's track would take a newcomer's face and push its
# neighbour onto a worse one; a pair dearer than this is never made.
UNMATCHED_COST = 3.0


@dataclass
class _Track:
    """A track being built: its faces as (frame, face) positions, and its motion and appearance state."""

    faces: list[tuple[int, int]]
    state: np.ndarray  # centre x, centre y, log w, log h at the last face
    appearance: torch.Tensor  # unit vector
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # state change per sampled frame

    @property
    def last_frame(self) -> int:
        return self.faces[-1][0]

    def predict(self, frame: int) -> np.ndarray:
        return self.state + self.velocity * (frame - self.last_frame)

    def take(self, frame: int, face: int, state: np.ndarray, feature: torch.Tensor) -> None:
        step = (state - self.state) / (frame - self.last_frame)
        self.velocity = (
            step if len(self.faces) == 1 else KEEP_VELOCITY * self.velocity + (1 - KEEP_VELOCITY) * step
        )
        self.appearance = F.normalize(
            KEEP_APPEARANCE * self.appearance + (1 - KEEP_APPEARANCE) * feature, dim=0
        )
        self.state = state
        self.faces.append((frame, face))


def box_states(boxes: torch.Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """[n, 4] boxes `[x, y, w, h]` -> [n, 4] states (centre x, centre y, log w, log h)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    size = np.maximum(b[:, 2:], 1e-6)
    return np.concatenate([b[:, :2] + size / 2, np.log(size)], axis=1)


def state_boxes(states: np.ndarray) -> np.ndarray:
    """The inverse of `box_states`."""
    size = np.exp(states[:, 2:])
    return np.concatenate([states[:, :2] - size / 2, size], axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of [n, 4] and [m, 4] boxes `[x, y, w, h]` -> [n, m]."""
    ax1, ay1, ax2, ay2 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx1, by1, bx2, by2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    inter = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None) * np.clip(
        np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None
    )
    union = a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_cost(
    predicted: np.ndarray,
    gaps: np.ndarray,
    appearances: torch.Tensor,
    states: np.ndarray,
    features: torch.Tensor,
) -> np.ndarray:
    """[tracks, faces] cost of giving each face to each track; IMPOSSIBLE where the gates say never.

    `predicted`: the tracks' predicted states [t, 4]; `gaps`: sampled frames since each track's last face
    [t]; `appearances`: their unit appearance vectors [t, D]; `states`, `features`: the faces' [f, 4],
    [f, D] (features need not be normalised)."""
    overlap = iou_matrix(state_boxes(predicted), state_boxes(states))
    size = np.exp((predicted[:, None, 2] + predicted[:, None, 3]) / 2)  # the prediction's side, sqrt(w*h)
    distance = np.linalg.norm(predicted[:, None, :2] - states[None, :, :2], axis=2) / size
    shift = distance / gaps[:, None]  # box sizes per sampled frame
    size_change = np.abs(
        (predicted[:, None, 2:] - states[None, :, 2:]).sum(axis=2) / 2
    )  # |log area ratio| / 2
    unlike = 1.0 - (appearances @ F.normalize(features.float(), dim=1).T).numpy().astype(np.float64)
    cost = (
        WEIGHT_OVERLAP * (1.0 - overlap)
        + WEIGHT_SHIFT * np.minimum(shift / MAX_SHIFT, 1.0)
        + WEIGHT_APPEARANCE * unlike
        + GAP_COST * (gaps[:, None] - 1)
    )
    gated = (shift > MAX_SHIFT) | (size_change > math.log(MAX_SIZE_RATIO))
    return np.where(gated, IMPOSSIBLE, cost)


def link_faces(
    boxes: Sequence[torch.Tensor | np.ndarray | Sequence[Sequence[float]]], features: Sequence[torch.Tensor]
) -> list[list[tuple[int, int]]]:
    """Per sampled frame, its faces' boxes [n, 4] and features [n, D] -> the tracks, each a list of
    (frame, face) positions in frame order, one face per frame at most; tracks in order of their first
    face (see `rank_tracks` for the order an answer gives)."""
    if len(boxes) != len(features):
        raise ValueError(f"{len(boxes)} frames of boxes but {len(features)} of features")
    live: list[_Track] = []
    ended: list[_Track] = []
    for frame, (frame_boxes, frame_features) in enumerate(zip(boxes, features, strict=True)):
        states = box_states(frame_boxes)
        if len(states) != len(frame_features):
            raise ValueError(f"frame {frame}: {len(states)} boxes but {len(frame_features)} features")
        ended += [t for t in live if frame - t.last_frame > MEMORY + 1]
        live = [t for t in live if frame - t.last_frame <= MEMORY + 1]
        unit = F.normalize(torch.as_tensor(frame_features).float(), dim=-1)
        taken: set[int] = set()
        if live and len(states):
            predicted = np.stack([t.predict(frame) for t in live])
            gaps = np.array([frame - t.last_frame for t in live], dtype=np.float64)
            appearances = torch.stack([t.appearance for t in live])
            cost = match_cost(predicted, gaps, appearances, states, unit)
            n_tracks, n_faces = cost.shape
            choices = np.full((n_tracks, n_faces + n_tracks), IMPOSSIBLE)  # each track's own "no face"
            choices[:, :n_faces] = cost
            choices[np.arange(n_tracks), n_faces + np.arange(n_tracks)] = UNMATCHED_COST
            for row, col in zip(*linear_sum_assignment(choices), strict=True):
                if col < n_faces and cost[row, col] < IMPOSSIBLE:
                    live[row].take(frame, int(col), states[col], unit[col])
                    taken.add(int(col))
        for face in range(len(states)):
            if face not in taken:
                live.append(_Track([(frame, face)], states[face], unit[face]))
    return [t.faces for t in sorted(ended + live, key=lambda t: t.faces[0])]


def rank_tracks(
    tracks: Sequence[Sequence[tuple[int, int]]], boxes: Sequence[torch.Tensor | np.ndarray | Sequence]
) -> list[int]:
    """The order an answer gives the tracks: most frames first; ties: the larger mean box area first,
    then the earlier first face. Returns positions in `tracks`."""

    def area(track: Sequence[tuple[int, int]]) -> float:
        return float(np.mean([_area(boxes[frame], face) for frame, face in track]))

    return sorted(range(len(tracks)), key=lambda i: (-len(tracks[i]), -area(tracks[i]), tracks[i][0]))


def _area(frame_boxes, face: int) -> float:
    box = np.asarray(frame_boxes, dtype=np.float64).reshape(-1, 4)[face]
    return float(box[2] * box[3])
