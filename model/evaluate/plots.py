"""Figures as PNG, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def plot_confusion(
    matrix: Sequence[Sequence[float]], classes: Sequence[str], counts: Sequence[int], title: str, path: Path
) -> Path:
    """Row-normalised confusion matrix; each row label carries its item count."""
    matrix = np.asarray(matrix)
    size = 2.0 + 0.6 * len(classes)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [f"{c} (n={n})" for c, n in zip(classes, counts, strict=True)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 16:
        for (row, col), value in np.ndenumerate(matrix):
            ax.text(
                col,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > 0.5 else "black",
            )
    fig.tight_layout()
    return _save(fig, path)


def plot_feature_variance(
    variance: Mapping[str, Mapping[str, Mapping[str, float | None]]], classes: Sequence[str], path: Path
) -> Path:
    return _save(feature_variance_figure(variance, classes), path)


def feature_variance_figure(
    variance: Mapping[str, Mapping[str, Mapping[str, float | None]]], classes: Sequence[str]
) -> Figure:
    """One panel per model: relative per-class variance, plain CLIP vs projected, side by side; a class
    with fewer than two items has no variance and says "n/a" rather than showing a zero bar."""
    fig = Figure(figsize=(2.0 + 0.7 * len(classes), 3.2 * len(variance)))
    x = np.arange(len(classes))
    for panel, (model, spaces) in enumerate(variance.items(), start=1):
        ax = fig.add_subplot(len(variance), 1, panel)
        for offset, space in ((-0.2, "clip"), (0.2, "projected")):
            values = [spaces[space]["relative"][c] for c in classes]
            ax.bar(x + offset, [np.nan if v is None else v for v in values], width=0.4, label=space)
        for position, name in zip(x, classes, strict=True):
            if spaces["clip"]["relative"][name] is None:
                ax.text(position, 0.05, "n/a", ha="center", va="bottom", fontsize=8, color="dimgray")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        # From 0, so the "n/a" marks sit inside the axes even when no class has a variance (autoscale would
        # then span only the 1.0 line, and the marks below it would leave tight_layout no room).
        ax.set_ylim(bottom=0)
        ax.set_xticks(x, classes, rotation=30, ha="right")
        ax.set_ylabel("class / all-items variance")
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_precision_at_k(
    precision: Mapping[str, Mapping[str, float]], n_items: int, chance: Mapping[str, float], path: Path
) -> Path:
    return _save(precision_at_k_figure(precision, n_items, chance), path)


def precision_at_k_figure(
    precision: Mapping[str, Mapping[str, float]], n_items: int, chance: Mapping[str, float]
) -> Figure:
    """P@k per k, the models' bars side by side (appendix E, Fig. D), with what a random ranking gets
    at each k (one mark per k: beyond the number of descriptions it falls as 1/k)."""
    ks = list(next(iter(precision.values())))
    width = 0.8 / len(precision)
    fig = Figure(figsize=(2.0 + 1.2 * len(ks), 3.8))
    ax = fig.add_subplot()
    x = np.arange(len(ks))
    for i, (model, values) in enumerate(precision.items()):
        ax.bar(x + (i - (len(precision) - 1) / 2) * width, [values[k] for k in ks], width=width, label=model)
    ax.hlines(
        [chance[k] for k in ks], x - 0.45, x + 0.45, color="grey", linewidth=1, linestyle="--", label="chance"
    )
    ax.set_xticks(x, [f"P@{k}" for k in ks])
    ax.set_ylabel("precision")
    ax.set_title(f"Description retrieval: precision at k, {n_items} items")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
