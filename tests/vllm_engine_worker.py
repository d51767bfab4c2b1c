"""Runs the vllm backend on a real vLLM engine, in .venv-vllm (vLLM's CPU build), and writes
what it answered as JSON: ``python vllm_engine_worker.py MODEL_DIR OUT.json``.

Called by test_generation_vllm_engine.py, which compares the answers with the transformers
backend's in the project's own environment (the two cannot share one: their torch pins clash).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
from vllm_models import MAX_MODEL_LEN, NEW_TOKENS, hostile_instruction_request, instruction_requests

from megapairs_dagster.synthesis.generation.backends import BackendSettings, make_instructor


def engine_processes() -> list[str]:
    """vLLM's engine core and workers among this process's children (they name themselves
    VLLM::...; Python's own resource tracker lives on until the interpreter exits)."""
    names = []
    for child in psutil.Process().children(recursive=True):
        try:  # an exited child not yet reaped is a zombie: dead, so not a live engine
            names.append(" ".join(child.cmdline()).strip())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return [name for name in names if name.startswith("VLLM::")]


def main(model: str, out: Path) -> None:
    instructor = make_instructor(BackendSettings(
        backend="vllm", instruction_model=model, temperature=0.0, max_new_tokens=NEW_TOKENS,
        dtype="float32",
        # Eager mode skips a torch.compile warm-up that a tiny model does not repay.
        instruction_engine_args={"max_model_len": MAX_MODEL_LEN, "enforce_eager": True},
    ))
    requests = [*instruction_requests(6), hostile_instruction_request()]
    greedy = instructor.instruct(requests)
    # Sampling on the same engine (starting a second costs a minute): per-request seeds make
    # each answer independent of its batch and its place in it.
    instructor.temperature = 0.9
    sampled = instructor.instruct(requests)
    reversed_batch = instructor.instruct(requests[::-1])[::-1]
    alone = [instructor.instruct([request])[0] for request in requests[:2]]
    reseeded = instructor.instruct([
        type(request)(request.pair, request.description, request.demonstrations, request.seed + 1000)
        for request in requests
    ])
    engine_before = engine_processes()
    instructor.close()
    deadline = time.monotonic() + 30
    while engine_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    out.write_text(json.dumps({
        "identity": instructor.identity,
        "greedy": greedy,
        "sampled": sampled,
        "reversed_batch": reversed_batch,
        "alone": alone,
        "reseeded": reseeded,
        "engine_processes_before_close": engine_before,
        "engine_processes_after_close": engine_processes(),
        "engine_after_close": repr(instructor.engine),
    }))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
