"""MMEB's training set (TIGER-Lab/MMEB-train), read from a local copy in its official layout,
as MMRet-MLLM's second stage trains on it.

The layout (the dataset repository, as VLM2Vec's train loader reads it): one folder per subset
(``CIRR/``, ``NIGHTS/``, ``MSCOCO/``...) holding ``<split>-*.parquet`` (splits ``original``,
``diverse_instruction``; older copies ``train``), rows ``qry`` (with an ``<|image_1|>`` tag
where the query image goes), ``qry_image_path``, ``pos_text`` and ``pos_image_path``, image
paths relative to the unpacked images folder, "" for none.

``train_mmret`` trains on (query image + instruction, target image) pairs, so the examples
that fit are those whose query and positive both have an image; the positive's text (an
instruction such as "Represent the given image.") is dropped, and the others are counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from .data import MMRetTrainingSet, PairExample, _UrlLoader

IMAGE_TAG = "<|image_1|>"  # where MMEB puts the image in a text
COLUMNS = ["qry", "qry_image_path", "pos_text", "pos_image_path"]
DEFAULT_SPLIT = "original"


class MMEBTrainError(ValueError):
    """The MMEB-train copy is not where, or not what, the settings say."""


@dataclass(frozen=True)
class MMEBTrainExample:
    subset: str
    query_text: str
    query_image: str | None  # relative to the images folder
    positive_text: str
    positive_image: str | None


def read_mmeb_train(
    root: str | Path, *, split: str = DEFAULT_SPLIT, subsets: Sequence[str] | None = None,
    per_subset: int | None = None,
) -> Iterator[MMEBTrainExample]:
    """The rows of every subset folder of ``root`` that has the split (or of ``subsets``), the
    first ``per_subset`` of each (VLM2Vec's ``num_sample_per_subset``), one at a time."""
    root = Path(root)
    if not root.is_dir():
        raise MMEBTrainError(f"MMEB-train: {root} is not a folder")
    names = list(subsets or sorted(
        p.parent.name for p in root.glob(f"*/{split}-00000-of-*.parquet")))
    if not names:
        raise MMEBTrainError(f"MMEB-train: no subset folder in {root} has {split}-*.parquet")
    for name in names:
        files = sorted((root / name).glob(f"{split}-*.parquet"))
        if not files:
            raise MMEBTrainError(f"MMEB-train: no {root / name}/{split}-*.parquet")
        taken = 0
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(columns=COLUMNS):
                for row in batch.to_pylist():
                    if per_subset is not None and taken >= per_subset:
                        break
                    taken += 1
                    yield MMEBTrainExample(
                        name, row["qry"], row["qry_image_path"] or None, row["pos_text"],
                        row["pos_image_path"] or None,
                    )


def composed_pairs(
    examples: Iterator[MMEBTrainExample], images: str | Path
) -> tuple[list[PairExample], dict[str, int]]:
    """The examples ``train_mmret`` can train on as ``PairExample`` (image keys: paths under
    ``images``; the query text without its image tag is the instruction; no mined hard
    negatives), and how many of each subset were kept and skipped."""
    images = Path(images)
    pairs, counts = [], Counter()
    for example in examples:
        if example.query_image is None or example.positive_image is None:
            counts[f"{example.subset}_skipped"] += 1
            continue
        counts[f"{example.subset}_kept"] += 1
        instruction = " ".join(example.query_text.replace(IMAGE_TAG, " ").split())
        pairs.append(PairExample(str(images / example.query_image), (instruction,),
                                 str(images / example.positive_image), ()))
    return pairs, dict(sorted(counts.items()))


def mmeb_training_set(pairs: list[PairExample], **options) -> MMRetTrainingSet:
    """``composed_pairs`` as training items, each image read from its path."""
    return MMRetTrainingSet(pairs, _UrlLoader(None), **options)
