"""Parsing and validation of model output: every reject reason from a hand-made answer."""

import json

import pytest

from megapairs_dagster.synthesis.generation.parsing import (
    EMPTY_ITEM,
    EMPTY_OUTPUT,
    MARKUP,
    NO_CONTENT,
    NOT_A_LIST,
    REPEATS_CAPTION,
    TOO_FEW,
    TOO_LONG,
    TOO_SHORT,
    parse_instructions,
    validate_description,
)

QUERY = "A small blue star at the top, on a sand background."
TARGET = "A small blue star at the top, on a night background."
GOOD = ["Show the same star at night", "Make the backdrop night", "A similar shot after dark"]


def _with_third(item: str) -> str:
    return json.dumps(["Show the same star at night", "Make it night", item])


def _parse(raw: str, **kwargs):
    return parse_instructions(raw, query_caption=QUERY, target_caption=TARGET, **kwargs)


@pytest.mark.parametrize(
    "raw",
    [
        '["Show the same star at night", "Make the backdrop night", "A similar shot after dark"]',
        (
            'Sure! Here are the instructions:\n```json\n["Show the same star at night",\n'
            ' "Make the backdrop night", "A similar shot after dark"]\n```\nHope this helps.'
        ),
        (
            'Here you go: ["Show the same star at night", "Make the backdrop night", '
            '"A similar shot after dark"] (three items)'
        ),
        (
            "Instructions:\n1. Show the same star at night\n2) Make the backdrop night\n"
            '- "A similar shot after dark"'
        ),
    ],
    ids=["json", "fenced-with-prose", "leading-prose", "numbered-and-bulleted"],
)
def test_accepted_formats(raw):
    result = _parse(raw)
    assert result.ok and list(result.instructions) == GOOD


def test_duplicates_are_dropped_case_and_space_insensitively():
    raw = json.dumps(
        [
            "Show the same star at night",
            "show the  same star AT NIGHT",
            "Make it night",
            "Find it at night",
        ]
    )
    result = _parse(raw)
    assert result.instructions == (
        "Show the same star at night",
        "Make it night",
        "Find it at night",
    )
    assert "duplicate=1" in result.detail


def test_a_bad_item_is_dropped_when_enough_remain():
    result = _parse('["", "Show the same star at night", "Make it night", "Find it at night"]')
    assert result.ok and len(result.instructions) == 3 and "empty_item=1" in result.detail


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", EMPTY_OUTPUT),
        ("   \n ", EMPTY_OUTPUT),
        ("I am sorry, I cannot describe these images.", NOT_A_LIST),
        ('{"instructions": "make it night"}', NOT_A_LIST),
        ('["Show the same star at night", "Make it night"]', TOO_FEW),
        ('["Make it night", "Make it night", "make it  night"]', TOO_FEW),
        ('["Show the same star at night", "Make it night", "  "]', EMPTY_ITEM),
        ('["Show the same star at night", "Make it night", 42]', EMPTY_ITEM),
        (_with_third("Make it " + "very " * 50 + "dark"), TOO_LONG),
        (_with_third("a small blue star at the top, on a night background"), REPEATS_CAPTION),
        (_with_third("A small blue star at the top on a night background please"), REPEATS_CAPTION),
        (_with_third("<b>Show it darker</b>"), MARKUP),
        (_with_third("Show it in {colour}"), MARKUP),
        (_with_third("Make it %s"), MARKUP),
        (_with_third("```"), NO_CONTENT),
        (_with_third("\u0000\u202e 1. -- ?"), NO_CONTENT),
    ],
)
def test_reject_reasons(raw, reason):
    result = _parse(raw)
    assert not result.ok and result.reason == reason and not result.instructions


def test_min_count_and_max_chars_are_parameters():
    assert _parse('["Make it night", "Find it at night"]', min_count=2).ok
    assert (
        _parse(
            '["Show the same star at night", "Make it night", "Find it at night"]', max_chars=15
        ).reason
        == TOO_LONG
    )


DESCRIPTION = (
    "Both images show a small blue star near the top of the frame. However, the source image "
    "is set on a sand background, whereas the target image is set on a night background."
)


@pytest.mark.parametrize(
    ("text", "budget", "reason"),
    [
        (DESCRIPTION, 30, None),
        ("", 60, EMPTY_OUTPUT),
        (DESCRIPTION, 20, TOO_LONG),
        ("Both images show a star.", 60, TOO_SHORT),
        ("A small blue star at the top on a night background", 60, REPEATS_CAPTION),
    ],
)
def test_validate_description(text, budget, reason):
    assert validate_description(text, budget, captions=(QUERY, TARGET)) == reason
