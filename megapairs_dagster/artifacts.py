"""The artifact format: where each asset's artifact lives in the store and how it is encoded.

Tables are pandas DataFrames stored as Parquet, dicts as JSON, and the matrix-shaped artifacts
(embeddings, faiss indexes) as npz. Each records ``produced_by`` (run, encoder identity, index
spec, ...) so a file read months later still says what made it. Plain Python: a notebook reads
artifacts with these functions exactly as the pipeline's IO manager writes them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_dagster.storage import ArtifactStoreClient

TABLE_SUFFIX = ".parquet"
JSON_SUFFIX = ".json"
# Small row groups let a reader fetch a few rows of a shard (synthesis/image_index.py) with
# ranged reads instead of the whole table: a shard of images is hundreds of megabytes.
ROW_GROUP_ROWS = 256


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


def write_table(frame: pd.DataFrame, produced_by: dict[str, Any]) -> bytes:
    """Parquet bytes whose schema metadata records what produced the table."""
    # pandas would also store ``frame.attrs`` (e.g. the produced_by of frames read back from
    # saved chunks): the same rows must give the same bytes however they were assembled.
    frame = frame.copy(deep=False)
    frame.attrs = {}
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[b"megapairs.produced_by"] = json.dumps(produced_by).encode()
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata), buffer, row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue()


def open_parquet(source, columns: list[str] | None = None) -> pq.ParquetFile:
    """A Parquet file (bytes, an open file or a path) to read on the calling thread only;
    a clear error if it lacks one of ``columns`` (pyarrow would silently leave it out).

    Pass ``use_threads=False`` to its reads and to ``to_pandas``. Why: when Arrow reads a
    Python-owned source (bytes, an fsspec file) on its thread pools, the last reference to the
    source can be dropped by a pool thread after the read has returned. If the interpreter is
    exiting by then, that thread cannot take the GIL to free the source and the process
    aborts ("terminate called without an active exception"; a core dump showed exactly this).
    Without pre-buffering and with ``use_threads=False`` Arrow starts no pool thread at all
    (tests/test_storage.py counts them). On 2 cores whole tables read as fast as with the
    pools, columns and row groups faster (bench/artifact_reads.py).
    """
    parquet = pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else source,
                             pre_buffer=False)
    missing = sorted(set(columns or ()) - set(parquet.schema_arrow.names))
    if missing:
        # s3fs files name their object in .path, local ones in .name; bytes name nothing
        where = getattr(source, "path", None) or getattr(source, "name", None) or "this table"
        raise KeyError(f"{where} has no column(s) {missing}; it has {parquet.schema_arrow.names}")
    return parquet


def read_table(source, columns: list[str] | None = None) -> pd.DataFrame:
    """A table written by ``write_table`` (bytes or an open file), optionally some columns."""
    table = open_parquet(source, columns).read(columns=columns, use_threads=False)
    frame = table.to_pandas(use_threads=False)
    produced_by = (table.schema.metadata or {}).get(b"megapairs.produced_by")
    if produced_by:
        frame.attrs["produced_by"] = json.loads(produced_by)
    return frame


def artifact_relpath(asset_key_path: list[str], partition_key: str | None) -> str:
    """``<asset>/<partition>`` for per-shard artifacts, ``<asset>/data`` for global ones."""
    return "/".join([*asset_key_path, partition_key or "data"])


def load_artifact(store: ArtifactStoreClient, relpath: str) -> Any:
    """Load whatever the IO manager wrote at ``relpath`` (a table, a JSON dict or a binary)."""
    candidates = [(TABLE_SUFFIX, read_table), (JSON_SUFFIX, lambda b: json.loads(b))]
    candidates += [(cls.SUFFIX, cls.from_bytes) for cls in BINARY_ARTIFACTS]
    for suffix, reader in candidates:
        if store.exists(relpath + suffix):
            return reader(store.read_bytes(relpath + suffix))
    raise FileNotFoundError(
        f"no artifact at {store.url(relpath)}.* — materialise the upstream asset first"
    )


def load_columns(
    store: ArtifactStoreClient, asset: str, partitions: list[str], columns: list[str]
) -> pd.DataFrame:
    """Some columns of a per-shard table over many shards, reading nothing else."""
    frames = []
    for key in partitions:
        with store.path(artifact_relpath([asset], key) + TABLE_SUFFIX).open("rb") as handle:
            frames.append(read_table(handle, columns))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
