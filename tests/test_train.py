"""`fer train`: teacher features, resumable extraction, fitting W, and serving the result.

The teacher is a tiny random BLIP-2 with a T5 language model, a word-level tokenizer and a small
image processor, saved with save_pretrained and loaded back through the path a hub model takes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cli.main import main
from model.engine import FerEngine, create_engine
from model.pipeline import classify
from model.projection import ProjectionError, load_projection, save_projection
from model.settings import ModelSettings
from model.train.cache import CacheError, CacheWriter, PairCache
from model.train.config import INSTRUCTIONS, FitConfig
from model.train.extract import extract, list_images
from model.train.fit import fit, symmetric_infonce
from model.train.teacher import Teacher
from tests.support import TINY_MODEL, encode_images, face_image, tiny_settings, wait_ready

TEACHER_IMAGE_SIZE = 32  # not BlipImageProcessor's default (384): proves the saved processor is used
T5_DIM = 24
QUERIES = 4
INIT_STD = 0.3  # the default 0.02 leaves a 1-layer Q-Former nearly blind to the image


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        PreTrainedTokenizerFast,
        T5Config,
    )

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for text in INSTRUCTIONS.values():
        for word in text.lower().replace(".", " . ").split():
            vocab.setdefault(word, len(vocab))
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=TEACHER_IMAGE_SIZE,
            patch_size=8,
            initializer_range=INIT_STD,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
            initializer_range=INIT_STD,
        ).to_dict(),
        text_config=T5Config(
            vocab_size=len(vocab) + 8,
            d_model=T5_DIM,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=1,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ).to_dict(),
        num_query_tokens=QUERIES,
        initializer_range=INIT_STD,
    )
    torch.manual_seed(7)
    model = Blip2ForConditionalGeneration(config)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": TEACHER_IMAGE_SIZE, "width": TEACHER_IMAGE_SIZE}),
        tokenizer=tokenizer,
        num_query_tokens=QUERIES,
    )
    path = tmp_path_factory.mktemp("teacher") / "tiny-blip2-t5"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "faces"
    (folder / "sub").mkdir(parents=True)
    for i in range(7):
        face_image(i, size=(40 + 3 * i, 48)).save(folder / ("sub" if i % 2 else ".") / f"f{i}.png")
    (folder / "sub" / "broken.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def test_teacher_feature_is_the_encoder_mean_over_queries_and_instruction(teacher_dir):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    teacher = Teacher.load(str(teacher_dir), "expert")
    images = [face_image(s, size=(50, 40)) for s in range(3)]
    pixels = teacher.pixel_values(images)
    assert pixels.shape == (3, 3, TEACHER_IMAGE_SIZE, TEACHER_IMAGE_SIZE)
    features = teacher.features(pixels)

    # Independently: vision -> Q-Former queries -> language projection, then the T5 encoder over
    # [queries ; instruction tokens + EOS], mean over all tokens, L2.
    model = Blip2ForConditionalGeneration.from_pretrained(teacher_dir).eval()
    tokenizer = Blip2Processor.from_pretrained(teacher_dir).tokenizer
    ids = torch.tensor([tokenizer(INSTRUCTIONS["expert"]).input_ids])
    assert ids[0, -1] == tokenizer.eos_token_id and (ids != tokenizer.unk_token_id).all()
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixels).last_hidden_state
        queries = model.qformer(
            query_embeds=model.query_tokens.expand(3, -1, -1),
            encoder_hidden_states=vision,
            encoder_attention_mask=torch.ones(vision.shape[:2], dtype=torch.long),
        ).last_hidden_state
        encoder = model.language_model.encoder
        tokens = torch.cat(
            [model.language_projection(queries), encoder.embed_tokens(ids).expand(3, -1, -1)], dim=1
        )
        assert tokens.shape[1] == QUERIES + ids.shape[1]
        hidden = encoder(inputs_embeds=tokens).last_hidden_state
    expected = F.normalize(hidden.mean(dim=1), dim=-1)

    assert features.shape == (3, T5_DIM) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert not hasattr(teacher.model.language_model, "decoder")  # encoder-only: decoder freed
    # Each image and the instruction itself shape the feature (the "empty" control gives others).
    assert torch.cdist(features, features).triu(1).max() > 1e-3
    empty = Teacher.load(str(teacher_dir), "empty")
    assert empty.instruction_ids.tolist() == [[tokenizer.eos_token_id]]
    assert (empty.features(pixels) - features).abs().max() > 1e-3


def test_missing_teacher_is_one_clear_error(tmp_path, monkeypatch):
    from model.registry import MissingWeights as MissingWeightsError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="hf download"):
        Teacher.load("nobody/blip2-not-cached")


def test_list_images_from_a_folder_or_a_list_file(image_dir, tmp_path):
    from_folder = list_images(image_dir)
    assert [p.rsplit("/", 1)[1] for p in from_folder] == [
        "f0.png", "f2.png", "f4.png", "f6.png", "broken.jpg", "f1.png", "f3.png", "f5.png"
    ]  # fmt: skip
    listing = tmp_path / "train.txt"
    listing.write_text(f"# CAER-S faces\nfaces/f0.png\n\n{image_dir / 'sub' / 'f1.png'}\n")
    assert list_images(listing) == [from_folder[0], from_folder[5]]
    with pytest.raises(ValueError, match="is one image"):
        list_images(image_dir / "f0.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list_images(tmp_path / "empty")


def _cache_arrays(root):
    cache = PairCache(root)
    clip, teacher = cache.gather(np.arange(len(cache)))
    return clip, teacher


def test_extract_resumes_without_recomputing_finished_shards(
    model_env, teacher_dir, image_dir, tmp_path, monkeypatch
):
    spec = ModelSettings(projection="none").resolve()
    images = list_images(image_dir)
    assert len(images) == 8 and sum(p.endswith("broken.jpg") for p in images) == 1
    calls = []
    original = Teacher.features

    def counting(self, pixels, fail_after=None):
        calls.append(len(pixels))
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("interrupted")
        return original(self, pixels)

    teacher = Teacher.load(str(teacher_dir), "describer")
    out = tmp_path / "cache"

    def fill(cache_dir, using=teacher, batch_size=2, shard_size=3):
        # float32: the cached CLIP side is compared with a float32 engine below
        return extract(
            images, cache_dir, spec, using, batch_size=batch_size, shard_size=shard_size, clip_dtype="float32"
        )

    # Shards of 3 images, batches of 2: shard 0 takes 2 teacher calls; the 3rd call (shard 1) fails.
    monkeypatch.setattr(Teacher, "features", lambda self, pixels: counting(self, pixels, fail_after=2))
    with pytest.raises(RuntimeError, match="interrupted"):
        fill(out)
    index = json.loads((out / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["shard-00000.safetensors"]
    assert not list(out.glob("*.partial"))

    calls.clear()
    monkeypatch.setattr(Teacher, "features", lambda self, pixels: counting(self, pixels))
    summary = fill(out)
    assert summary.shards_skipped == 1 and summary.shards == 3
    assert sum(calls) == 5 - 1  # images of shards 1 and 2, minus the broken one; shard 0 not redone
    assert summary.pairs == 7 and summary.failed == 1

    fresh = fill(tmp_path / "fresh", batch_size=4, shard_size=8)
    assert fresh.shards == 1
    for resumed, whole in zip(_cache_arrays(out), _cache_arrays(tmp_path / "fresh"), strict=True):
        torch.testing.assert_close(resumed, whole, atol=1e-5, rtol=1e-5)

    # The cached CLIP side is the raw embedding of the engine's own preprocessing, before W.
    from model.media import decode_image

    plain = FerEngine.from_spec(ModelSettings(projection="none").resolve(), "cpu", "float32")
    cache = PairCache(out)
    good = [p for p in images if not p.endswith("broken.jpg")]
    clip, teacher_rows = cache.gather(np.arange(len(cache)))
    rows = torch.cat([load_file(out / s["file"])["image_index"] for s in cache.index["shards"]])
    assert rows.tolist() == [images.index(p) for p in good]
    torch.testing.assert_close(
        clip, encode_images(plain, [decode_image(p) for p in good]), atol=1e-5, rtol=1e-4
    )
    assert clip.norm(dim=-1).sub(1).abs().max() > 1e-3  # not normalised: the raw embedding
    torch.testing.assert_close(teacher_rows.norm(dim=-1), torch.ones(7))
    settings = cache.settings
    assert settings["teacher"]["instruction"] == INSTRUCTIONS["describer"]
    assert settings["teacher"]["image_processor"]["size"]["height"] == TEACHER_IMAGE_SIZE
    assert settings["clip"]["preprocess"] == "exp-clip" and settings["clip"]["clip_model"] == TINY_MODEL

    # Resuming into a cache made differently is refused, not mixed.
    other = Teacher.load(str(teacher_dir), "actions")
    with pytest.raises(CacheError, match="different settings"):
        fill(out, using=other)


def _synthetic_cache(root, n=1200, teacher_dim=32, seed=0, shard_size=256):
    """Pairs where a true linear map exists: teacher = L2(A @ clip) for a random A."""
    generator = torch.Generator().manual_seed(seed)
    clip_dim = 64  # fer-tiny's embed_dim, so the result can be served by the tiny engine
    true_map = torch.randn(teacher_dim, clip_dim, generator=generator)
    clip = 3 * torch.randn(n, clip_dim, generator=generator)
    teacher = F.normalize(clip @ true_map.T, dim=-1)
    settings = {
        "clip": {"clip_model": TINY_MODEL, "preprocess": "exp-clip"},
        "teacher": {"source": "synthetic"},
    }
    writer = CacheWriter(root, settings, [f"img{i}.png" for i in range(n)], shard_size=shard_size)
    for number in range(writer.n_shards):
        start, stop = writer.shard_range(number)
        writer.write_shard(number, clip[start:stop], teacher[start:stop], torch.arange(start, stop))
    return clip, teacher


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc (Linux)")
def test_the_pair_cache_keeps_no_file_open_per_shard(tmp_path):
    """A large cache has many shards: a descriptor held per shard runs into the open-file limit."""
    clip, teacher = _synthetic_cache(tmp_path, n=400, shard_size=10)  # 40 shards
    before = len(os.listdir("/proc/self/fd"))
    cache = PairCache(tmp_path)
    rows = np.array([399, 3, 157, 0, 158])
    got_clip, got_teacher = cache.gather(rows)
    assert len(os.listdir("/proc/self/fd")) - before < 4  # not one or two per shard (40, 80)
    torch.testing.assert_close(got_clip, clip[np.sort(rows)], rtol=0, atol=0)  # gathered in row order
    torch.testing.assert_close(got_teacher, teacher[np.sort(rows)], rtol=0, atol=0)
    assert (cache.clip_dim, cache.teacher_dim, len(cache)) == (64, 32, 400)


def test_symmetric_infonce_is_the_two_way_cross_entropy():
    student = F.normalize(torch.randn(5, 8), dim=-1)
    teacher = F.normalize(torch.randn(5, 8), dim=-1)
    logits = 100 * student @ teacher.T
    by_rows = -logits.log_softmax(dim=1).diagonal().mean()
    by_columns = -logits.log_softmax(dim=0).diagonal().mean()
    torch.testing.assert_close(symmetric_infonce(student, teacher, 100.0), (by_rows + by_columns) / 2)


def test_fit_recovers_a_true_linear_map_and_the_engine_serves_it(
    tmp_path, tiny_clip_path, official_projection_path
):
    clip, teacher = _synthetic_cache(tmp_path / "cache")
    out = tmp_path / "w.safetensors"
    cfg = FitConfig(batch_size=128, val_fraction=0.1)  # the paper's optimiser settings otherwise
    result = fit(tmp_path / "cache", out, cfg)

    final = result.final
    assert len(result.history) == cfg.epochs and (result.train_pairs, result.val_pairs) == (1080, 120)
    assert final["val_loss"] < 0.05 * result.first_loss
    assert final["val_top1_student_to_teacher"] >= 0.95 and final["val_top1_teacher_to_student"] >= 0.95
    saved = load_projection(out)
    assert saved.weight.shape == (32, 64)
    # Every pair (training and held-out) retrieves its own teacher feature among all 1200.
    similarity = F.normalize(clip @ saved.weight.T, dim=-1) @ teacher.T
    assert (similarity.argmax(dim=1) == torch.arange(len(clip))).float().mean() > 0.95

    training = json.loads(saved.metadata["training"])
    assert training["config"] == {**cfg.__dict__}
    assert training["data"]["fingerprint"] == PairCache(tmp_path / "cache").fingerprint
    assert saved.metadata["clip_model"] == TINY_MODEL and saved.metadata["preprocess"] == "exp-clip"

    # FER_PROJECTION=<file>: the engine's features are L2(W x) of the raw CLIP embedding.
    served = create_engine(tiny_settings(tiny_clip_path, out))
    plain = create_engine(tiny_settings(tiny_clip_path, "none"))  # on the CPU too
    pixels = served.prepare_many([face_image(s) for s in range(3)])
    expected = plain.embed_pixels(pixels) @ saved.weight.T  # W·x; classify and pool normalise later
    torch.testing.assert_close(served.encode_pixels(pixels), expected, atol=1e-5, rtol=1e-5)


def test_fit_refuses_an_unfinished_cache(tmp_path):
    writer = CacheWriter(tmp_path / "c", {"clip": {}, "teacher": {}}, ["a", "b", "c"], shard_size=2)
    writer.write_shard(0, torch.randn(2, 4), torch.randn(2, 3), torch.arange(2))
    with pytest.raises(CacheError, match="incomplete"):
        fit(tmp_path / "c", tmp_path / "w.safetensors", FitConfig())


def test_cli_train_run_then_predict_with_the_new_projection(
    model_env, teacher_dir, image_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "mine.safetensors"
    code = main(
        [
            "train",
            "run",
            "--images",
            str(image_dir),
            "--cache",
            str(tmp_path / "cache"),
            "--teacher",
            str(teacher_dir),
            "--instruction",
            "a random control sentence",
            "--extract-batch-size",
            "3",
            "--shard-size",
            "4",
            "--workers",
            "1",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--val-fraction",
            "0",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert lines[0]["pairs"] == 7 and lines[0]["failed"] == 1 and lines[0]["shards"] == 2
    assert lines[1]["projection"] == str(out) and lines[1]["train_pairs"] == 7
    saved = load_projection(out)
    assert saved.weight.shape == (T5_DIM, 64)
    assert (
        json.loads(saved.metadata["training"])["data"]["settings"]["teacher"]["instruction_name"] == "custom"
    )

    monkeypatch.setenv("FER_PROJECTION", str(out))
    image = image_dir / "f0.png"
    assert main(["predict", "--classes", "calm,angry", "--no-detect-faces", str(image)]) == 0
    row = json.loads(capsys.readouterr().out)
    engine = create_engine(ModelSettings())
    assert engine.feature_dim == T5_DIM
    torch.testing.assert_close(engine.projection, saved.weight)
    from model.media import decode_image

    classes = ("calm", "angry")
    scores = classify(
        encode_images(engine, [decode_image(image)]), engine.class_features(classes, "P-3"), classes
    )
    assert row["probabilities"] == pytest.approx(scores.as_dict(0), abs=1e-6)

    # ... and the service, configured the same way (FER_PROJECTION=<file>), serves it.
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings

    with TestClient(create_app(ServiceSettings())) as client:
        wait_ready(client)
        answer = client.post(
            "/predict",
            files={"file": ("f0.png", image.read_bytes(), "image/png")},
            data={"classes": "calm,angry", "detect_faces": "false"},
        ).json()
    assert answer["model"] == "custom"
    assert answer["probabilities"] == pytest.approx(row["probabilities"], abs=1e-6)


def test_cli_fit_rejects_a_non_safetensors_output(tmp_path, capsys):
    _synthetic_cache(tmp_path / "cache", n=8)
    code = main(["train", "fit", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "w.pth")])
    assert code == 2 and ".safetensors" in capsys.readouterr().err


def test_a_projection_made_for_another_clip_model_is_refused(tmp_path, tiny_clip_path, capsys):
    """ViT-B/32 and B/16 both embed to 512-d: only the CLIP model a projection records tells them apart."""
    other = save_projection(
        tmp_path / "for-b16.safetensors", torch.randn(32, 64), clip_model="ViT-B-16", preprocess="exp-clip"
    )
    settings = tiny_settings(tiny_clip_path, other)
    message = r"^projection .*for-b16\.safetensors was made for CLIP ViT-B-16, not fer-tiny: [^;]*$"
    with pytest.raises(ProjectionError, match=message):
        create_engine(settings)
    with pytest.raises(ProjectionError, match=message):  # the check commands make before any work
        settings.resolve_checked()
    # the deliberate case: FER_PROJECTION_ANY_CLIP=true
    engine = create_engine(settings.model_copy(update={"projection_any_clip": True}))
    assert engine.feature_dim == 32

    # an official release is known by its file name: B/32's W on B/16 (checked without loading a CLIP)
    torch.save({"module.mlp.weight": torch.zeros(4096, 512)}, tmp_path / "ExpCLIP_B32_model.pth")
    b16 = ModelSettings(
        clip_model="ViT-B-16", clip_weights="random", projection=str(tmp_path / "ExpCLIP_B32_model.pth")
    )
    with pytest.raises(ProjectionError, match="made for CLIP ViT-B-32, not ViT-B-16"):
        b16.resolve_checked()
    for same in ("ViT-B-32", "ViT-B-32-quickgelu"):  # an OpenAI checkpoint by path is named -quickgelu
        assert b16.model_copy(update={"clip_model": same}).resolve_checked().clip_model == same

    # `fer serve` refuses it at start, in one line, before a model loads or a port is bound
    env = {
        "FER_CLIP_MODEL": TINY_MODEL,
        "FER_CLIP_WEIGHTS": str(tiny_clip_path),
        "FER_PROJECTION": str(other),
    }
    with pytest.MonkeyPatch.context() as patch, socket.create_server(("127.0.0.1", 0)) as taken:
        for key, value in env.items():
            patch.setenv(key, value)
        # a port in use: were the projection not checked first, the error would be about the port
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "made for CLIP ViT-B-16, not fer-tiny" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--batch-size", "1"),  # no negatives: the contrastive loss is 0 and W never moves
        ("--log-interval", "0"),
        ("--val-fraction", "1"),
        ("--lr", "0"),
        ("--logit-scale", "-1"),
    ],
)
def test_fit_options_are_checked_before_any_work(option, value, teacher_dir, image_dir, tmp_path, capsys):
    _synthetic_cache(tmp_path / "cache", n=8)
    out = tmp_path / "w.safetensors"
    assert main(["train", "fit", "--cache", str(tmp_path / "cache"), "--out", str(out), option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fer: error: {option} ") and err.count("\n") == 1
    assert not out.exists()  # --epochs 0 used to save an untrained projection and exit 0
    # `fer train run` refuses them before the extraction, not after it
    run = ["train", "run", "--images", str(image_dir), "--teacher", str(teacher_dir), "--out", str(out)]
    assert main([*run, "--cache", str(tmp_path / "new"), option, value]) == 2
    assert capsys.readouterr().err == err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("option", ["--extract-batch-size", "--shard-size"])
def test_extract_options_are_checked_before_the_teacher_loads(option, image_dir, tmp_path, capsys):
    argv = ["train", "extract", "--images", str(image_dir), "--teacher", "nobody/not-loaded"]
    assert main([*argv, "--cache", str(tmp_path / "c"), option, "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"fer: error: {option} must be at least 1\n" and not (tmp_path / "c").exists()


def test_a_cache_names_its_files_the_same_however_they_were_given(
    model_env, tiny_clip_path, teacher_dir, image_dir, tmp_path, monkeypatch, capsys
):
    """Relative --teacher and FER_CLIP_WEIGHTS are recorded as the files they name: `--ray` (whose
    actors need absolute paths) resumes a cache made without it, and the reverse (test_ray runs that)."""
    monkeypatch.chdir(tmp_path)
    common = ["train", "extract", "--images", str(image_dir), "--cache", "cache", "--workers", "0"]
    common += ["--shard-size", "4", "--extract-batch-size", "4"]
    monkeypatch.setenv("FER_CLIP_WEIGHTS", os.path.relpath(tiny_clip_path))
    assert main([*common, "--teacher", os.path.relpath(teacher_dir)]) == 0
    capsys.readouterr()
    (tmp_path / "cache" / "shard-00001.safetensors").unlink()
    monkeypatch.setenv("FER_CLIP_WEIGHTS", str(tiny_clip_path))
    assert main([*common, "--teacher", str(teacher_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 1
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["settings"]["clip"]["clip_weights"] == str(tiny_clip_path.resolve())
    assert index["settings"]["teacher"]["source"] == str(teacher_dir.resolve())
