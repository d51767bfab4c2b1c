"""The nightly catch-up: re-run every shard whose per-shard chain is missing or stale.

Declarative automation (``automation.py``) runs a missing partition, retrying a failed one
hourly; it never recomputes stale partitions. Each night this schedule requests, per
shard, one run of the per-shard assets that need work:

- **missing**: the instance holds no materialisation of that asset for the shard;
- **stale**: the latest materialisation was made with another ``code_version`` than the asset
  has now, or a *same-shard* dependency was materialised after it (e.g. the shard was
  re-ingested). Changes of the global assets (the KNN indexes, the base encoders) do not count:
  a rebuilt index must not recompute every old shard's neighbours.

If ingest or embeddings need work, only those run for that shard tonight (the index has to be
rebuilt before that shard's neighbours; automation rebuilds it, and the neighbours follow on
the next night, or at once through automation where they are missing).

Default status: stopped. After a code-version bump this recomputes that stage for the whole
corpus (GPU hours on a real corpus), so an operator turns it on deliberately.
"""

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.synthesis.views import VIEWS

INGEST_AND_EMBED = ("corpus_images", "corpus_rejects", *(f"embeddings_{v}" for v in VIEWS))
AFTER_INDEX = (
    *(f"neighbors_{v}" for v in VIEWS), "image_pairs", "pair_descriptions", "description_rejects",
    "instructions", "instruction_rejects", "triplets",
)
CODE_VERSION_TAG = "dagster/code_version"


def shard_work(
    instance: DagsterInstance,
    code_versions: Mapping[str, str | None],
    shard_parents: Mapping[str, Sequence[str]],
) -> dict[str, list[str]]:
    """Per shard, the per-shard assets to run tonight (see the module docstring)."""
    keys = instance.get_dynamic_partitions(shards.name)
    if not keys:
        return {}
    latest: dict[str, Mapping[str, int]] = {}
    versions: dict[str, dict[str, str | None]] = {}
    for name in (*INGEST_AND_EMBED, *AFTER_INDEX):
        latest[name] = instance.get_latest_storage_id_by_partition(
            AssetKey(name), DagsterEventType.ASSET_MATERIALIZATION, partitions=set(keys)
        )
        versions[name] = {}
        for record in instance.fetch_materializations(AssetKey(name), limit=10_000).records:
            event = record.asset_materialization
            if event is not None and event.partition in keys and event.partition not in versions[name]:
                versions[name][event.partition] = (event.tags or {}).get(CODE_VERSION_TAG)

    def needs_work(name: str, key: str) -> bool:
        own = latest[name].get(key)
        if own is None:
            return True
        if code_versions.get(name) and versions[name].get(key) != code_versions[name]:
            return True
        return any(latest[parent].get(key, -1) > own for parent in shard_parents.get(name, ()))

    work: dict[str, list[str]] = {}
    for key in sorted(keys):
        for stage in (INGEST_AND_EMBED, AFTER_INDEX):
            todo = [name for name in stage if needs_work(name, key)]
            if todo:
                work[key] = todo
                break
    return work


@schedule(
    cron_schedule="0 3 * * *",
    target=AssetSelection.assets(*INGEST_AND_EMBED, *AFTER_INDEX),
    default_status=DefaultScheduleStatus.STOPPED,
    description="Nightly: one run per shard whose per-shard chain is missing or stale "
    "(code version changed, or a same-shard dependency is newer); see jobs/schedules.py.",
)
def nightly_shard_catch_up(context: ScheduleEvaluationContext):
    graph = context.repository_def.asset_graph
    names = (*INGEST_AND_EMBED, *AFTER_INDEX)
    code_versions = {name: graph.get(AssetKey(name)).code_version for name in names}
    parents = {
        name: [p.to_user_string() for p in graph.get(AssetKey(name)).parent_keys
               if p.to_user_string() in names]
        for name in names
    }
    work = shard_work(context.instance, code_versions, parents)
    if not work:
        return SkipReason("every shard's per-shard chain is materialised and current")
    tick = context.scheduled_execution_time or datetime.now(timezone.utc)
    # A multi-asset (corpus_images + corpus_rejects, ...) runs whole: select its siblings too.
    return [
        RunRequest(
            run_key=f"catch-up-{key}-{tick:%Y%m%d}",
            partition_key=key,
            asset_selection=[AssetKey(name) for name in _with_siblings(todo)],
        )
        for key, todo in work.items()
    ]


_SIBLINGS = {
    "corpus_images": "corpus_rejects", "corpus_rejects": "corpus_images",
    "pair_descriptions": "description_rejects", "description_rejects": "pair_descriptions",
    "instructions": "instruction_rejects", "instruction_rejects": "instructions",
}


def _with_siblings(names: Sequence[str]) -> list[str]:
    out = list(names)
    for name in names:
        sibling = _SIBLINGS.get(name)
        if sibling and sibling not in out:
            out.append(sibling)
    return out


schedules = [nightly_shard_catch_up]
