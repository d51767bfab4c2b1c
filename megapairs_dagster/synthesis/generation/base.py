"""The two-step instruction-generation interface shared by every backend.

Step 1 (MLLM): look at the query and the target image and describe, in a sampled word
budget, what they share and how they differ. Step 2 (LLM): rewrite that description into at
least three retrieval instructions. Backends (``template`` and ``transformers``, chosen by
name in ``backends.py``) only turn prompts into raw text; parsing, validation, retries and
rejects live outside them so every backend is held to the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PairInput:
    """One mined pair as the generators see it."""

    pair_id: str  # "<query_id>-<target_id>", stable across runs
    query_jpeg: bytes
    target_jpeg: bytes
    query_caption: str
    target_caption: str


@dataclass(frozen=True)
class DescriptionRequest:
    pair: PairInput
    word_budget: int  # sampled per pair from 60–100
    seed: int  # derived from the run seed, the pair id and the attempt number


@dataclass(frozen=True)
class Demonstration:
    """One worked example for the LLM step: a description and the instructions it yields."""

    description: str
    instructions: tuple[str, ...]


@dataclass(frozen=True)
class InstructionRequest:
    pair: PairInput
    description: str
    demonstrations: tuple[Demonstration, ...]  # 5 sampled per call from the pool of 50
    seed: int


class DescriptionBackend(Protocol):
    """Turns description requests into raw text, one string per request, in order."""

    identity: dict  # backend name, model names and hashes

    def describe(self, requests: Sequence[DescriptionRequest]) -> list[str]: ...


class InstructionBackend(Protocol):
    """Turns instruction requests into raw model output, one string per request, in order.

    The output is expected to be a JSON list of strings; anything else is rejected by the
    parser with a reason, never by the backend.
    """

    identity: dict

    def instruct(self, requests: Sequence[InstructionRequest]) -> list[str]: ...
