"""`fer eval-retrieval`: item-to-description retrieval (docs/method.md, retrieval).

Every item (video, or image as a one-frame clip) ranks ALL unique descriptions of the CSV by cosine
similarity of its pooled projected feature with each description's projected text feature
(`FerEngine.encode_texts`). Relevant = the descriptions the CSV pairs with that item.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from model.evaluate.data import read_retrieval, take_subset
from model.evaluate.features import EncodeBackend, EncodedItems, TextSide, encode_each_model, engine_fields
from model.evaluate.metrics import retrieval_metrics
from model.evaluate.models import ModelChoice
from model.evaluate.outputs import start_outputs, write_json
from model.evaluate.plots import plot_precision_at_k
from model.faces.base import FaceDetector
from model.options import PipelineOptions

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
OUTPUTS = ("metrics.json", "ranks.csv", "precision_at_k.png")


def run_retrieval(
    data: Path,
    out: Path,
    models: Sequence[ModelChoice],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    options: PipelineOptions,
    detector: FaceDetector | None = None,
    backend: EncodeBackend | None = None,
) -> dict:
    """`limit` samples items; every description stays a candidate. Writes metrics.json, ranks.csv
    (each item's first relevant rank per model) and precision_at_k.png, each model's as it finishes
    (an earlier run's are removed first). `backend`: where the encoders run (default: here;
    `fer eval-retrieval --ray` passes a Ray cluster's)."""
    if not ks or min(ks) < 1:
        raise ValueError("--k needs positive integers")
    dataset = read_retrieval(data)
    chosen = take_subset(list(range(len(dataset.files))), limit, seed)
    start_outputs(out, OUTPUTS)
    metrics = {
        "data": str(data),
        "n_items": len(chosen),
        "n_descriptions": len(dataset.descriptions),
        "limit": limit,
        "seed": seed,
        "frames": options.frames,
        "detect_faces": options.detect_faces,
        "relevance": "the descriptions paired with the item on any row of the CSV",
        "models": {},
        "models_pending": [choice.name for choice in models],  # left over only by a run that failed
    }
    with (out / "ranks.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "model", "first_relevant_rank", "n_relevant", "top_description"])

        def score(choice: ModelChoice, engine: TextSide, encoded: EncodedItems) -> None:
            kept = [chosen[i] for i in encoded.kept]
            text = engine.encode_texts(dataset.descriptions).float().cpu()
            scores = (encoded.features @ text.T).numpy()
            result = retrieval_metrics(scores, [dataset.relevant[i] for i in kept], ks)
            for row, i in enumerate(kept):
                writer.writerow(
                    [
                        dataset.files[i],
                        choice.name,
                        result["first_relevant_rank"][row],
                        len(dataset.relevant[i]),
                        dataset.descriptions[int(scores[row].argmax())],
                    ]
                )
            del result["first_relevant_rank"]  # per item: in ranks.csv
            result.update(engine_fields(choice.entry, engine))
            result["skipped"] = {dataset.files[chosen[i]]: why for i, why in encoded.failures.items()}
            metrics["models"][choice.name] = result
            metrics["models_pending"].remove(choice.name)
            # This model's results, whatever happens to the next one.
            f.flush()
            first = next(iter(metrics["models"].values()))
            plot_precision_at_k(
                {name: r["precision_at_k"] for name, r in metrics["models"].items()},
                first["n_items"],
                first["chance_precision_at_k"],
                out / "precision_at_k.png",
            )
            write_json(out / "metrics.json", metrics)

        paths = [dataset.paths[i] for i in chosen]
        encode_each_model(models, paths, options, backend, score, batch_size=batch_size, detector=detector)
    return metrics
