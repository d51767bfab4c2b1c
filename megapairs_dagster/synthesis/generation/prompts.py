"""Versioned prompt files and demonstrations for the model backends.

The texts live as data files in ``prompts/`` next to this module, named ``<name>_<version>``,
so a new prompt is a new file and a new version string: artifacts record the version, and
a changed LLM prompt recomputes only the instruction step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources

import numpy as np

from .base import Demonstration

PROMPT_VERSION = "v1"
# The paper profile's prompts: the paper's rules ("under WORD_NUM words", the differences
# present in the target) without the demo's "mention at most two changes".
PAPER_PROMPT_VERSION = "paper-v1"
DEMONSTRATIONS_PER_PROMPT = 5
# Prompt versions that share another version's pool of demonstrations.
_DEMONSTRATION_POOL = {PAPER_PROMPT_VERSION: "v1"}


def _prompt_file(filename: str) -> str:
    return (resources.files(__package__) / "prompts" / filename).read_text(encoding="utf-8")


def load_prompt(name: str, version: str = PROMPT_VERSION) -> str:
    """The raw text of prompt ``name`` ("describe" or "instruct") at ``version``."""
    return _prompt_file(f"{name}_{version}.txt")


def load_demonstrations(version: str = PROMPT_VERSION) -> tuple[Demonstration, ...]:
    """The pool of worked examples (description → instructions) for the LLM step."""
    pool = _DEMONSTRATION_POOL.get(version, version)
    entries = json.loads(_prompt_file(f"demonstrations_{pool}.json"))
    return tuple(Demonstration(e["description"], tuple(e["instructions"])) for e in entries)


def sample_demonstrations(
    pool: Sequence[Demonstration], seed: int, count: int = DEMONSTRATIONS_PER_PROMPT
) -> tuple[Demonstration, ...]:
    """``count`` distinct demonstrations drawn by ``seed``, so each call sees a different mix."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return tuple(pool[int(i)] for i in chosen)


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` placeholders; str.format would trip over the JSON braces."""
    for name, value in values.items():
        placeholder = "{" + name + "}"
        if placeholder not in template:
            raise ValueError(f"prompt has no {placeholder} placeholder")
        template = template.replace(placeholder, value)
    return template


def render_description_prompt(word_budget: int, version: str = PROMPT_VERSION) -> str:
    """The MLLM prompt; the source and target images are passed alongside it, in that order."""
    return _fill(load_prompt("describe", version), {"word_budget": str(word_budget)})


def render_instruction_prompt(
    description: str, demonstrations: Sequence[Demonstration], version: str = PROMPT_VERSION
) -> str:
    """The LLM prompt: rules, the demonstrations as description → JSON list, then the task.

    The description goes in on one line (whitespace collapsed), so lines of its own such as
    ``Instructions: [...]`` or ``Description: ...`` cannot pose as another demonstration."""
    examples = "\n\n".join(
        f"Description: {d.description}\nInstructions: {json.dumps(list(d.instructions))}"
        for d in demonstrations
    )
    return _fill(
        load_prompt("instruct", version),
        {"demonstrations": examples, "description": " ".join(description.split())},
    )
