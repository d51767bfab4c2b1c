"""The artifact store: atomic local writes, and the pipeline's artifacts round-tripping S3."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import small_demo_resources
from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    DagsterInstance,
    DynamicPartitionsDefinition,
    asset,
    materialize,
)
from s3_server import moto_s3

from megapairs_dagster import __version__
from megapairs_dagster.artifacts import (
    Embeddings,
    KnnIndexArtifact,
    artifact_relpath,
    load_artifact,
    load_columns,
    read_table,
    write_table,
)
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.resources.store import ArtifactIOManager, ArtifactStore
from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.image_index import build_image_index, read_images


def test_local_write_is_atomic_and_leaves_no_partial_files(tmp_path, monkeypatch):
    store = ArtifactStoreClient(str(tmp_path / "store"))
    store.write_bytes("a/b.bin", b"first")
    from megapairs_dagster import storage

    def crash(*_args):
        raise OSError("disk went away")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        store.write_bytes("a/b.bin", b"second, never visible")
    assert store.read_bytes("a/b.bin") == b"first"
    assert sorted(p.name for p in (tmp_path / "store" / "a").iterdir()) == ["b.bin"]


def test_a_write_sweeps_the_temporaries_its_killed_predecessors_left(tmp_path):
    """A writer killed mid-write leaves its hidden temporary; the next write of the same name
    removes it, and keeps one whose writer is alive (it may be writing now)."""
    store = ArtifactStoreClient(str(tmp_path / "store"))
    store.write_bytes("a/b.bin", b"first")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead_pid = int(ended.stdout)
    folder = tmp_path / "store" / "a"
    left = {
        "dead": folder / f".b.bin.{dead_pid}.{'0' * 32}.partial",
        "live": folder / f".b.bin.{os.getpid()}.{'1' * 32}.partial",
        "other_name": folder / f".c.bin.{dead_pid}.{'2' * 32}.partial",  # swept by its own write
    }
    for path in left.values():
        path.write_bytes(b"half a file")
    store.write_bytes("a/b.bin", b"second")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [left["live"].name, left["other_name"].name, "b.bin"]
    )
    assert store.read_bytes("a/b.bin") == b"second"


def test_missing_artifact_names_the_asset_to_materialise(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialise the upstream asset"):
        load_artifact(ArtifactStoreClient(str(tmp_path)), "embeddings_clip_image/00000")


def test_embeddings_reject_misaligned_rows():
    with pytest.raises(ValueError, match="N ids"):
        Embeddings(ids=np.arange(3), vectors=np.zeros((2, 4)))


# Reads every way the pipeline reads Parquet from a Python-owned source (bytes, open files),
# counting the process's threads after each. A thread of Arrow's pools that held such a source
# could drop it while the interpreter exits, and the process then aborted ("terminate called
# without an active exception"; the README's notebook snippet: 5 of about 730 runs, 4 at once on 2
# cores).
READ_WITHOUT_ARROW_THREADS = """
import json, os
import numpy as np, pandas as pd, pyarrow as pa, pyarrow.parquet as pq
from megapairs_dagster.artifacts import load_artifact, load_columns, write_table
from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.image_index import build_image_index, read_images
from megapairs_dagster.synthesis.megapairs_format import MEGAPAIRS_SCHEMA, read_megapairs
from megapairs_dagster.synthesis.readers import Shard, read_shard

store = ArtifactStoreClient("store")
ids = np.arange(600, dtype=np.int64)  # three row groups
store.write_bytes("corpus_images/00000.parquet", write_table(
    pd.DataFrame({"image_id": ids, "caption": [f"c{i}" for i in ids]}), {"asset": "x"}))
pq.write_table(pa.table({"image": [b"jpeg"] * 3, "caption": ["a", "b", "c"]}), "corpus.parquet")
pq.write_table(pa.table({"q_img": ["a.jpg"], "q_text": [["find b"]], "t_img": ["b.jpg"],
                         "hns": [["a.jpg"]]}, schema=MEGAPAIRS_SCHEMA), "megapairs.parquet")
threads = lambda: len(os.listdir("/proc/self/task"))
started, before = {}, threads()
reads = {
    "load_artifact": lambda: load_artifact(store, "corpus_images/00000"),
    "load_columns": lambda: load_columns(store, "corpus_images", ["00000"], ["caption"]),
    "read_images": lambda: read_images(
        store, build_image_index(store, ["00000"]), [3, 300, 599], ["caption"]),
    "read_shard": lambda: list(read_shard(Shard("corpus", "corpus.parquet", "parquet"))),
    "read_megapairs": lambda: list(read_megapairs("megapairs.parquet")),
}
for name, read in reads.items():
    assert len(read()) > 0, name
    started[name] = threads() - before
print(json.dumps(started))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_parquet_reads_start_no_arrow_thread_that_could_outlive_the_interpreter(tmp_path):
    done = subprocess.run([sys.executable, "-c", READ_WITHOUT_ARROW_THREADS], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    started = json.loads(done.stdout.strip().splitlines()[-1])
    assert started == dict.fromkeys(started, 0), f"threads started by each read: {started}"


def test_a_column_the_table_lacks_is_an_error_naming_the_file_and_its_columns(tmp_path):
    """pyarrow's ParquetFile would silently leave the column out."""
    store = ArtifactStoreClient(str(tmp_path))
    store.write_bytes("corpus_images/00000.parquet", write_table(
        pd.DataFrame({"image_id": np.arange(3), "caption": ["a", "b", "c"]}), {}))
    message = r"corpus_images/00000.parquet has no column\(s\) \['meta'\]; it has \['image_id', 'caption'\]"
    with pytest.raises(KeyError, match=message):
        load_columns(store, "corpus_images", ["00000"], ["image_id", "meta"])
    with pytest.raises(KeyError, match="this table has no column"):
        read_table(store.read_bytes("corpus_images/00000.parquet"), ["meta"])
    with pytest.raises(KeyError, match=message.replace("meta", "jpeg")):
        read_images(store, build_image_index(store, ["00000"]), [1], ["jpeg"])


def test_corpus_and_embeddings_round_trip_through_s3(tmp_path):
    write_demo_shard(tmp_path / "demo_corpus", 0, 40, seed=0)
    selection = ["corpus_images", "corpus_rejects", "base_encoders", "embeddings_clip_image"]
    local = small_demo_resources(tmp_path)
    local_instance = DagsterInstance.ephemeral()
    local_instance.add_dynamic_partitions("shards", ["00000"])
    for step in (selection[:2], selection[2:3], selection[3:]):
        partition = None if step == ["base_encoders"] else "00000"
        materialize(list(defs.assets), selection=step, partition_key=partition,
                    resources=local, instance=local_instance)

    with moto_s3() as (endpoint, options):
        import s3fs

        s3fs.S3FileSystem(**options).mkdir("artifacts")
        remote = small_demo_resources(
            tmp_path, url="s3://artifacts/run", endpoint_url=endpoint,
            cache_dir=str(tmp_path / "s3-cache"),
        )
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("shards", ["00000"])
        for step in (selection[:2], selection[2:3], selection[3:]):
            partition = None if step == ["base_encoders"] else "00000"
            result = materialize(list(defs.assets), selection=step, partition_key=partition,
                                 resources=remote, instance=instance)
            assert result.success
        store = remote["store"].client()
        assert store.url("x").startswith("s3://artifacts/run")
        remote_images = load_artifact(store, artifact_relpath(["corpus_images"], "00000"))
        remote_embeddings = load_artifact(store, artifact_relpath(["embeddings_clip_image"], "00000"))
        # The encoder trained in the S3 run was downloaded to the local cache to embed.
        assert any((tmp_path / "s3-cache").rglob("*.safetensors"))

    local_store = local["store"].client()
    local_images = load_artifact(local_store, artifact_relpath(["corpus_images"], "00000"))
    assert remote_images.equals(local_images)
    embeddings = load_artifact(local_store, artifact_relpath(["embeddings_clip_image"], "00000"))
    np.testing.assert_array_equal(remote_embeddings.ids, embeddings.ids)
    assert remote_embeddings.vectors.shape == embeddings.vectors.shape
    assert remote_embeddings.produced_by["asset"] == "embeddings_clip_image"


# A small graph through the IO manager alone: what it writes where, and what readers receive.
parts = DynamicPartitionsDefinition(name="parts")


@asset(partitions_def=parts, backfill_policy=BackfillPolicy.single_run(), code_version="3")
def table(context: AssetExecutionContext):
    frames = {key: pd.DataFrame({"part": [key]}) for key in context.partition_keys}
    return frames if len(frames) > 1 else frames[context.partition_key]


@asset(partitions_def=parts)
def vectors(context: AssetExecutionContext, table: pd.DataFrame) -> Embeddings:
    assert list(table["part"]) == [context.partition_key]
    return Embeddings(ids=np.arange(2), vectors=np.eye(2, 4))


@asset
def summary(table: dict) -> dict:
    return {"parts": list(table), "rows": [frame["part"].tolist() for frame in table.values()]}


@asset
def index() -> KnnIndexArtifact:
    return KnnIndexArtifact(ids=np.arange(3), index_bytes=b"faiss")


@asset(partitions_def=parts, backfill_policy=BackfillPolicy.single_run())
def wrong_keys(context: AssetExecutionContext) -> dict:
    return {"elsewhere": pd.DataFrame()}


@asset
def unsupported() -> list:
    return [1, 2]


@asset
def reads_summary(summary: dict) -> dict:
    return summary


GRAPH = [table, vectors, summary, index, wrong_keys, unsupported, reads_summary]


def _io_run(root, selection, partition=None, **run):
    store = ArtifactStore(url=str(root))
    return materialize(
        GRAPH, selection=selection, partition_key=partition,
        resources={"io_manager": ArtifactIOManager(store=store)}, **run,
    )


def _range(instance, start, end) -> dict:
    tags = {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}
    return {"instance": instance, "tags": tags}


def _cause(error: BaseException, kind: type) -> BaseException:
    while not isinstance(error, kind):
        assert error.__cause__ is not None, f"no {kind.__name__} behind {error!r}"
        error = error.__cause__
    return error


def test_io_manager_lays_out_artifacts_by_asset_partition_and_type(tmp_path):
    root, instance = tmp_path / "store", DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("parts", ["a"])
    first = _io_run(root, ["table", "vectors"], "a", instance=instance)
    second = _io_run(root, ["summary", "index"], instance=instance)

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["index/data.faiss.npz", "summary/data.json", "table/a.parquet",
                     "vectors/a.embeddings.npz"]
    client = ArtifactStoreClient(str(root))
    for result, name, partition, suffix in [
        (first, "table", "a", ".parquet"), (first, "vectors", "a", Embeddings.SUFFIX),
        (second, "summary", None, ".json"), (second, "index", None, KnnIndexArtifact.SUFFIX),
    ]:
        relpath = artifact_relpath([name], partition) + suffix
        [materialization] = result.asset_materializations_for_node(name)
        assert materialization.metadata["path"].value == client.url(relpath)
        assert materialization.metadata["bytes"].value == len(client.read_bytes(relpath))
        if name == "summary":
            continue
        artifact = load_artifact(client, artifact_relpath([name], partition))
        produced_by = getattr(artifact, "produced_by", None) or artifact.attrs["produced_by"]
        assert produced_by == {
            "run_id": result.run_id, "asset": name, "partition": partition,
            "code_version": "3" if name == "table" else None, "package_version": __version__,
        }
    # A table's columns reach the UI as Dagster's column schema, with their Parquet types.
    [table_event] = first.asset_materializations_for_node("table")
    schema = table_event.metadata["dagster/column_schema"].schema
    assert [column.name for column in schema.columns] == ["part"]
    assert schema.columns[0].type.endswith("string")  # Arrow's string or large_string
    # A non-partitioned reader of one partition still gets {partition: value}.
    assert load_artifact(client, artifact_relpath(["summary"], None)) == {
        "parts": ["a"], "rows": [["a"]]}


def test_a_run_over_several_partitions_writes_each_and_readers_get_them_sorted(tmp_path):
    root, instance = tmp_path / "store", DagsterInstance.ephemeral()
    client = ArtifactStoreClient(str(root))
    _io_run(root, ["summary"], instance=instance)
    assert load_artifact(client, artifact_relpath(["summary"], None)) == {"parts": [], "rows": []}
    instance.add_dynamic_partitions("parts", ["a", "c", "b"])
    result = _io_run(root, ["table"], **_range(instance, "c", "b"))
    assert sorted(m.partition for m in result.asset_materializations_for_node("table")) == [
        "b", "c"]
    for partition in ("b", "c"):
        written = load_artifact(client, artifact_relpath(["table"], partition))
        assert list(written["part"]) == [partition]
        assert written.attrs["produced_by"]["partition"] == partition
    _io_run(root, ["table"], "a", instance=instance)
    _io_run(root, ["summary"], instance=instance)
    assert load_artifact(client, artifact_relpath(["summary"], None)) == {
        "parts": ["a", "b", "c"], "rows": [["a"], ["b"], ["c"]]}


def test_a_run_over_several_partitions_must_return_exactly_their_values(tmp_path):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("parts", ["a", "b"])
    with pytest.raises(Exception) as raised:
        _io_run(tmp_path, ["wrong_keys"], **_range(instance, "a", "b"))
    assert "wrong_keys ran for partitions ['a', 'b']" in str(_cause(raised.value, TypeError))


def test_unsupported_output_type_names_the_asset(tmp_path):
    with pytest.raises(Exception) as raised:
        _io_run(tmp_path, ["unsupported"])
    assert "unsupported returned list" in str(_cause(raised.value, TypeError))
    assert not any(tmp_path.rglob("*.*"))


def test_missing_input_artifact_names_its_url(tmp_path):
    with pytest.raises(Exception) as raised:
        _io_run(tmp_path / "store", ["reads_summary"])
    message = str(_cause(raised.value, FileNotFoundError))
    assert str(tmp_path / "store" / "summary" / "data") in message
    assert "materialise the upstream asset first" in message
