"""The driver: batches requests to a backend, validates the output, retries, records rejects.

Every random choice (word budget, backend seed, demonstrations) comes from a seed derived
from (run seed, pair id, stage, attempt), so a rerun of the same pairs reproduces the same
tables whatever the batch size or the order in which pairs arrive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

import pandas as pd

from .base import (
    Demonstration,
    DescriptionBackend,
    DescriptionRequest,
    InstructionBackend,
    InstructionRequest,
    PairInput,
)
from .caption_diff import caption_changes
from .errors import BackendUnavailable
from .parsing import BACKEND_ERROR, TOO_DIFFERENT, parse_instructions, validate_description
from .prompts import sample_demonstrations

DESCRIPTION_COLUMNS = ["pair_id", "description", "word_budget", "attempts"]
INSTRUCTION_COLUMNS = ["pair_id", "instructions", "attempts"]
REJECT_COLUMNS = ["pair_id", "stage", "reason", "detail", "raw"]
RAW_KEPT_CHARS = 500  # enough of a bad answer to see what went wrong

Item = TypeVar("Item")
Request = TypeVar("Request")
# (accepted value, or None) and (reason, detail) when rejected
Check = Callable[[Item, str], tuple[object, str | None, str]]


def derive_seed(seed: int, pair_id: str, stage: str, attempt: int = 0) -> int:
    """A 63-bit seed from a stable hash (Python's own hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{stage}/{pair_id}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def sample_word_budget(seed: int, pair_id: str, word_budget_range: tuple[int, int]) -> int:
    low, high = word_budget_range
    return low + derive_seed(seed, pair_id, "word_budget") % (high - low + 1)


def _reject(pair_id: str, stage: str, reason: str, detail: str, raw: str) -> dict:
    return {
        "pair_id": pair_id,
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "raw": raw[:RAW_KEPT_CHARS],
    }


def _run_stage(
    items: Sequence[tuple[str, Item]],
    build: Callable[[Item, int], Request],
    call: Callable[[list[Request]], list[str]],
    check: Check,
    *,
    stage: str,
    max_attempts: int,
    batch_size: int,
) -> tuple[dict[str, tuple[object, int]], dict[str, dict]]:
    """Accepted values by pair id (with the attempt that produced them) and rejects.

    Output that fails validation is asked for again with the next attempt's seed. A batch
    whose backend call raises is sent again one request at a time, so a bad image or an
    over-long prompt rejects only its own pair; a request that raises alone is rejected and
    not retried, since it would most likely raise again.
    """
    if len({pair_id for pair_id, _ in items}) != len(items):
        raise ValueError("pair ids must be unique")
    accepted: dict[str, tuple[object, int]] = {}
    rejects: dict[str, dict] = {}

    def outputs(batch: list[tuple[str, Item]], attempt: int) -> list[tuple[str, Item, str]]:
        """(pair id, item, raw output) of each request of ``batch`` the backend answered."""
        try:
            raws = call([build(item, attempt) for _, item in batch])
            if len(raws) != len(batch):
                raise RuntimeError(f"backend gave {len(raws)} outputs for {len(batch)}")
            return [(pair_id, item, raw) for (pair_id, item), raw in zip(batch, raws)]
        except BackendUnavailable:
            raise  # the generator is gone: fail the step, keep the chunks saved so far
        except Exception as error:  # noqa: BLE001 - one bad request must not end the run
            if len(batch) > 1:
                return [answer for one in batch for answer in outputs([one], attempt)]
            pair_id = batch[0][0]
            message = f"{type(error).__name__}: {error}"
            rejects[pair_id] = _reject(pair_id, stage, BACKEND_ERROR, message, "")
            return []

    pending = list(items)
    for attempt in range(max_attempts):
        retry: list[tuple[str, Item]] = []
        for start in range(0, len(pending), batch_size):
            for pair_id, item, raw in outputs(pending[start : start + batch_size], attempt):
                value, reason, detail = check(item, raw)
                if reason is None:
                    accepted[pair_id] = (value, attempt + 1)
                    rejects.pop(pair_id, None)
                else:
                    rejects[pair_id] = _reject(pair_id, stage, reason, detail, raw)
                    retry.append((pair_id, item))
        pending = retry
    return accepted, rejects


def _tables(
    order: Sequence[str],
    accepted: dict[str, tuple[object, int]],
    rejects: dict[str, dict],
    to_row: Callable[[str, object, int], dict],
    columns: list[str],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [to_row(pid, *accepted[pid]) for pid in order if pid in accepted]
    reject_rows = [rejects[pid] for pid in order if pid in rejects]
    return (
        pd.DataFrame(rows, columns=columns),
        pd.DataFrame(reject_rows, columns=REJECT_COLUMNS),
    )


def generate_descriptions(
    pairs: Sequence[PairInput],
    backend: DescriptionBackend,
    *,
    seed: int,
    word_budget_range: tuple[int, int] = (60, 100),
    max_attempts: int = 2,
    batch_size: int = 32,
    max_caption_changes: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Descriptions ``(pair_id, description, word_budget, attempts)`` and rejects.

    With ``max_caption_changes``, a pair whose captions differ in more clauses is rejected
    as ``too_different`` before any model sees it: instructions state one or two changes,
    so for such a pair they would name a fraction of what differs and mislabel the target.
    """
    budgets = {p.pair_id: sample_word_budget(seed, p.pair_id, word_budget_range) for p in pairs}
    too_different = {}
    if max_caption_changes is not None:
        for pair in pairs:
            changes = caption_changes(pair.query_caption, pair.target_caption)
            if changes > max_caption_changes:
                too_different[pair.pair_id] = _reject(
                    pair.pair_id, "description", TOO_DIFFERENT,
                    f"captions differ in {changes} clauses (max {max_caption_changes})", "",
                )

    def build(pair: PairInput, attempt: int) -> DescriptionRequest:
        request_seed = derive_seed(seed, pair.pair_id, "describe", attempt)
        return DescriptionRequest(pair, budgets[pair.pair_id], request_seed)

    def check(pair: PairInput, raw: str) -> tuple[object, str | None, str]:
        text = raw.strip()
        budget = budgets[pair.pair_id]
        reason = validate_description(
            text, budget, captions=(pair.query_caption, pair.target_caption)
        )
        return text, reason, f"{len(text.split())} words for a budget of {budget}"

    accepted, rejects = _run_stage(
        [(p.pair_id, p) for p in pairs if p.pair_id not in too_different],
        build,
        backend.describe,
        check,
        stage="description",
        max_attempts=max_attempts,
        batch_size=batch_size,
    )
    rejects.update(too_different)
    return _tables(
        [p.pair_id for p in pairs],
        accepted,
        rejects,
        lambda pid, text, attempts: {
            "pair_id": pid,
            "description": text,
            "word_budget": budgets[pid],
            "attempts": attempts,
        },
        DESCRIPTION_COLUMNS,
    )


def generate_instructions(
    described: Sequence[tuple[PairInput, str]],
    backend: InstructionBackend,
    *,
    demonstrations: Sequence[Demonstration],
    seed: int,
    min_count: int = 3,
    max_attempts: int = 2,
    batch_size: int = 32,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Instructions ``(pair_id, instructions, attempts)`` and rejects.

    ``demonstrations`` is the whole pool; each request gets its own sample from it.
    """

    def build(item: tuple[PairInput, str], attempt: int) -> InstructionRequest:
        pair, description = item
        request_seed = derive_seed(seed, pair.pair_id, "instruct", attempt)
        examples = sample_demonstrations(demonstrations, request_seed)
        return InstructionRequest(pair, description, examples, request_seed)

    def check(item: tuple[PairInput, str], raw: str) -> tuple[object, str | None, str]:
        pair, _ = item
        result = parse_instructions(
            raw,
            query_caption=pair.query_caption,
            target_caption=pair.target_caption,
            min_count=min_count,
        )
        return list(result.instructions), result.reason, result.detail

    accepted, rejects = _run_stage(
        [(pair.pair_id, (pair, text)) for pair, text in described],
        build,
        backend.instruct,
        check,
        stage="instructions",
        max_attempts=max_attempts,
        batch_size=batch_size,
    )
    return _tables(
        [pair.pair_id for pair, _ in described],
        accepted,
        rejects,
        lambda pid, instructions, attempts: {
            "pair_id": pid,
            "instructions": instructions,
            "attempts": attempts,
        },
        INSTRUCTION_COLUMNS,
    )
