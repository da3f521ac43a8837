"""What only a GPU exercises: the float16 default on CUDA, pinned non-blocking uploads, the batcher's
device round trip (features back on the CPU, in the device thread) and fer_device_peak_bytes.

They skip without CUDA. `tools/gpu-check.sh` runs them, then the CUDA benchmark (docs/serving.md, Benchmarks).

Tolerance: float16 encoders against float32 on the CPU, each image's projected feature within cosine
0.999 of the float32 one and each class probability within 0.01 (W, pooling and scores are float32 in
both, so the difference is the encoders' precision alone)."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from model.engine import create_engine
from model.pipeline import classify
from model.prompts import CLASS_PRESETS, DEFAULT_CLASSES, DEFAULT_PROMPTS
from tests.support import TINY_MODEL, encode_images, face_image, png, run_bounded, tiny_settings, wait_ready

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device: the gpu tests run on a GPU (tools/gpu-check.sh)",
    ),
]

MIN_COSINE = 0.999
PROBABILITY_ATOL = 0.01
CLASSES = CLASS_PRESETS[DEFAULT_CLASSES]


@pytest.fixture(scope="module", params=["fer-tiny", "ViT-B-32"])
def model_files(request, tiny_clip_path, official_projection_path, full_size_checkpoint):
    """The tiny model, and random weights of Exp-CLIP B/32's real sizes (where float16 range matters)."""
    if request.param == "fer-tiny":
        return {
            "clip_model": TINY_MODEL,
            "clip_path": tiny_clip_path,
            "projection_path": official_projection_path,
        }
    clip, projection = full_size_checkpoint
    return {"clip_model": "ViT-B-32", "clip_path": clip, "projection_path": projection}


def engine_on(files: dict, device: str, dtype: str):
    from model.settings import ModelSettings

    return create_engine(
        ModelSettings(
            clip_model=files["clip_model"],
            clip_weights=str(files["clip_path"]),
            projection=str(files["projection_path"]),
            preprocess="exp-clip",
            device=device,
            dtype=dtype,
        )
    )


def test_float16_on_cuda_agrees_with_float32_on_the_cpu(model_files):
    reference = engine_on(model_files, "cpu", "float32")
    engine = engine_on(model_files, "cuda", "auto")  # the service's default on a GPU
    assert engine.device.type == "cuda" and engine.dtype == torch.float16
    assert {p.dtype for p in engine.clip.parameters()} == {torch.float16}

    images = [face_image(i, size=(224, 224)) for i in range(16)]
    expected, features = encode_images(reference, images), encode_images(engine, images)
    assert features.device.type == "cpu" and features.dtype == torch.float32
    cosine = F.cosine_similarity(features, expected, dim=-1)
    assert cosine.min() > MIN_COSINE, cosine
    assert not torch.equal(features, expected)  # the float16 path really ran

    text, expected_text = (
        engine.class_features(CLASSES, DEFAULT_PROMPTS),
        reference.class_features(CLASSES, DEFAULT_PROMPTS),
    )
    assert (
        F.cosine_similarity(text.cpu().flatten(0, 1), expected_text.flatten(0, 1), dim=-1).min() > MIN_COSINE
    )
    probabilities = classify(features, text.cpu(), CLASSES).probabilities
    expected_probabilities = classify(expected, expected_text, CLASSES).probabilities
    torch.testing.assert_close(probabilities, expected_probabilities, atol=PROBABILITY_ATOL, rtol=0)


def test_the_batcher_round_trips_concurrent_requests_through_the_device(
    tiny_clip_path, official_projection_path
):
    """Requests batched together on the GPU get their own rows back, on the CPU."""
    from service.batcher import Batcher

    engine = create_engine(
        tiny_settings(tiny_clip_path, official_projection_path, device="cuda", dtype="auto")
    )
    requests = [engine.prepare_many([face_image(10 * i + j) for j in range(i + 1)]) for i in range(6)]
    alone = [engine.encode_pixels(pixels).cpu() for pixels in requests]

    async def main():
        batcher = Batcher(engine.encode_pixels, max_batch=64, max_wait_ms=200)
        batcher.start()
        withdraws = [batcher.expect() for _ in requests]  # all decoding at once: they share a batch

        async def request(i):
            withdraws[i]()
            return await batcher.submit(requests[i])

        try:
            return await asyncio.gather(*(request(i) for i in range(len(requests)))), batcher.calls
        finally:
            await batcher.stop()

    results, calls = run_bounded(main())
    assert calls < len(requests)
    for rows, expected in zip(results, alone, strict=True):
        assert rows.device.type == "cpu" and rows.shape == expected.shape
        # float16 kernels may differ with the batch's size, not by more than precision
        assert F.cosine_similarity(rows, expected, dim=-1).min() > 0.9999


def test_the_service_on_cuda_reports_its_device_peak_memory(tiny_clip_path, official_projection_path):
    from service.app import create_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        clip_model=TINY_MODEL,
        clip_weights=str(tiny_clip_path),
        projection=str(official_projection_path),
        preprocess="exp-clip",
        device="cuda",
        dtype="auto",
        face_detector="none",
        max_wait_ms=5,
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        ready = client.get("/readyz").json()
        assert "cuda" in str(ready) and "float16" in str(ready), ready
        response = client.post("/predict", files={"file": ("face.png", png(face_image(3)), "image/png")})
        assert response.status_code == 200, response.text
        metrics = client.get("/metrics").text
    peak = [line for line in metrics.splitlines() if line.startswith("fer_device_peak_bytes")]
    assert peak and float(peak[0].split()[-1]) > 0, metrics
