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
from megapairs_dagster.jobs import jobs, schedules, sensors, with_automation
from megapairs_dagster.resources.profiles import executor_for, resources_for

defs = Definitions(
    assets=with_automation(load_assets_from_modules(
        [corpus, encoders, embeddings, knn, diagnostics, pairs, instructions, triplets,
         training, evaluation]
    )),
    jobs=jobs,
    sensors=sensors,
    schedules=schedules,
    resources=resources_for(),
    executor=executor_for(),
)
