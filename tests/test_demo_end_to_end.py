"""The method end to end on a reduced demo: training on the mined triplets beats the base.

The demo recipe on fewer images (2 shards of 400) with a shorter training, scored on the
fixed demo benchmark. A few minutes on 2 CPU cores; it is the one test that checks the
pipeline's output is worth training on, not only that every stage runs.
"""

import dataclasses

import pytest
from dagster import DagsterInstance

from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.jobs.pipeline import materialize_pipeline, pipeline_stages
from megapairs_dagster.reports import compare_runs, format_scores
from megapairs_dagster.resources.profiles import resources_for
from megapairs_dagster.resources.settings import Encoders, Training
from megapairs_dagster.synthesis.triplet_store import TripletStore

pytestmark = pytest.mark.integration

SHARDS, IMAGES_PER_SHARD = 2, 400
RUNS = ("demo",)


def reduced_stages():
    """The demo stages, training one seed of the recipe instead of three and the control."""
    models = ("base_encoder", *RUNS)
    stages = []
    for stage in pipeline_stages(defs.resolve_asset_graph()):
        if stage.assets == ("mmret_clip",):
            stage = dataclasses.replace(stage, keys=models)
        elif stage.assets == ("benchmark_scores",):
            stage = dataclasses.replace(stage, keys=tuple(
                key for key in stage.keys if key.keys_by_dimension["model"] in models
            ))
        stages.append(stage)
    return stages


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("reduced_demo")
    for shard in range(SHARDS):
        write_demo_shard(home / "demo_corpus", shard, IMAGES_PER_SHARD, seed=0)
    resources = resources_for("demo", str(home))
    resources["encoders"] = Encoders(
        mode="bootstrap", dino_image_size=resources["encoders"].dino_image_size,
        bootstrap_max_seconds=600,  # the plateau, not the clock, ends it
    )
    demo_training = resources["training"]
    resources["training"] = Training(**{**demo_training.model_dump(), "max_steps": 150})
    shard_keys = [f"{shard:05d}" for shard in range(SHARDS)]
    materialize_pipeline(
        list(defs.assets), resources, DagsterInstance.ephemeral(), shard_keys,
        stages=reduced_stages(), log=lambda _: None,
    )
    return TripletStore(resources["store"].client()).scores_frame()


def test_training_on_mined_triplets_beats_the_base_encoder(reduced_demo):
    print(format_scores(reduced_demo))
    comparison = compare_runs(reduced_demo, "base_encoder", RUNS, control=None)
    assert comparison["all"]["beats_baseline"] == len(RUNS), comparison["all"]
