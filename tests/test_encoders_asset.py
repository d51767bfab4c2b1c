"""``base_encoders`` in pretrained mode pins locally saved weights; embeddings load them back."""

import open_clip
from conftest import small_demo_resources
from dagster import DagsterInstance, materialize

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.resources.settings import Encoders
from megapairs_dagster.synthesis.encoders import (
    DEMO_DINO_IMAGE_SIZE,
    build_demo_dino,
    save_clip,
    sha256_file,
)


def test_pretrained_mode_records_hashes_of_what_it_loaded(tmp_path):
    clip_dir, dino_dir = tmp_path / "weights" / "clip", tmp_path / "weights" / "dino"
    model = open_clip.create_model("megapairs-demo-clip", pretrained=None)
    save_clip(model, "megapairs-demo-clip", clip_dir)
    build_demo_dino(dino_dir, seed=3)
    write_demo_shard(tmp_path / "demo_corpus", 0, 16, seed=0)

    resources = small_demo_resources(tmp_path)
    resources["encoders"] = Encoders(
        mode="pretrained", clip_model="megapairs-demo-clip", clip_pretrained=str(clip_dir),
        dino_model=str(dino_dir), dino_image_size=DEMO_DINO_IMAGE_SIZE,
    )
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00000"])
    assets = list(defs.assets)
    materialize(assets, selection=["corpus_images", "corpus_rejects"], partition_key="00000",
                resources=resources, instance=instance)
    materialize(assets, selection=["base_encoders"], resources=resources, instance=instance)
    store = resources["store"].client()
    manifest = load_artifact(store, artifact_relpath(["base_encoders"], None))
    assert manifest["mode"] == "pretrained"
    clip_hashes = manifest["clip"]["identity"]["files"]
    assert sha256_file(clip_dir / "model.safetensors") in clip_hashes.values()
    dino_hashes = manifest["dino"]["identity"]["files"]
    assert sha256_file(dino_dir / "model.safetensors") in dino_hashes.values()
    # Nothing was trained or copied into the store in pretrained mode.
    assert [p.name for p in store.path("base_encoders").iterdir()] == ["data.json"]
    assert "bootstrap" not in manifest

    result = materialize(assets, selection=["embeddings_dino_image", "embeddings_clip_caption"],
                         partition_key="00000", resources=resources, instance=instance)
    assert result.success
    emb = load_artifact(store, artifact_relpath(["embeddings_dino_image"], "00000"))
    assert emb.vectors.shape == (16, 128)
    assert emb.produced_by["encoder"]["files"] == dino_hashes
