"""Declarative automation: a new shard flows through its own partitions, and only those.

The shard sensor adds a ``shards`` partition and ingests it; everything after that is driven by
the ``AutomationCondition`` attached here to each asset, keyed by asset name, and evaluated by
``automation_sensor`` (running by default). The policy:

- per-shard assets (``embeddings_*``, ``neighbors_*``, ``image_pairs``, ``pair_descriptions`` +
  ``description_rejects``, ``instructions`` + ``instruction_rejects``, ``triplets``): request a
  partition **once, when it is missing** and every dependency is present and idle; not again
  before that request has materialised it, nor after a failed run. They are never re-run
  because a dependency changed, so a rebuilt global index does not recompute the neighbours of
  old shards (Dagster still shows them as stale; the nightly schedule in
  ``schedules.py`` and explicit backfills are how stale partitions get refreshed). Per-shard
  steps whose dependencies are requested on the same tick share one run.
- **retries**: a partition whose run failed is requested again once an hour, on the hour
  (``RETRY_CRON``), while it stays missing: a transient fault (a node lost, a model server
  restarting) heals by itself, and a configuration error fixed in the deployment config is
  picked up within the hour. Each retry is one request; a run that keeps failing shows in the
  UI as one failed run per hour, never a tight loop.
- ``neighbors_<view>`` additionally waits until ``knn_index_<view>`` was materialised *after*
  the shard's ``embeddings_<view>`` (so the index searched already holds the shard) and is not
  being rebuilt.
- ``pair_descriptions`` and ``instructions`` (and their reject tables) also wait until
  ``image_index`` was materialised after the shard's ``corpus_images``: they read the images
  of every pair, which may live in other shards, through it.
- ``image_index``, ``knn_index_*``, ``view_report``, ``megapairs_export``: eager — rebuilt once after any
  dependency partition updates, when no dependency is missing, in progress or about to run.
- ``base_encoders`` is the baseline: materialised automatically once, when it is missing and at
  least one shard has been ingested; never retrained by automation (launch it explicitly).

Assets not named here (e.g. training and scoring stages) keep whatever condition they declare.
"""

import os
import warnings
from collections.abc import Iterable, Mapping

from dagster import (
    AssetKey,
    AssetsDefinition,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    AutomationContext,
    AutomationResult,
    DagsterEventType,
    DefaultSensorStatus,
)

from megapairs_dagster.synthesis.views import VIEWS


class UpdatedAfter(AutomationCondition):
    """True for the partitions ``p`` whose unpartitioned dependency ``later`` has a
    materialisation newer than the latest materialisation of ``earlier[p]``.

    ``neighbors_<view>`` uses it with ``later=knn_index_<view>``, ``earlier=embeddings_<view>``:
    the index was rebuilt after this shard's embeddings, so it contains them.
    """

    def __init__(self, later: str, earlier: str):
        self.later = AssetKey(later)
        self.earlier = AssetKey(earlier)

    @property
    def name(self) -> str:
        return f"{self.later.to_user_string()}_updated_after_{self.earlier.to_user_string()}"

    @property
    def description(self) -> str:
        return f"{self.later.to_user_string()} materialised after this partition's " \
               f"{self.earlier.to_user_string()}"

    def evaluate(self, context: AutomationContext) -> AutomationResult:
        instance = context.asset_graph_view.instance
        later = instance.fetch_materializations(self.later, limit=1).records
        keys = context.candidate_subset.expensively_compute_partition_keys()
        if not later or not keys:
            return AutomationResult(context, true_subset=context.get_empty_subset())
        earlier = instance.get_latest_storage_id_by_partition(
            self.earlier, DagsterEventType.ASSET_MATERIALIZATION, partitions=set(keys)
        )
        newer = {key for key, storage_id in earlier.items() if later[0].storage_id > storage_id}
        return AutomationResult(
            context, true_subset=context.candidate_subset.compute_intersection_with_partition_keys(newer)
        )


def _not_requested_or_running(deps: Iterable[str]) -> AutomationCondition:
    """None of ``deps`` is requested on this tick or in progress: an unpartitioned dependency
    cannot share a run with a partitioned asset, so the child waits for the parent's run."""
    busy = AutomationCondition.will_be_requested() | AutomationCondition.in_progress()
    return ~AutomationCondition.any_deps_match(busy).allow(AssetSelection.assets(*deps))


def _ready() -> AutomationCondition:
    """No dependency missing (a dependency requested on this tick counts as present, so
    same-shard steps share one run) or in progress, and the target itself not in progress."""
    return (
        ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
    )


RETRY_CRON = "0 * * * *"


def _missing_not_tried() -> AutomationCondition:
    """Missing, and neither requested since it was last materialised (or since the last retry
    tick) nor failed, unless a retry tick has just passed."""
    # Plain `missing`, not `on_missing()`: on_missing ignores what is already missing on the
    # sensor's first evaluation (a shard added just before it would never run).
    # Requested once is enough. Dagster reads a partition's "materialised" and "in progress" in
    # separate queries, so one that is materialised while a tick is evaluated can look missing
    # and idle to that tick, which asked for it again (a second `triplets` run in a server
    # test). A requested partition is not requested again until it is seen materialised, or
    # the hourly retry tick passes.
    retry = AutomationCondition.cron_tick_passed(RETRY_CRON, "UTC")
    requested = AutomationCondition.newly_requested().since(
        ~AutomationCondition.missing() | retry
    )
    return (
        AutomationCondition.missing()
        & ~requested
        & (~AutomationCondition.execution_failed() | retry)
    )


def missing_partition(global_deps: Iterable[str] = ()) -> AutomationCondition:
    """Run a partition once when it is missing and every dependency is present and idle."""
    condition = _missing_not_tried() & _ready()
    global_deps = list(global_deps)
    if global_deps:
        condition = condition & _not_requested_or_running(global_deps)
    return condition.with_label("missing_partition")


def rebuild_after_updates(deps: Iterable[str]) -> AutomationCondition:
    """Like ``eager()`` (once after any dependency updates, or when missing), but never on the
    same tick as a dependency's own run: an unpartitioned asset cannot share a run with the
    partitioned dependencies it reads."""
    # (when missing: only once some dependency partition exists, not over an empty corpus)
    has_input = AutomationCondition.any_deps_match(~AutomationCondition.missing())
    trigger = (_missing_not_tried() & has_input) | (
        AutomationCondition.any_deps_updated().since_last_handled()
    )
    return (trigger & _ready() & _not_requested_or_running(deps)).with_label(
        "rebuild_after_updates"
    )


def baseline_once() -> AutomationCondition:
    """Materialise once, when missing and at least one dependency partition exists."""
    return (
        _missing_not_tried()
        & _ready()
        & AutomationCondition.any_deps_match(~AutomationCondition.missing())
    ).with_label("baseline_once")


def automation_conditions() -> dict[str, AutomationCondition]:
    conditions: dict[str, AutomationCondition] = {"base_encoders": baseline_once()}
    for view in VIEWS:
        index, embeddings = f"knn_index_{view}", f"embeddings_{view}"
        conditions[embeddings] = missing_partition(global_deps=["base_encoders"])
        conditions[index] = rebuild_after_updates([embeddings])
        conditions[f"neighbors_{view}"] = (
            missing_partition(global_deps=[index]) & UpdatedAfter(index, embeddings)
        ).with_label("missing_partition_with_fresh_index")
    conditions["image_index"] = rebuild_after_updates(["corpus_images"])
    for name in ("image_pairs", "triplets"):
        conditions[name] = missing_partition()
    for name in ("pair_descriptions", "description_rejects", "instructions",
                 "instruction_rejects"):
        conditions[name] = (
            missing_partition(global_deps=["image_index"])
            & UpdatedAfter("image_index", "corpus_images")
        ).with_label("missing_partition_with_fresh_image_index")
    conditions["view_report"] = rebuild_after_updates(
        ["corpus_images", *(f"neighbors_{view}" for view in VIEWS)]
    )
    conditions["megapairs_export"] = rebuild_after_updates(["triplets", "image_index"])
    return conditions


def with_automation(
    assets: Iterable, conditions: Mapping[str, AutomationCondition] | None = None
) -> list:
    """The same assets with the conditions above attached, keyed by asset name."""
    conditions = automation_conditions() if conditions is None else conditions

    def attach(spec):
        condition = conditions.get(spec.key.to_user_string())
        return spec if condition is None else spec.replace_attributes(automation_condition=condition)

    return [
        item.map_asset_specs(attach) if isinstance(item, AssetsDefinition) else item
        for item in assets
    ]


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # use_user_code_server is beta in dagster 1.13
    automation_sensor = AutomationConditionSensorDefinition(
        "megapairs_automation",
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.RUNNING,
        # UpdatedAfter is a custom condition: it needs the sensor evaluated in the code server.
        use_user_code_server=True,
        minimum_interval_seconds=int(os.environ.get("MEGAPAIRS_AUTOMATION_INTERVAL_SECONDS", "30")),
        description="Runs each new shard's partitions once its dependencies are ready; rebuilds "
        "the global indexes, view report and export after shards change (jobs/automation.py).",
    )
