"""Every entry point takes the same stages with the same options, so they give the same answer for the
same input: the service, the `fer` commands and `fer eval`."""

from __future__ import annotations

import csv
import json

import pytest
from fastapi.testclient import TestClient

from cli.main import main
from service.app import create_app
from service.settings import ServiceSettings
from tests.support import face_image, make_video, png, two_faces, wait_ready


@pytest.fixture
def served(model_env, monkeypatch):
    monkeypatch.setenv("FER_FACE_DETECTOR", "haar")  # finds the astronaut's face; no landmarks needed here
    with TestClient(create_app(ServiceSettings())) as client:
        wait_ready(client)
        yield client


def cli_lines(capsys, *argv) -> list[dict]:
    assert main(list(argv)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def eval_probabilities(capsys, tmp_path, path, *options) -> dict[str, float]:
    """`fer eval` on a one-item data set: the item's probabilities from predictions.csv."""
    data = tmp_path / "data.csv"
    data.write_text(f"file,label\n{path.name},happiness\n")
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--data",
                str(data),
                "--out",
                str(out),
                "--classes",
                "basic7",
                "--prompts",
                "P-4",
                *options,
            ]
        )
        == 0
    )
    capsys.readouterr()
    with (out / "predictions.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    return {k.removeprefix("p_"): float(v) for k, v in row.items() if k.startswith("p_")}


@pytest.mark.parametrize("detect", [True, False])
def test_a_photo_gets_the_same_probabilities_from_the_service_the_cli_and_eval(
    served, capsys, tmp_path, detect
):
    data, _ = two_faces() if detect else (png(face_image(5, size=(150, 120))), None)
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    fields = {"prompts": "P-4", "detect_faces": str(detect).lower()}
    service = served.post("/predict", files={"file": ("photo.png", data, "image/png")}, data=fields).json()
    assert len(service["faces"]) == (2 if detect else 0)

    flag = "--detect-faces" if detect else "--no-detect-faces"
    (cli,) = cli_lines(capsys, "predict", "--prompts", "P-4", flag, str(path))
    assert cli["probabilities"] == pytest.approx(service["probabilities"], abs=1e-6)
    assert [f["box"] for f in cli["faces"]] == [f["box"] for f in service["faces"]]
    for mine, theirs in zip(cli["faces"], service["faces"], strict=True):
        assert mine["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-6)

    # eval scores an item as a one-frame clip of its largest face (its default: detection off)
    evaluated = eval_probabilities(capsys, tmp_path, path, *([flag] if detect else []))
    assert evaluated == pytest.approx(service["probabilities"], abs=1e-5)


def test_a_clip_gets_the_same_probabilities_from_the_service_the_cli_and_eval(served, capsys, tmp_path):
    path = make_video(tmp_path / "clip.mp4", 40)
    fields = {"prompts": "P-4", "frames": "8", "detect_faces": "false"}
    service = served.post(
        "/predict-video", files={"file": ("clip.mp4", path.read_bytes(), "video/mp4")}, data=fields
    ).json()
    (cli,) = cli_lines(
        capsys, "predict-video", "--prompts", "P-4", "--frames", "8", "--no-detect-faces", str(path)
    )
    assert cli["probabilities"] == pytest.approx(service["probabilities"], abs=1e-6)
    assert cli["frames_sampled"] == service["frames_sampled"] == 8
    evaluated = eval_probabilities(capsys, tmp_path, path, "--frames", "8")
    assert evaluated == pytest.approx(service["probabilities"], abs=1e-5)
