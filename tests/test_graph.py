"""The whole foundation graph, materialised in process on a small demo profile."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_SHARD, small_demo_resources
from dagster import (
    AssetKey,
    DagsterInstance,
    MultiPartitionKey,
    build_sensor_context,
    materialize,
)
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.jobs.pipeline import materialize_pipeline
from megapairs_dagster.jobs.sensors import shard_sensor
from megapairs_dagster.reports import format_scores
from megapairs_dagster.synthesis.diagnostics import caption_overlap
from megapairs_dagster.synthesis.megapairs_format import read_megapairs
from megapairs_dagster.synthesis.triplet_store import TripletStore
from megapairs_dagster.synthesis.views import VIEWS

pytestmark = pytest.mark.integration

PER_SHARD_ASSETS = ["corpus_images", "corpus_rejects"] + [
    f"{stage}_{view}" for stage in ("embeddings", "neighbors") for view in VIEWS
] + ["image_pairs", "pair_descriptions", "description_rejects", "instructions",
      "instruction_rejects", "triplets"]


@pytest.fixture(scope="module")
def two_shard_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("graph")
    for shard in (0, 1):
        write_demo_shard(home / "demo_corpus", shard, SMALL_SHARD, seed=0)
    resources = small_demo_resources(home)
    instance = DagsterInstance.ephemeral()
    done = materialize_pipeline(
        list(defs.assets), resources, instance, ["00000", "00001"], log=lambda _: None
    )
    return home, resources, instance, done


def test_every_asset_materialises_for_two_shards(two_shard_run):
    _, resources, instance, done = two_shard_run
    for name in PER_SHARD_ASSETS:
        assert done[name] == ["00000", "00001"], name
        assert instance.get_materialized_partitions(AssetKey(name)) == {"00000", "00001"}
    store = resources["store"].client()
    for shard in ("00000", "00001"):
        images = load_artifact(store, artifact_relpath(["corpus_images"], shard))
        assert len(images) == SMALL_SHARD
        for view in VIEWS:
            emb = load_artifact(store, artifact_relpath([f"embeddings_{view}"], shard))
            assert emb.vectors.dtype == np.float16
            np.testing.assert_array_equal(emb.ids, images["image_id"].to_numpy())
            norms = np.linalg.norm(emb.vectors.astype(np.float32), axis=1)
            np.testing.assert_allclose(norms, 1.0, atol=2e-3)
            neighbors = load_artifact(store, artifact_relpath([f"neighbors_{view}"], shard))
            assert len(neighbors) == SMALL_SHARD
            for image_id, ids, scores in neighbors.itertuples(index=False):
                assert image_id not in set(ids) and len(set(ids)) == len(ids)
                assert list(scores) == sorted(scores, reverse=True)


def test_recall_checks_pass_and_artifacts_record_their_producer(two_shard_run):
    resources = two_shard_run[1]
    store = resources["store"].client()
    for view in VIEWS:
        index = load_artifact(store, artifact_relpath([f"knn_index_{view}"], None))
        assert index.produced_by["spec"] == "Flat" and index.produced_by["recall"] == 1.0
        assert index.produced_by["shards"] == ["00000", "00001"]
        assert index.produced_by["run_id"]
    images = load_artifact(store, artifact_relpath(["corpus_images"], "00000"))
    assert images.attrs["produced_by"]["asset"] == "corpus_images"
    assert images.attrs["produced_by"]["partition"] == "00000"


def test_nearest_neighbours_share_more_caption_words_than_random_pairs(two_shard_run):
    """A measured check that each view means something: its 3 nearest neighbours describe
    more of the same content than random images do."""
    _, resources, _, _ = two_shard_run
    store = resources["store"].client()
    images = pd.concat(
        [load_artifact(store, artifact_relpath(["corpus_images"], s)) for s in ("00000", "00001")]
    )
    captions = dict(zip(images["image_id"], images["caption"]))
    rng = np.random.default_rng(0)
    random_pairs = rng.choice(images["image_id"].to_numpy(), size=(2000, 2))
    random_overlap = np.mean([caption_overlap(captions[a], captions[b]) for a, b in random_pairs])
    for view in VIEWS:
        neighbors = pd.concat(
            [load_artifact(store, artifact_relpath([f"neighbors_{view}"], s)) for s in ("00000", "00001")]
        )
        overlap = np.mean([
            caption_overlap(captions[query], captions[neighbor])
            for query, ids in zip(neighbors["image_id"], neighbors["neighbor_ids"])
            for neighbor in list(ids)[:3]
        ])
        assert overlap > random_overlap + 0.03, (view, overlap, random_overlap)
    report = load_artifact(store, artifact_relpath(["view_report"], None))
    assert set(report) == set(VIEWS)
    assert all(report[view]["relation_pairs"] > 0 for view in VIEWS)


def test_a_new_shard_recomputes_only_its_own_partitions(two_shard_run):
    home, resources, instance, _ = two_shard_run
    write_demo_shard(home / "demo_corpus", 2, SMALL_SHARD, seed=0)
    before = {
        name: len(instance.fetch_materializations(AssetKey(name), limit=100).records)
        for name in PER_SHARD_ASSETS + ["base_encoders"]
    }
    done = materialize_pipeline(
        list(defs.assets), resources, instance, ["00000", "00001", "00002"], log=lambda _: None
    )
    for name in PER_SHARD_ASSETS:
        assert done[name] == ["00002"], name
        after = len(instance.fetch_materializations(AssetKey(name), limit=100).records)
        assert after == before[name] + 1, name
    assert "base_encoders" not in done  # the baseline encoders are not retrained
    assert all(done[f"knn_index_{view}"] == ["(global)"] for view in VIEWS)
    index = load_artifact(resources["store"].client(), artifact_relpath(["knn_index_clip_image"], None))
    assert len(index.ids) == 3 * SMALL_SHARD


def test_sensor_adds_partitions_for_new_shards_only(tmp_path):
    for shard in (0, 1):
        write_demo_shard(tmp_path / "demo_corpus", shard, 8, seed=0)
    resources = small_demo_resources(tmp_path)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00000"])
    with build_sensor_context(instance=instance, resources=resources) as context:
        result = shard_sensor(context)
    assert [request.partition_key for request in result.run_requests] == ["00001"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["00001"]


def test_triplets_land_in_the_store_and_rematerialising_a_shard_keeps_the_count(two_shard_run):
    _, resources, instance, _ = two_shard_run
    store = resources["store"].client()
    database = TripletStore(resources["store"].client())
    counts = database.counts()
    shard_keys = sorted(instance.get_materialized_partitions(AssetKey("triplets")))
    expected = sum(
        len(load_artifact(store, artifact_relpath(["instructions"], shard))) for shard in shard_keys
    )
    assert counts["triplets"] == expected > 0
    assert counts["images"] == len(shard_keys) * SMALL_SHARD
    frame = database.triplets_frame()
    assert all(len(instructions) >= 3 for instructions in frame["instructions"])
    assert all(negatives[0] == query for query, negatives in zip(frame["query_id"], frame["hard_negative_ids"]))
    assert set(frame["generator_backend"]) == {"template"} and set(frame["prompt_version"]) == {"v1"}

    materialize(list(defs.assets), selection=["triplets"], partition_key="00000",
                resources=resources, instance=instance)
    assert database.counts() == counts and database.duplicate_pairs() == 0


def test_export_is_readable_in_the_released_format(two_shard_run):
    _, resources, _, done = two_shard_run
    assert done["megapairs_export"] == ["(global)"]
    url = resources["store"].client().url("megapairs_export", "megapairs.jsonl")
    records = list(read_megapairs(url))
    assert len(records) == TripletStore(resources["store"].client()).counts()["triplets"]
    for record in records[:20]:
        assert record.hns[0] == record.q_img and len(record.q_text) >= 3
        assert Path(record.resolve(record.t_img)).read_bytes()[:2] == b"\xff\xd8"  # a JPEG


def test_training_and_scoring_record_checkpoint_and_score_rows(two_shard_run):
    _, resources, _, done = two_shard_run
    assert done["mmret_clip"] == [
        "base_encoder", "demo", "demo_seed1", "demo_seed2", "demo_captions"
    ]
    assert done["benchmark_scores"] == [f"demo_cir|{run}" for run in done["mmret_clip"]]
    # The zero-shot baseline trains nothing: its record names the base CLIP it scores.
    baseline = load_artifact(resources["store"].client(), artifact_relpath(["mmret_clip"], "base_encoder"))
    assert baseline["checkpoint"] is None and baseline["start"]["stored"]
    store = resources["store"].client()
    record = load_artifact(store, artifact_relpath(["mmret_clip"], "demo"))
    assert record["training"]["max_steps"] == 12 and record["data"]["triplets"] > 0
    assert store.exists(record["checkpoint"] + "/model.safetensors")
    seeds = [load_artifact(store, artifact_relpath(["mmret_clip"], run))["training"]["seed"]
             for run in ("demo", "demo_seed1", "demo_seed2")]
    assert seeds == [0, 1, 2]
    # The control: captions of every ingested image, 5 per triplet sample, same steps.
    control = load_artifact(store, artifact_relpath(["mmret_clip"], "demo_captions"))
    assert control["run"]["data"] == "captions"
    assert control["data"]["captioned_images"] == SMALL_SHARD * len(control["data"]["shards"])
    assert control["training"]["batch_size"] == 5 * record["training"]["batch_size"]
    assert control["training"]["max_steps"] == record["training"]["max_steps"]
    scores = TripletStore(resources["store"].client()).scores_frame()
    overall = scores[(scores["query_group"] == "all") & (scores["metric"] == "mAP@5")]
    assert sorted(overall["model"]) == sorted(done["mmret_clip"])
    assert all(0 <= value <= 100 for value in overall["value"])
    groups = set(scores["query_group"]) - {"all"}
    assert {"background", "colour", "shape"} <= groups
    table = format_scores(scores, seeds=("demo", "demo_seed1", "demo_seed2"),
                          control="demo_captions")
    assert "mean of 3 seeds" in table and "/3 seeds beat base_encoder" in table


def test_one_run_can_embed_several_shards_with_the_same_result(two_shard_run):
    """The embedding assets take a range of shards per run (their BackfillPolicy)."""
    _, resources, instance, _ = two_shard_run
    store = resources["store"].client()
    name = "embeddings_clip_caption"
    before = {s: load_artifact(store, artifact_relpath([name], s)) for s in ("00000", "00001")}
    result = materialize(
        list(defs.assets), selection=[name], resources=resources, instance=instance,
        tags={"dagster/asset_partition_range_start": "00000",
              "dagster/asset_partition_range_end": "00001"},
    )
    materializations = result.asset_materializations_for_node(name)
    assert sorted(m.partition for m in materializations) == ["00000", "00001"]
    for shard, earlier in before.items():
        again = load_artifact(store, artifact_relpath([name], shard))
        assert again.produced_by["run_id"] == result.run_id
        np.testing.assert_array_equal(again.ids, earlier.ids)
        np.testing.assert_allclose(again.vectors.astype(np.float32),
                                   earlier.vectors.astype(np.float32), atol=1e-3)


def test_one_run_can_generate_instructions_for_several_shards(two_shard_run):
    _, resources, instance, _ = two_shard_run
    store = resources["store"].client()
    before = {s: load_artifact(store, artifact_relpath(["instructions"], s)) for s in ("00000", "00001")}
    result = materialize(
        list(defs.assets),
        selection=["pair_descriptions", "description_rejects", "instructions", "instruction_rejects"],
        resources=resources, instance=instance,
        tags={"dagster/asset_partition_range_start": "00000",
              "dagster/asset_partition_range_end": "00001"},
    )
    materialized = [
        m.partition for m in result.asset_materializations_for_node("instructions")
        if m.asset_key == AssetKey("instructions")
    ]
    assert sorted(materialized) == ["00000", "00001"]
    for shard, earlier in before.items():
        again = load_artifact(store, artifact_relpath(["instructions"], shard))
        assert again.attrs["produced_by"]["run_id"] == result.run_id
        pd.testing.assert_frame_equal(again.reset_index(drop=True), earlier.reset_index(drop=True))


def test_retraining_one_run_marks_exactly_its_scores_stale(two_shard_run):
    """benchmark_scores maps to the mmret_clip partition it scores, so Dagster's stale-status
    resolver (the one behind the UI) flags the retrained run's scores and no other."""
    _, resources, instance, _ = two_shard_run

    def status() -> dict[str, StaleStatus]:
        resolver = CachingStaleStatusResolver(
            instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
        )
        return {
            run: resolver.get_status(
                AssetKey("benchmark_scores"), MultiPartitionKey({"benchmark": "demo_cir", "model": run})
            )
            for run in ("base_encoder", "demo", "demo_seed1")
        }

    assert set(status().values()) == {StaleStatus.FRESH}
    materialize(list(defs.assets), selection=["mmret_clip"], partition_key="demo_seed1",
                resources=resources, instance=instance)
    assert status() == {"base_encoder": StaleStatus.FRESH, "demo": StaleStatus.FRESH,
                        "demo_seed1": StaleStatus.STALE}
