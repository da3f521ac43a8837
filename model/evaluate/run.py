"""`fer eval`: UAR/WAR per model and prompt set, confusion matrices and feature variance on a
labelled data set, written as metrics.json, predictions.csv, table.md and PNGs.

Each model encodes every item once (`features.encode_items`); all prompt sets are scored from those
cached features, so five prompt sets cost five text encodings, not five passes over the data.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.evaluate.data import choose_classes, label_indices, merged_labels, read_labelled, take_subset
from model.evaluate.features import EncodeBackend, EncodedItems, TextSide, encode_each_model, engine_fields
from model.evaluate.metrics import classification_metrics, feature_variance
from model.evaluate.models import ModelChoice, slug
from model.evaluate.outputs import start_outputs, write_json
from model.evaluate.plots import plot_confusion, plot_feature_variance
from model.faces.base import FaceDetector
from model.files import write_text_atomic
from model.options import PipelineOptions
from model.pipeline import classify
from model.prompts import PROMPT_SET_NAMES, prompt_table, resolve_prompt_sets

log = logging.getLogger(__name__)

OUTPUTS = (
    "metrics.json",
    "predictions.csv",
    "prompts.json",
    "table.md",
    "confusion_*.png",
    "feature_variance.png",
)
VARIANCE_DEFINITION = (
    "per class: mean squared distance of the class's L2-normalised features to their mean "
    "(= sum over dimensions of the per-dimension variance, in [0, 1] for any dimension); "
    "relative: that divided by the same over all items. 'clip' = CLIP image embedding before W, "
    "'projected' = after W (identical for a model without W). Video features are pooled over frames first."
)


def run_eval(
    data: Path,
    out: Path,
    models: Sequence[ModelChoice],
    *,
    classes: str | None = None,
    prompt_sets: Sequence[str] = PROMPT_SET_NAMES,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    options: PipelineOptions,
    detector: FaceDetector | None = None,
    backend: EncodeBackend | None = None,
) -> dict:
    """Returns the metrics.json content after writing every output under `out` (an earlier run's are
    removed first; each model's are written as it finishes). `backend`: where the encoders run
    (default: here; `fer eval --ray` passes a Ray cluster's)."""
    items = read_labelled(data)
    class_words = choose_classes((item.label for item in items), classes)  # from all items, not the subset
    merged = merged_labels((item.label for item in items), class_words)
    items = take_subset(items, limit, seed)
    labels = np.array(label_indices((item.label for item in items), class_words))
    prompt_sets = resolve_prompt_sets(prompt_sets)
    start_outputs(out, OUTPUTS)
    # The exact prompts behind every number: a reader of the table knows which lists produced it.
    prompts = {p: prompt_table(class_words, p) for p in prompt_sets}
    write_json(out / "prompts.json", prompts, ensure_ascii=False)
    metrics = {
        "data": str(data),
        "n_items": len(items),
        "limit": limit,
        "seed": seed,
        "frames": options.frames,
        "detect_faces": options.detect_faces,
        "classes": list(class_words),
        "merged_labels": merged,  # class -> the label spellings scored as it (equal up to case, spacing)
        "prompt_sets": prompt_sets,
        "zero_sample_classes": "per-class recall is null and the class is left out of UAR",
        "feature_variance_definition": VARIANCE_DEFINITION,
        "models": {},
        "models_pending": [choice.name for choice in models],  # left over only by a run that failed
    }
    variance = {}
    with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "model", "prompts", "predicted", *(f"p_{c}" for c in class_words)])

        def score(choice: ModelChoice, engine: TextSide, encoded: EncodedItems) -> None:
            y = labels[encoded.kept]
            result = {
                **engine_fields(choice.entry, engine),  # dtype: FER_DTYPE=float32 for a float32 reference
                "spec": {k: str(v) for k, v in choice.settings.resolve().__dict__.items()},
                "skipped": {items[i].file: why for i, why in encoded.failures.items()},
                "prompts": {},
            }
            for prompt_set in prompt_sets:
                text = engine.class_features(class_words, prompt_set)
                probabilities = classify(encoded.features, text, class_words).probabilities.numpy()
                predicted = probabilities.argmax(axis=1)
                scores = classification_metrics(y, predicted, class_words)
                result["prompts"][prompt_set] = scores
                for row, i in enumerate(encoded.kept):
                    writer.writerow(
                        [
                            items[i].file,
                            class_words[labels[i]],
                            choice.name,
                            prompt_set,
                            class_words[predicted[row]],
                        ]
                        + [f"{p:.6f}" for p in probabilities[row]]
                    )
                plot_confusion(
                    scores["confusion"],
                    class_words,
                    list(scores["per_class_n"].values()),
                    f"{choice.name}, {prompt_set}: UAR {scores['uar']:.2f} / WAR {scores['war']:.2f}",
                    out / f"confusion_{slug(choice.name)}_{prompt_set}.png",
                )
            variance[choice.name] = {
                "clip": feature_variance(encoded.clip_features.numpy(), y, class_words),
                "projected": feature_variance(encoded.features.numpy(), y, class_words),
            }
            result["feature_variance"] = variance[choice.name]
            metrics["models"][choice.name] = result
            metrics["models_pending"].remove(choice.name)
            log.info("%s: %s", choice.name, {p: round(s["uar"], 2) for p, s in result["prompts"].items()})
            # This model's results, whatever happens to the next one.
            f.flush()
            plot_feature_variance(variance, class_words, out / "feature_variance.png")
            write_json(out / "metrics.json", metrics)
            write_text_atomic(out / "table.md", results_table(metrics))

        paths = [item.path for item in items]
        encode_each_model(models, paths, options, backend, score, batch_size=batch_size, detector=detector)
    return metrics


def results_table(metrics: dict) -> str:
    """Table A of the paper's appendix, for this data: one row per model and prompt set."""
    lines = [
        f"Data: `{metrics['data']}`, {metrics['n_items']} items, classes: {', '.join(metrics['classes'])}.",
        "",
    ]
    if metrics["merged_labels"]:
        merged = "; ".join(f"{c} = {', '.join(s)}" for c, s in metrics["merged_labels"].items())
        lines += [f"Labels merged (equal up to case and spacing): {merged}.", ""]
    lines += [
        "| model | prompts | UAR | WAR | n |",
        "|---|---|---|---|---|",
    ]
    for name, result in metrics["models"].items():
        for prompt_set, s in result["prompts"].items():
            lines.append(f"| {name} | {prompt_set} | {s['uar']:.2f} | {s['war']:.2f} | {s['n']} |")
    return "\n".join(lines) + "\n"
