"""The clause-level caption comparison that the template backends and the driver share."""

from megapairs_dagster.synthesis.generation.caption_diff import (
    caption_changes,
    compare_captions,
    key_changes,
    split_clauses,
)

NIGHT_QUERY = (
    "a large red striped circle on the left and a small blue star at the top, on a sand background"
)
NIGHT_TARGET = NIGHT_QUERY.replace("sand", "night")
UNRELATED = "two green squares at the bottom over a grey background"


def test_captions_split_into_clauses_without_their_lead_in():
    assert [c.text() for c in split_clauses(NIGHT_QUERY)] == [
        "a large red striped circle on the left",
        "a small blue star at the top",
        "on a sand background",
    ]
    assert [c.text() for c in split_clauses("An image of a big dog, and two cats.")] == [
        "a big dog",
        "two cats",
    ]


def test_a_word_swapped_in_place_is_the_one_change_and_the_rest_is_shared():
    comparison = compare_captions(NIGHT_QUERY, NIGHT_TARGET)
    (change,) = comparison.changes
    assert change.kind == "change" and change.swap == ("sand", "night")
    assert change.old == {"sand"} and change.new == {"night"}
    assert comparison.shared == (
        "a large red striped circle on the left",
        "a small blue star at the top",
        "on a background",
    )


def test_a_clause_only_one_caption_has_is_an_addition_or_a_removal():
    query, target = "a red star on a sand background", "a red star and a blue circle on a sand background"
    added, removed = compare_captions(query, target), compare_captions(target, query)
    assert [(c.kind, c.target.text()) for c in added.changes] == [("add", "a blue circle")]
    assert [(c.kind, c.query.text()) for c in removed.changes] == [("remove", "a blue circle")]
    assert added.shared == removed.shared == ("a red star", "on a sand background")
    assert removed.changes[0].strength < added.changes[0].strength


def test_rewordings_are_not_changes():
    assert compare_captions("a big dog in the picture", "A large dog.").changes == ()


def test_changes_are_counted_and_only_strong_ones_are_key():
    assert caption_changes(NIGHT_QUERY, NIGHT_TARGET) == 1
    assert caption_changes(NIGHT_QUERY, UNRELATED) > 2
    comparison = compare_captions(NIGHT_QUERY, UNRELATED)
    strengths = [c.strength for c in comparison.changes]
    assert strengths == sorted(strengths, reverse=True)
    key = key_changes(comparison)
    assert key[0].swap == ("sand", "grey") and len(key) == 2
    assert key_changes(comparison, limit=1) == key[:1]
