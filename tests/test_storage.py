"""The artifact store: atomic local writes, and the pipeline's artifacts round-tripping S3."""

import numpy as np
import pytest
from conftest import small_demo_resources
from dagster import DagsterInstance, materialize
from s3_server import moto_s3

from megapairs_dagster.artifacts import Embeddings, artifact_relpath, load_artifact
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.storage import ArtifactStoreClient


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


def test_missing_artifact_names_the_asset_to_materialise(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialise the upstream asset"):
        load_artifact(ArtifactStoreClient(str(tmp_path)), "embeddings_clip_image/00000")


def test_embeddings_reject_misaligned_rows():
    with pytest.raises(ValueError, match="N ids"):
        Embeddings(ids=np.arange(3), vectors=np.zeros((2, 4)))


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
