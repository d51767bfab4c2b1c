"""The shard sensor: new shards at the corpus source become partitions and get ingested."""


from dagster import (
    AssetSelection,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.resources.settings import CorpusSource
from megapairs_dagster.resources.store import ArtifactStore

OWNER_KEY = "megapairs/store"


class ForeignInstanceError(ValueError):
    """A Dagster instance holds another deployment's shards and runs."""


def claim_instance(instance: DagsterInstance, store: ArtifactStore) -> None:
    """Bind the instance to this deployment's store on first use, and refuse another's.

    Shard partitions and materialisations live in the instance: a paper deployment pointed at
    the demo's DAGSTER_HOME would take the demo's shards as its own and show its results.
    """
    url = str(store.client().root)
    owner = instance.run_storage.get_cursor_values({OWNER_KEY}).get(OWNER_KEY)
    if owner is None:
        instance.run_storage.set_cursor_values({OWNER_KEY: url})
    elif owner != url:
        raise ForeignInstanceError(
            f"this Dagster instance ({instance.root_directory or 'DAGSTER_HOME'}) belongs to the "
            f"deployment whose store is {owner}, not {url}: give each deployment its own "
            "DAGSTER_HOME (the README's paper commands use .dagster_paper)"
        )
from megapairs_dagster.synthesis.readers import discover_shards


@sensor(
    asset_selection=AssetSelection.assets("corpus_images", "corpus_rejects"),
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a `shards` partition for every new shard at the corpus source and "
    "requests its ingest run.",
)
def shard_sensor(context: SensorEvaluationContext, corpus_source: CorpusSource,
                 store: ArtifactStore):
    try:
        claim_instance(context.instance, store)
    except ForeignInstanceError as error:
        return SkipReason(str(error))
    try:
        found = discover_shards(
            corpus_source.url, corpus_source.storage_options(), corpus_source.format
        )
    except (FileNotFoundError, ValueError) as error:
        return SkipReason(f"no shards at {corpus_source.url}: {error}")
    known = set(context.instance.get_dynamic_partitions(shards.name))
    new = [shard.name for shard in found if shard.name not in known]
    if not new:
        return SkipReason(f"{len(found)} shards at the source, none new")
    context.log.info(f"new shards: {new}")
    return SensorResult(
        run_requests=[RunRequest(run_key=f"ingest-{name}", partition_key=name) for name in new],
        dynamic_partitions_requests=[shards.build_add_request(new)],
    )
