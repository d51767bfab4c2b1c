"""image_index: image id → (shard, row); readers fetch only the row groups they need, and a
rebuild reads only the shards ingested since the last one."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import small_demo_resources
from dagster import DagsterInstance, materialize

from megapairs_dagster.artifacts import ROW_GROUP_ROWS, write_table
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.image_index import (
    build_image_index,
    iter_images,
    locate,
    read_images,
)


def _shard(store: ArtifactStoreClient, shard: str, ids: range) -> None:
    frame = pd.DataFrame({"image_id": list(ids), "caption": [f"caption {i}" for i in ids],
                          "jpeg": [bytes([i % 256]) * 10 for i in ids]})
    store.write_bytes(f"corpus_images/{shard}.parquet", write_table(frame, {}))


@pytest.fixture
def store(tmp_path):
    store = ArtifactStoreClient(str(tmp_path / "store"))
    _shard(store, "00000", range(1000, 2000, 2))  # 500 rows: two row groups
    _shard(store, "00001", range(1001, 2001, 2))
    return store


def test_index_locates_every_image_and_names_missing_ones(store):
    index = build_image_index(store, ["00000", "00001"])
    assert len(index) == 1000 and index["image_id"].is_monotonic_increasing
    found = locate(index, [1998, 1001])
    assert found.to_dict("records") == [
        {"image_id": 1001, "shard": "00001", "row": 0},
        {"image_id": 1998, "shard": "00000", "row": 499},
    ]
    with pytest.raises(KeyError, match=r"2 image ids are not in image_index, e.g. \[7, 5000\]"):
        locate(index, [1001, 7, 5000])


def _counted_row_group_reads(monkeypatch) -> list[int]:
    """The row groups read from now on, in order."""
    read_groups: list[int] = []
    original = pq.ParquetFile.read_row_group

    def counting(self, group, *args, **kwargs):
        read_groups.append(group)
        return original(self, group, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    return read_groups


def test_reads_only_the_row_groups_that_hold_the_rows(store, monkeypatch):
    index = build_image_index(store, ["00000", "00001"])
    read_groups = _counted_row_group_reads(monkeypatch)
    rows = read_images(store, index, [1998, 1000, 1003], ["caption", "jpeg"])
    assert rows.loc[1998, "caption"] == "caption 1998" and rows.loc[1003, "jpeg"] == b"\xeb" * 10
    assert sorted(rows.index) == [1000, 1003, 1998]
    # 1000 and 1998: rows 0 and 499 of shard 00000 (groups 0 and 1); 1003: row 1 of 00001
    assert ROW_GROUP_ROWS == 256 and sorted(read_groups) == [0, 0, 1]


def test_images_come_a_row_group_at_a_time_in_storage_order(store, monkeypatch):
    """How the export reads every referenced image without holding them all."""
    index = build_image_index(store, ["00000", "00001"])
    read_groups = _counted_row_group_reads(monkeypatch)
    wanted = list(range(1998, 999, -1))  # every image, newest id first
    chunks = list(iter_images(store, index, wanted, ["jpeg"], chunk_rows=256))
    assert [len(chunk) for chunk in chunks] == [256, 244, 256, 243]  # 1999 not asked for
    assert [chunk.index[0] for chunk in chunks] == [1000, 1512, 1001, 1513]  # shard, then row
    assert sorted(i for chunk in chunks for i in chunk.index) == sorted(wanted)
    assert chunks[0].loc[1000, "jpeg"] == bytes([1000 % 256]) * 10
    assert read_groups == [0, 1, 0, 1]  # each row group once


def test_a_tables_bytes_do_not_depend_on_the_frames_attrs():
    """Rows read back from saved chunks carry attrs; the artifact must not (same rows, same
    bytes, however they were assembled)."""
    frame = pd.DataFrame({"image_id": [1, 2]})
    tagged = frame.copy()
    tagged.attrs["produced_by"] = {"asset": "pair_descriptions"}
    assert write_table(tagged, {"run": 1}) == write_table(frame, {"run": 1})
    assert tagged.attrs == {"produced_by": {"asset": "pair_descriptions"}}  # left as it was


def test_a_rebuild_reuses_unchanged_shards(store):
    first = build_image_index(store, ["00000"])
    _shard(store, "00000", range(5))  # changed on disk, but declared unchanged: not read
    again = build_image_index(store, ["00000", "00001"], previous=first, reuse=["00000"])
    assert set(again.loc[again["shard"] == "00000", "image_id"]) == set(range(1000, 2000, 2))
    assert (again["shard"] == "00001").sum() == 500
    np.testing.assert_array_equal(again["image_id"], np.sort(again["image_id"]))


def test_the_asset_reads_only_new_shards(tmp_path):
    for shard in (0, 1):
        write_demo_shard(tmp_path / "home" / "demo_corpus", shard, 6, seed=0)
    resources = small_demo_resources(tmp_path / "home")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00000", "00001"])
    assets = list(defs.assets)

    def ingest(shard: str) -> None:
        materialize(assets, selection=["corpus_images", "corpus_rejects"], partition_key=shard,
                    resources=resources, instance=instance)

    def index() -> dict:
        result = materialize(assets, selection=["image_index"], resources=resources,
                             instance=instance)
        (event,) = result.asset_materializations_for_node("image_index")
        return {key: value.value for key, value in event.metadata.items()}

    ingest("00000")
    assert index()["shards_read"] == 1
    ingest("00001")
    metadata = index()
    assert (metadata["shards"], metadata["shards_read"], metadata["dagster/row_count"]) == (2, 1, 12)
    assert index()["shards_read"] == 0  # nothing new
    ingest("00000")  # re-ingested: read again, the other shard reused
    assert index()["shards_read"] == 1
