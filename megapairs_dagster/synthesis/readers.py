"""Corpus readers: find the shards of an image corpus and stream their samples.

Every reader goes through fsspec, so the same code reads a local folder and
``s3://bucket/prefix`` (pass s3fs options as ``storage_options``). Three layouts:

* ``webdataset``: ``*.tar`` files in the source folder, one shard each. Members of one
  sample share a key (the member path up to the first dot of its basename, directory kept)
  and are adjacent, as img2dataset writes them: ``KEY.jpg`` / ``KEY.txt`` / ``KEY.json``.
* ``folder``: each sub-folder of the source is a shard holding image files
  (:data:`IMAGE_EXTENSIONS`, searched recursively) whose captions come from a sidecar
  ``NAME.txt`` next to ``NAME.jpg``, or from a ``captions.jsonl`` at the top of the shard
  folder with lines ``{"file": "NAME.jpg", "caption": "..."}`` (``image`` is accepted for
  ``file`` and ``text`` for ``caption``). A sidecar wins over the jsonl. A caption whose
  image file is absent becomes a sample without image.
* ``parquet``: ``*.parquet`` files, one shard each, with an image column (raw bytes, or a
  struct with a ``bytes`` field as Hugging Face datasets write it), a caption column and
  an optional key column (else the row index is the key). Other columns go to ``meta``.

Shards are streamed: a tar is read member by member, a parquet file batch by batch, so a
shard never has to fit in memory.

Captions are passed on as stored (bytes from a ``.txt``, text from JSON or a string column):
decoding and repair happen in ``normalize.py``, which records them. Keys are made storable
here: a name that is not valid UTF-8 shows each bad byte as a ``\\udcXX`` escape.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import fsspec
import pyarrow as pa

from megapairs_dagster.artifacts import open_parquet

ShardFormat = Literal["webdataset", "folder", "parquet"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
FOLDER_CAPTIONS_FILE = "captions.jsonl"
_SHARD_FILE_SUFFIXES: dict[str, ShardFormat] = {".tar": "webdataset", ".parquet": "parquet"}
_PARQUET_BATCH_ROWS = 256


class CorpusReadError(RuntimeError):
    """A shard's container is unreadable (e.g. a truncated tar); names the shard."""


@dataclass(frozen=True)
class RawSample:
    """One corpus sample as stored, before any validation or decoding."""

    key: str
    image_bytes: bytes | None
    caption: str | bytes | None  # bytes: not yet decoded (a .txt member or sidecar)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Shard:
    """One unit of work: ``name`` is its partition key, ``url`` where it lives."""

    name: str
    url: str
    format: ShardFormat


def discover_shards(
    source_url: str,
    storage_options: dict | None = None,
    format: Literal["auto", "webdataset", "folder", "parquet"] = "auto",
) -> list[Shard]:
    """List the complete shards under ``source_url``, sorted by name.

    Hidden entries (``.*``) and files with other suffixes (e.g. ``00001.tar.tmp`` being
    written) are ignored. ``auto`` picks the one layout present and refuses to guess when
    the folder mixes layouts.
    """
    fs, root = fsspec.core.url_to_fs(source_url, **(storage_options or {}))
    if not fs.isdir(root):
        raise FileNotFoundError(f"corpus source {source_url!r} is not an existing folder")
    base_url = source_url.rstrip("/")
    found: dict[ShardFormat, list[Shard]] = {"webdataset": [], "folder": [], "parquet": []}
    for entry in fs.ls(root, detail=True):
        basename = posixpath.basename(entry["name"].rstrip("/"))
        if basename.startswith("."):
            continue
        url = f"{base_url}/{basename}"
        if entry["type"] == "directory":
            found["folder"].append(Shard(basename, url, "folder"))
            continue
        stem, suffix = posixpath.splitext(basename)
        if suffix in _SHARD_FILE_SUFFIXES and stem:
            shard_format = _SHARD_FILE_SUFFIXES[suffix]
            found[shard_format].append(Shard(stem, url, shard_format))
    if format == "auto":
        present = [name for name, shards in found.items() if shards]
        if len(present) > 1:
            raise ValueError(
                f"corpus source {source_url!r} mixes layouts {present}; pass format= explicitly"
            )
        format = present[0] if present else "webdataset"
    shards = sorted(found[format], key=lambda shard: shard.name)
    if not shards:
        raise ValueError(f"corpus source {source_url!r} holds no {format} shards")
    return shards


def read_shard(
    shard: Shard,
    storage_options: dict | None = None,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str = "key",
) -> Iterator[RawSample]:
    """Stream the samples of one shard in stored order.

    The column names only matter for parquet shards. A corrupt container raises
    :class:`CorpusReadError` after the samples read before the damage were yielded.
    """
    options = storage_options or {}
    if shard.format == "webdataset":
        return _read_webdataset(shard, options)
    if shard.format == "folder":
        return _read_folder(shard, options)
    if shard.format == "parquet":
        return _read_parquet(shard, options, image_column, caption_column, key_column)
    raise ValueError(f"unknown shard format {shard.format!r} for shard {shard.url!r}")


def _split_member_name(path: str) -> tuple[str, str]:
    """Split a member path into (key, extension) at the first dot of the basename."""
    directory, basename = posixpath.split(path)
    stem, _, extension = basename.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def _extension_kind(extension: str) -> str:
    """Classify a member by the last part of its extension: image, caption or meta."""
    last = extension.rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS:
        return "image"
    return {"txt": "caption", "json": "meta"}.get(last, "other")


def _storable_key(key: str) -> str:
    """The key with lone surrogates (undecodable bytes of a file name) escaped: Parquet
    refuses them, and the escape still shows which bytes the name held."""
    return key.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _parse_meta(raw: bytes) -> dict:
    """Parse a sample's .json; a malformed one is reported in meta, not fatal."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nested too deep
        return {"json_error": str(exc)}
    return parsed if isinstance(parsed, dict) else {"json": parsed}


def _sample_from_members(key: str, members: dict[str, bytes]) -> RawSample:
    """Build a sample from the members sharing one key; the first image member wins."""
    image_bytes = caption = None
    meta: dict = {}
    for extension, data in members.items():
        kind = _extension_kind(extension)
        if kind == "image" and image_bytes is None:
            image_bytes = data
        elif kind == "caption":
            caption = data
        elif kind == "meta":
            meta = _parse_meta(data)
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    return RawSample(_storable_key(key), image_bytes=image_bytes, caption=caption, meta=meta)


def _read_webdataset(shard: Shard, options: dict) -> Iterator[RawSample]:
    group_key: str | None = None
    members: dict[str, bytes] = {}
    with fsspec.open(shard.url, "rb", **options) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile() or posixpath.basename(member.name).startswith("."):
                        continue
                    key, extension = _split_member_name(member.name)
                    if key != group_key and members:
                        # yield before reading on, so damage further in cannot hide this one
                        yield _sample_from_members(group_key, members)
                        members = {}
                    group_key = key
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name!r} is cut short")
                    members[extension] = data
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise CorpusReadError(f"shard {shard.name!r} ({shard.url}) is corrupt: {exc}") from exc
    if members:
        yield _sample_from_members(group_key, members)


def _folder_captions_from_jsonl(fs, path: str) -> dict[str, str]:
    """Map image file name to caption from a shard's captions.jsonl, if there is one.

    Lines are decoded with ``surrogateescape``: bytes that are not UTF-8 reach the caption as
    lone surrogates, which normalisation replaces and records, instead of failing the shard.
    """
    if not fs.exists(path):
        return {}
    captions = {}
    with fs.open(path, "rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8", errors="surrogateescape"))
                file_name = record.get("file", record.get("image"))
                caption = record.get("caption", record.get("text"))
            except (ValueError, AttributeError, RecursionError) as exc:
                raise CorpusReadError(f"{path} line {line_number} is not a JSON object") from exc
            if isinstance(file_name, str) and isinstance(caption, str):
                captions[posixpath.normpath(file_name)] = caption
    return captions


def _read_folder(shard: Shard, options: dict) -> Iterator[RawSample]:
    fs, root = fsspec.core.url_to_fs(shard.url, **options)
    root = root.rstrip("/")
    images: dict[str, str] = {}  # key -> path
    sidecars: dict[str, str] = {}  # key -> path
    for path in sorted(fs.find(root)):
        relative = path[len(root) + 1 :]
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        stem, suffix = posixpath.splitext(relative)
        extension = suffix.lower().lstrip(".")
        if extension in IMAGE_EXTENSIONS:
            images.setdefault(stem, path)
        elif extension == "txt":
            sidecars[stem] = path
    jsonl_captions = {
        posixpath.splitext(name)[0]: caption
        for name, caption in _folder_captions_from_jsonl(
            fs, f"{root}/{FOLDER_CAPTIONS_FILE}"
        ).items()
    }
    for key in sorted(images.keys() | sidecars.keys() | jsonl_captions.keys()):
        caption = fs.cat_file(sidecars[key]) if key in sidecars else jsonl_captions.get(key)
        image_bytes = fs.cat_file(images[key]) if key in images else None
        yield RawSample(_storable_key(key), image_bytes=image_bytes, caption=caption, meta={})


def _image_cell_bytes(cell, column: str) -> bytes | None:
    """Accept raw bytes or a Hugging Face ``{"bytes": ..., "path": ...}`` struct."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if cell is not None and not isinstance(cell, bytes):
        raise TypeError(f"column {column!r} holds {type(cell).__name__}, not image bytes")
    return cell


def _caption_cell(cell, column: str) -> str | bytes | None:
    if cell is not None and not isinstance(cell, str | bytes):
        raise TypeError(f"column {column!r} holds {type(cell).__name__}, not text")
    return cell


def _read_parquet(
    shard: Shard, options: dict, image_column: str, caption_column: str, key_column: str
) -> Iterator[RawSample]:
    with fsspec.open(shard.url, "rb", **options) as stream:
        try:
            parquet = open_parquet(stream)
            columns = set(parquet.schema_arrow.names)
            missing = {image_column, caption_column} - columns
            if missing:
                raise CorpusReadError(
                    f"shard {shard.name!r} ({shard.url}) lacks column(s) {sorted(missing)}; "
                    f"it has {sorted(columns)}"
                )
            row_index = 0
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, use_threads=False):
                for row in batch.to_pylist():
                    try:
                        image_bytes = _image_cell_bytes(row.pop(image_column), image_column)
                        caption = _caption_cell(row.pop(caption_column), caption_column)
                    except TypeError as exc:  # a column has one type: the wrong column is named
                        raise CorpusReadError(f"shard {shard.name!r} ({shard.url}): {exc}") from exc
                    key = row.pop(key_column) if key_column in columns else row_index
                    row_index += 1
                    yield RawSample(
                        key=str(key), image_bytes=image_bytes, caption=caption, meta=row
                    )
        except (pa.ArrowException, OSError) as exc:
            raise CorpusReadError(
                f"shard {shard.name!r} ({shard.url}) is unreadable: {exc}"
            ) from exc
