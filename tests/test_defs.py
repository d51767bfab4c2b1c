"""The code location loads and holds the graph the design describes."""

import dataclasses

import pytest
from dagster import AssetKey, EnvVar

from megapairs_dagster.definitions import build_definitions, defs
from megapairs_dagster.resources.profiles import (
    DEMO_MLLM_ENV,
    PROFILES,
    MLLMRun,
    TrainingRun,
    load_deployment,
    resources_for,
)
from megapairs_dagster.synthesis.views import VIEWS

PER_SHARD = {"corpus_images", "corpus_rejects"} | {
    f"{stage}_{view}" for stage in ("embeddings", "neighbors") for view in VIEWS
}
GLOBAL = {"base_encoders", "image_index", "view_report"} | {f"knn_index_{view}" for view in VIEWS}


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
    groups = {node.group_name for node in defs.resolve_asset_graph().asset_nodes}
    assert {"ingest_and_embed", "indexes", "neighbors", "synthesis", "training",
            "evaluation"} <= groups
    assert groups <= set(jobs)  # one job per group
    assert jobs["ingest_and_embed"].partitions_def.name == "shards"
    assert "demo_seed1" in jobs["training"].partitions_def.get_partition_keys()
    # the demo scores a real benchmark only once its data is configured; the paper all of them
    assert set(jobs["evaluation"].partitions_def.get_partition_keys()) == {
        f"demo_cir|{run}" for run in jobs["training"].partitions_def.get_partition_keys()
    }
    paper = build_definitions(load_deployment("paper")).resolve_job_def("evaluation")
    assert {"cirr|large", "genecis|large", "mmeb|base_encoder"} <= set(
        paper.partitions_def.get_partition_keys())
    assert {key.to_user_string() for key in jobs["synthesis"].asset_layer.selected_asset_keys} == {
        "image_pairs", "pair_descriptions", "description_rejects", "instructions",
        "instruction_rejects", "triplets",
    }
    assert defs.resolve_sensor_def("shard_sensor") is not None
    for profile in PROFILES:
        assert set(resources_for(profile)) >= {"store", "io_manager", "corpus_source", "encoders"}


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown profile"):
        resources_for("papr")


def test_gpu_assets_share_a_pool_and_table_writers_need_none():
    graph = defs.resolve_asset_graph()
    gpu = [f"embeddings_{view}" for view in VIEWS] + ["pair_descriptions", "instructions"]
    for name in gpu:
        node = graph.get(AssetKey(name))
        assert node.pools == {"gpu"}, name
    # each shard's triplets are its own files in the store: writers never contend
    assert not graph.get(AssetKey("triplets")).pools


def test_reads_of_other_shards_go_through_the_declared_image_index():
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey("image_index")).parent_keys == {AssetKey("corpus_images")}
    for name in ("pair_descriptions", "instructions", "mmret_clip", "megapairs_export"):
        assert AssetKey("image_index") in graph.get(AssetKey(name)).parent_keys, name
    # mining reads its own shard's neighbours only; relation statistics live in view_report
    assert AssetKey("corpus_images") not in graph.get(AssetKey("image_pairs")).parent_keys


def _training_runs(definitions) -> list[str]:
    graph = definitions.resolve_asset_graph()
    return graph.get(AssetKey("mmret_clip")).partitions_def.get_partition_keys()


def test_each_profile_has_its_own_training_runs():
    assert _training_runs(build_definitions(load_deployment("demo", "home"))) == [
        "base_encoder", "demo", "demo_seed1", "demo_seed2", "demo_captions"
    ]
    paper = build_definitions(load_deployment("paper"))
    assert _training_runs(paper) == ["base_encoder", "base", "large"]
    # the scores' model dimension is exactly the runs, so each maps to one checkpoint
    scores = paper.resolve_asset_graph().get(AssetKey("benchmark_scores")).partitions_def
    assert "circo|large" in scores.get_partition_keys()
    assert not any("demo_seed" in key for key in scores.get_partition_keys())
    # the demo benchmark is the demo's: the paper scores real benchmarks and depends on no demo
    assert not any(key.startswith("demo_cir|") for key in scores.get_partition_keys())
    graph = paper.resolve_asset_graph()
    assert not graph.has(AssetKey("demo_benchmark"))
    # each model family's scores depend on its own training asset, one partition per model
    assert graph.get(AssetKey("benchmark_scores")).parent_keys == {AssetKey("mmret_clip")}
    assert graph.get(AssetKey("mllm_benchmark_scores")).parent_keys == {AssetKey("mmret_mllm")}
    # one table of every score, its own group (and job): a group is one partitioning
    leaderboard = graph.get(AssetKey("leaderboard"))
    assert leaderboard.parent_keys == {AssetKey("benchmark_scores"),
                                       AssetKey("mllm_benchmark_scores")}
    assert leaderboard.group_name == "evaluation_summary" and leaderboard.partitions_def is None


def test_a_deployment_config_file_reaches_resources_and_runs(tmp_path, monkeypatch):
    config = tmp_path / "megapairs.yaml"
    config.write_text(
        "resources:\n"
        "  encoders:\n"
        "    config: {clip_pretrained: /models/eva02_b16.safetensors}\n"
        "  compute:\n"
        "    config: {device: cpu, batch_size: 7}\n"
        "  generation:\n"
        "    config: {instruction_model: {env: MY_LLM}}\n"
        "training_runs:\n"
        "  base: {pretrained: /models/vit-b-16.pt}\n"
        "  base_long: {start: ViT-B-16, pretrained: /models/vit-b-16.pt, seed_offset: 3}\n"
        "mllm_runs:\n"
        "  mllm_s1: {max_steps: 500}\n"
        "  mllm_s1_seed1: {seed_offset: 1}\n"
    )
    monkeypatch.setenv("MEGAPAIRS_CONFIG", str(config))
    deployment = load_deployment("paper")
    resources = deployment.resources
    assert resources["encoders"].clip_pretrained == "/models/eva02_b16.safetensors"
    assert resources["encoders"].clip_model == "EVA02-B-16"  # the profile's, not overridden
    assert resources["compute"].batch_size == 7
    assert resources["generation"].instruction_model == EnvVar("MY_LLM")
    # The file's weights, the profile's recipe (15k steps for the base size).
    assert deployment.training_runs["base"] == TrainingRun("ViT-B-16", "/models/vit-b-16.pt",
                                                           max_steps=15_000)
    assert deployment.training_runs["base_long"].seed_offset == 3
    assert _training_runs(build_definitions(deployment))[-1] == "base_long"
    # MMRet-MLLM's runs the same way: the paper's S1 shortened, a second seed added
    assert deployment.mllm_runs["mllm_s1"] == MLLMRun(max_steps=500)
    assert deployment.mllm_runs["mllm_s2"] == MLLMRun(data="mmeb_train", start="mllm_s1")
    graph = build_definitions(deployment).resolve_asset_graph()
    assert graph.get(AssetKey("mmret_mllm")).partitions_def.get_partition_keys() == [
        "mllm_s1", "mllm_s2", "mllm_s1_seed1"]


@pytest.mark.parametrize(
    "text, error",
    [
        ("resources: {encoder: {config: {}}}", "unknown resource 'encoder'"),
        ("resources: {compute: {config: {devise: cuda}}}", "no setting \\['devise'\\]"),
        ("training_runs: {base: {pretrain: x}}", "training_runs.base"),
        ("mllm_runs: {s1: {data: captions}}", "mllm_runs.s1: data must be triplets"),
        ("mllm_runs: {s2: {start: s0}}", "mllm_runs.s2 starts from 's0'"),
        ("stores: {}", "expected a mapping with `resources`"),
    ],
)
def test_a_wrong_config_file_names_what_is_wrong(tmp_path, text, error):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=error):
        load_deployment("demo", "home", config_file=str(config))


def test_executor_per_deployment(monkeypatch):
    monkeypatch.delenv("MEGAPAIRS_EXECUTOR", raising=False)
    assert load_deployment("demo", "home").executor_definition().name == "in_process"
    assert load_deployment("paper").executor_definition().name == "multiprocess"
    monkeypatch.setenv("MEGAPAIRS_EXECUTOR", "k8s")
    assert load_deployment("demo", "home").executor_definition().name == "k8s"
    monkeypatch.setenv("MEGAPAIRS_EXECUTOR", "slurm")
    with pytest.raises(ValueError, match="MEGAPAIRS_EXECUTOR='slurm'"):
        load_deployment("paper")


def test_mmret_mllm_runs_are_scored_beside_mmret_clip_where_the_deployment_has_them(
        monkeypatch):
    monkeypatch.delenv(DEMO_MLLM_ENV, raising=False)
    assert not defs.resolve_asset_graph().has(AssetKey("mmret_mllm"))  # the demo, by default
    paper = build_definitions(load_deployment("paper")).resolve_asset_graph()
    node = paper.get(AssetKey("mmret_mllm"))
    assert node.partitions_def.get_partition_keys() == ["mllm_s1", "mllm_s2"]
    assert node.pools == {"gpu"} and node.group_name == "training_mllm"
    assert node.automation_condition is None  # launched deliberately, as mmret_clip
    scores = paper.get(AssetKey("mllm_benchmark_scores"))
    assert "circo|mllm_s2" in scores.partitions_def.get_partition_keys()
    assert "circo|mllm_s2" not in paper.get(
        AssetKey("benchmark_scores")).partitions_def.get_partition_keys()
    assert scores.group_name == "evaluation_mllm" and scores.pools == {"gpu"}
    # the score of mllm_s2 reads mllm_s2's checkpoint and no other
    mapping = paper.get_partition_mapping(AssetKey("mllm_benchmark_scores"), AssetKey("mmret_mllm"))
    assert mapping.partition_dimension_name == "model"
    mllm = load_deployment("paper").resources["mllm_training"]
    assert (mllm.base_model, mllm.lora_rank, mllm.bf16) == (
        "llava-hf/llava-v1.6-mistral-7b-hf", 32, True)

    monkeypatch.setenv(DEMO_MLLM_ENV, "1")
    demo = build_definitions(load_deployment("demo", "home"))
    jobs = {job.name: job for job in demo.resolve_all_job_defs()}
    assert jobs["training_mllm"].partitions_def.get_partition_keys() == ["mllm_demo"]
    assert jobs["evaluation_mllm"].partitions_def.get_partition_keys() == ["demo_cir|mllm_demo"]
    with pytest.raises(ValueError, match=r"\['demo'\] are both"):
        dataclasses.replace(load_deployment("demo", "home"),
                            mllm_runs={"demo": MLLMRun()})
