"""Pair mining on hand-made neighbour lists."""

import pandas as pd
import pytest

from megapairs_dagster.synthesis.mining import mine_pairs

WINDOW = (0.8, 0.96)


def table(rows):
    return pd.DataFrame(
        [(q, [n for n, _ in pairs], [s for _, s in pairs]) for q, pairs in rows],
        columns=["image_id", "neighbor_ids", "scores"],
    )


def test_window_is_open_at_both_edges():
    neighbors = {"clip_image": table([(1, [(2, 0.96), (3, 0.95), (4, 0.8), (5, 0.81), (6, 0.5)])])}
    pairs = mine_pairs(neighbors, {"clip_image": WINDOW}, targets_per_query=10)
    assert sorted(pairs["target_id"]) == [3, 5]


def test_self_is_never_a_target_or_extra_negative():
    neighbors = {"clip_image": table([(1, [(1, 0.9), (2, 0.9)])])}
    pairs = mine_pairs(neighbors, {"clip_image": WINDOW}, targets_per_query=5)
    assert list(pairs["target_id"]) == [2]
    assert list(pairs["hard_negative_ids"].iloc[0]) == [1]  # only the query itself


def test_a_target_found_by_several_views_is_one_row_with_every_view():
    neighbors = {
        "clip_image": table([(1, [(2, 0.90)])]),
        "dino_image": table([(1, [(2, 0.85), (3, 0.88)])]),
        "clip_caption": table([(1, [(2, 0.99)])]),  # above its window: not a finder
    }
    windows = dict.fromkeys(neighbors, WINDOW)
    pairs = mine_pairs(neighbors, windows, targets_per_query=5).set_index("target_id")
    assert len(pairs) == 2
    assert pairs.loc[2, "views"] == ["clip_image", "dino_image"]
    assert pairs.loc[2, "scores"] == pytest.approx([0.90, 0.85])
    assert pairs.loc[3, "views"] == ["dino_image"]


def test_hard_negatives_start_with_the_query_and_come_from_its_retrievals():
    retrieved = [(n, 0.9 if n < 5 else 0.3) for n in range(2, 12)]
    neighbors = {"clip_image": table([(1, retrieved)])}
    pairs = mine_pairs(neighbors, {"clip_image": WINDOW}, targets_per_query=2, num_hard_negatives=5)
    assert len(pairs) == 2
    for target, negatives in zip(pairs["target_id"], pairs["hard_negative_ids"]):
        assert negatives[0] == 1
        assert len(negatives) == 6 and len(set(negatives)) == 6
        assert target not in negatives
        assert set(negatives[1:]) <= set(range(2, 12))


def test_targets_take_turns_between_views_and_respect_the_cap():
    neighbors = {
        "clip_image": table([(1, [(n, 0.9) for n in range(10, 20)])]),
        "dino_image": table([(1, [(n, 0.9) for n in range(20, 30)])]),
    }
    pairs = mine_pairs(neighbors, dict.fromkeys(neighbors, WINDOW), targets_per_query=4)
    assert len(pairs) == 4
    views = [v[0] for v in pairs["views"]]
    assert views.count("clip_image") == 2 and views.count("dino_image") == 2


def test_choice_is_deterministic_for_a_seed_and_changes_with_it():
    neighbors = {"clip_image": table([(q, [(n, 0.9) for n in range(100, 140)]) for q in range(5)])}
    windows = {"clip_image": WINDOW}
    first = mine_pairs(neighbors, windows, targets_per_query=3, seed=7)
    again = mine_pairs(neighbors, windows, targets_per_query=3, seed=7)
    other = mine_pairs(neighbors, windows, targets_per_query=3, seed=8)
    pd.testing.assert_frame_equal(first, again)
    assert list(first["target_id"]) != list(other["target_id"])


def test_queries_without_in_window_neighbours_give_no_rows_and_bad_config_is_an_error():
    neighbors = {"clip_image": table([(1, [(2, 0.2)]), (3, [])])}
    assert mine_pairs(neighbors, {"clip_image": WINDOW}).empty
    with pytest.raises(ValueError, match="no similarity window"):
        mine_pairs(neighbors, {})
    with pytest.raises(ValueError, match="low < high"):
        mine_pairs(neighbors, {"clip_image": (0.9, 0.8)})
