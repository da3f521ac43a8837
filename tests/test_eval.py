"""`fer eval` / `fer eval-retrieval`: the metrics against sklearn and hand-worked cases, the one-pass
encoding, and both commands end to end on the tiny random model with generated data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

from cli.main import main
from model.evaluate.data import DatasetError, choose_classes, take_subset
from model.evaluate.features import encode_items
from model.evaluate.metrics import classification_metrics, feature_variance, retrieval_metrics, spread
from model.evaluate.models import model_choices
from model.evaluate.plots import feature_variance_figure, precision_at_k_figure
from model.media import decode_image, read_video
from model.options import PipelineOptions
from model.pipeline import pool
from model.prompts import BASIC7, BASIC8
from model.settings import ModelSettings
from tests.conftest import SHARED_DATA, encode_images, face_image, make_video, needs_shared

FRAMES = 4


# ---- metrics -------------------------------------------------------------------------------------
def test_hand_worked_uar_war_with_a_class_without_items():
    # class 0: 1 of 2 right; class 1: 2 of 3 right; class 2 has no items but is predicted once.
    result = classification_metrics(np.array([0, 0, 1, 1, 1]), np.array([0, 2, 1, 1, 0]), ("a", "b", "c"))
    assert result["per_class_recall"] == {"a": 50.0, "b": pytest.approx(200 / 3), "c": None}
    assert result["uar"] == pytest.approx((50 + 200 / 3) / 2)
    assert result["war"] == pytest.approx(60.0)
    assert result["per_class_n"] == {"a": 2, "b": 3, "c": 0}
    assert result["confusion"] == [[0.5, 0.0, 0.5], pytest.approx([1 / 3, 2 / 3, 0.0]), [0.0, 0.0, 0.0]]


def test_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    n_classes = 6
    labels = rng.choice([0, 1, 2, 4, 5], size=200)  # class 3 has no items
    predictions = np.where(rng.random(200) < 0.4, labels, rng.integers(0, n_classes, 200))
    result = classification_metrics(labels, predictions, tuple("abcdef"))
    present = sorted(set(labels.tolist()))
    assert result["uar"] == pytest.approx(
        100 * recall_score(labels, predictions, labels=present, average="macro")
    )
    assert result["war"] == pytest.approx(100 * accuracy_score(labels, predictions))
    expected = confusion_matrix(labels, predictions, labels=range(n_classes), normalize="true")
    np.testing.assert_allclose(result["confusion"], np.nan_to_num(expected))
    assert result["per_class_recall"]["d"] is None


def test_feature_variance_is_dimension_free_and_per_class():
    two = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert spread(two) == pytest.approx(0.5)  # 1 - |mean|^2 for unit rows
    padded = np.hstack([two, np.zeros((2, 510))])
    assert spread(padded) == pytest.approx(spread(two))
    features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    result = feature_variance(features, np.array([0, 0, 1, 1, 3]), ("same", "spread", "empty", "single"))
    assert result["per_class"]["same"] == 0.0
    assert result["per_class"]["single"] is None  # one item has no spread: not a zero
    figure = feature_variance_figure(
        {"m": {"clip": result, "projected": result}}, ("same", "spread", "empty", "single")
    )
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert labels == ["n/a", "n/a"]  # the empty class and the single-item one
    assert result["per_class"]["spread"] == pytest.approx(spread(features[2:4]))
    assert result["per_class"]["empty"] is None and result["relative"]["empty"] is None
    assert result["relative"]["spread"] == pytest.approx(spread(features[2:4]) / spread(features))


def test_hand_worked_retrieval():
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.8, 0.1]])
    relevant = [frozenset({2}), frozenset({0, 3})]
    # item 0 ranks 1,2,3,0: first relevant at 2. Item 1 ranks 0,2,1,3 (tie kept in order): first at 1.
    result = retrieval_metrics(scores, relevant, [1, 2, 4])
    assert result["first_relevant_rank"] == [2, 1]
    assert result["precision_at_k"] == pytest.approx({"1": 0.5, "2": 0.5, "4": (1 / 4 + 2 / 4) / 2})
    assert result["recall_at_k"] == pytest.approx({"1": 0.25, "2": 0.75, "4": 1.0})
    assert result["mrr"] == pytest.approx(0.75)
    assert result["chance_precision"] == pytest.approx((1 + 2) / 2 / 4)  # mean relevant / descriptions
    figure = precision_at_k_figure({"m": result["precision_at_k"]}, 2, result["chance_precision"])
    ax = figure.axes[0]
    assert ax.get_title() == "Description retrieval: precision at k, 2 items"
    assert [line.get_ydata()[0] for line in ax.lines] == [pytest.approx(0.375)]


# ---- data and model choice -----------------------------------------------------------------------
def test_class_inference_and_unknown_labels():
    assert choose_classes(["happiness", "Sadness "], None) == BASIC7
    assert choose_classes(["happiness", "contempt"], None) == BASIC8
    assert choose_classes(["calm", "amused"], None) == ("amused", "calm")
    assert choose_classes(["happiness"], "ferplus") == BASIC8
    with pytest.raises(DatasetError, match="amused, calm"):
        choose_classes(["happiness", "calm", "amused"], "basic7")


def test_limit_is_a_seeded_ordered_subset():
    items = list(range(100))
    subset = take_subset(items, 10, seed=0)
    assert subset == take_subset(items, 10, seed=0) == sorted(subset) and len(set(subset)) == 10
    assert subset != take_subset(items, 10, seed=1) and subset != items[:10]
    assert take_subset(items, 500, seed=0) == items


def test_model_entries(model_env, official_projection_path):
    base = ModelSettings()
    choices = model_choices(f"{official_projection_path},none", base)
    assert [c.name for c in choices] == [official_projection_path.stem, "none"]
    assert choices[0].settings.resolve().projection == official_projection_path
    assert choices[1].settings.resolve().projection is None
    # A preset is the preset as registered, whatever FER_PROJECTION says; its missing weights fail early.
    with pytest.raises(FileNotFoundError, match="fer weights download clip-b32"):
        model_choices("clip-b32", base)
    with pytest.raises(ValueError, match="neither a preset"):
        model_choices("no-such-model", base)
    assert model_choices(None, base)[0].name == "custom"


# ---- encoding ------------------------------------------------------------------------------------
def test_one_encoder_pass_gives_the_engines_features(engine, tmp_path):
    face_image(5).save(tmp_path / "a.png")
    make_video(tmp_path / "b.mp4", 12)
    pixels = engine.prepare_many([face_image(6)])
    torch.testing.assert_close(engine.project(engine.embed_pixels(pixels)), engine.encode_pixels(pixels))

    options = PipelineOptions(detect_faces=False, frames=FRAMES)
    encoded = encode_items(engine, [tmp_path / "a.png", tmp_path / "b.mp4", tmp_path / "gone.png"], options)
    assert encoded.kept == [0, 1] and list(encoded.failures) == [2]
    expected = torch.stack(
        [
            F.normalize(encode_images(engine, [decode_image(tmp_path / "a.png")])[0], dim=-1),
            pool(encode_images(engine, read_video(str(tmp_path / "b.mp4"), FRAMES).frames)),
        ]
    )
    torch.testing.assert_close(encoded.features, expected.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoded.clip_features.norm(dim=-1), torch.ones(2))


def make_dataset(root: Path) -> Path:
    """Class sub-folders with images and short videos, one unreadable file, and a CSV of the same items."""
    files = {
        "happiness": ["h1.png", "h2.png", "h3.jpg", "h4.mp4"],
        "sadness": ["s1.png", "s2.png"],
        "anger": ["a1.mp4", "a2.png"],
    }
    rows = []
    for n, (label, names) in enumerate(files.items()):
        (root / label).mkdir(parents=True)
        for m, name in enumerate(names):
            path = root / label / name
            if path.suffix == ".mp4":
                make_video(path, 10 + m)
            else:
                face_image(10 * n + m).save(path)
            rows.append((f"{label}/{name}", label))
    (root / "sadness" / "broken.png").write_bytes(b"not an image")
    rows.append(("sadness/broken.png", "sadness"))
    with (root / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *rows])
    return root / "labels.csv"


def test_eval_encodes_each_item_once_for_all_prompt_sets(model_env, engine, tmp_path, monkeypatch):
    make_dataset(tmp_path / "data")
    encoded_items = []
    original = engine.clip.encode_image
    monkeypatch.setattr(engine.clip, "encode_image", lambda x: encoded_items.append(len(x)) or original(x))
    monkeypatch.setattr("model.evaluate.features.create_engine", lambda settings: engine)
    from model.evaluate.run import run_eval

    choices = model_choices(None, ModelSettings())
    options = PipelineOptions(detect_faces=False, frames=FRAMES)
    metrics = run_eval(tmp_path / "data", tmp_path / "out", choices, options=options, batch_size=3)
    assert list(metrics["models"]["custom"]["prompts"]) == ["P-1", "P-2", "P-3", "P-4", "P-5"]
    assert sum(encoded_items) == 6 + 2 * FRAMES  # 6 images, 2 videos of FRAMES frames, once each


# ---- end to end ----------------------------------------------------------------------------------
def read_predictions(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def recompute(rows: list[dict]) -> tuple[float, float]:
    """UAR and WAR from predictions.csv rows, independently of model.evaluate.metrics."""
    labels = sorted({r["label"] for r in rows})
    recalls = [np.mean([r["predicted"] == c for r in rows if r["label"] == c]) for c in labels]
    return 100 * float(np.mean(recalls)), 100 * float(np.mean([r["predicted"] == r["label"] for r in rows]))


def assert_same_variance(a: dict, b: dict) -> None:
    """Equal up to float noise (tiny-model variances are ~1e-3); None (no items) exactly."""
    assert a.keys() == b.keys() and all((a[c] is None) == (b[c] is None) for c in a)
    assert [a[c] for c in a if a[c] is not None] == pytest.approx(
        [b[c] for c in b if b[c] is not None], rel=1e-4
    )


def test_eval_end_to_end(model_env, official_projection_path, tmp_path, capsys):
    labels_csv = make_dataset(tmp_path / "data")
    models = f"{official_projection_path},none"
    common = ["--prompts", "P-1,P-4", "--models", models, "--frames", str(FRAMES), "--batch-size", "4"]

    assert main(["eval", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "a"), *common]) == 0
    assert "| none | P-4 |" in capsys.readouterr().out
    out = tmp_path / "a"
    names = [official_projection_path.stem, "none"]
    for name in names:
        for prompts in ("P-1", "P-4"):
            assert (out / f"confusion_{name}_{prompts}.png").stat().st_size > 1000
    assert (out / "feature_variance.png").stat().st_size > 1000
    assert (out / "table.md").read_text().count("| P-") == 4
    prompts = json.loads((out / "prompts.json").read_text())  # what produced the table, exactly
    assert list(prompts) == ["P-1", "P-4"] and list(prompts["P-4"]) == list(BASIC7)
    assert prompts["P-4"]["sadness"][1] == "a cropped photo emphasizing a face expressing sadness."

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == list(BASIC7) and metrics["n_items"] == 9
    rows = read_predictions(out / "predictions.csv")
    assert len(rows) == 8 * 2 * 2  # the broken file is skipped, and listed
    for name in names:
        result = metrics["models"][name]
        assert (result["device"], result["dtype"]) == ("cpu", "float32")  # FER_DTYPE, as tests pin it
        assert list(result["skipped"]) == ["sadness/broken.png"]
        for prompts, scores in result["prompts"].items():
            mine = [r for r in rows if r["model"] == name and r["prompts"] == prompts]
            assert scores["n"] == len(mine) == 8
            assert (scores["uar"], scores["war"]) == pytest.approx(recompute(mine))
            for r in mine:
                probabilities = {c: float(r[f"p_{c}"]) for c in BASIC7}
                assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
                assert r["predicted"] == max(probabilities, key=probabilities.get)
            assert scores["per_class_recall"]["fear"] is None
    variance = metrics["models"]["none"]["feature_variance"]
    assert variance["clip"]["per_class"] == pytest.approx(variance["projected"]["per_class"])
    projected = metrics["models"][names[0]]["feature_variance"]
    assert_same_variance(projected["clip"]["per_class"], variance["clip"]["per_class"])

    # The CSV form of the same data gives the same numbers: reading and scoring are deterministic.
    assert main(["eval", "--data", str(labels_csv), "--out", str(tmp_path / "b"), *common]) == 0
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for name in names:  # items come in another order, so batches differ: equal up to float noise
        for prompts, scores in again["models"][name]["prompts"].items():
            first = metrics["models"][name]["prompts"][prompts]
            assert scores["per_class_recall"] == first["per_class_recall"]
            np.testing.assert_allclose(scores["confusion"], first["confusion"])
        variance = again["models"][name]["feature_variance"]["projected"]["per_class"]
        expected = metrics["models"][name]["feature_variance"]["projected"]["per_class"]
        assert_same_variance(variance, expected)


def test_eval_unknown_labels_are_one_error(model_env, tmp_path, capsys):
    labels_csv = make_dataset(tmp_path / "data")
    assert (
        main(["eval", "--data", str(labels_csv), "--out", str(tmp_path / "o"), "--classes", "sadness,calm"])
        == 2
    )
    err = capsys.readouterr().err
    assert "anger, happiness" in err and "Traceback" not in err


def test_eval_retrieval_end_to_end(model_env, engine, official_projection_path, tmp_path, capsys):
    face_image(1).save(tmp_path / "a.png")
    face_image(2).save(tmp_path / "b.png")
    make_video(tmp_path / "c.mp4", 20)
    pairs = [
        ("a.png", "smiles broadly"),
        ("a.png", "raises cheeks"),
        ("b.png", "frowns"),
        ("c.mp4", "opens mouth wide"),
        ("c.mp4", "smiles broadly"),
    ]
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("file", "description"), *pairs, ("", "")])
    out = tmp_path / "out"
    argv = ["eval-retrieval", "--data", str(tmp_path / "pairs.csv"), "--out", str(out), "--k", "1,2"]
    assert main([*argv, "--models", f"{official_projection_path},none", "--frames", str(FRAMES)]) == 0
    assert "MRR" in capsys.readouterr().out
    assert (out / "precision_at_k.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_items"] == 3 and metrics["n_descriptions"] == 4

    descriptions = ["smiles broadly", "raises cheeks", "frowns", "opens mouth wide"]
    features = torch.cat(
        [
            encode_images(engine, [decode_image(tmp_path / "a.png"), decode_image(tmp_path / "b.png")]),
            pool(encode_images(engine, read_video(str(tmp_path / "c.mp4"), FRAMES).frames)).unsqueeze(0),
        ]
    )
    scores = (features @ engine.encode_texts(descriptions).T).cpu().numpy()
    expected = retrieval_metrics(scores, [frozenset({0, 1}), frozenset({2}), frozenset({3, 0})], [1, 2])
    result = metrics["models"][official_projection_path.stem]
    assert (result["device"], result["dtype"]) == ("cpu", "float32")
    assert result["precision_at_k"] == pytest.approx(expected["precision_at_k"], abs=1e-6)
    assert result["mrr"] == pytest.approx(expected["mrr"], abs=1e-6)
    with (out / "ranks.csv").open(newline="") as f:
        ranks = [r for r in csv.DictReader(f) if r["model"] == official_projection_path.stem]
    assert [int(r["first_relevant_rank"]) for r in ranks] == expected["first_relevant_rank"]


@needs_shared(SHARED_DATA / "ferplus_valid", "labelled FERPlus face images")
def test_eval_on_a_slice_of_ferplus(model_env, tmp_path, capsys):
    data = SHARED_DATA / "ferplus_valid" / "labels.csv"
    argv = ["eval", "--data", str(data), "--out", str(tmp_path), "--classes", "ferplus", "--prompts", "P-3"]
    assert main([*argv, "--limit", "24"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    scores = metrics["models"]["custom"]["prompts"]["P-3"]
    assert metrics["classes"] == list(BASIC8) and scores["n"] == 24
    assert (scores["uar"], scores["war"]) == pytest.approx(
        recompute(read_predictions(tmp_path / "predictions.csv"))
    )
