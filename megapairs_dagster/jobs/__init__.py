"""Jobs, sensors (the shard sensor, the automation sensor) and schedules."""

from collections.abc import Mapping, Sequence

from dagster import AssetSelection, define_asset_job

from megapairs_dagster.assets.evaluation import benchmark_by_model
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.training import training_partitions
from megapairs_dagster.jobs.automation import automation_sensor, with_automation  # noqa: F401
from megapairs_dagster.jobs.schedules import schedules  # noqa: F401
from megapairs_dagster.jobs.sensors import shard_sensor
from megapairs_dagster.resources.profiles import TrainingRun
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

synthesis_job = define_asset_job(
    "synthesis",
    selection=AssetSelection.assets(
        "image_pairs", "pair_descriptions", "description_rejects", "instructions",
        "instruction_rejects", "triplets",
    ),
    partitions_def=shards,
    description="Mine pairs, describe them, write instructions and the triplet tables for shards "
    "(needs their neighbours).",
)


def build_jobs(runs: Mapping[str, TrainingRun], benchmarks: Sequence[str]) -> list:
    """The named jobs; training and evaluation are partitioned by the deployment's runs."""
    training_job = define_asset_job(
        "training",
        selection=AssetSelection.assets("mmret_clip"),
        partitions_def=training_partitions(runs),
        description="Train one MMRet-CLIP run (a partition of mmret_clip) on every triplet.",
    )
    evaluation_job = define_asset_job(
        "evaluation",
        selection=AssetSelection.assets("benchmark_scores"),
        partitions_def=benchmark_by_model(runs, benchmarks),
        description="Score a model on a benchmark (a benchmark|model partition).",
    )
    return [ingest_and_embed_job, indexes_job, neighbors_job, synthesis_job, training_job,
            evaluation_job]


sensors = [shard_sensor, automation_sensor]
