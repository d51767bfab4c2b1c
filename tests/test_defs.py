"""The code location loads and holds the graph the design describes."""

from dagster import AssetKey

from megapairs_dagster.definitions import defs
from megapairs_dagster.resources.profiles import PROFILES, resources_for
from megapairs_dagster.synthesis.views import VIEWS

PER_SHARD = {"corpus_images", "corpus_rejects"} | {
    f"{stage}_{view}" for stage in ("embeddings", "neighbors") for view in VIEWS
}
GLOBAL = {"base_encoders", "view_report"} | {f"knn_index_{view}" for view in VIEWS}


def test_definitions_hold_every_asset_of_the_foundation():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert PER_SHARD | GLOBAL <= keys
    for name in PER_SHARD:
        assert graph.get(AssetKey(name)).partitions_def.name == "shards", name
    for name in GLOBAL:
        assert graph.get(AssetKey(name)).partitions_def is None, name


def test_lineage_runs_corpus_to_neighbours():
    graph = defs.resolve_asset_graph()
    for view in VIEWS:
        parents = graph.get(AssetKey(f"neighbors_{view}")).parent_keys
        assert parents == {AssetKey(f"embeddings_{view}"), AssetKey(f"knn_index_{view}")}
        assert AssetKey("corpus_images") in graph.get(AssetKey(f"embeddings_{view}")).parent_keys


def test_recall_check_is_attached_to_every_index():
    checks = {key.asset_key.to_user_string() for key in defs.resolve_asset_graph().asset_check_keys}
    assert {f"knn_index_{view}" for view in VIEWS} <= checks


def test_jobs_sensor_and_both_profiles_resolve():
    jobs = {job.name: job for job in defs.resolve_all_job_defs()}
    assert {"ingest_and_embed", "indexes", "neighbors", "synthesis", "training",
            "evaluation"} <= set(jobs)
    assert "demo_seed1" in jobs["training"].partitions_def.get_partition_keys()
    assert "cirr|demo_captions" in jobs["evaluation"].partitions_def.get_partition_keys()
    assert {key.to_user_string() for key in jobs["synthesis"].asset_layer.selected_asset_keys} == {
        "image_pairs", "pair_descriptions", "description_rejects", "instructions",
        "instruction_rejects", "triplets",
    }
    assert defs.resolve_sensor_def("shard_sensor") is not None
    for profile in PROFILES:
        assert set(resources_for(profile)) >= {"store", "io_manager", "corpus_source", "encoders"}


def test_unknown_profile_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown profile"):
        resources_for("papr")


def test_gpu_assets_share_a_pool_and_duckdb_writers_another():
    graph = defs.resolve_asset_graph()
    gpu = [f"embeddings_{view}" for view in VIEWS] + ["pair_descriptions", "instructions"]
    for name in gpu:
        node = graph.get(AssetKey(name))
        assert node.pools == {"gpu"}, name
    assert graph.get(AssetKey("triplets")).pools == {"duckdb"}
