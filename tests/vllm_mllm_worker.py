"""Runs the vllm description backend on a real vLLM engine, in .venv-vllm (vLLM's CPU build),
and writes what it answered as JSON: ``python vllm_mllm_worker.py MODEL_DIR COUNT OUT.json``.

Called by test_generation_vllm_mllm.py, which compares the descriptions with the transformers
backend's in the project's own environment (the two cannot share one: their torch pins clash).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tiny_idefics3 import MAX_MODEL_LEN, NEW_TOKENS, description_requests, swapped

from megapairs_dagster.synthesis.generation.backends import BackendSettings, make_describer


def main(model: str, count: int, out: Path) -> None:
    describer = make_describer(BackendSettings(
        backend="vllm", description_model=model, temperature=0.0, max_new_tokens=NEW_TOKENS,
        dtype="float32",
        # Eager mode skips a torch.compile warm-up that a tiny model does not repay.
        description_engine_args={"max_model_len": MAX_MODEL_LEN, "enforce_eager": True},
    ))
    try:
        requests = description_requests(count)
        answers = {
            "greedy": describer.describe(requests),
            "swapped": describer.describe(swapped(requests)),
            "native": describer.describe(description_requests(count, native=True)),
        }
    finally:
        describer.close()
    out.write_text(json.dumps({"identity": describer.identity, **answers}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
