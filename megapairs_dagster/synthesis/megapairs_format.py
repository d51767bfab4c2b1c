"""The format the MegaPairs authors released (Hugging Face dataset ``JUNJIE99/MegaPairs``).

One record per pair: ``q_img`` (relative path of the query image), ``q_text`` (list of
instructions), ``t_img`` (relative path of the target) and ``hns`` (relative paths of hard
negatives, the query image first). Paths are relative to the directory of the records file,
so an export can be moved or uploaded as one folder and still be opened by training code.
"""

from __future__ import annotations

import io
import itertools
import json
import numbers
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_dagster.artifacts import open_parquet
from megapairs_dagster.storage import ArtifactStoreClient

MEGAPAIRS_FIELDS = ("q_img", "q_text", "t_img", "hns")
MEGAPAIRS_SCHEMA = pa.schema(
    [
        pa.field("q_img", pa.string()),
        pa.field("q_text", pa.list_(pa.string())),
        pa.field("t_img", pa.string()),
        pa.field("hns", pa.list_(pa.string())),
    ]
)
EXPORT_COLUMNS = ("query_id", "target_id", "instructions", "hard_negative_ids")
JSONL_NAME = "megapairs.jsonl"
PARQUET_NAME = "megapairs.parquet"
IMAGE_DIR = "images"
IMAGE_WRITE_THREADS = 16
IMAGE_WRITE_CHUNK = 256


class MegaPairsFormatError(ValueError):
    """A record (to write or read) that does not follow the MegaPairs format; says where."""


@dataclass(frozen=True)
class MegaPairsRecord:
    """One training example; ``base_url`` (the records file's folder) only serves ``resolve``."""

    q_img: str
    q_text: list[str]
    t_img: str
    hns: list[str]
    base_url: str = field(default="", compare=False, repr=False)

    def resolve(self, image_path: str) -> str:
        """Where ``image_path`` (as written in the record) can be opened from."""
        if "://" in image_path or posixpath.isabs(image_path):
            return image_path
        return posixpath.join(self.base_url, image_path)


def image_relpath(image_id: int) -> str:
    """The path of an image inside an export, as written in its records."""
    if not isinstance(image_id, numbers.Integral) or isinstance(image_id, bool):
        raise MegaPairsFormatError(f"image ids must be integers, got {image_id!r}")
    return f"{IMAGE_DIR}/{int(image_id)}.jpg"


def _string_list(value: Any, name: str, where: str, *, allow_empty: bool) -> list[str]:
    """Normalise a list, tuple or numpy array of strings (how parquet readers return them)."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise MegaPairsFormatError(
            f"{where}: {name} must be a list of strings, got {type(value).__name__}"
        )
    items = list(value)
    if not items and not allow_empty:
        raise MegaPairsFormatError(f"{where}: {name} is empty")
    bad = [item for item in items if not isinstance(item, str) or not item]
    if bad:
        raise MegaPairsFormatError(f"{where}: {name} holds empty or non-string items {bad[:3]!r}")
    return [str(item) for item in items]


def _image_path(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise MegaPairsFormatError(
            f"{where}: {name} must be a non-empty path string, got {value!r}"
        )
    return value


def _record(row: Mapping[str, Any], where: str, base_url: str = "") -> MegaPairsRecord:
    """Validate one row of any source and build its record, naming ``where`` on error."""
    if not isinstance(row, Mapping):
        raise MegaPairsFormatError(
            f"{where}: expected an object with {MEGAPAIRS_FIELDS}, got {row!r:.80}"
        )
    missing = [name for name in MEGAPAIRS_FIELDS if name not in row]
    if missing:
        raise MegaPairsFormatError(f"{where}: missing field(s) {missing}")
    return MegaPairsRecord(
        q_img=_image_path(row["q_img"], "q_img", where),
        q_text=_string_list(row["q_text"], "q_text", where, allow_empty=False),
        t_img=_image_path(row["t_img"], "t_img", where),
        hns=_string_list(row["hns"], "hns", where, allow_empty=True),
        base_url=base_url,
    )


def _export_records(records: pd.DataFrame) -> list[MegaPairsRecord]:
    missing = [name for name in EXPORT_COLUMNS if name not in records.columns]
    if missing:
        raise MegaPairsFormatError(
            f"records lack column(s) {missing}; expected {list(EXPORT_COLUMNS)}"
        )
    exported = []
    columns = (records[name] for name in EXPORT_COLUMNS)
    for row_number, (query_id, target_id, instructions, negatives) in enumerate(zip(*columns)):
        where = f"records row {row_number} (query {query_id}, target {target_id})"
        if not isinstance(negatives, (list, tuple, np.ndarray)):
            raise MegaPairsFormatError(f"{where}: hard_negative_ids must be a list of image ids")
        row = {
            "q_img": image_relpath(query_id),
            "q_text": instructions,
            "t_img": image_relpath(target_id),
            "hns": [image_relpath(negative) for negative in negatives],
        }
        record = _record(row, where)
        if not record.hns or record.hns[0] != record.q_img:
            raise MegaPairsFormatError(
                f"{where}: hns must start with the query image {record.q_img} as in the "
                f"released MegaPairs data, got {record.hns[:2]}"
            )
        exported.append(record)
    return exported


def _as_row(record: MegaPairsRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in MEGAPAIRS_FIELDS}


def write_megapairs(
    records: pd.DataFrame,
    out_dir_url: str,
    *,
    images: Callable[[list[int]], Iterable[tuple[int, bytes]]],
    storage_options: dict[str, Any] | None = None,
) -> dict:
    """Export pairs as ``megapairs.jsonl``, ``megapairs.parquet`` and ``images/<id>.jpg``.

    ``records`` holds ``query_id, target_id, instructions, hard_negative_ids`` (the query id
    first among the negatives). ``images(ids)`` yields ``(image_id, jpeg)`` for each id, in
    whatever order reads them cheapest; they are written as they come, so memory holds one
    chunk of them. Every file is written atomically, images before the record files, so a
    record file that exists never names a missing image.
    """
    exported = _export_records(records)
    store = ArtifactStoreClient(out_dir_url, storage_options)
    image_ids = sorted(
        set(records["query_id"])
        .union(records["target_id"])
        .union(*(set(negatives) for negatives in records["hard_negative_ids"]))
    )
    wanted, written, written_bytes = set(image_ids), set(), 0
    # Each local write ends in an fsync and each S3 write is a round trip: overlap them in
    # threads, a chunk at a time so memory stays bounded.
    with ThreadPoolExecutor(max_workers=IMAGE_WRITE_THREADS) as pool:
        stream = iter(images(image_ids))
        while True:
            chunk = list(itertools.islice(stream, IMAGE_WRITE_CHUNK))
            if not chunk:
                break
            ids = [int(image_id) for image_id, _ in chunk]
            unexpected = [i for i in ids if i not in wanted or i in written]
            if unexpected:
                raise MegaPairsFormatError(
                    f"images {unexpected[:3]} were not asked for or came twice")
            list(pool.map(store.write_bytes, map(image_relpath, ids), [j for _, j in chunk]))
            written.update(ids)
            written_bytes += sum(len(jpeg) for _, jpeg in chunk)
    if written != wanted:
        missing = sorted(wanted - written)
        raise MegaPairsFormatError(
            f"{len(missing)} referenced images were not supplied, e.g. {missing[:3]}")
    rows = [_as_row(record) for record in exported]
    jsonl = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    store.write_bytes(JSONL_NAME, jsonl.encode())
    table = pa.Table.from_pylist(rows, schema=MEGAPAIRS_SCHEMA)
    store.write_buffer(PARQUET_NAME, lambda buffer: pq.write_table(table, buffer))
    return {
        "records": len(rows),
        "images": len(image_ids),
        "image_bytes": written_bytes,
        "jsonl_url": store.url(JSONL_NAME),
        "parquet_url": store.url(PARQUET_NAME),
    }


def _jsonl_rows(handle: io.IOBase, path_or_url: str) -> Iterator[tuple[str, Any]]:
    for line_number, line in enumerate(io.TextIOWrapper(handle, encoding="utf-8"), start=1):
        if not line.strip():
            continue
        where = f"{path_or_url} line {line_number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise MegaPairsFormatError(f"{where}: not valid JSON ({error})") from error


def _parquet_rows(handle: io.IOBase, path_or_url: str) -> Iterator[tuple[str, Any]]:
    parquet = open_parquet(handle)
    missing = [name for name in MEGAPAIRS_FIELDS if name not in parquet.schema_arrow.names]
    if missing:
        raise MegaPairsFormatError(f"{path_or_url}: missing field(s) {missing} (no such column)")
    row_number = 0
    for batch in parquet.iter_batches(columns=list(MEGAPAIRS_FIELDS), use_threads=False):
        for row in batch.to_pylist():
            yield f"{path_or_url} row {row_number}", row
            row_number += 1


def read_megapairs(
    path_or_url: str, *, storage_options: dict[str, Any] | None = None
) -> Iterator[MegaPairsRecord]:
    """Stream the records of a ``.jsonl`` or ``.parquet`` file (an export or the release)."""
    if path_or_url.endswith(".jsonl"):
        rows = _jsonl_rows
    elif path_or_url.endswith(".parquet"):
        rows = _parquet_rows
    else:
        raise MegaPairsFormatError(f"{path_or_url}: expected a .jsonl or .parquet MegaPairs file")
    base_url = posixpath.dirname(path_or_url)
    with fsspec.open(path_or_url, "rb", **(storage_options or {})) as handle:
        for where, row in rows(handle, path_or_url):
            yield _record(row, where, base_url)
