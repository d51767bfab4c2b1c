"""Jobs, sensors (the shard sensor, the automation sensor) and schedules."""

from dagster import AssetSelection, define_asset_job

from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.jobs.automation import automation_sensor, with_automation  # noqa: F401
from megapairs_dagster.jobs.schedules import schedules  # noqa: F401
from megapairs_dagster.jobs.sensors import shard_sensor
from megapairs_dagster.synthesis.views import VIEWS

ingest_and_embed_job = define_asset_job(
    "ingest_and_embed",
    selection=AssetSelection.groups("corpus", "embeddings"),
    partitions_def=shards,
    description="Ingest and embed shards (needs base_encoders).",
)
indexes_job = define_asset_job(
    "indexes",
    selection=AssetSelection.assets(*[f"knn_index_{view}" for view in VIEWS]),
    description="Rebuild every view's KNN index over all shards.",
)
neighbors_job = define_asset_job(
    "neighbors",
    selection=AssetSelection.assets(*[f"neighbors_{view}" for view in VIEWS]),
    partitions_def=shards,
    description="Search each shard's neighbours in every view.",
)

jobs = [ingest_and_embed_job, indexes_job, neighbors_job]
sensors = [shard_sensor, automation_sensor]
