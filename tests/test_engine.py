"""The engine against an independent computation written here, straight from docs/method.md."""

from __future__ import annotations

import json
from importlib import resources

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

import model.engine
from model.clip import clip_transform, load_clip, preprocess_config
from model.engine import create_engine
from model.pipeline import classify, pool, score_descriptions
from model.projection import ProjectionError, load_projection, save_projection
from model.prompts import BASIC7, CLASS_PRESETS, PROMPT_SETS, LabelError, resolve_classes, resolve_prompt_set
from model.settings import ModelSettings, dtype_for
from tests.support import (
    TINY_MODEL,
    DeviceFeatures,
    encode_clip,
    encode_images,
    face_image,
    tiny_settings,
)

# The package's copy of the official lists (test_prompts checks it against the official code's).
OFFICIAL_SOURCE = resources.files("model") / "data" / "official_prompts.json"


@pytest.fixture(scope="module")
def official_clip(tiny_clip_path):
    """open_clip's model and the official evaluation transform (squash, [0,1], no mean/std)."""
    model = open_clip.create_model(TINY_MODEL, pretrained=str(tiny_clip_path)).eval()
    size = model.visual.image_size[0]
    return model, T.Compose([T.Resize((size, size)), T.ToTensor()])


@pytest.fixture(scope="module")
def reference(official_clip, official_projection_path):
    """The pipeline as the official evaluation computes it, built without any project code."""
    model, transform = official_clip
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    weight = torch.load(official_projection_path, weights_only=True)["module.projection_head.mlp.weight"]

    def image_features(images):
        """Projected, not normalised: W·x (docs/method.md: a clip pools these before L2)."""
        with torch.no_grad():
            x = torch.stack([transform(im.convert("RGB")) for im in images])
            return model.encode_image(x) @ weight.T

    def text_features(texts):
        with torch.no_grad():
            return F.normalize(model.encode_text(tokenizer(texts)) @ weight.T, dim=-1)

    def probabilities(features, prompt_lists):
        """`prompt_lists`: each class's prompts (equal counts); logits averaged per class."""
        texts = [prompt for prompts in prompt_lists for prompt in prompts]
        logits = 100 * F.normalize(features, dim=-1) @ text_features(texts).T
        return logits.view(len(features), len(prompt_lists), -1).mean(-1).softmax(-1)

    return image_features, text_features, probabilities


def test_image_probabilities_match_reference(engine, reference):
    image_features, _, probabilities = reference
    images = [face_image(i) for i in range(3)]
    for prompt_set in ("P-3", "P-5"):  # a single prompt and a 10-prompt ensemble (logits averaged)
        expected = probabilities(image_features(images), official_lists(BASIC7, prompt_set))
        scores = score_with(engine, encode_images(engine, images), BASIC7, prompt_set)
        torch.testing.assert_close(scores.probabilities, expected, atol=1e-5, rtol=1e-4)
        assert torch.allclose(scores.probabilities.sum(-1), torch.ones(3))


def score_with(engine, features, classes, prompt_set):
    """The pipeline's score stage with the engine's class features."""
    return classify(features, engine.class_features(classes, prompt_set), classes)


def official_lists(classes, prompt_set):
    """The official lists as the package's data file holds them."""
    lists = json.loads(OFFICIAL_SOURCE.read_text())[prompt_set]
    return [lists[c] for c in classes]


def test_a_mixed_class_list_scores_official_and_template_prompts(engine, reference):
    """Official words keep their own wording (sadness under P-4), other words get the templates."""
    image_features, _, probabilities = reference
    images = [face_image(i) for i in range(4)]
    sadness = [
        "an expression of sadness.",
        "a cropped photo emphasizing a face expressing sadness.",
        "a photo exuding sadness in a person.",
        "a photo showing someone immersed in sadness.",
        "a photo capturing sadness within an individual.",
    ]
    templates = [
        "an expression of {}.",
        "a photo of a face with an expression of {}.",
        "a photo radiating {} in a person.",
        "a photo showing someone immersed in {}.",
        "a photo capturing {} within an individual.",
    ]
    classes = ("sadness", "calm", "very angry")
    expected = probabilities(
        image_features(images), [sadness, *([t.format(c) for t in templates] for c in classes[1:])]
    )
    scores = score_with(engine, encode_images(engine, images), classes, "P-4")
    torch.testing.assert_close(scores.probabilities, expected, atol=1e-5, rtol=1e-4)


def test_ensemble_averages_logits_not_embeddings(engine, reference):
    image_features, text_features, _ = reference
    feats = F.normalize(image_features([face_image(7)]), dim=-1)
    texts = [prompt for prompts in official_lists(BASIC7, "P-4") for prompt in prompts]
    mean_embedding = F.normalize(text_features(texts).view(7, 5, -1).mean(1), dim=-1)
    averaged_embeddings = (100 * feats @ mean_embedding.T).softmax(-1)
    ours = score_with(engine, encode_images(engine, [face_image(7)]), BASIC7, "P-4").probabilities
    assert not torch.allclose(ours, averaged_embeddings, atol=1e-4)


def test_video_pools_projected_frame_features(engine, reference):
    image_features, _, probabilities = reference
    frames = [face_image(10 + i) for i in range(5)]
    pooled = F.normalize(image_features(frames).mean(0, keepdim=True), dim=-1)
    expected = probabilities(pooled, official_lists(BASIC7, "P-3"))
    ours = score_with(engine, encode_clip(engine, frames).unsqueeze(0), BASIC7, "P-3").probabilities
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_pooling_averages_projected_frames_before_normalising():
    frames = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # frames of different norms
    torch.testing.assert_close(pool(frames), F.normalize(torch.tensor([1.5, 0.5]), dim=0))
    normalised_first = F.normalize(F.normalize(frames, dim=-1).mean(0), dim=0)  # the wrong order
    assert not torch.allclose(pool(frames), normalised_first, atol=1e-3)


def test_scores_do_not_depend_on_feature_scale(engine):
    features = encode_images(engine, [face_image(4)])
    torch.testing.assert_close(
        score_with(engine, 7.5 * features, BASIC7, "P-3").probabilities,
        score_with(engine, features, BASIC7, "P-3").probabilities,
    )


def test_clips_batched_together_equal_clips_alone(engine):
    a, b = [face_image(1), face_image(2)], [face_image(3)]
    together = [pool(rows) for rows in torch.split(encode_images(engine, [*a, *b]), [2, 1])]
    torch.testing.assert_close(together[0], encode_clip(engine, a), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[1], encode_clip(engine, b), atol=1e-5, rtol=1e-4)


def test_retrieval_ranking_matches_reference(engine, reference):
    image_features, text_features, _ = reference
    frames = [face_image(20 + i) for i in range(4)]
    descriptions = ["raises the eyebrows", "smiles broadly", "frowns", "opens the mouth wide", "blinks"]
    pooled = F.normalize(image_features(frames).mean(0), dim=-1)
    expected = text_features(descriptions) @ pooled
    text = engine.encode_texts(descriptions)
    ranking = score_descriptions(encode_images(engine, frames), text, descriptions).ranking
    assert [r.index for r in ranking] == torch.argsort(expected, descending=True).tolist()
    assert [r.text for r in ranking] == [descriptions[r.index] for r in ranking]
    torch.testing.assert_close(
        torch.tensor([r.score for r in ranking]), expected.sort(descending=True).values
    )


def test_text_features_are_cached_per_class_and_prompt_set(engine, monkeypatch):
    classes = ("joy", "gloom")
    engine.class_features(classes, "P-4")
    calls = []
    monkeypatch.setattr(engine, "encode_texts", lambda texts: calls.append(texts))
    engine.class_features(classes, "P-4")
    score_with(engine, encode_images(engine, [face_image(0)]), classes, "P-4")
    assert calls == []


def test_plain_clip_uses_the_clip_embedding(tiny_clip_path, official_clip):
    plain = create_engine(tiny_settings(tiny_clip_path, "none"))
    assert plain.projection is None and plain.feature_dim == plain.embed_dim
    features = encode_images(plain, [face_image(0)])
    assert features.shape == (1, plain.embed_dim)
    # open_clip itself, on the official evaluation transform: no projection anywhere.
    model, transform = official_clip
    pixels = transform(face_image(0).convert("RGB"))
    with torch.no_grad():
        expected = model.encode_image(pixels.unsqueeze(0))
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


def test_clip_preprocessing_equals_open_clip_transform(tiny_clip_path):
    plain = create_engine(tiny_settings(tiny_clip_path, "none", preprocess="clip"))  # on the CPU
    _, _, val_transform = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(tiny_clip_path))
    image = face_image(3, size=(120, 90))
    ours = plain.normaliser(plain.prepare(image).unsqueeze(0))[0]
    torch.testing.assert_close(ours, val_transform(image), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("preprocess", ["exp-clip", "clip"])
def test_the_weightless_transform_is_the_engine_s(tiny_clip_path, preprocess):
    """Ray's decode actors prepare pixels from the architecture's config, without the model."""
    settings = tiny_settings(tiny_clip_path, "none", preprocess=preprocess)
    spec = settings.resolve()
    assert preprocess_config(spec) == load_clip(spec).preprocess
    image = face_image(3, size=(120, 90))
    assert torch.equal(clip_transform(spec)(image), create_engine(settings).prepare(image))
    vit = ModelSettings(preset="clip-b32", clip_weights="random", device="cpu").resolve()
    assert preprocess_config(vit).image_size == 224


def test_no_face_detector_means_no_detection_whatever_is_asked():
    assert ModelSettings(face_detector="none").pipeline_options(detect_faces=True).detect_faces is False
    assert ModelSettings(face_detector="haar").pipeline_options(detect_faces=False).detect_faces is False
    assert ModelSettings(face_detector="haar").pipeline_options().detect_faces is True


def test_official_checkpoint_loads_with_any_prefix(tmp_path):
    weight = torch.randn(16, 8)
    for key in ("mlp.weight", "module.mlp.weight", "projection_head.mlp.weight"):
        torch.save({key: weight}, tmp_path / "w.pth")
        torch.testing.assert_close(load_projection(tmp_path / "w.pth").weight, weight)


def test_projection_errors_are_clear(tmp_path, tiny_clip_path):
    torch.save({"a.weight": torch.zeros(2, 2)}, tmp_path / "none.pth")
    with pytest.raises(ProjectionError, match=r"mlp\.weight"):
        load_projection(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ProjectionError, match="weights-only"):
        load_projection(tmp_path / "junk.pth")
    torch.save({"mlp.weight": torch.zeros(4096, 512)}, tmp_path / "b32.pth")
    settings = ModelSettings(
        clip_model=TINY_MODEL, clip_weights=str(tiny_clip_path), projection=str(tmp_path / "b32.pth")
    )
    with pytest.raises(ProjectionError, match="512-d features but the CLIP model embeds to 64-d"):
        create_engine(settings)


def test_own_format_round_trips_with_metadata(tmp_path, engine):
    path = save_projection(
        tmp_path / "p.safetensors",
        engine.projection.cpu(),
        clip_model=TINY_MODEL,
        preprocess="exp-clip",
        training={"epochs": 5},
    )
    loaded = load_projection(path)
    torch.testing.assert_close(loaded.weight, engine.projection.cpu())
    assert loaded.metadata["clip_model"] == TINY_MODEL
    assert loaded.metadata["input_dim"] == "64" and '"epochs": 5' in loaded.metadata["training"]


def test_missing_weights_name_the_download_command(tmp_path):
    from model.registry import MissingWeights as MissingWeightsError

    with pytest.raises(MissingWeightsError, match="fer weights download exp-clip-b32"):
        create_engine(ModelSettings(weights_dir=tmp_path))
    with pytest.raises(MissingWeightsError, match="fer weights download clip-b32`"):
        create_engine(ModelSettings(preset="clip-b32", weights_dir=tmp_path))
    # A projection path the user gave cannot be downloaded: no `fer weights download custom`.
    with pytest.raises(MissingWeightsError, match="missing: set FER_PROJECTION") as missing:
        create_engine(ModelSettings(preset="demo", projection=str(tmp_path / "W.pth")))
    assert "download" not in str(missing.value)


def test_presets_resolve_to_their_parts(tmp_path):
    """One resolver turns a preset (and overrides) into every file; only existence is checked."""
    for name in ("clip/ViT-L-14__openai.safetensors", "clip/ViT-B-16__openai.pt", "ExpCLIP_L14_model.pth"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    spec = ModelSettings(preset="exp-clip-l14", weights_dir=tmp_path).resolve()
    assert (spec.clip_model, spec.clip_weights, spec.preprocess) == ("ViT-L-14", "openai", "exp-clip")
    assert spec.clip_checkpoint == tmp_path / "clip/ViT-L-14__openai.safetensors"
    assert spec.quick_gelu  # the openai tag's own setting
    assert spec.projection == tmp_path / "ExpCLIP_L14_model.pth"
    spec = ModelSettings(preset="clip-b16", weights_dir=tmp_path).resolve()
    assert spec.clip_checkpoint == tmp_path / "clip/ViT-B-16__openai.pt"
    assert (spec.clip_model, spec.projection, spec.preprocess, spec.name) == (
        "ViT-B-16",
        None,
        "clip",
        "clip-b16",
    )
    assert (
        ModelSettings(preset="clip-b16", weights_dir=tmp_path, preprocess="exp-clip").resolve().name
        == "custom"
    )
    with pytest.raises(ValueError, match="unknown preset"):
        ModelSettings(preset="nope")


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FER_PRESET", "clip-l14")
    monkeypatch.setenv("FER_DEVICE", "cpu")
    settings = ModelSettings()
    assert settings.preset == "clip-l14" and settings.device == "cpu"


def test_class_and_prompt_resolution():
    assert resolve_classes("ferplus") == CLASS_PRESETS["basic8"]
    assert resolve_classes("MAFW") == CLASS_PRESETS["all11"]
    assert resolve_classes(" calm , very  angry,") == ("calm", "very angry")
    assert resolve_classes(None) == BASIC7
    for bad in ("", " , ", "a,a", ",".join(f"c{i}" for i in range(100)), "x" * 300):
        with pytest.raises(LabelError):
            resolve_classes(bad)
    assert resolve_prompt_set(" P-3") == "P-3" and resolve_prompt_set("P-5") == "P-5"
    assert resolve_prompt_set(None) == "P-3"
    for bad in ("P-9", "p3", "3", ""):
        with pytest.raises(LabelError, match="P-1, P-2, P-3, P-4, P-5"):
            resolve_prompt_set(bad)
    assert len(PROMPT_SETS["P-4"]) == 5 and len(PROMPT_SETS["P-5"]) == 10


def test_dtype_choice(monkeypatch):
    import model.settings as config

    assert dtype_for("auto", "cuda") == torch.float16
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(config, "cpu_has_native_bf16", lambda native=native: native)
        assert dtype_for("auto", "cpu") == expected
    assert dtype_for("float32", "cuda") == torch.float32 and dtype_for("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(RuntimeError, match="CUDA only"):
        dtype_for("float16", "cpu")
    monkeypatch.setenv("FER_DTYPE", "bfloat16")
    assert ModelSettings().dtype == "bfloat16"
    monkeypatch.setenv("FER_DTYPE", "fp8")
    with pytest.raises(ValueError, match="dtype"):
        ModelSettings()


def test_bfloat16_encoders_agree_with_float32(tiny_clip_path, official_projection_path, reference):
    """FER_DTYPE=bfloat16 casts the encoders' weights, not W or the scores, and stays close to float32."""
    low = create_engine(tiny_settings(tiny_clip_path, official_projection_path, dtype="bfloat16"))
    assert {p.dtype for p in low.clip.parameters()} == {torch.bfloat16}
    assert low.projection.dtype == torch.float32

    image_features, _, probabilities = reference
    images = [face_image(i) for i in range(8)]
    features = encode_images(low, images)
    assert features.dtype == torch.float32
    expected = image_features(images)
    cosine = F.cosine_similarity(features, expected, dim=-1)
    assert cosine.min() > 0.999, cosine
    assert not torch.equal(features, expected)  # the bfloat16 path really ran
    scores = score_with(low, features, BASIC7, "P-5")
    torch.testing.assert_close(
        scores.probabilities, probabilities(expected, official_lists(BASIC7, "P-5")), atol=0.02, rtol=0
    )


def test_class_features_are_cached_on_the_cpu(tiny_clip_path, official_projection_path, monkeypatch):
    engine = create_engine(tiny_settings(tiny_clip_path, official_projection_path))
    encode_texts = engine.encode_texts
    monkeypatch.setattr(engine, "encode_texts", lambda texts: encode_texts(texts).as_subclass(DeviceFeatures))
    DeviceFeatures.copied_in.clear()
    text = engine.class_features(BASIC7, "P-3")
    assert type(text) is torch.Tensor and len(DeviceFeatures.copied_in) == 1
    assert engine.cached_class_features(BASIC7, "P-3") is text


def test_the_text_cache_evicts_the_least_recently_used(tiny_clip_path, official_projection_path, monkeypatch):
    """A hit refreshes an entry, so the hottest lists (the warmed presets) stay while cold ones go."""
    engine = create_engine(tiny_settings(tiny_clip_path, official_projection_path))
    first, second, third = ("calm", "tense"), ("bored", "keen"), ("shy", "bold")
    size = engine.class_features(first, "P-1").numel() * 4
    monkeypatch.setattr(model.engine, "TEXT_CACHE_BYTES", 2 * size)  # room for two lists
    engine.class_features(second, "P-1")
    assert engine.cached_class_features(first, "P-1") is not None  # a hit: now the most recent
    engine.class_features(third, "P-1")  # over the budget: the least recently used goes
    assert engine.cached_class_features(first, "P-1") is not None
    assert engine.cached_class_features(second, "P-1") is None
