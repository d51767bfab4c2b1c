"""Shared test setup: offline hub, and a small demo profile for graph tests."""

import dataclasses
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from megapairs_dagster.resources.profiles import Deployment, load_deployment, resources_for
from megapairs_dagster.resources.settings import Compute, Encoders, Mining, Training
from megapairs_dagster.resources.store import ArtifactIOManager, ArtifactStore
from megapairs_dagster.synthesis.views import VIEWS

SMALL_SHARD = 64

# The shared reference data lies beside the checkout (CI copies it there too).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BENCHMARKS = SHARED_DATA / "benchmarks"
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared benchmark annotations not found at {SHARED_DATA}"
)


def small_demo_resources(home, **store_overrides) -> dict:
    """The demo profile, shrunk so the whole graph runs in well under a minute."""
    resources = resources_for("demo", str(home))
    resources["encoders"] = Encoders(
        mode="bootstrap", dino_image_size=resources["encoders"].dino_image_size,
        bootstrap_max_seconds=8, bootstrap_max_images=400,
    )
    resources["compute"] = Compute(num_workers=0, batch_size=32)
    resources["training"] = Training(max_steps=12, batch_size=8, warmup_steps=2)
    # Every neighbour counts, so the report measures the views rather than a window.
    resources["mining"] = Mining(windows={view: [0.0, 1.0] for view in VIEWS})
    if store_overrides:
        store = ArtifactStore(**store_overrides)
        resources["store"] = store
        resources["io_manager"] = ArtifactIOManager(store=store)
    return resources


def deployment_with(resources: dict, profile: str = "demo") -> Deployment:
    """The profile's deployment (training runs, executor) with these resources."""
    return dataclasses.replace(load_deployment(profile, "home"), resources=resources)


MINED_SHARDS = ["00000", "00001"]


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """Two small shards materialised up to what the training reads (triplets, base CLIP):
    the resources and the instance."""
    from dagster import DagsterInstance

    from megapairs_dagster.definitions import defs
    from megapairs_dagster.demo import write_demo_shard
    from megapairs_dagster.jobs.pipeline import (
        materialize_pipeline,
        pipeline_stages,
        stages_upstream_of,
    )

    home = tmp_path_factory.mktemp("launch")
    for index in range(len(MINED_SHARDS)):
        write_demo_shard(home / "demo_corpus", index, 60, seed=0)
    resources = small_demo_resources(home)
    stages = stages_upstream_of(pipeline_stages(defs.resolve_asset_graph()), "mmret_clip")
    instance = DagsterInstance.ephemeral()
    materialize_pipeline(list(defs.assets), resources, instance, MINED_SHARDS, stages=stages,
                         log=lambda _: None)
    return resources, instance


@pytest.fixture
def demo_home(tmp_path):
    return tmp_path / "home"
