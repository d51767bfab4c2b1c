"""Work in chunks whose results are saved as they finish, so a crash never redoes them.

A chunk is identified by a key derived from its inputs and the configuration, so a rerun
with the same inputs and settings finds the saved result, while any change recomputes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def config_hash(config: dict) -> str:
    """A short stable hash of a JSON-serialisable configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_key(config_digest: str, item_ids: Sequence[str]) -> str:
    """The name of a chunk: the configuration and exactly which items it holds."""
    return hashlib.sha256("\n".join([config_digest, *item_ids]).encode()).hexdigest()[:24]


def run_in_chunks(
    items: Sequence[Item],
    chunk_size: int,
    *,
    item_id: Callable[[Item], str],
    config_digest: str,
    load: Callable[[str], Result | None],
    save: Callable[[str, Result], None],
    work: Callable[[Sequence[Item]], Result],
    on_chunk: Callable[[int, int, bool], None] | None = None,
) -> list[Result]:
    """Results of ``work`` over consecutive chunks, reusing every chunk already saved.

    ``on_chunk(index, total, reused)`` reports progress after each chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    chunks = [items[start : start + chunk_size] for start in range(0, len(items), chunk_size)]
    results = []
    for index, chunk in enumerate(chunks):
        key = chunk_key(config_digest, [item_id(item) for item in chunk])
        result = load(key)
        reused = result is not None
        if not reused:
            result = work(chunk)
            save(key, result)
        results.append(result)
        if on_chunk is not None:
            on_chunk(index, len(chunks), reused)
    return results
