"""The automation conditions on the asset decorators (assets/conditions.py), evaluated in
process tick by tick.

Materialisations are reported straight to an ephemeral instance (nothing is computed), so each
test shows in seconds what the automation sensor would request on a server.
"""

import weakref
from datetime import datetime, timedelta, timezone
from unittest import mock

import pytest
from conftest import deployment_with
from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    evaluate_automation_conditions,
)
from dagster._core.storage.event_log.base import AssetRecord

from megapairs_dagster.definitions import build_definitions, defs
from megapairs_dagster.resources.profiles import resources_for
from megapairs_dagster.synthesis.views import VIEWS

pytestmark = pytest.mark.slow


def _group(*groups: str) -> list[str]:
    graph = defs.resolve_asset_graph()
    return [key.to_user_string() for key in graph.toposorted_asset_keys
            if graph.get(key).group_name in groups]


INGEST_AND_EMBED = _group("ingest_and_embed")
AFTER_INDEX = _group("neighbors", "synthesis")

OLD, NEW = "00000", "00001"
GLOBAL = ["base_encoders", "image_index", *(f"knn_index_{v}" for v in VIEWS), "view_report",
          "megapairs_export"]
AFTER_NEIGHBORS = [name for name in AFTER_INDEX if not name.startswith("neighbors_")]


class Ticks:
    """Successive evaluations of the automation sensor, the cursor carried from one to the next."""

    def __init__(self, instance: DagsterInstance):
        self.instance = instance
        self.cursor = None
        self.keys = defs.resolve_asset_graph().get_all_asset_keys()
        # One clock for the ticks that name no time: with the wall clock, a test running across
        # the hour would see the hourly retry tick pass between two ticks and a second request.
        self.started = datetime.now(timezone.utc)

    def __call__(self, at: datetime | None = None, definitions=defs) -> dict[str, set]:
        """What this tick (at ``at``, default when these ticks started; of ``definitions``,
        default the shipped ones) requests: asset name → partitions (None for an unpartitioned
        asset)."""
        result = evaluate_automation_conditions(
            defs=definitions, instance=self.instance, cursor=self.cursor,
            evaluation_time=at or self.started,
        )
        self.cursor = result.cursor
        requested = {
            key.to_user_string(): result.get_requested_partitions(key) for key in self.keys
        }
        return {name: set(partitions) for name, partitions in requested.items() if partitions}


# Check results already reported, per instance. Keyed by the instance itself, weakly: an id()
# is reused once an instance is freed, and a later test's instance then skipped its checks.
_REPORTED: weakref.WeakKeyDictionary[DagsterInstance, set] = weakref.WeakKeyDictionary()


def materialised(
    instance: DagsterInstance, names, partition: str | None = None, checks_pass: bool = True
) -> None:
    """Report materialisations, and the result of each asset's blocking checks (a runless
    check result is stored once per partition: the first one stands)."""
    graph = defs.resolve_asset_graph()
    for name in names:
        instance.report_runless_asset_event(AssetMaterialization(name, partition=partition))
        for check in graph.get(AssetKey(name)).check_keys:
            reported = _REPORTED.setdefault(instance, set())
            if graph.get(check).blocking and (check, partition) not in reported:
                if partition:
                    reported.add((check, partition))
                instance.report_runless_asset_event(AssetCheckEvaluation(
                    asset_key=AssetKey(name), check_name=check.name, passed=checks_pass,
                    partition=partition,
                ))


@pytest.fixture
def instance():
    with DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture
def ticks(instance):
    """One shard materialised all through, the automation idle, then a new shard ingested."""
    instance.add_dynamic_partitions("shards", [OLD])
    materialised(instance, [*INGEST_AND_EMBED, *AFTER_INDEX], OLD)
    materialised(instance, GLOBAL)
    ticks = Ticks(instance)
    assert ticks() == {}
    instance.add_dynamic_partitions("shards", [NEW])
    materialised(instance, ["corpus_images", "corpus_rejects"], NEW)
    return ticks


def test_a_new_shard_is_embedded_and_nothing_of_the_old_one_runs(ticks):
    assert ticks() == {"image_index": {None}, **{f"embeddings_{view}": {NEW} for view in VIEWS}}


def test_neighbours_wait_for_an_index_built_after_the_shards_embeddings(ticks, instance):
    ticks()
    materialised(instance, ["image_index"])
    materialised(instance, [f"embeddings_{view}" for view in VIEWS], NEW)
    # the indexes are rebuilt; the neighbours would search indexes without the new shard
    assert ticks() == {f"knn_index_{view}": {None} for view in VIEWS}
    assert ticks() == {}
    materialised(instance, ["knn_index_clip_image"])
    assert ticks() == {"neighbors_clip_image": {NEW}}
    materialised(instance, ["neighbors_clip_image"], NEW)
    materialised(instance, ["knn_index_dino_image", "knn_index_clip_caption"])
    # the last neighbours and every later per-shard step share one run; the report follows
    assert ticks() == {
        "neighbors_dino_image": {NEW},
        "neighbors_clip_caption": {NEW},
        **{name: {NEW} for name in AFTER_NEIGHBORS},
    }


def test_base_encoders_run_once_when_missing_after_a_first_ingest(instance):
    instance.add_dynamic_partitions("shards", [OLD])
    ticks = Ticks(instance)
    assert ticks() == {}  # no shard ingested yet: nothing to train on
    materialised(instance, ["corpus_images", "corpus_rejects"], OLD)
    # the embeddings wait for its run; the image index is rebuilt beside it
    assert ticks() == {"base_encoders": {None}, "image_index": {None}}
    assert ticks() == {}  # requested once, even before its run shows up
    materialised(instance, ["base_encoders", "image_index"])
    assert ticks() == {f"embeddings_{view}": {OLD} for view in VIEWS}
    materialised(instance, [f"embeddings_{view}" for view in VIEWS], OLD)
    instance.add_dynamic_partitions("shards", [NEW])
    materialised(instance, ["corpus_images", "corpus_rejects"], NEW)
    requested = ticks()
    assert "base_encoders" not in requested  # the baseline is never retrained by automation
    assert requested["embeddings_clip_image"] == {NEW}


def _through_neighbours(ticks, instance) -> dict:
    """The new shard up to its neighbours; returns the tick that requests the rest."""
    materialised(instance, ["image_index"])
    materialised(instance, [f"embeddings_{view}" for view in VIEWS], NEW)
    materialised(instance, [f"knn_index_{view}" for view in VIEWS])
    materialised(instance, [f"neighbors_{view}" for view in VIEWS], NEW)
    return ticks()


def test_a_partition_is_requested_once_even_before_its_run_shows_up(ticks, instance):
    """Two ticks in a row, nothing materialised and no run in the instance: the second tick
    must not ask again for what the first one requested."""
    requested = _through_neighbours(ticks, instance)
    assert {name: requested[name] for name in AFTER_NEIGHBORS} == {
        n: {NEW} for n in AFTER_NEIGHBORS
    }
    for _ in range(2):
        assert not set(ticks()) & set(AFTER_NEIGHBORS)
    # once materialised, the export is rebuilt; nothing per shard runs again
    materialised(instance, AFTER_NEIGHBORS, NEW)
    assert ticks() == {"megapairs_export": {None}}


def test_a_materialisation_during_a_tick_does_not_request_the_partition_again(ticks, instance):
    """Dagster reads a partition's status from the asset record first and its
    planned-but-unmaterialised runs later: when `triplets` is materialised between the two reads,
    the tick sees it neither materialised nor in progress, and must still not request it again.
    The tick here reads the asset record before the commit, and the planned runs after it."""
    _through_neighbours(ticks, instance)
    instance.create_run_for_job(
        defs.resolve_implicit_global_asset_job_def(),
        asset_selection={AssetKey(name) for name in AFTER_NEIGHBORS},
        tags={"dagster/partition": NEW},
    )
    materialised(instance, [name for name in AFTER_NEIGHBORS if name != "triplets"], NEW)
    assert ticks() == {}  # triplets is in progress
    key = AssetKey("triplets")
    (before_commit,) = instance.get_asset_records([key])
    last_event = instance.event_log_storage.get_maximum_record_id()
    materialised(instance, ["triplets"], NEW)
    read = AssetRecord.blocking_get.__func__

    def racing_read(cls, context, asset_key):
        return before_commit if asset_key == key else read(cls, context, asset_key)

    with (
        mock.patch.object(AssetRecord, "blocking_get", classmethod(racing_read)),
        mock.patch.object(
            type(instance.event_log_storage), "get_maximum_record_id", return_value=last_event
        ),
    ):
        assert "triplets" not in ticks()  # not a second run for the same partition
    assert ticks() == {"megapairs_export": {None}}


def test_a_queued_run_counts_as_in_progress(ticks, instance):
    """Without the cursor's memory of the request, the run alone (planned, not started) keeps
    its partitions from being requested again."""
    _through_neighbours(ticks, instance)
    instance.create_run_for_job(
        defs.resolve_implicit_global_asset_job_def(),
        asset_selection={AssetKey(name) for name in AFTER_NEIGHBORS},
        tags={"dagster/partition": NEW},
    )
    assert not set(Ticks(instance)()) & set(AFTER_NEIGHBORS)


def test_generation_waits_for_an_image_index_that_holds_the_shard(ticks, instance):
    """The descriptions read the pair images of any shard through image_index: not before the
    index was rebuilt after this shard's ingest."""
    ticks()  # requests the new shard's embeddings and the image index
    materialised(instance, [f"embeddings_{view}" for view in VIEWS], NEW)
    materialised(instance, [f"knn_index_{view}" for view in VIEWS])
    materialised(instance, [f"neighbors_{view}" for view in VIEWS], NEW)
    materialised(instance, ["image_pairs"], NEW)
    assert not {"pair_descriptions", "instructions"} & set(ticks())
    materialised(instance, ["image_index"])
    assert {"pair_descriptions", "description_rejects"} <= set(ticks())


def test_a_failed_shard_is_retried_on_the_hour_once(ticks, instance):
    """A failed run is not retried in a loop: once per retry tick (assets/conditions.py)."""
    start = datetime(2026, 1, 1, 10, 10, tzinfo=timezone.utc)
    assert ticks(start)["embeddings_clip_image"] == {NEW}
    run = instance.create_run_for_job(
        defs.resolve_implicit_global_asset_job_def(),
        asset_selection={AssetKey("embeddings_clip_image")},
        tags={"dagster/partition": NEW},
    )
    instance.report_run_failed(run)
    for minutes in (1, 20, 45):  # failed: not requested again within the hour
        assert "embeddings_clip_image" not in ticks(start + timedelta(minutes=minutes))
    retried = ticks(start + timedelta(minutes=51))  # 11:01, the 11:00 tick has passed
    assert retried["embeddings_clip_image"] == {NEW}
    assert "embeddings_clip_image" not in ticks(start + timedelta(minutes=52))


def test_a_failed_blocking_check_stops_the_shards_next_steps(ticks, instance):
    """An index whose recall check failed does not feed neighbour search."""
    ticks()
    materialised(instance, ["image_index"])
    materialised(instance, [f"embeddings_{view}" for view in VIEWS], NEW)
    materialised(instance, [f"knn_index_{view}" for view in VIEWS], checks_pass=False)
    assert not {f"neighbors_{view}" for view in VIEWS} & set(ticks())
    materialised(instance, [f"knn_index_{view}" for view in VIEWS])
    assert {f"neighbors_{view}" for view in VIEWS} <= set(ticks())


NIGHT = datetime(2026, 1, 2, 2, 50, tzinfo=timezone.utc)  # ten minutes before the catch-up


def _mining_changed():
    resources = resources_for("demo", "home")
    mining = resources["mining"]
    changed = type(mining)(**{**mining.model_dump(), "targets_per_query": 2})
    return build_definitions(deployment_with({**resources, "mining": changed}))


def test_the_nightly_catch_up_recomputes_what_a_config_change_made_stale(instance):
    """A new mining setting changes image_pairs' code version: after the 03:00 tick each
    shard's pairs are mined again, with the same-shard steps that read them in the same run;
    the shard's upstream steps and the global assets are left alone, and it happens once."""
    instance.add_dynamic_partitions("shards", [OLD])
    materialised(instance, [*INGEST_AND_EMBED, *AFTER_INDEX], OLD)
    materialised(instance, GLOBAL)
    ticks = Ticks(instance)
    assert ticks(NIGHT) == {}
    changed = _mining_changed()
    assert ticks(NIGHT + timedelta(minutes=5), changed) == {}  # stale, but not yet 03:00
    downstream = ["image_pairs", "pair_descriptions", "description_rejects", "instructions",
                  "instruction_rejects", "triplets"]
    assert ticks(NIGHT + timedelta(minutes=11), changed) == {name: {OLD} for name in downstream}
    assert ticks(NIGHT + timedelta(minutes=12), changed) == {}  # requested once
    materialised(instance, downstream, OLD)
    assert ticks(NIGHT + timedelta(minutes=13), changed) == {"megapairs_export": {None}}
    materialised(instance, ["megapairs_export"])
    assert ticks(NIGHT + timedelta(days=1, minutes=11), changed) == {}  # current again


def test_a_rebuilt_index_does_not_make_old_shards_stale(ticks, instance):
    """The index is rebuilt for every new shard; the neighbours of old shards stay as they are,
    also at the nightly catch-up."""
    ticks(NIGHT)
    materialised(instance, ["image_index", *(f"knn_index_{view}" for view in VIEWS)])
    requested = ticks(NIGHT + timedelta(minutes=11))
    assert OLD not in set().union(*requested.values())


def test_a_reingested_shard_is_caught_up_from_its_embeddings(ticks, instance):
    """A same-shard dependency newer than an asset makes it stale: a re-ingested shard gets
    new embeddings at the catch-up; the old shard's neighbours wait for indexes that hold them."""
    ticks(NIGHT)
    materialised(instance, [f"embeddings_{view}" for view in VIEWS], NEW)
    materialised(instance, ["image_index", *(f"knn_index_{view}" for view in VIEWS)])
    materialised(instance, [*(f"neighbors_{view}" for view in VIEWS), *AFTER_NEIGHBORS], NEW)
    materialised(instance, ["megapairs_export", "view_report"])
    assert ticks(NIGHT + timedelta(minutes=1)) == {}
    materialised(instance, ["corpus_images", "corpus_rejects"], OLD)  # re-ingested
    assert ticks(NIGHT + timedelta(minutes=2)) == {"image_index": {None}, "view_report": {None}}
    materialised(instance, ["image_index", "view_report"])
    # triplets writes the shard's images table from the corpus: it is stale too
    assert ticks(NIGHT + timedelta(minutes=11)) == {
        "triplets": {OLD}, **{f"embeddings_{view}": {OLD} for view in VIEWS}
    }
    materialised(instance, ["triplets", *(f"embeddings_{view}" for view in VIEWS)], OLD)
    requested = ticks(NIGHT + timedelta(minutes=12))
    assert OLD not in requested.get("neighbors_clip_image", set())  # the index lacks them
    assert requested["knn_index_clip_image"] == {None}
    materialised(instance, [f"knn_index_{view}" for view in VIEWS])
    requested = ticks(NIGHT + timedelta(minutes=13))
    assert all(requested[f"neighbors_{view}"] == {OLD} for view in VIEWS)
    assert requested["image_pairs"] == {OLD}  # the rest of the shard's chain in the same run
