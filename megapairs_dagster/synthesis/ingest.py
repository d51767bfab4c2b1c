"""One shard from its source to normalised images and rejects, whatever goes wrong inside it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

from megapairs_dagster.synthesis.normalize import DEFAULT_RULES, IngestRules, normalize_shard
from megapairs_dagster.synthesis.readers import CorpusReadError, RawSample, Shard, read_shard

CORRUPT_CONTAINER = "corrupt_container"


def ingest_shard(
    shard: Shard,
    rules: IngestRules = DEFAULT_RULES,
    *,
    storage_options: dict[str, Any] | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    progress: Callable[[int], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and normalise a shard; returns ``(images, rejects)``.

    ``images`` gains a ``meta`` column (the sample's source metadata as JSON, e.g. the
    img2dataset ``.json``) so later diagnostics can use it. A container that breaks part-way
    (a truncated tar) keeps the samples read before the break and records the break as a
    ``corrupt_container`` reject, instead of failing the whole shard. Every sample read
    ends up in exactly one of the two frames.
    """
    metas: dict[str, str] = {}
    container_errors: list[str] = []

    def samples() -> Iterator[RawSample]:
        try:
            for sample in read_shard(
                shard, storage_options, image_column=image_column, caption_column=caption_column
            ):
                # default=str: parquet meta columns may hold bytes or timestamps
                metas[sample.key] = (
                    json.dumps(sample.meta, sort_keys=True, default=str) if sample.meta else ""
                )
                yield sample
        except CorpusReadError as error:
            container_errors.append(str(error))

    images, rejects = normalize_shard(samples(), rules, progress=progress)
    images["meta"] = images["key"].map(metas).fillna("").astype(str)
    if container_errors:
        broken = pd.DataFrame(
            {"key": [shard.name], "reason": [CORRUPT_CONTAINER], "detail": container_errors[:1]}
        )
        rejects = pd.concat([rejects, broken], ignore_index=True)
    return images, rejects
