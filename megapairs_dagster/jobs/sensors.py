"""The shard sensor: new shards at the corpus source become partitions and get ingested."""


from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.resources.settings import CorpusSource
from megapairs_dagster.synthesis.readers import discover_shards


@sensor(
    asset_selection=AssetSelection.assets("corpus_images", "corpus_rejects"),
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a `shards` partition for every new shard at the corpus source and "
    "requests its ingest run.",
)
def shard_sensor(context: SensorEvaluationContext, corpus_source: CorpusSource):
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
