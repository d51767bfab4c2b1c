"""When each asset runs by itself: the automation conditions the asset decorators declare.

The shard sensor adds a ``shards`` partition and ingests it; every later step is requested by
the condition on its own decorator, evaluated by the automation sensor (``jobs/automation.py``).

- :func:`per_shard`: a shard's partition runs **once, when it is missing** and its dependencies
  are present, idle and past their blocking checks; a failed run is retried on the hour
  (``RETRY_CRON``). Stale partitions are caught up nightly (``CATCH_UP_CRON``): one whose code
  version changed, or one of whose same-shard dependencies was materialised after it, runs
  once after that tick. Changes of the global dependencies it names (a rebuilt index, the base
  encoders) never count: a rebuilt index must not recompute every old shard's neighbours.
- :func:`catch_up_only`: the ingest, which the shard sensor requests, is only caught up.
- :func:`rebuild_after_updates`: a global asset (an index, the export) is rebuilt once after
  any dependency partition updates.
- :func:`summary_after_updates`: the same for a summary that must not wait for every
  dependency partition (the leaderboard).
- :func:`baseline_once`: the base encoders are materialised once and never rebuilt by
  automation (the demo runner reads this too: ``jobs/pipeline.py``).
- :class:`UpdatedAfter`: a shard waits until a global asset it reads holds the shard.
"""

import os
from collections.abc import Iterable

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationCondition,
    AutomationContext,
    AutomationResult,
    DagsterEventType,
)

RETRY_CRON = "0 * * * *"
# A code-version bump recomputes its stage for the whole corpus (GPU hours on a real corpus),
# so the catch-up waits for a quiet hour; "off" leaves stale partitions to explicit backfills.
CATCH_UP_CRON = os.environ.get("MEGAPAIRS_CATCH_UP_CRON", "0 3 * * *")
BASELINE = "baseline_once"


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


class RequestedThisTick(AutomationCondition):
    """Requested on this tick, also when it cannot share a run with the asset evaluated:
    Dagster's ``will_be_requested`` counts a dependency only when both can run together, so a
    per-shard step requested beside a global rebuild would look idle to it."""

    @property
    def name(self) -> str:
        return "requested_this_tick"

    def evaluate(self, context: AutomationContext) -> AutomationResult:
        requested = context.request_subsets_by_key.get(context.key)
        true_subset = (
            context.candidate_subset.compute_intersection(requested)
            if requested is not None else context.get_empty_subset()
        )
        return AutomationResult(context, true_subset=true_subset)


def _idle(deps: Iterable[str] | None = None) -> AutomationCondition:
    """None of ``deps`` (default: every dependency) is requested on this tick or in progress: a
    partitioned and an unpartitioned asset cannot share a run, so one waits for the other's."""
    busy = AutomationCondition.any_deps_match(RequestedThisTick() | AutomationCondition.in_progress())
    return ~(busy if deps is None else busy.allow(AssetSelection.assets(*deps)))


def _ready() -> AutomationCondition:
    """No dependency missing (a dependency requested on this tick counts as present, so
    same-shard steps share one run), in progress or failing a blocking check, and the target
    itself not in progress."""
    return (
        ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & AutomationCondition.all_deps_blocking_checks_passed()
        & ~AutomationCondition.in_progress()
    )


def _missing_not_tried() -> AutomationCondition:
    """Missing, and neither requested since it was last materialised (or since the last retry
    tick) nor failed, unless a retry tick has just passed."""
    # Plain `missing`, not `on_missing()`: on_missing ignores what is already missing on the
    # sensor's first evaluation (a shard added just before it would never run).
    # Requested once is enough: Dagster reads a partition's "materialised" and "in progress" in
    # separate queries, so a partition materialised while a tick is evaluated can look missing
    # and idle to that tick; it is not requested again until it is seen materialised, or the
    # hourly retry tick passes.
    retry = AutomationCondition.cron_tick_passed(RETRY_CRON, "UTC")
    requested = AutomationCondition.newly_requested().since(
        ~AutomationCondition.missing() | retry
    )
    return (
        AutomationCondition.missing()
        & ~requested
        & (~AutomationCondition.execution_failed() | retry)
    )


def _stale_since_catch_up(global_deps: list[str]) -> AutomationCondition:
    """Materialised, outdated (its code version changed, or a same-shard dependency was
    materialised since it was), and not requested since the last catch-up tick."""
    same_shard_updated = AutomationCondition.any_deps_updated()
    if global_deps:
        same_shard_updated = same_shard_updated.ignore(AssetSelection.assets(*global_deps))
    outdated = (AutomationCondition.code_version_changed() | same_shard_updated).since(
        AutomationCondition.newly_updated()
    )
    due = AutomationCondition.cron_tick_passed(CATCH_UP_CRON, "UTC").since(
        AutomationCondition.newly_requested()
    )
    return ~AutomationCondition.missing() & outdated & due


def per_shard(
    global_deps: Iterable[str] = (), fresh: UpdatedAfter | None = None
) -> AutomationCondition:
    """A per-shard asset: run once when missing, catch up nightly when stale (module
    docstring). ``global_deps``: its unpartitioned dependencies, whose changes do not make it
    stale and whose runs it waits for; ``fresh``: a global input that must hold the shard."""
    global_deps = list(global_deps)
    run = _missing_not_tried()
    if CATCH_UP_CRON != "off":
        run = run | _stale_since_catch_up(global_deps)
    condition = run & _ready()
    if global_deps:
        condition = condition & _idle(global_deps)
    if fresh is not None:
        # judged against the latest `earlier`: not while a new one is being made
        condition = condition & fresh & _idle([fresh.earlier.to_user_string()])
    return condition.with_label("per_shard")


def catch_up_only() -> AutomationCondition:
    """A per-shard root (the ingest, which the shard sensor requests): only the nightly
    catch-up."""
    return (_stale_since_catch_up([]) & _ready()).with_label("catch_up_only")


def _after_updates() -> AutomationCondition:
    """Once after any dependency updates, or when missing (only once some dependency
    partition exists, not over an empty corpus)."""
    has_input = AutomationCondition.any_deps_match(~AutomationCondition.missing())
    return (_missing_not_tried() & has_input) | (
        AutomationCondition.any_deps_updated().since_last_handled()
    )


def rebuild_after_updates() -> AutomationCondition:
    """Like ``eager()`` (once after any dependency updates, or when missing), but never on the
    same tick as a dependency's own run: an unpartitioned asset cannot share a run with the
    partitioned dependencies it reads."""
    return (_after_updates() & _ready() & _idle()).with_label("rebuild_after_updates")


def summary_after_updates() -> AutomationCondition:
    """A summary of partitions some of which may never exist (the leaderboard: a benchmark
    without data, a run not trained yet): rebuilt once after any of them updates, never while
    one is requested or running, whatever is missing."""
    return (_after_updates() & ~AutomationCondition.in_progress() & _idle()).with_label(
        "summary_after_updates")


def baseline_once() -> AutomationCondition:
    """Materialise once, when missing and at least one dependency partition exists."""
    return (
        _missing_not_tried()
        & _ready()
        & AutomationCondition.any_deps_match(~AutomationCondition.missing())
    ).with_label(BASELINE)
