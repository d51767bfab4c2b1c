"""The tables ``triplets``, ``images`` and ``benchmark_scores`` as Parquet files in the store.

On a cluster every step runs in its own pod and the artifact store (S3) is the only thing
they share, so each writer owns whole files and nobody needs a lock:

    tables/triplets/<shard>.parquet
    tables/images/<shard>.parquet
    tables/benchmark_scores/<benchmark>/<model>.parquet

Every file is one atomic ``write_bytes`` of complete Parquet bytes (one PUT on S3), so a
reader sees a file's old or new version, never half of one. A shard writes its images file
first and its triplets file last: the triplets file is the shard's commit point. Reading is
DuckDB over those files: ``connect()`` gives an in-memory connection whose views are the
three tables (through the store's fsspec filesystem, as DuckDB's httpfs is not available).
"""

from __future__ import annotations

import io
import os
import posixpath
import resource
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_dagster.storage import ArtifactStoreClient

SCHEMA_VERSION = "2"
SCHEMA_VERSION_KEY = "megapairs.schema_version"
TABLES_DIR = "tables"

TRIPLETS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.int64()),
        pa.field("target_id", pa.int64()),
        pa.field("instructions", pa.list_(pa.string())),
        pa.field("hard_negative_ids", pa.list_(pa.int64())),
        pa.field("views", pa.list_(pa.string())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("description", pa.string()),
        pa.field("generator_backend", pa.string()),
        pa.field("description_model", pa.string()),
        pa.field("instruction_model", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("config_hash", pa.string()),
    ]
)
IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64()),
        pa.field("caption", pa.string()),
        pa.field("uri", pa.string()),
    ]
)
# Columns without which a row is useless; checked before anything is written.
REQUIRED_COLUMNS = {
    "triplets": ("query_id", "target_id", "instructions", "hard_negative_ids"),
    "images": ("image_id", "uri"),
}
# Columns the store fills itself; a frame may carry ``shard`` if it agrees with the argument.
STORE_FILLED_COLUMNS = ("shard", "created_at")
_SHARD = pa.field("shard", pa.string())
_CREATED_AT = pa.field("created_at", pa.timestamp("us"))
# What ``replace_scores`` is given; the store adds benchmark, model, checkpoint, created_at.
_SCORE_ROWS_SCHEMA = pa.schema(
    [
        pa.field("query_group", pa.string()),
        pa.field("metric", pa.string()),
        pa.field("value", pa.float64()),
    ]
)

# The schemas of the files (and so of the views), column order included.
FILE_SCHEMAS = {
    "triplets": pa.schema([*TRIPLETS_SCHEMA, _SHARD, _CREATED_AT]),
    "images": pa.schema(
        [IMAGES_SCHEMA.field("image_id"), _SHARD, IMAGES_SCHEMA.field("caption"),
         IMAGES_SCHEMA.field("uri"), _CREATED_AT]
    ),
    "benchmark_scores": pa.schema(
        [
            pa.field("benchmark", pa.string()),
            pa.field("model", pa.string()),
            *_SCORE_ROWS_SCHEMA,
            pa.field("checkpoint", pa.string()),
            _CREATED_AT,
        ]
    ),
}
# A name becomes a file name and a DuckDB path (where these characters would glob).
_FORBIDDEN_IN_NAMES = set("/\\*?[]{}")
# Where Linux names a process's open files: a path there reopens the very file opened.
_OPEN_FILES = "/proc/self/fd"


def _to_arrow(frame: pd.DataFrame, schema: pa.Schema, table: str, shard: str) -> pa.Table:
    """Check a caller's frame against ``schema`` and convert it, naming what is wrong."""
    expected = set(schema.names)
    missing = sorted(expected - set(frame.columns))
    unexpected = sorted(set(frame.columns) - expected - set(STORE_FILLED_COLUMNS))
    if missing or unexpected:
        raise ValueError(
            f"{table} rows for shard {shard!r}: missing columns {missing}, "
            f"unexpected columns {unexpected}; expected {schema.names}"
        )
    if "created_at" in frame.columns:
        raise ValueError(f"{table} rows for shard {shard!r}: created_at is set by the store")
    if "shard" in frame.columns and not (frame["shard"] == shard).all():
        others = sorted(set(frame["shard"].astype(str)) - {shard})
        raise ValueError(f"{table} rows for shard {shard!r} also name shards {others}")
    if frame.empty:  # pandas gives empty list columns a float dtype; there is nothing to convert
        return schema.empty_table()
    try:
        converted = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        raise ValueError(f"{table} rows for shard {shard!r} have a wrong type: {error}") from error
    with_nulls = [name for name in REQUIRED_COLUMNS[table] if converted[name].null_count]
    if with_nulls:
        raise ValueError(f"{table} rows for shard {shard!r} have nulls in {with_nulls}")
    return converted


def _check_name(kind: str, name: str) -> None:
    if not name or name.startswith(".") or _FORBIDDEN_IN_NAMES & set(name):
        raise ValueError(
            f"{kind} {name!r} cannot name a table file: it must be non-empty, not start with "
            f"'.', and contain none of {''.join(sorted(_FORBIDDEN_IN_NAMES))}"
        )


def _parquet_bytes(rows: pa.Table, table: str, constants: dict) -> bytes:
    """A file of ``table`` as bytes: ``rows`` plus constant columns, version-tagged."""
    schema = FILE_SCHEMAS[table]
    for column, value in constants.items():
        field = schema.field(column)
        rows = rows.append_column(field, pa.array([value] * rows.num_rows, field.type))
    rows = rows.select(schema.names).replace_schema_metadata({SCHEMA_VERSION_KEY: SCHEMA_VERSION})
    buffer = io.BytesIO()
    pq.write_table(rows, buffer)
    return buffer.getvalue()


def _column(name: str) -> str:
    """A column of the triplets table, checked before it goes into SQL."""
    names = FILE_SCHEMAS["triplets"].names
    if name not in names:
        raise ValueError(f"triplets has no column {name!r}; its columns: {names}")
    return name


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _single_row(connection: duckdb.DuckDBPyConnection, sql: str) -> tuple:
    """The one row of a statement, fetched to the end (DuckDB 2 refuses new work before that)."""
    (row,) = connection.execute(sql).fetchall()
    return row


class TripletStore:
    """Replace-by-shard writes and DuckDB reads of the tables under ``store``'s ``tables/``."""

    def __init__(self, store: ArtifactStoreClient):
        self.store = store

    @staticmethod
    def _relpath(table: str, name: str) -> str:
        return f"{TABLES_DIR}/{table}/{name}.parquet"

    def _rows_in(self, relpath: str) -> int:
        """Rows of the file at ``relpath`` (0 if none), from its footer alone."""
        path = self.store.path(relpath).path
        self.store.fs.invalidate_cache(path)
        try:
            with self.store.fs.open(path, "rb") as handle:
                return pq.read_metadata(handle).num_rows
        except FileNotFoundError:
            return 0

    def replace_shard(self, shard: str, triplets: pd.DataFrame, images: pd.DataFrame) -> dict:
        """Replace the shard's two files with these rows; return counts and the time it took.

        Everything is checked and encoded before the first write, so a bad frame changes
        nothing. Images go first and triplets last: if the store fails in between, the old
        triplets stay, beside the new images, until the shard is rerun.
        """
        started = time.perf_counter()
        _check_name("shard", shard)
        incoming_triplets = _to_arrow(triplets, TRIPLETS_SCHEMA, "triplets", shard)
        incoming_images = _to_arrow(images, IMAGES_SCHEMA, "images", shard)
        stamp = {"shard": shard, "created_at": datetime.now(timezone.utc).replace(tzinfo=None)}
        files = {
            "images": _parquet_bytes(incoming_images, "images", stamp),
            "triplets": _parquet_bytes(incoming_triplets, "triplets", stamp),
        }
        deleted = {}
        for table, data in files.items():
            relpath = self._relpath(table, shard)
            deleted[table] = self._rows_in(relpath)
            self.store.write_bytes(relpath, data)
        return {
            "shard": shard,
            "triplets_deleted": deleted["triplets"],
            "triplets_inserted": incoming_triplets.num_rows,
            "images_deleted": deleted["images"],
            "images_inserted": incoming_images.num_rows,
            "write_s": time.perf_counter() - started,
        }

    def replace_scores(
        self, benchmark: str, model: str, metrics: dict[str, dict[str, float]], checkpoint: str
    ) -> int:
        """Replace the ``benchmark_scores`` file of one (benchmark, model); return its rows.

        ``metrics`` maps a query group ("all", or e.g. an edit type) to ``{metric: value}``.
        """
        _check_name("benchmark", benchmark)
        _check_name("model", model)
        rows = [
            {"query_group": group, "metric": metric, "value": float(value)}
            for group, values in metrics.items()
            for metric, value in values.items()
        ]
        scores = pa.Table.from_pylist(rows, schema=_SCORE_ROWS_SCHEMA)
        constants = {
            "benchmark": benchmark,
            "model": model,
            "checkpoint": checkpoint,
            "created_at": datetime.now(timezone.utc).replace(tzinfo=None),
        }
        data = _parquet_bytes(scores, "benchmark_scores", constants)
        self.store.write_bytes(self._relpath("benchmark_scores", f"{benchmark}/{model}"), data)
        return len(rows)

    def _files(self, table: str, shards: Collection[str] | None) -> list[str]:
        """The table's files as DuckDB paths, listed afresh (other processes add files)."""
        fs = self.store.fs
        folder = self.store.path(TABLES_DIR, table).path
        fs.invalidate_cache(folder)
        found = [
            path
            for path in sorted(fs.find(folder))
            if path.endswith(".parquet") and not posixpath.basename(path).startswith(".")
        ]
        if shards is not None:
            wanted = {f"{shard}.parquet" for shard in shards}
            found = [path for path in found if posixpath.basename(path) in wanted]
        return found if self.store.is_local else [fs.unstrip_protocol(path) for path in found]

    def written_shards(self) -> list[str]:
        """The shards whose triplets file exists, those with zero triplets included."""
        files = self._files("triplets", None)
        return [posixpath.basename(path).removesuffix(".parquet") for path in files]

    def _pinned(self, files: list[str], stack: ExitStack) -> list[str]:
        """Paths through which DuckDB reads the local ``files`` as they are now.

        DuckDB opens a Parquet file by its path more than once in a query (its footer, then
        each scan), so a writer renaming a new file over it in between would have it read the
        new bytes with the old footer and fail ("Invalid data"). Each file is opened once here
        and read through ``/proc/self/fd``, which keeps naming that file whatever is renamed
        over its path later. Without ``/proc``, or with more files than a quarter of the open
        file limit, the paths are returned as they are.
        """
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if not (self.store.is_local and os.path.isdir(_OPEN_FILES)) or len(files) > limit // 4:
            return files
        pinned = []
        for path in files:
            descriptor = os.open(path, os.O_RDONLY)
            stack.callback(os.close, descriptor)
            pinned.append(f"{_OPEN_FILES}/{descriptor}")
        return pinned

    @contextmanager
    def connect(
        self, shards: Collection[str] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB connection with the views ``triplets``, ``images`` and
        ``benchmark_scores`` over the store's files.

        The files are listed once, so every query on the connection sees the same shards;
        in a local store also the same version of each file (``_pinned``), even if a writer
        replaces it meanwhile. ``shards`` limits ``triplets`` and ``images`` to those shards
        and reads no other file. A table without files is an empty view with the full schema.
        """
        with ExitStack() as pins, duckdb.connect() as connection:
            if not self.store.is_local:
                connection.register_filesystem(self.store.fs)
            for table, schema in FILE_SCHEMAS.items():
                listed = self._files(table, None if table == "benchmark_scores" else shards)
                if not listed:
                    connection.register(table, schema.empty_table())
                    continue
                files = self._pinned(listed, pins)
                self._check_versions(connection, files, listed)
                paths = ", ".join(_sql_string(path) for path in files)
                connection.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{paths}])")
            yield connection

    @staticmethod
    def _check_versions(
        connection: duckdb.DuckDBPyConnection, files: list[str], names: list[str]
    ) -> None:
        """Refuse files of another schema version rather than mixing them into one view;
        ``names`` are the files' paths in the store, for the messages."""
        try:
            found = dict(
                connection.execute(
                    "SELECT file_name, decode(value) FROM parquet_kv_metadata(?) "
                    "WHERE decode(key) = ?",
                    [files, SCHEMA_VERSION_KEY],
                ).fetchall()
            )
        except duckdb.Error as error:  # e.g. not Parquet: named by its store path, not its pin
            message = str(error)
            for path, name in sorted(zip(files, names), key=lambda pair: -len(pair[0])):
                message = message.replace(path, name)
            raise type(error)(message) from error
        wrong = [f"{name} ({found.get(path, 'none')})" for path, name in zip(files, names)
                 if found.get(path) != SCHEMA_VERSION]
        if wrong:
            raise RuntimeError(
                f"{len(wrong)} table file(s) have another schema version than {SCHEMA_VERSION}, "
                f"which this code reads: {wrong[:3]}; rewrite them (rerun their shards)"
            )

    def scores_frame(self) -> pd.DataFrame:
        """Every row of ``benchmark_scores``."""
        with self.connect() as connection:
            return connection.execute(
                "SELECT * FROM benchmark_scores ORDER BY benchmark, model, query_group, metric"
            ).df()

    def counts(self) -> dict:
        """Rows per table and number of shards, for asset metadata."""
        with self.connect() as connection:
            triplets, shards = _single_row(
                connection, "SELECT count(*), count(DISTINCT shard) FROM triplets"
            )
            (images,) = _single_row(connection, "SELECT count(*) FROM images")
        return {"triplets": int(triplets), "images": int(images), "shards": int(shards)}

    def duplicate_pairs(self) -> int:
        """How many (query_id, target_id) pairs occur more than once (0 when the store is sound).

        Each shard owns its file, so nothing stops two shards from holding the same pair;
        this count is the check.
        """
        with self.connect() as connection:
            (duplicates,) = _single_row(
                connection,
                "SELECT count(*) FROM (SELECT 1 FROM triplets "
                "GROUP BY query_id, target_id HAVING count(*) > 1)",
            )
        return int(duplicates)

    def triplets_frame(
        self, shards: Collection[str] | None = None, columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """The triplets of ``shards`` (all when None), ordered, list columns as Python lists;
        only ``columns`` when given (a reader of millions of rows rarely needs the
        descriptions)."""
        selected = "*" if columns is None else ", ".join(f'"{_column(c)}"' for c in columns)
        with self.connect(shards) as connection:
            frame = connection.execute(
                f"SELECT {selected} FROM triplets ORDER BY shard, query_id, target_id"
            ).df()
        for column in {"instructions", "hard_negative_ids", "views", "scores"} & set(frame):
            frame[column] = frame[column].map(
                lambda values: None if values is None else values.tolist()
            )
        return frame
