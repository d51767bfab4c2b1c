"""Asset code versions follow the configuration that shapes each asset, so the UI shows what a
config change makes stale."""

import pytest
from conftest import deployment_with
from dagster import AssetKey, DagsterInstance, EnvVar, materialize
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleCauseCategory,
    StaleStatus,
)
from dagster._core.loader import LoadingContextForTest

from megapairs_dagster.assets.code_versions import VERSIONED_BY
from megapairs_dagster.assets.instructions import DESCRIBE, INSTRUCT
from megapairs_dagster.definitions import build_definitions, defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.resources.profiles import resources_for
from megapairs_dagster.resources.settings import Generation, versioned_fields
from megapairs_dagster.synthesis.views import VIEWS


def _versions(resources: dict) -> dict[str, str]:
    graph = build_definitions(deployment_with(resources)).resolve_asset_graph()
    return {key.to_user_string(): graph.get(key).code_version for key in graph.get_all_asset_keys()}


def _changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def _with(resources: dict, key: str, **changes) -> dict:
    """``resources`` with some settings of one resource changed, the rest as they were."""
    resource = resources[key]
    settings = {name: getattr(resource, name) for name in type(resource).model_fields}
    return {**resources, key: type(resource)(**{**settings, **changes})}


@pytest.fixture(scope="module")
def demo():
    resources = resources_for("demo", "home")
    return resources, _versions(resources)


def test_a_mining_window_changes_the_pairs_and_nothing_upstream(demo):
    resources, before = demo
    windows = {**resources["mining"].windows, "clip_image": [0.8, 0.95]}
    after = _versions(_with(resources, "mining", windows=windows))
    assert _changed(before, after) == {"image_pairs", "view_report"}
    assert after["image_pairs"].startswith("1+")
    for name in ("corpus_images", "corpus_rejects", *(f"embeddings_{view}" for view in VIEWS)):
        assert after[name] == before[name], name
    # targets per query change the pairs only: the view report reads the windows alone
    after = _versions(_with(resources, "mining", targets_per_query=2))
    assert _changed(before, after) == {"image_pairs"}


def test_a_prompt_version_changes_both_generation_steps_a_new_llm_only_the_second(demo):
    resources, before = demo
    after = _versions(_with(resources, "generation", prompt_version="v2"))
    assert _changed(before, after) == {
        "pair_descriptions",
        "description_rejects",
        "instructions",
        "instruction_rejects",
    }
    after = _versions(_with(resources, "generation", instruction_model="/models/other-llm"))
    assert _changed(before, after) == {"instructions", "instruction_rejects"}


def test_throughput_and_placement_settings_change_no_version(demo):
    resources, before = demo
    changed = _with(
        resources,
        "compute",
        device="cuda",
        dtype="bfloat16",
        batch_size=512,
        num_workers=8,
    )
    changed = _with(changed, "store", cache_dir="/elsewhere")
    changed = _with(changed, "generation", batch_size=64, chunk_size=16, device="cuda")
    changed = _with(changed, "corpus_source", url="s3://bucket/copy", format="parquet")
    assert _versions(changed) == before


def test_identical_config_gives_identical_versions(demo):
    resources, before = demo
    assert _versions(resources_for("demo", "elsewhere")) == before  # paths are not versioned
    assert _versions(dict(resources)) == before


def test_env_vars_count_by_name_and_need_not_be_set(monkeypatch):
    for name in ("MEGAPAIRS_MLLM", "MEGAPAIRS_LLM", "MEGAPAIRS_STORE_URL", "MEGAPAIRS_CORPUS_URL"):
        monkeypatch.delenv(name, raising=False)
    paper = resources_for("paper")
    unset = _versions(paper)
    monkeypatch.setenv("MEGAPAIRS_MLLM", "/models/llava")
    assert _versions(resources_for("paper")) == unset
    renamed = _with(paper, "generation", description_model=EnvVar("MEGAPAIRS_OTHER_MLLM"))
    assert _changed(unset, _versions(renamed)) == {
        "pair_descriptions",
        "description_rejects",
    }


def test_every_setting_an_asset_reads_is_versioned_or_declared_unversioned():
    """A new asset that reads mining, encoders, ... without declaring it (``versioned_by`` on its
    decorator) would never go stale."""
    resources = resources_for("demo", "home")
    for asset in defs.assets:
        for key in asset.keys:
            selectors = asset.specs_by_key[key].metadata.get(VERSIONED_BY, ())
            named = {selector.split(".")[0] for selector in selectors}
            # io_manager's only setting is the store, which is checked under its own key
            for resource in asset.required_resource_keys - named - {"io_manager"}:
                assert not versioned_fields(resources[resource]), (key, resource)
    generation = {f"generation.{name}" for name in versioned_fields(Generation())}
    assert set(DESCRIBE) | set(INSTRUCT) == generation


def test_a_changed_setting_shows_the_materialised_asset_stale_in_dagster(tmp_path):
    """Dagster's own stale-status resolver (the one behind the UI) reports a code-version cause
    for the partitions materialised under the old config, and nothing for a setting that does
    not count."""
    write_demo_shard(tmp_path / "demo_corpus", 0, images_per_shard=6)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00000"])
    resources = resources_for("demo", str(tmp_path))
    ingest = ["corpus_images", "corpus_rejects"]

    def status(definitions) -> dict:
        resolver = CachingStaleStatusResolver(
            instance, definitions.resolve_asset_graph(), LoadingContextForTest(instance)
        )
        return {
            name: (
                resolver.get_status(AssetKey(name), "00000"),
                [
                    (cause.category, cause.reason)
                    for cause in resolver.get_stale_causes(AssetKey(name), "00000")
                ],
            )
            for name in ingest
        }

    def ingest_shard(definitions, with_resources) -> bool:
        return materialize(
            list(definitions.assets),
            selection=ingest,
            partition_key="00000",
            resources=with_resources,
            instance=instance,
        ).success

    old = build_definitions(deployment_with(resources))
    assert ingest_shard(old, resources)
    assert status(old) == {name: (StaleStatus.FRESH, []) for name in ingest}

    moved = _with(resources, "compute", device="cuda", batch_size=8)
    assert status(build_definitions(deployment_with(moved))) == {name: (StaleStatus.FRESH, []) for name in ingest}

    smaller = _with(resources, "corpus_source", max_side=64)
    new = build_definitions(deployment_with(smaller))
    stale = (StaleStatus.STALE, [(StaleCauseCategory.CODE, "has a new code version")])
    assert status(new) == {name: stale for name in ingest}

    assert ingest_shard(new, smaller)
    assert status(new) == {name: (StaleStatus.FRESH, []) for name in ingest}
