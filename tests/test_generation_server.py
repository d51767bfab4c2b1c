"""The openai backend and the generation_server resource against a real vLLM server.

A tiny random Llama saved locally is served by vLLM's CPU build from its own environment
(``make vllm-env`` makes .venv-vllm; ``make test`` depends on it). Greedy outputs through the
server equal the transformers backend's on the same model and prompts; a server killed in the
middle of the instruction step fails the step naming the endpoint, with the chunks already
written kept; the rerun, through a server the resource starts and stops itself, resumes
after those chunks over two shards in one run and yields what an uninterrupted run yields.

Each server start costs about a minute on two cores, so the module starts two.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pandas as pd
import pytest
from conftest import small_demo_resources
from dagster import DagsterInstance, materialize
from vllm_models import (
    MAX_MODEL_LEN,
    NEW_TOKENS,
    hostile_instruction_request,
    instruction_requests,
    read_as_special_tokens,
    save_served_llm,
    vllm_python,
    without_dangling_bytes,
)

import megapairs_dagster.assets.instructions as instruction_assets
from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.jobs.pipeline import (
    materialize_pipeline,
    pipeline_stages,
    stages_upstream_of,
)
from megapairs_dagster.resources.generation_server import GenerationServer, serve_model
from megapairs_dagster.resources.settings import Generation
from megapairs_dagster.synthesis.generation.backends import BackendSettings, make_instructor

pytestmark = pytest.mark.integration

VLLM_PYTHON = vllm_python()

SHARDS = ["00000", "00001"]
CHUNK = 8
INSTRUCTION_STEP = ["instructions", "instruction_rejects"]
BOTH_SHARDS = {"dagster/asset_partition_range_start": SHARDS[0],
               "dagster/asset_partition_range_end": SHARDS[-1]}


def server_resource(tmp: Path, **settings) -> GenerationServer:
    return GenerationServer(
        vllm_command=[str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
        # Eager mode skips a ~60 s torch.compile warm-up that a tiny model does not repay.
        instruction_args=["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"],
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
        startup_timeout_s=300, log_dir=str(tmp), **settings,
    )


def generation(llm: Path, **changes) -> Generation:
    values = {
        "backend": "openai", "instruction_model": str(llm), "temperature": 0.0,
        "max_new_tokens": NEW_TOKENS, "dtype": "float32", "chunk_size": CHUNK, "batch_size": CHUNK,
        "max_retries": 2, "retry_backoff_s": 0.2, "max_attempts": 1,
    }
    return Generation(**{**values, **changes})


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> Path:
    return save_served_llm(tmp_path_factory.mktemp("served-llm"))


@pytest.fixture(scope="module")
def served(llm, tmp_path_factory):
    """One server for the module's first tests, started as the resource would start it; the
    kill test ends it."""
    tmp = tmp_path_factory.mktemp("vllm-logs")
    command = server_resource(tmp).command(str(llm), "instruction", dtype="float32")
    with serve_model(command, env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
                     startup_timeout_s=300, log_dir=tmp) as server:
        yield server


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """Two small shards materialised up to pair_descriptions (template backend): 48 pairs
    each."""
    home = tmp_path_factory.mktemp("served-generation")
    for index in range(len(SHARDS)):
        write_demo_shard(home / "demo_corpus", index, 16, seed=0)
    # Every mined pair gets a description (the demo's "at most two changes" filter is off).
    resources = {**small_demo_resources(home), "generation": Generation()}
    stages = stages_upstream_of(pipeline_stages(defs.resolve_asset_graph()), "instructions")
    instance = DagsterInstance.ephemeral()
    materialize_pipeline(list(defs.assets), resources, instance, SHARDS, stages=stages,
                         log=lambda _: None)
    return home, resources, instance


def test_greedy_outputs_through_vllm_serve_equal_the_transformers_backends(llm, served):
    settings = BackendSettings(instruction_model=str(llm), temperature=0.0,
                               max_new_tokens=NEW_TOKENS, dtype="float32")
    requests = [*instruction_requests(6), hostile_instruction_request()]
    served_outputs = make_instructor(
        BackendSettings(**{**settings.__dict__, "backend": "openai", "endpoint_url": served.url})
    ).instruct(requests)
    transformers = BackendSettings(**{**settings.__dict__, "backend": "transformers"})
    local = make_instructor(transformers).instruct(requests)
    assert without_dangling_bytes(served_outputs) == without_dangling_bytes(local)
    assert len(set(local)) > 1 and sum(map(bool, local)) > 1  # the prompts make a difference
    # The '</s>' in the last description stayed text on the server: read as the special
    # token (as /v1/chat/completions would read it), it gives another answer.
    assert read_as_special_tokens(make_instructor(transformers)).instruct(requests[-1:]) != local[-1:]


def _chunk_files(home: Path, shard: str) -> set[str]:
    return {p.name for p in (home / "artifacts" / "instructions" / f"{shard}.chunks").glob("*.rows.parquet")}


def test_a_server_killed_mid_run_fails_the_step_keeps_its_chunks_and_the_rerun_resumes(
    llm, served, described, monkeypatch, tmp_path
):
    home, resources, instance = described
    calls: list[list[str]] = []
    generate = instruction_assets.generate_instructions

    def generate_then_kill(chunk, *args, **kwargs):
        calls.append([pair.pair_id for pair, _ in chunk])
        if len(calls) == 2 and served.process.poll() is None:  # chunk 1 is saved: kill now
            os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait()
        return generate(chunk, *args, **kwargs)

    monkeypatch.setattr(instruction_assets, "generate_instructions", generate_then_kill)
    result = materialize(
        list(defs.assets), selection=INSTRUCTION_STEP, partition_key=SHARDS[0],
        resources={**resources, "generation": generation(llm),
                   "generation_server": GenerationServer(instruction_url=served.url)},
        instance=instance, raise_on_error=False,
    )
    assert not result.success
    errors = [event.step_failure_data.error for event in result.get_step_failure_events()]
    message = str(errors[-1])
    assert f"generation endpoint {served.url} failed 3 times" in message, message
    kept = _chunk_files(home, SHARDS[0])
    assert len(kept) == 1  # the chunk finished before the kill; nothing after it

    # The rerun: a server the resource starts itself, two shards in one run.
    calls.clear()
    server = server_resource(tmp_path)
    rerun = materialize(
        list(defs.assets), selection=INSTRUCTION_STEP, tags=BOTH_SHARDS,
        resources={**resources, "generation": generation(llm), "generation_server": server},
        instance=instance,
    )
    assert rerun.success
    redone = {pair_id for chunk in calls for pair_id in chunk}
    assert redone and not set(_first_chunk_ids(described)) & redone  # reused, not redone
    assert _chunk_files(home, SHARDS[0]) > kept
    served_tables = {s: _tables(resources, s) for s in SHARDS}

    # The started server is gone once the step ends.
    (log,) = tmp_path.glob("server-*.log")
    port = int(log.stem.split("-")[1])
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0

    # An uninterrupted run through the transformers backend (greedy, same model) yields the
    # same instructions and rejects. (A random model writes no JSON list: its answers end up
    # as rejects, whose raw text is compared.)
    monkeypatch.setattr(instruction_assets, "generate_instructions", generate)
    local = materialize(
        list(defs.assets), selection=INSTRUCTION_STEP, tags=BOTH_SHARDS,
        resources={**resources, "generation": generation(llm, backend="transformers")},
        instance=instance,
    )
    assert local.success
    for shard in SHARDS:
        rows, rejects = _tables(resources, shard)
        pd.testing.assert_frame_equal(served_tables[shard][0], rows)
        pd.testing.assert_frame_equal(served_tables[shard][1], rejects)
        assert len(rows) + len(rejects) == 48 and rejects["raw"].str.len().sum() > 0


def _first_chunk_ids(described) -> list[str]:
    _, resources, _ = described
    descriptions = load_artifact(resources["store"].client(),
                                 artifact_relpath(["pair_descriptions"], SHARDS[0]))
    return list(descriptions["pair_id"])[:CHUNK]


def _tables(resources, shard: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The shard's instructions and rejects, less the provenance columns (backend, model...).
    A trailing U+FFFD is dropped from raw answers (see the greedy test above)."""
    store = resources["store"].client()
    rows = load_artifact(store, artifact_relpath(["instructions"], shard))
    rows = rows[["pair_id", "instructions", "attempts"]].reset_index(drop=True)
    rows["instructions"] = rows["instructions"].map(list)
    rejects = load_artifact(store, artifact_relpath(["instruction_rejects"], shard))
    rejects = rejects[["pair_id", "stage", "reason", "raw"]].reset_index(drop=True)
    rejects["raw"] = rejects["raw"].str.rstrip("\ufffd")
    # An answer that was only dangling bytes is empty once they are dropped (as vLLM drops them).
    rejects.loc[rejects["raw"] == "", "reason"] = "empty_output"
    return rows, rejects
