"""The one Definitions object of the code location; resources come from the active profile."""

from dagster import Definitions, load_assets_from_modules

from megapairs_dagster.assets import (
    corpus,
    diagnostics,
    embeddings,
    encoders,
    evaluation,
    instructions,
    knn,
    pairs,
    training,
    triplets,
)
from megapairs_dagster.assets.code_versions import with_config_versions
from megapairs_dagster.jobs import jobs, schedules, sensors, with_automation
from megapairs_dagster.resources.profiles import executor_for, resources_for


def build_definitions(resources: dict) -> Definitions:
    """The code location for these resources: asset code versions follow their configuration."""
    assets = load_assets_from_modules(
        [
            corpus,
            encoders,
            embeddings,
            knn,
            diagnostics,
            pairs,
            instructions,
            triplets,
            training,
            evaluation,
        ]
    )
    return Definitions(
        assets=with_config_versions(with_automation(assets), resources),
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources=resources,
        executor=executor_for(),
    )


defs = build_definitions(resources_for())
