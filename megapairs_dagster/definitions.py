"""The one Definitions object of the code location; resources come from the active profile."""

from dagster import Definitions, load_assets_from_modules

from megapairs_dagster.assets import (
    corpus,
    diagnostics,
    embeddings,
    encoders,
    instructions,
    knn,
    pairs,
    triplets,
)
from megapairs_dagster.jobs import jobs, sensors
from megapairs_dagster.resources.profiles import resources_for

defs = Definitions(
    assets=load_assets_from_modules(
        [corpus, encoders, embeddings, knn, diagnostics, pairs, instructions, triplets]
    ),
    jobs=jobs,
    sensors=sensors,
    resources=resources_for(),
)
