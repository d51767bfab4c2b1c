"""The triplet tables as Parquet files in the artifact store (local folder and moto S3):
replace-by-shard, atomicity, validation, and writers in separate processes with no shared
working directory."""

from __future__ import annotations

import io
import multiprocessing
import os
import time
import uuid

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import s3fs
from s3_server import moto_s3

from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.triplet_store import (
    FILE_SCHEMAS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    TripletStore,
)

BUCKET = "triplet-tables"
WRITERS = 4
ROWS_PER_WRITER = 2_000


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


@pytest.fixture(scope="module")
def s3_options():
    """One moto server for the module; each test writes below its own prefix."""
    with moto_s3() as (_, options):
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        yield options


def new_client(kind: str, tmp_path, request) -> ArtifactStoreClient:
    """A fresh, empty store: a local folder, or a new prefix of the moto bucket."""
    if kind == "local":
        return ArtifactStoreClient(str(tmp_path / f"store-{uuid.uuid4().hex[:8]}"))
    options = request.getfixturevalue("s3_options")
    return ArtifactStoreClient(f"s3://{BUCKET}/{uuid.uuid4().hex}", options)


@pytest.fixture(params=["local", "s3"])
def client(request, tmp_path) -> ArtifactStoreClient:
    return new_client(request.param, tmp_path, request)


@pytest.fixture
def local_client(tmp_path) -> ArtifactStoreClient:
    return ArtifactStoreClient(str(tmp_path / "store"))


def without_created_at(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns="created_at").reset_index(drop=True)


def test_replace_shard_stores_rows_and_is_idempotent(client):
    store = TripletStore(client)
    triplets = triplet_rows(1, 20)
    images = image_rows("a", 1, 30)

    first = store.replace_shard("a", triplets, images)
    second = store.replace_shard("a", triplets, images)
    store.replace_shard("b", triplet_rows(2, 5), image_rows("b", 2, 7))

    assert (first["triplets_deleted"], first["triplets_inserted"]) == (0, 20)
    assert (second["triplets_deleted"], second["images_deleted"]) == (20, 30)
    assert second["write_s"] > 0 and "wait_s" not in second
    assert store.counts() == {"triplets": 25, "images": 37, "shards": 2}
    assert store.duplicate_pairs() == 0
    for table in ("triplets", "images"):
        for shard in ("a", "b"):
            assert client.exists(f"tables/{table}/{shard}.parquet")

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


def test_replace_shard_swaps_old_rows_for_new(local_client):
    store = TripletStore(local_client)
    store.replace_shard("a", triplet_rows(1, 20, "v1"), image_rows("a", 1, 20))
    store.replace_shard("a", triplet_rows(1, 8, "v2"), image_rows("a", 1, 8))
    stored = store.triplets_frame(["a"])
    assert len(stored) == 8 and set(stored["prompt_version"]) == {"v2"}
    assert store.counts()["images"] == 8


def test_views_exist_and_are_typed_before_any_file_and_for_an_empty_shard(client):
    store = TripletStore(client)
    with store.connect() as connection:
        empty = {t: connection.execute(f"DESCRIBE {t}").fetchall() for t in FILE_SCHEMAS}
    assert store.counts() == {"triplets": 0, "images": 0, "shards": 0}
    assert store.written_shards() == [] and store.scores_frame().empty

    store.replace_shard("empty", triplet_rows(1, 0), image_rows("empty", 1, 0))
    store.replace_scores("demo_cir", "base_encoder", {"all": {"mAP@5": 1.0}}, "ckpt")
    assert store.written_shards() == ["empty"]  # done with zero rows, unlike "not written"
    assert store.triplets_frame().empty
    with store.connect() as connection:
        written = {t: connection.execute(f"DESCRIBE {t}").fetchall() for t in FILE_SCHEMAS}
    assert written == empty
    columns = {name: kind for name, kind, *_ in written["triplets"]}
    assert columns["hard_negative_ids"] == "BIGINT[]" and columns["created_at"] == "TIMESTAMP"


def test_bad_rows_are_refused_before_anything_is_written(local_client):
    store = TripletStore(local_client)
    store.replace_shard("a", triplet_rows(1, 20, "v1"), image_rows("a", 1, 20))
    broken_images = image_rows("a", 1, 5).astype({"image_id": "float64"})
    broken_images.loc[3, "image_id"] = np.nan

    with pytest.raises(ValueError, match=r"images rows for shard 'a' have nulls in \['image_id'\]"):
        store.replace_shard("a", triplet_rows(1, 50, "v2"), broken_images)

    assert store.counts() == {"triplets": 20, "images": 20, "shards": 1}
    assert set(store.triplets_frame()["prompt_version"]) == {"v1"}


@pytest.mark.parametrize("failing_table", ["images", "triplets"])
def test_a_failed_store_write_leaves_the_previous_triplets(
    local_client, monkeypatch, failing_table
):
    store = TripletStore(local_client)
    store.replace_shard("a", triplet_rows(1, 20, "v1"), image_rows("a", 1, 20))
    write_bytes = local_client.write_bytes

    def failing_write(relpath: str, data: bytes):
        if relpath.startswith(f"tables/{failing_table}/"):
            raise OSError("connection reset by peer")
        return write_bytes(relpath, data)

    monkeypatch.setattr(local_client, "write_bytes", failing_write)
    with pytest.raises(OSError, match="connection reset"):
        store.replace_shard("a", triplet_rows(1, 50, "v2"), image_rows("a", 1, 50))

    # Images are written first: failing on them changes nothing, failing on the triplets
    # (the commit point) leaves the old triplets beside the new images until a rerun.
    assert set(store.triplets_frame()["prompt_version"]) == {"v1"}
    assert store.counts()["images"] == (20 if failing_table == "images" else 50)
    monkeypatch.setattr(local_client, "write_bytes", write_bytes)
    store.replace_shard("a", triplet_rows(1, 50, "v2"), image_rows("a", 1, 50))
    assert store.counts() == {"triplets": 50, "images": 50, "shards": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda frame: frame.drop(columns=["instructions"]), r"missing columns \['instructions'\]"),
        (lambda frame: frame.assign(instuctions=1), r"unexpected columns \['instuctions'\]"),
        (lambda frame: frame.assign(query_id="q"), "wrong type.*query_id"),
        (lambda frame: frame.assign(hard_negative_ids="1,2"), "wrong type.*hard_negative_ids"),
        (lambda frame: frame.assign(instructions=None), r"nulls in \['instructions'\]"),
        (lambda frame: frame.assign(shard="other"), r"also name shards \['other'\]"),
        (lambda frame: frame.assign(created_at=pd.Timestamp(0)), "created_at is set by the store"),
    ],
)
def test_malformed_triplets_are_rejected_before_writing(local_client, change, message):
    store = TripletStore(local_client)
    store.replace_shard("a", triplet_rows(1, 3), image_rows("a", 1, 3))
    with pytest.raises(ValueError, match=message):
        store.replace_shard("a", change(triplet_rows(1, 3)), image_rows("a", 1, 3))
    assert store.counts()["triplets"] == 3


@pytest.mark.parametrize("shard", ["", ".hidden", "a/b", "part-[1]", "x*"])
def test_shard_names_that_cannot_name_a_file_are_rejected(local_client, shard):
    with pytest.raises(ValueError, match="cannot name a table file"):
        TripletStore(local_client).replace_shard(shard, triplet_rows(1, 1), image_rows("", 1, 1))


def test_matching_shard_column_is_accepted(local_client):
    store = TripletStore(local_client)
    store.replace_shard("a", triplet_rows(1, 3).assign(shard="a"), image_rows("a", 1, 3))
    assert store.counts()["triplets"] == 3


def test_schema_version_is_recorded_and_checked(local_client):
    store = TripletStore(local_client)
    store.replace_shard("a", triplet_rows(1, 3), image_rows("a", 1, 3))
    relpath = "tables/triplets/a.parquet"
    table = pq.read_table(io.BytesIO(local_client.read_bytes(relpath)))
    assert table.schema.metadata == {SCHEMA_VERSION_KEY.encode(): SCHEMA_VERSION.encode()}

    older = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY: "1"}), older)
    local_client.write_bytes(relpath, older.getvalue())
    with pytest.raises(RuntimeError, match=r"another schema version.*a\.parquet \(1\)"):
        store.counts()


def test_a_shard_subset_reads_no_other_shard_file(local_client):
    store = TripletStore(local_client)
    store.replace_shard("a", triplet_rows(1, 3), image_rows("a", 1, 3))
    local_client.write_bytes("tables/triplets/b.parquet", b"not parquet")
    assert len(store.triplets_frame(["a"])) == 3
    with pytest.raises(Exception, match="b.parquet"):
        store.triplets_frame()


def test_duplicate_pairs_across_shards_are_counted(local_client):
    store = TripletStore(local_client)
    store.replace_shard("a", triplet_rows(1, 5), image_rows("a", 1, 5))
    store.replace_shard("b", triplet_rows(1, 3), image_rows("b", 1, 3))
    assert store.duplicate_pairs() == 3
    store.replace_shard("b", triplet_rows(2, 3), image_rows("b", 2, 3))
    assert store.duplicate_pairs() == 0


def test_benchmark_scores_are_replaced_per_benchmark_and_model(client):
    store = TripletStore(client)
    metrics = {"all": {"mAP@5": 30.0, "mAP@10": 31.0}, "background": {"mAP@5": 20.0}}
    assert store.replace_scores("demo_cir", "base_encoder", metrics, "ckpt-a") == 3
    store.replace_scores("demo_cir", "demo", {"all": {"mAP@5": 35.0}}, "ckpt-b")
    store.replace_scores("demo_cir", "base_encoder", {"all": {"mAP@5": 29.0}}, "ckpt-c")
    assert client.exists("tables/benchmark_scores/demo_cir/base_encoder.parquet")
    frame = store.scores_frame()
    assert len(frame) == 2
    base = frame[frame["model"] == "base_encoder"].iloc[0]
    assert (base["value"], base["checkpoint"], base["query_group"]) == (29.0, "ckpt-c", "all")


def write_shard_from_own_directory(
    workdir: str, root: str, options: dict, shard_number: int, barrier, results
) -> None:
    """Child process body: from its own fresh cwd, write one shard once all writers are ready."""
    os.chdir(workdir)
    store = TripletStore(ArtifactStoreClient(root, options))
    shard = shard_name(shard_number)
    triplets = triplet_rows(shard_number, ROWS_PER_WRITER)
    images = image_rows(shard, shard_number, ROWS_PER_WRITER)
    barrier.wait(timeout=120)
    try:
        results.put((shard, store.replace_shard(shard, triplets, images)["write_s"], None))
    except Exception as error:  # noqa: BLE001 - any failure is reported to the parent
        results.put((shard, None, f"{type(error).__name__}: {error}"))


def write_concurrently(client: ArtifactStoreClient, tmp_path) -> dict[str, float]:
    """WRITERS spawned processes, each in its own cwd, write one shard each at once."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WRITERS)
    results = context.Queue()
    processes = []
    for number in range(WRITERS):
        workdir = tmp_path / f"writer-{number}"
        workdir.mkdir()
        args = (str(workdir), str(client.root), client.storage_options, number, barrier, results)
        processes.append(context.Process(target=write_shard_from_own_directory, args=args))
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in range(WRITERS)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert [error for *_, error in outcomes if error] == []
    return {shard: write_s for shard, write_s, _ in sorted(outcomes)}


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_writer_processes_lose_and_double_nothing(kind, tmp_path, request):
    concurrent_client = new_client(kind, tmp_path, request)
    write_s = write_concurrently(concurrent_client, tmp_path)

    serial = TripletStore(new_client(kind, tmp_path, request))
    serial_write_s = []
    for number in range(WRITERS):
        shard = shard_name(number)
        triplets = triplet_rows(number, ROWS_PER_WRITER)
        written = serial.replace_shard(shard, triplets, image_rows(shard, number, ROWS_PER_WRITER))
        serial_write_s.append(written["write_s"])

    concurrent = TripletStore(concurrent_client)
    started = time.perf_counter()
    written = concurrent.triplets_frame()
    read_s = time.perf_counter() - started
    expected_counts = {"triplets": WRITERS * ROWS_PER_WRITER, "images": WRITERS * ROWS_PER_WRITER,
                       "shards": WRITERS}
    assert concurrent.counts() == expected_counts
    assert concurrent.duplicate_pairs() == 0
    pd.testing.assert_frame_equal(
        without_created_at(written), without_created_at(serial.triplets_frame())
    )
    images_sql = "SELECT * EXCLUDE (created_at) FROM images ORDER BY shard, image_id"
    with concurrent.connect() as left, serial.connect() as right:
        pd.testing.assert_frame_equal(left.execute(images_sql).df(), right.execute(images_sql).df())
    print(
        f"\n[{kind}] {WRITERS} processes x {ROWS_PER_WRITER} triplets: write s per shard "
        + ", ".join(f"{shard}={seconds:.3f}" for shard, seconds in write_s.items())
        + f"; serially in one process: {', '.join(f'{t:.3f}' for t in serial_write_s)}"
        + f"; one triplets_frame() of all {WRITERS} shards: {read_s:.3f} s"
    )
