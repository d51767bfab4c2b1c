"""The vllm backend on a real vLLM engine: vLLM's CPU build, in its own environment.

The engine runs where vLLM imports (.venv-vllm; ``make test`` builds it), driven by
tests/vllm_engine_worker.py through the project's own backend code. Its greedy answers equal
the transformers backend's on the same tiny Llama and prompts, a description spelling '</s>'
among them; sampled answers depend only on
each request's seed; closing the backend stops the engine's processes.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from vllm_models import (
    NEW_TOKENS,
    ROOT,
    hostile_instruction_request,
    instruction_requests,
    read_as_special_tokens,
    save_served_llm,
    vllm_python,
    without_dangling_bytes,
)

from megapairs_dagster.synthesis.generation.backends import BackendSettings, make_instructor

pytestmark = pytest.mark.integration
VLLM_PYTHON = vllm_python()


@pytest.fixture(scope="module")
def answered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-engine")
    llm = save_served_llm(tmp / "llm")
    out = tmp / "answers.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}",
           "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_engine_worker.py"),
                           str(llm), str(out)], env=env, capture_output=True, text=True, check=False,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return llm, json.loads(out.read_text())


def test_greedy_answers_of_the_engine_equal_the_transformers_backends(answered):
    llm, answers = answered
    transformers = BackendSettings(
        backend="transformers", instruction_model=str(llm), temperature=0.0,
        max_new_tokens=NEW_TOKENS, dtype="float32",
    )
    requests = [*instruction_requests(6), hostile_instruction_request()]
    local = make_instructor(transformers).instruct(requests)
    assert without_dangling_bytes(answers["greedy"]) == without_dangling_bytes(local)
    assert len(set(local)) > 1  # the prompts make a difference
    # The '</s>' in the last description stayed text in the engine: read as the special token
    # (as LLM.chat would read it), it gives another answer.
    assert read_as_special_tokens(make_instructor(transformers)).instruct(requests[-1:]) != local[-1:]
    assert answers["identity"]["backend"] == "vllm"
    assert answers["identity"]["model"] == str(llm)


def test_sampled_answers_depend_only_on_each_requests_seed(answered):
    _, answers = answered
    sampled = answers["sampled"]
    assert answers["reversed_batch"] == sampled
    assert answers["alone"] == sampled[:2]
    assert answers["reseeded"] != sampled
    assert sampled != answers["greedy"]


def test_closing_the_backend_stops_the_engine(answered):
    _, answers = answered
    assert "VLLM::EngineCore" in answers["engine_processes_before_close"]
    assert answers["engine_processes_after_close"] == []
    assert answers["engine_after_close"] == "None"
