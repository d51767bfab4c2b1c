"""Artifact containers that are not tables, and their byte formats.

Tables are pandas DataFrames stored as parquet; these are the matrix-shaped artifacts.
Each carries ``produced_by`` (encoder identity, index spec, ...) so a file read months later
still says what made it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


def _npz_bytes(meta: dict[str, Any], **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return buffer.getvalue()


def _npz_load(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    return meta, arrays


@dataclass
class Embeddings:
    """L2-normalised float16 vectors, row-aligned with a shard's ``corpus_images``."""

    SUFFIX: ClassVar[str] = ".embeddings.npz"

    ids: np.ndarray
    vectors: np.ndarray
    produced_by: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.vectors = np.asarray(self.vectors, dtype=np.float16)
        if self.vectors.ndim != 2 or len(self.ids) != len(self.vectors):
            raise ValueError(
                f"embeddings must be (N, D) with N ids; got {self.vectors.shape} for {len(self.ids)} ids"
            )

    def to_bytes(self) -> bytes:
        return _npz_bytes(self.produced_by, ids=self.ids, vectors=self.vectors)

    @classmethod
    def from_bytes(cls, data: bytes) -> Embeddings:
        meta, arrays = _npz_load(data)
        return cls(ids=arrays["ids"], vectors=arrays["vectors"], produced_by=meta)


@dataclass
class KnnIndexArtifact:
    """A serialised faiss index over all shards of one view, and the image id of each row."""

    SUFFIX: ClassVar[str] = ".faiss.npz"

    ids: np.ndarray
    index_bytes: bytes
    produced_by: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return _npz_bytes(
            self.produced_by,
            ids=np.asarray(self.ids, dtype=np.int64),
            index=np.frombuffer(self.index_bytes, dtype=np.uint8),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KnnIndexArtifact:
        meta, arrays = _npz_load(data)
        return cls(ids=arrays["ids"], index_bytes=arrays["index"].tobytes(), produced_by=meta)


BINARY_ARTIFACTS: tuple[type, ...] = (Embeddings, KnnIndexArtifact)
