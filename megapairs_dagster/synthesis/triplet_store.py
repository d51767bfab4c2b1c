"""The DuckDB tables ``triplets`` and ``images``, written shard by shard.

DuckDB lets one process at a time open a database file for writing, and a read-only open
also fails while another process writes. Dagster's multiprocess executor runs several
shards at once in separate processes, so every open happens under one exclusive file lock
(``<db>.lock``) and the connection is closed before the lock is released: callers wait
instead of seeing "Could not set lock on file". Readers take the same lock because DuckDB
would refuse their read-only open during a write; reads are short, so the wait is too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import filelock
import pandas as pd
import pyarrow as pa

SCHEMA_VERSION = "1"
DEFAULT_LOCK_TIMEOUT_S = 900.0

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
# Columns the store fills itself; a frame may carry ``shard`` if it agrees with the argument.
STORE_FILLED_COLUMNS = ("shard", "created_at")

CREATE_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS triplets (
    query_id BIGINT NOT NULL,
    target_id BIGINT NOT NULL,
    instructions VARCHAR[] NOT NULL,
    hard_negative_ids BIGINT[] NOT NULL,
    views VARCHAR[],
    scores FLOAT[],
    description VARCHAR,
    generator_backend VARCHAR,
    description_model VARCHAR,
    instruction_model VARCHAR,
    prompt_version VARCHAR,
    config_hash VARCHAR,
    shard VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    image_id BIGINT NOT NULL,
    shard VARCHAR NOT NULL,
    caption VARCHAR,
    uri VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS benchmark_scores (
    benchmark VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    query_group VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,
    value DOUBLE NOT NULL,
    checkpoint VARCHAR,
    created_at TIMESTAMP NOT NULL
);
"""


class StoreLockTimeout(TimeoutError):
    """The database stayed locked by other writers for longer than the configured timeout."""


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
    try:
        return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        raise ValueError(f"{table} rows for shard {shard!r} have a wrong type: {error}") from error


def _single_row(connection: duckdb.DuckDBPyConnection, sql: str, parameters=()) -> tuple:
    """The one row of a statement, fetched to the end (DuckDB 2 refuses new work before that)."""
    (row,) = connection.execute(sql, list(parameters)).fetchall()
    return row


class TripletStore:
    """Replace-by-shard access to the ``triplets`` and ``images`` tables of one DuckDB file."""

    def __init__(self, db_path: str | Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S):
        self.db_path = Path(db_path)
        self.lock_timeout_s = lock_timeout_s

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the cross-process lock, turning an expired wait into a clear error."""
        lock = filelock.FileLock(f"{self.db_path}.lock", timeout=self.lock_timeout_s)
        try:
            lock.acquire()
        except filelock.Timeout as error:
            raise StoreLockTimeout(
                f"waited {self.lock_timeout_s:.0f} s for {lock.lock_file}; another process is "
                f"still using {self.db_path} (raise lock_timeout_s for very large shards)"
            ) from error
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def _connect(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection opened and closed inside the lock, with the schema in place."""
        with self._exclusive():
            if read_only and self.db_path.exists():
                with duckdb.connect(str(self.db_path), read_only=True) as connection:
                    yield connection
                return
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            with duckdb.connect(str(self.db_path)) as connection:
                self._ensure_schema(connection)
                yield connection

    def _ensure_schema(self, connection: duckdb.DuckDBPyConnection) -> None:
        connection.execute(CREATE_SCHEMA_SQL)
        connection.execute(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING",
            [SCHEMA_VERSION],
        )
        (found,) = _single_row(connection, "SELECT value FROM meta WHERE key = 'schema_version'")
        if found != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.db_path} has triplet schema version {found}, this code writes "
                f"version {SCHEMA_VERSION}; migrate or use a new database file"
            )

    def replace_shard(self, shard: str, triplets: pd.DataFrame, images: pd.DataFrame) -> dict:
        """Swap one shard's rows for new ones in one transaction; return counts and timings.

        Re-running a shard leaves the tables as one run would; a failure leaves the
        previous rows of the shard untouched.
        """
        if not shard:
            raise ValueError("shard must be a non-empty string")
        incoming_triplets = _to_arrow(triplets, TRIPLETS_SCHEMA, "triplets", shard)
        incoming_images = _to_arrow(images, IMAGES_SCHEMA, "images", shard)
        created_at = datetime.now(timezone.utc).replace(tzinfo=None)
        requested = time.perf_counter()
        with self._connect(read_only=False) as connection:
            started = time.perf_counter()
            connection.register("incoming_triplets", incoming_triplets)
            connection.register("incoming_images", incoming_images)
            connection.begin()
            try:
                (triplets_deleted,) = _single_row(
                    connection, "DELETE FROM triplets WHERE shard = ?", [shard]
                )
                (images_deleted,) = _single_row(
                    connection, "DELETE FROM images WHERE shard = ?", [shard]
                )
                connection.execute(
                    "INSERT INTO triplets BY NAME "
                    "SELECT *, ? AS shard, ? AS created_at FROM incoming_triplets",
                    [shard, created_at],
                )
                connection.execute(
                    "INSERT INTO images BY NAME SELECT *, ? AS shard FROM incoming_images",
                    [shard],
                )
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
            write_s = time.perf_counter() - started
        return {
            "shard": shard,
            "triplets_deleted": int(triplets_deleted),
            "triplets_inserted": incoming_triplets.num_rows,
            "images_deleted": int(images_deleted),
            "images_inserted": incoming_images.num_rows,
            "wait_s": started - requested,
            "write_s": write_s,
        }

    def replace_scores(
        self, benchmark: str, model: str, metrics: dict[str, dict[str, float]], checkpoint: str
    ) -> int:
        """Swap the ``benchmark_scores`` rows of one (benchmark, model) in one transaction.

        ``metrics`` maps a query group ("all", or e.g. an edit type) to ``{metric: value}``.
        """
        rows = [
            (benchmark, model, group, metric, float(value), checkpoint)
            for group, values in metrics.items()
            for metric, value in values.items()
        ]
        created_at = datetime.now(timezone.utc).replace(tzinfo=None)
        with self._connect(read_only=False) as connection:
            connection.begin()
            try:
                connection.execute(
                    "DELETE FROM benchmark_scores WHERE benchmark = ? AND model = ?",
                    [benchmark, model],
                )
                connection.executemany(
                    "INSERT INTO benchmark_scores VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(*row, created_at) for row in rows],
                )
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
        return len(rows)

    def scores_frame(self) -> pd.DataFrame:
        """Every row of ``benchmark_scores``."""
        with self._connect(read_only=True) as connection:
            return connection.execute(
                "SELECT * FROM benchmark_scores ORDER BY benchmark, model, query_group, metric"
            ).df()

    def counts(self) -> dict:
        """Rows per table and number of shards, for asset metadata."""
        with self._connect(read_only=True) as connection:
            triplets, shards = _single_row(
                connection, "SELECT count(*), count(DISTINCT shard) FROM triplets"
            )
            (images,) = _single_row(connection, "SELECT count(*) FROM images")
        return {"triplets": int(triplets), "images": int(images), "shards": int(shards)}

    def duplicate_pairs(self) -> int:
        """How many (query_id, target_id) pairs occur more than once (0 when the store is sound).

        Checked here rather than by a PRIMARY KEY, which DuckDB would enforce too eagerly for a
        delete and re-insert of the same keys inside one transaction.
        """
        with self._connect(read_only=True) as connection:
            (duplicates,) = _single_row(
                connection,
                "SELECT count(*) FROM (SELECT 1 FROM triplets "
                "GROUP BY query_id, target_id HAVING count(*) > 1)",
            )
        return int(duplicates)

    def triplets_frame(self, shards: list[str] | None = None) -> pd.DataFrame:
        """The triplets of ``shards`` (all when None), ordered, list columns as Python lists."""
        query = "SELECT * FROM triplets"
        parameters: list = []
        if shards is not None:
            query += " WHERE list_contains(?, shard)"
            parameters.append(list(shards))
        query += " ORDER BY shard, query_id, target_id"
        with self._connect(read_only=True) as connection:
            frame = connection.execute(query, parameters).df()
        for column in ("instructions", "hard_negative_ids", "views", "scores"):
            frame[column] = frame[column].map(
                lambda values: None if values is None else values.tolist()
            )
        return frame
