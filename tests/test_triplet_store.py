"""The DuckDB triplet store: replace-by-shard, atomicity, validation, cross-process writers."""

from __future__ import annotations

import multiprocessing
from contextlib import nullcontext
from pathlib import Path

import duckdb
import filelock
import numpy as np
import pandas as pd
import pytest

from megapairs_dagster.synthesis.triplet_store import StoreLockTimeout, TripletStore

ROWS_PER_SHARD = 300
WRITERS = 4


def triplet_rows(shard_number: int, rows: int, prompt_version: str = "v1") -> pd.DataFrame:
    """Distinct pairs per shard: query ids are offset by the shard number."""
    query_ids = np.arange(rows, dtype=np.int64) + shard_number * 1_000_000
    return pd.DataFrame(
        {
            "query_id": query_ids,
            "target_id": query_ids + 500_000,
            "instructions": [
                [f"make it red {i}", f"add a dog {i}", f"at night {i}"] for i in range(rows)
            ],
            "hard_negative_ids": [[int(q), int(q) + 1, int(q) + 2] for q in query_ids],
            "views": [["clip_image", "dino_image"]] * rows,
            "scores": [[0.85, 0.9]] * rows,
            "description": [f"both show a street, {i}" for i in range(rows)],
            "generator_backend": "template",
            "description_model": "none",
            "instruction_model": "none",
            "prompt_version": prompt_version,
            "config_hash": "abc123",
        }
    )


def image_rows(shard: str, shard_number: int, rows: int) -> pd.DataFrame:
    image_ids = np.arange(rows, dtype=np.int64) + shard_number * 1_000_000
    return pd.DataFrame(
        {
            "image_id": image_ids,
            "caption": [f"caption {i}" for i in image_ids],
            "uri": [f"/store/corpus_images/{shard}.parquet#{i}" for i in image_ids],
        }
    )


def shard_name(shard_number: int) -> str:
    return f"shard-{shard_number:03d}"


class TripletStoreWithoutFileLock(TripletStore):
    """The store minus its file lock, to show what the lock prevents."""

    def _exclusive(self):
        return nullcontext()


def replace_shard_repeatedly(
    db_path: str, shard_number: int, rounds: int, use_file_lock: bool, barrier, results
) -> None:
    """Child process body: replace one shard ``rounds`` times, starting with the others."""
    store_type = TripletStore if use_file_lock else TripletStoreWithoutFileLock
    store = store_type(db_path, lock_timeout_s=120)
    shard = shard_name(shard_number)
    triplets = triplet_rows(shard_number, ROWS_PER_SHARD)
    images = image_rows(shard, shard_number, ROWS_PER_SHARD)
    for _ in range(rounds):
        barrier.wait(timeout=120)
        try:
            store.replace_shard(shard, triplets, images)
            results.put((shard, None))
        except Exception as error:  # noqa: BLE001 - any failure is reported to the parent
            results.put((shard, f"{type(error).__name__}: {error}"))


def run_concurrent_writers(db_path: Path, rounds: int, use_file_lock: bool) -> list:
    """Start WRITERS spawned processes at once; return each attempt's (shard, error or None)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WRITERS)
    results = context.Queue()
    processes = [
        context.Process(
            target=replace_shard_repeatedly,
            args=(str(db_path), number, rounds, use_file_lock, barrier, results),
        )
        for number in range(WRITERS)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in range(WRITERS * rounds)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcomes


def test_replace_shard_stores_rows_and_is_idempotent(tmp_path):
    store = TripletStore(tmp_path / "db" / "mega.duckdb")
    triplets = triplet_rows(1, 20)
    images = image_rows("a", 1, 30)

    first = store.replace_shard("a", triplets, images)
    second = store.replace_shard("a", triplets, images)
    store.replace_shard("b", triplet_rows(2, 5), image_rows("b", 2, 7))

    assert (first["triplets_deleted"], first["triplets_inserted"]) == (0, 20)
    assert (second["triplets_deleted"], second["images_deleted"]) == (20, 30)
    assert store.counts() == {"triplets": 25, "images": 37, "shards": 2}
    assert store.duplicate_pairs() == 0

    stored = store.triplets_frame(["a"])
    assert len(stored) == 20 and set(stored["shard"]) == {"a"}
    for column in (
        "query_id",
        "target_id",
        "instructions",
        "hard_negative_ids",
        "views",
        "description",
        "prompt_version",
    ):
        assert stored[column].tolist() == triplets[column].tolist(), column
    assert np.allclose(np.stack(stored["scores"]), np.stack(triplets["scores"]))
    assert stored["created_at"].notna().all()
    assert len(store.triplets_frame()) == 25


def test_replace_shard_swaps_old_rows_for_new(tmp_path):
    store = TripletStore(tmp_path / "mega.duckdb")
    store.replace_shard("a", triplet_rows(1, 20, "v1"), image_rows("a", 1, 20))
    store.replace_shard("a", triplet_rows(1, 8, "v2"), image_rows("a", 1, 8))
    stored = store.triplets_frame(["a"])
    assert len(stored) == 8 and set(stored["prompt_version"]) == {"v2"}
    assert store.counts()["images"] == 8


def test_failure_inside_the_transaction_keeps_previous_rows(tmp_path):
    store = TripletStore(tmp_path / "mega.duckdb")
    store.replace_shard("a", triplet_rows(1, 20, "v1"), image_rows("a", 1, 20))
    # Passes validation but breaks the NOT NULL constraint of images.image_id, which runs
    # after the shard's triplets were deleted and re-inserted in the same transaction.
    broken_images = image_rows("a", 1, 5).astype({"image_id": "float64"})
    broken_images.loc[3, "image_id"] = np.nan

    with pytest.raises(duckdb.ConstraintException, match="image_id"):
        store.replace_shard("a", triplet_rows(1, 50, "v2"), broken_images)

    assert store.counts() == {"triplets": 20, "images": 20, "shards": 1}
    assert set(store.triplets_frame()["prompt_version"]) == {"v1"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda frame: frame.drop(columns=["instructions"]), r"missing columns \['instructions'\]"),
        (lambda frame: frame.assign(instuctions=1), r"unexpected columns \['instuctions'\]"),
        (lambda frame: frame.assign(query_id="q"), "wrong type.*query_id"),
        (lambda frame: frame.assign(hard_negative_ids="1,2"), "wrong type.*hard_negative_ids"),
        (lambda frame: frame.assign(shard="other"), r"also name shards \['other'\]"),
        (lambda frame: frame.assign(created_at=pd.Timestamp(0)), "created_at is set by the store"),
    ],
)
def test_malformed_triplets_are_rejected_before_writing(tmp_path, change, message):
    store = TripletStore(tmp_path / "mega.duckdb")
    store.replace_shard("a", triplet_rows(1, 3), image_rows("a", 1, 3))
    with pytest.raises(ValueError, match=message):
        store.replace_shard("a", change(triplet_rows(1, 3)), image_rows("a", 1, 3))
    assert store.counts()["triplets"] == 3


def test_matching_shard_column_is_accepted(tmp_path):
    store = TripletStore(tmp_path / "mega.duckdb")
    store.replace_shard("a", triplet_rows(1, 3).assign(shard="a"), image_rows("a", 1, 3))
    assert store.counts()["triplets"] == 3


def test_schema_version_is_recorded_and_checked(tmp_path):
    db_path = tmp_path / "mega.duckdb"
    store = TripletStore(db_path)
    assert store.counts() == {"triplets": 0, "images": 0, "shards": 0}
    with duckdb.connect(str(db_path)) as connection:
        assert connection.execute("SELECT value FROM meta").fetchall() == [("1",)]
        connection.execute("UPDATE meta SET value = '0'")
    with pytest.raises(RuntimeError, match="schema version 0"):
        store.replace_shard("a", triplet_rows(1, 3), image_rows("a", 1, 3))


def test_lock_timeout_is_a_clear_error(tmp_path):
    db_path = tmp_path / "mega.duckdb"
    store = TripletStore(db_path, lock_timeout_s=0.2)
    with (
        filelock.FileLock(f"{db_path}.lock"),
        pytest.raises(StoreLockTimeout, match="another process is still using"),
    ):
        store.replace_shard("a", triplet_rows(1, 3), image_rows("a", 1, 3))


def test_concurrent_writer_processes_are_serialised(tmp_path):
    db_path = tmp_path / "mega.duckdb"
    outcomes = run_concurrent_writers(db_path, rounds=2, use_file_lock=True)

    assert [error for _, error in outcomes if error] == []
    store = TripletStore(db_path)
    assert store.counts() == {
        "triplets": WRITERS * ROWS_PER_SHARD,
        "images": WRITERS * ROWS_PER_SHARD,
        "shards": WRITERS,
    }
    assert store.duplicate_pairs() == 0
    per_shard = store.triplets_frame().groupby("shard").size().to_dict()
    assert per_shard == {shard_name(n): ROWS_PER_SHARD for n in range(WRITERS)}


def test_without_the_file_lock_duckdb_refuses_concurrent_writers(tmp_path):
    db_path = tmp_path / "mega.duckdb"
    TripletStore(db_path).counts()  # create the file first, so only the write lock is contended
    outcomes = run_concurrent_writers(db_path, rounds=2, use_file_lock=False)
    errors = [error for _, error in outcomes if error]
    assert any("Could not set lock on file" in error for error in errors), outcomes


def test_benchmark_scores_are_replaced_per_benchmark_and_model(tmp_path):
    store = TripletStore(tmp_path / "scores.duckdb")
    metrics = {"all": {"mAP@5": 30.0, "mAP@10": 31.0}, "background": {"mAP@5": 20.0}}
    assert store.replace_scores("demo_cir", "base_encoder", metrics, "ckpt-a") == 3
    store.replace_scores("demo_cir", "demo", {"all": {"mAP@5": 35.0}}, "ckpt-b")
    store.replace_scores("demo_cir", "base_encoder", {"all": {"mAP@5": 29.0}}, "ckpt-c")
    frame = store.scores_frame()
    assert len(frame) == 2
    base = frame[frame["model"] == "base_encoder"].iloc[0]
    assert (base["value"], base["checkpoint"], base["query_group"]) == (29.0, "ckpt-c", "all")
