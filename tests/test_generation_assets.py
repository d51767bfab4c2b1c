"""Instruction generation survives a killed run, and shards write DuckDB concurrently."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import small_demo_resources
from dagster import DagsterInstance

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.jobs.pipeline import (
    materialize_pipeline,
    pipeline_stages,
    stages_upstream_of,
)
from megapairs_dagster.resources.settings import Generation
from megapairs_dagster.synthesis.generation.template import TemplateDescriber
from megapairs_dagster.synthesis.triplet_store import TripletStore

pytestmark = pytest.mark.integration

TESTS = Path(__file__).parent
SHARDS = ["00000", "00001", "00002", "00003"]
UP_TO_PAIRS = stages_upstream_of(pipeline_stages(defs.resolve_asset_graph()), "pair_descriptions")


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """Four small shards materialised up to mined pairs (generation is what is tested)."""
    home = tmp_path_factory.mktemp("generation")
    for index in range(len(SHARDS)):
        write_demo_shard(home / "demo_corpus", index, 40, seed=0)
    resources = small_demo_resources(home)
    materialize_pipeline(list(defs.assets), resources, DagsterInstance.ephemeral(), SHARDS,
                         stages=UP_TO_PAIRS, log=lambda _: None)
    return home, resources


def _subprocess(home, shard, assets, *extra):
    return subprocess.Popen(
        [sys.executable, str(TESTS / "materialize_in_subprocess.py"), str(home), shard, assets,
         *extra],
        cwd=TESTS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )


def test_a_killed_run_resumes_without_redoing_finished_chunks(mined, monkeypatch):
    home, resources = mined
    store = resources["store"].client()
    shard = "00001"
    pairs = load_artifact(store, artifact_relpath(["image_pairs"], shard))
    chunk_size = 8
    total_chunks = -(-len(pairs) // chunk_size)
    assert total_chunks >= 4
    chunks = home / "artifacts" / "pair_descriptions" / f"{shard}.chunks"

    process = _subprocess(home, shard, "pair_descriptions,description_rejects",
                          "--slow-describe", "1.0", "--chunk-size", str(chunk_size))
    deadline = time.monotonic() + 120
    while len(list(chunks.glob("*.rows.parquet"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(chunks.glob("*.rows.parquet")))
    assert 2 <= finished < total_chunks

    calls = []
    describe = TemplateDescriber.describe
    monkeypatch.setattr(
        TemplateDescriber, "describe",
        lambda self, requests: calls.extend(r.pair.pair_id for r in requests)
        or describe(self, requests),
    )
    resources = {**resources, "generation": Generation(chunk_size=chunk_size, batch_size=chunk_size)}
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", [shard])
    from dagster import materialize

    materialize(list(defs.assets), selection=["pair_descriptions", "description_rejects"],
                partition_key=shard, resources=resources, instance=instance)
    pair_ids = list(pairs["pair_id"])
    assert not set(calls) & set(pair_ids[: finished * chunk_size])  # finished chunks reused
    assert set(calls) == set(pair_ids[finished * chunk_size :])  # the rest computed
    descriptions = load_artifact(store, artifact_relpath(["pair_descriptions"], shard))
    assert descriptions["pair_id"].is_unique and len(descriptions) == len(pairs)

    # A clean rerun reproduces the same output from the saved chunks, computing nothing.
    calls.clear()
    materialize(list(defs.assets), selection=["pair_descriptions", "description_rejects"],
                partition_key=shard, resources=resources, instance=instance)
    assert calls == []
    again = load_artifact(store, artifact_relpath(["pair_descriptions"], shard))
    assert again.equals(descriptions)


def test_four_shards_write_triplets_at_once_without_lock_errors(mined):
    home, resources = mined
    assets = "pair_descriptions,description_rejects,instructions,instruction_rejects,triplets"
    processes = [_subprocess(home, shard, assets) for shard in SHARDS]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, [e[-2000:] for e in errors]
    assert not any("Could not set lock" in e for e in errors)
    store = resources["store"].client()
    expected = sum(
        len(load_artifact(store, artifact_relpath(["instructions"], shard))) for shard in SHARDS
    )
    database = TripletStore(resources["store"].client())
    assert database.counts()["triplets"] == expected
    assert database.counts()["shards"] == 4 and database.duplicate_pairs() == 0


def test_a_vllm_engine_serves_every_shard_of_a_run_and_is_shut_down_after_it(mined, monkeypatch):
    """One engine for a two-shard backfill run, each chunk handed to it in one call, shut down
    when the step ends (the engine is tests/stand_in_vllm.py's: no CPU vLLM runs an MLLM)."""
    from dagster import materialize
    from stand_in_vllm import StandInVLLM

    _, resources = mined
    vllm = StandInVLLM()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    shards = SHARDS[2:]
    generation = Generation(backend="vllm", description_model="/models/tiny-mllm",
                            chunk_size=16, batch_size=16, max_attempts=1)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", SHARDS)
    result = materialize(
        list(defs.assets), selection=["pair_descriptions", "description_rejects"],
        tags={"dagster/asset_partition_range_start": shards[0],
              "dagster/asset_partition_range_end": shards[-1]},
        resources={**resources, "generation": generation}, instance=instance,
    )
    assert result.success
    (engine,) = vllm.engines
    assert engine.shutdowns == 1
    store = resources["store"].client()
    described = {
        shard: load_artifact(store, artifact_relpath(["pair_descriptions"], shard))
        for shard in shards
    }
    pairs = {
        shard: load_artifact(store, artifact_relpath(["image_pairs"], shard)) for shard in shards
    }
    # Every pair of both shards went through the one engine, a chunk per call.
    sent = [len(conversations) for conversations, _ in engine.calls]
    assert sum(sent) == sum(len(frame) for frame in pairs.values())
    assert max(sent) == 16
    for shard in shards:
        assert len(described[shard]) == len(pairs[shard])
        assert set(described[shard]["backend"]) == {"vllm"}
        assert set(described[shard]["model"]) == {"/models/tiny-mllm"}
