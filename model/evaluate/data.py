"""Labelled evaluation data: a folder with one sub-folder per class, or a CSV `file,label`;
for retrieval a CSV `file,description`. Paths in a CSV are relative to the CSV's folder."""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from model.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from model.prompts import CLASS_PRESETS, resolve_classes

log = logging.getLogger(__name__)

MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
# Inferred class lists: the smallest of these (official order) that holds every label.
INFERRED_PRESETS = ("basic7", "basic8", "all11")


class DatasetError(ValueError):
    """Data that cannot be evaluated as given; the message says what to change."""


@dataclass(frozen=True)
class LabelledItem:
    file: str  # as written in the CSV, or relative to the folder: the name outputs use
    path: Path  # where it is read from
    label: str


@dataclass(frozen=True)
class RetrievalSet:
    """Unique items and unique descriptions; `relevant[i]` = indices of the descriptions the CSV
    pairs with item i (an item may appear on several rows)."""

    files: list[str]
    paths: list[Path]
    descriptions: list[str]
    relevant: list[frozenset[int]]


def read_labelled(data: Path) -> list[LabelledItem]:
    if data.is_dir():
        return _read_folder(data)
    if data.is_file():
        return [
            LabelledItem(row["file"], data.parent / row["file"], row["label"])
            for row in _csv_rows(data, "label")
        ]
    raise DatasetError(f"{data} does not exist: give a folder of class sub-folders or a CSV file,label")


def _read_folder(root: Path) -> list[LabelledItem]:
    items, ignored = [], 0
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file():
                continue
            if path.suffix.lower() in MEDIA_EXTENSIONS:
                items.append(LabelledItem(path.relative_to(root).as_posix(), path, class_dir.name))
            else:
                ignored += 1
    if ignored:
        log.warning(
            "%d files in %s are neither images nor videos (by extension) and were ignored", ignored, root
        )
    if not items:
        raise DatasetError(f"{root} holds no images or videos in class sub-folders")
    return items


def _csv_rows(path: Path, column: str) -> list[dict[str, str]]:
    """Rows of a CSV whose header names `file` and `column`; empty cells are an error naming the line."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(f)
        missing = {"file", column} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(
                f"{path}: the header must name the columns file,{column} (found {reader.fieldnames})"
            )
        rows = []
        for row in reader:
            file, value = (row.get("file") or "").strip(), " ".join((row.get(column) or "").split())
            if not file and not value:
                continue
            if not file or not value:
                raise DatasetError(f"{path}, line {reader.line_num}: both file and {column} are needed")
            rows.append({"file": file, column: value})
    if not rows:
        raise DatasetError(f"{path} has no rows")
    return rows


def _key(label: str) -> str:
    return " ".join(label.split()).lower()


def _spellings(labels: Iterable[str]) -> dict[str, list[str]]:
    """Labels equal up to case and spacing, grouped: key -> its spellings, the most common first (ties
    in sorted order). CLIP's tokenizer lowercases, so they cannot be told apart: they are one class."""
    counts = Counter(" ".join(label.split()) for label in labels)
    groups: dict[str, list[str]] = {}
    for label in sorted(counts, key=lambda label: (-counts[label], label)):
        groups.setdefault(_key(label), []).append(label)
    return groups


def choose_classes(labels: Iterable[str], spec: str | None) -> tuple[str, ...]:
    """The class list to score against. Given (`--classes`), every label must be in it; inferred, it is
    the smallest preset holding every label (official order), else the labels themselves (one spelling
    of each, see `_spellings`), sorted."""
    groups = _spellings(labels)
    labels = sorted(spellings[0] for spellings in groups.values())
    present = set(groups)
    if spec is not None:
        classes = resolve_classes(spec)
        known = {_key(c) for c in classes}
        unknown = sorted(label for label in labels if _key(label) not in known)
        if unknown:
            raise DatasetError(
                f"labels not in the class list ({', '.join(classes)}): {', '.join(unknown)}; "
                "pass --classes naming every label"
            )
        return classes
    for name in INFERRED_PRESETS:
        if present <= {_key(c) for c in CLASS_PRESETS[name]}:
            log.info("classes inferred from the labels: %s", name)
            return CLASS_PRESETS[name]
    log.info("labels are not all in a class preset; scoring against the labels themselves")
    return resolve_classes(labels)


def merged_labels(labels: Iterable[str], classes: Sequence[str]) -> dict[str, list[str]]:
    """Class -> the label spellings scored as it, for the classes with several (logged as a warning):
    an evaluation says which labels it merged."""
    class_of = {_key(c): c for c in classes}
    merged = {}
    for key, spellings in _spellings(labels).items():
        if len(spellings) > 1:
            merged[class_of[key]] = sorted(spellings)
            log.warning(
                "labels %s differ only in case or spacing: scored as one class, %s",
                ", ".join(sorted(spellings)),
                class_of[key],
            )
    return dict(sorted(merged.items()))


def label_indices(labels: Iterable[str], classes: Sequence[str]) -> list[int]:
    position = {_key(c): i for i, c in enumerate(classes)}
    return [position[_key(label)] for label in labels]


def take_subset(items: list, limit: int | None, seed: int) -> list:
    """`--limit`: a seeded random sample kept in the data's order (the first N of a class-folder
    dataset would be one class)."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise DatasetError("--limit must be at least 1")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def read_retrieval(path: Path) -> RetrievalSet:
    if not path.is_file():
        raise DatasetError(f"{path} does not exist: give a CSV file,description")
    files: dict[str, set[int]] = {}
    descriptions: dict[str, int] = {}
    for row in _csv_rows(path, "description"):
        index = descriptions.setdefault(row["description"], len(descriptions))
        files.setdefault(row["file"], set()).add(index)
    return RetrievalSet(
        files=list(files),
        paths=[path.parent / f for f in files],
        descriptions=list(descriptions),
        relevant=[frozenset(r) for r in files.values()],
    )
