"""Parsing and validation of model output, the same for every backend.

Bad output is turned into a reason from a fixed vocabulary (never an exception), so runs
can count rejects by reason and retry them. Each instruction is cleaned as ingest cleans a
caption (control and bidi-override characters out, whitespace collapsed): a JSON escape
such as ``\u0000`` or ``\u202e`` must not reach the triplets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from megapairs_dagster.synthesis.normalize import clean_caption

EMPTY_OUTPUT = "empty_output"
NOT_A_LIST = "not_a_list"
TOO_FEW = "too_few"
EMPTY_ITEM = "empty_item"
TOO_LONG = "too_long"
TOO_SHORT = "too_short"
REPEATS_CAPTION = "repeats_caption"
BACKEND_ERROR = "backend_error"
TOO_DIFFERENT = "too_different"  # captions differ in more than one instruction can state
MARKUP = "markup"  # an item with HTML/XML tags or template placeholders ({0}, {{x}}, %s)
NO_CONTENT = "no_content"  # an item with no word in it ("```", "---", "...")
REJECT_REASONS = (
    EMPTY_OUTPUT,
    NOT_A_LIST,
    TOO_FEW,
    EMPTY_ITEM,
    TOO_LONG,
    TOO_SHORT,
    REPEATS_CAPTION,
    BACKEND_ERROR,
    TOO_DIFFERENT,
    MARKUP,
    NO_CONTENT,
)
CAPTION_OVERLAP = 0.9  # token Jaccard overlap from which a text counts as a caption copy
MIN_DESCRIPTION_WORDS = 10
DESCRIPTION_BUDGET_SLACK = 1.5  # a description may run to 1.5x its word budget

_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+(.+?)\s*$")
_TOKEN = re.compile(r"[a-z0-9]+")
# Instructions are plain sentences: a tag or a placeholder means echoed markup or template.
_MARKUP = re.compile(r"</?[A-Za-z|][^<>]*>|\{[^{}]*\}|%(?:\([^)]*\))?[sdifr]\b")
_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters or more, in any script


@dataclass(frozen=True)
class ParseResult:
    """Accepted instructions, or the reason (and a human-readable detail) for rejecting."""

    instructions: tuple[str, ...] = ()
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


def _normalised(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?\"'")


def repeats_caption(text: str, captions: tuple[str, ...]) -> bool:
    """True when ``text`` is (nearly) one of the captions: equal or ≥ 90% token overlap."""
    tokens = set(_TOKEN.findall(text.lower()))
    for caption in captions:
        if _normalised(text) == _normalised(caption):
            return True
        caption_tokens = set(_TOKEN.findall(caption.lower()))
        union = tokens | caption_tokens
        if union and len(tokens & caption_tokens) / len(union) >= CAPTION_OVERLAP:
            return True
    return False


def _json_list(raw: str) -> list | None:
    """The first JSON list in ``raw``: bare, inside a code fence, or after leading prose."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\[", raw):
        try:
            value, _ = decoder.raw_decode(raw, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, list):
            return value
    return None


def _bulleted_list(raw: str) -> list[str] | None:
    items = [m.group(1).strip("\"'") for m in map(_LIST_ITEM.match, raw.splitlines()) if m]
    return items or None


def parse_instructions(
    raw: str,
    *,
    query_caption: str,
    target_caption: str,
    min_count: int = 3,
    max_chars: int = 200,
) -> ParseResult:
    """Instructions from an LLM answer, or a reject reason.

    Items are cleaned first; bad ones (empty, too long, markup, no words, a caption copy)
    and duplicates are dropped; the answer is rejected only when fewer than ``min_count``
    remain, with the reason items were lost.
    """
    if not raw or not raw.strip():
        return ParseResult(reason=EMPTY_OUTPUT, detail="no text")
    items = _json_list(raw)
    if items is None:
        items = _bulleted_list(raw)
    if items is None:
        return ParseResult(reason=NOT_A_LIST, detail="neither a JSON list nor a numbered list")
    captions = (query_caption, target_caption)
    kept: list[str] = []
    seen: set[str] = set()
    dropped = {EMPTY_ITEM: 0, TOO_LONG: 0, MARKUP: 0, NO_CONTENT: 0, REPEATS_CAPTION: 0,
               "duplicate": 0}
    for item in items:
        text = clean_caption(item).text if isinstance(item, str) else ""
        if not text:
            dropped[EMPTY_ITEM] += 1
        elif len(text) > max_chars:
            dropped[TOO_LONG] += 1
        elif _MARKUP.search(text):
            dropped[MARKUP] += 1
        elif not _WORD.search(text):
            dropped[NO_CONTENT] += 1
        elif repeats_caption(text, captions):
            dropped[REPEATS_CAPTION] += 1
        elif _normalised(text) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(_normalised(text))
            kept.append(text)
    drops = ", ".join(f"{name}={count}" for name, count in dropped.items() if count)
    detail = f"{len(kept)} valid of {len(items)}" + (f"; dropped {drops}" if drops else "")
    if len(kept) >= min_count:
        return ParseResult(instructions=tuple(kept), detail=detail)
    reasons = [r for r in (REPEATS_CAPTION, TOO_LONG, MARKUP, NO_CONTENT, EMPTY_ITEM) if dropped[r]]
    return ParseResult(reason=reasons[0] if reasons else TOO_FEW, detail=detail)


def validate_description(
    text: str, word_budget: int, *, captions: tuple[str, ...] = ()
) -> str | None:
    """The reject reason for an MLLM description, or None when it is usable."""
    words = len(text.split()) if text else 0
    if words == 0:
        return EMPTY_OUTPUT
    if words > DESCRIPTION_BUDGET_SLACK * word_budget:
        return TOO_LONG
    if words < MIN_DESCRIPTION_WORDS:
        return TOO_SHORT
    if repeats_caption(text, captions):
        return REPEATS_CAPTION
    return None
