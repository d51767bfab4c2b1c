"""What the tests against a real vLLM serve and send: a tiny Llama vLLM's CPU build can run,
and instruction requests whose prompts differ, one of them spelling special tokens. Shared by the server tests, the in-process
engine test and its worker (tests/vllm_engine_worker.py), which runs in .venv-vllm.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tiny_hf_models import build_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from megapairs_dagster.synthesis.generation.base import InstructionRequest, PairInput
from megapairs_dagster.synthesis.generation.prompts import (
    load_demonstrations,
    sample_demonstrations,
)

ROOT = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 4096  # the v1 instruction prompt with five demonstrations, in bytes-level tokens
NEW_TOKENS = 24


def save_served_llm(directory: Path) -> Path:
    """A random 2-layer Llama with head size 32: vLLM's CPU attention has no kernel for the
    head size 16 of tiny_hf_models' Llama (supported: 32, 64, 80, ...)."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_MODEL_LEN,
        initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def instruction_requests(count: int) -> list[InstructionRequest]:
    pool = load_demonstrations()
    return [
        InstructionRequest(
            PairInput(f"{i}-{i + 50}", b"", b"", "a red bicycle", "a blue bicycle"),
            f"Both images show a bicycle by a wall. However, the source image shows it red, "
            f"whereas the target image shows it blue {'and parked near a river ' * (i % 3)}.",
            sample_demonstrations(pool, seed=i), seed=i,
        )
        for i in range(count)
    ]


def hostile_instruction_request() -> InstructionRequest:
    """A description that spells the tokenizer's own special tokens (issue 15): a backend that
    tokenized the rendered prompt whole would read an end of sequence mid-prompt."""
    return InstructionRequest(
        PairInput("h-1", b"", b"", "a red car", "a blue car"),
        "Both images show a car </s> parked by a wall. <s> However, the target image shows it "
        "blue.", sample_demonstrations(load_demonstrations(), seed=0), seed=0,
    )


def read_as_special_tokens(instructor):
    """``instructor`` (a transformers backend) made to tokenize each rendered prompt whole, as
    a chat endpoint does: what the fix for special-token strings is compared against."""
    def encode(request):
        return instructor.tokenizer(instructor.format_prompt(request),
                                    add_special_tokens=False).input_ids

    instructor.encode = encode
    return instructor


def without_dangling_bytes(texts: list[str]) -> list[str]:
    """A random byte-level model can stop (at max_new_tokens) inside a multi-byte character:
    transformers decodes the dangling bytes as U+FFFD, vLLM's incremental detokenizer holds
    them back. Everything before them is compared."""
    return [text.rstrip("\ufffd") for text in texts]


def vllm_python() -> Path:
    """.venv-vllm's interpreter; the calling test module is skipped where it is missing,
    except in CI, where ``make test`` has built it and a skip would hide the tests."""
    import pytest  # not in .venv-vllm, where the worker imports this module

    venv = Path(os.environ.get("MEGAPAIRS_VLLM_VENV", ROOT / ".venv-vllm"))
    python = venv / "bin" / "python"
    if not python.exists():
        if os.environ.get("CI"):
            raise RuntimeError(f"no vLLM environment at {venv}: `make vllm-env` makes it")
        pytest.skip(f"no vLLM environment at {venv}: run `make vllm-env`", allow_module_level=True)
    return python
