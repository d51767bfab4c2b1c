"""CIR metrics on hand-computed cases, edge cases, and ranking from similarities."""

import numpy as np
import pytest
import torch

from megapairs_dagster.evaluation.metrics import (
    circo_metrics,
    cirr_metrics,
    fashioniq_metrics,
    rank_gallery,
)
from megapairs_dagster.evaluation.readers import CirQuery

CIRCO_QUERIES = [
    CirQuery("0", "ref0", ("s", "r"), "a", ("a", "b", "c")),
    CirQuery("1", "ref1", ("s", "r"), "d", ("d",)),
    CirQuery("2", "ref2", ("s", "r"), "g1", ("g1", "g2", "g3", "g4", "g5", "g6")),
]
CIRCO_RANKINGS = {
    "0": ["a", "x", "b", "y", "c"],   # hits at 1, 3, 5
    "1": ["ref1", "x", "d"],          # reference kept in the gallery: d stays at 3
    "2": ["g2", "x", "g1", "y"],      # shorter than k, 6 ground truths
}


def test_circo_map_and_recall_by_hand():
    # AP@5:  q0 (1/1 + 2/3 + 3/5) / min(5, 3) = 34/45
    #        q1 (1/3) / min(5, 1)             = 1/3
    #        q2 (1/1 + 2/3) / min(5, 6)       = 1/3
    #        mAP@5 = (34/45 + 15/45 + 15/45) / 3 = 64/135
    # AP@10: q0 34/45, q1 1/3, q2 (5/3) / min(10, 6) = 5/18 -> (68 + 30 + 25) / 90 / 3 = 41/90
    # R@k looks at the first target only: q0 at 1, q1 at 3, q2 at 3.
    scores = circo_metrics(CIRCO_QUERIES, CIRCO_RANKINGS)
    assert scores["mAP@5"] == pytest.approx(100 * 64 / 135)
    assert scores["mAP@10"] == pytest.approx(100 * 41 / 90)
    assert scores["mAP@25"] == scores["mAP@50"] == pytest.approx(100 * 41 / 90)
    assert scores["R@5"] == scores["R@50"] == pytest.approx(100.0)
    assert circo_metrics(CIRCO_QUERIES, CIRCO_RANKINGS, ks=(1, 2))["R@1"] == pytest.approx(100 / 3)


def test_circo_precision_counts_only_at_hit_positions():
    # One ground truth at rank 2 of 5: AP@5 = (1/2) / 1, not the precision@5 of 1/5.
    query = CirQuery("0", "r", ("s", "c"), "t", ("t",))
    scores = circo_metrics([query], {"0": ["x", "t", "y", "z", "w"]}, ks=(5,))
    assert scores["mAP@5"] == pytest.approx(50.0)


def _cirr_query(query_id, reference, target, others):
    return CirQuery(query_id, reference, ("caption",), target, (target,),
                    (reference, target, *others))


CIRR_QUERIES = [
    _cirr_query("1", "r1", "t1", ["m1", "m2", "m3", "m4"]),
    _cirr_query("2", "r2", "t2", ["n1", "n2", "n3", "n4"]),
]
CIRR_RANKINGS = {
    "1": ["r1", "t1", "m1"],                          # reference removed: t1 is first
    "2": ["x1", "x2", "r2", "x3", "x4", "n1", "t2"],  # without r2: t2 is sixth
}


def test_cirr_recall_removes_the_reference():
    # q1 target at 1, q2 target at 6 -> R@1 = R@5 = 1/2, R@10 = R@50 = 1.
    # Subsets from the rankings: q1 [t1, m1], q2 [n1, t2] -> R_s@1 = 1/2, R_s@2 = R_s@3 = 1.
    scores = cirr_metrics(CIRR_QUERIES, CIRR_RANKINGS)
    assert scores == pytest.approx({"R@1": 50.0, "R@5": 50.0, "R@10": 100.0, "R@50": 100.0,
                                    "R_subset@1": 50.0, "R_subset@2": 100.0,
                                    "R_subset@3": 100.0})


def test_cirr_subset_file_is_used_when_given():
    # q1 [m1, m2, t1] -> hit at 3; q2 [t2, n1, n2] -> hit at 1.
    subset = {"1": ["m1", "m2", "t1"], "2": ["t2", "n1", "n2"]}
    scores = cirr_metrics(CIRR_QUERIES, CIRR_RANKINGS, subset)
    assert (scores["R_subset@1"], scores["R_subset@2"], scores["R_subset@3"]) == pytest.approx(
        (50.0, 50.0, 100.0))


def test_cirr_subset_file_with_a_non_member_is_refused():
    subset = {"1": ["m1", "x9", "t1"], "2": ["t2", "n1", "n2"]}
    with pytest.raises(ValueError, match=r"query 1: subset ranking holds non-members \['x9'\]"):
        cirr_metrics(CIRR_QUERIES, CIRR_RANKINGS, subset)


def _fashion_query(query_id, target):
    return CirQuery(query_id, f"ref-{target}", ("a", "b"), target, (target,))


def _ranking_with(target, position, length, reference=None):
    filler = [f"f{i}" for i in range(length)]
    if reference is not None:
        filler[0] = reference
    filler[position - 1] = target
    return filler


def test_fashioniq_per_category_and_means_by_hand():
    queries = {"dress": [_fashion_query("0", "d0"), _fashion_query("1", "d1")],
               "shirt": [_fashion_query("0", "s0")],
               "toptee": [_fashion_query("0", "t0")]}
    rankings = {
        "dress": {"0": _ranking_with("d0", 3, 50), "1": _ranking_with("d1", 20, 50)},
        "shirt": {"0": _ranking_with("s0", 60, 60)},
        # the reference stays: t0 at 10 still counts for R@10
        "toptee": {"0": _ranking_with("t0", 10, 50, reference="ref-t0")},
    }
    # dress 50 / 100, shirt 0 / 0, toptee 100 / 100
    # avg R@10 = 150/3 = 50, avg R@50 = 200/3, avg = (50 + 200/3) / 2 = 175/3
    scores = fashioniq_metrics(queries, rankings)
    assert scores == pytest.approx({
        "dress/R@10": 50.0, "dress/R@50": 100.0, "shirt/R@10": 0.0, "shirt/R@50": 0.0,
        "toptee/R@10": 100.0, "toptee/R@50": 100.0,
        "avg/R@10": 50.0, "avg/R@50": 200 / 3, "avg": 175 / 3})


def test_fashioniq_categories_must_match():
    with pytest.raises(ValueError, match="categories differ"):
        fashioniq_metrics({"dress": [_fashion_query("0", "d0")]}, {"shirt": {"0": ["d0"]}})


def test_duplicate_ids_name_the_query():
    rankings = dict(CIRCO_RANKINGS, **{"1": ["d", "x", "d"]})
    with pytest.raises(ValueError, match="query 1: the ranking holds duplicate ids"):
        circo_metrics(CIRCO_QUERIES, rankings)


def test_unknown_and_missing_queries_are_refused():
    with pytest.raises(ValueError, match=r"unknown query ids: \['9'\]"):
        circo_metrics(CIRCO_QUERIES, dict(CIRCO_RANKINGS, **{"9": ["a"]}))
    with pytest.raises(ValueError, match="no predictions for 1 queries"):
        circo_metrics(CIRCO_QUERIES, {"0": ["a"], "1": ["d"]})


def test_queries_without_ground_truth_cannot_be_scored():
    test_query = CirQuery("0", "r", ("s", "c"))
    with pytest.raises(ValueError, match="query 0 has no ground truth"):
        circo_metrics([test_query], {"0": ["a"]})


def test_empty_ranking_scores_zero():
    scores = circo_metrics(CIRCO_QUERIES[1:2], {"1": []}, ks=(5,))
    assert scores == {"mAP@5": 0.0, "R@5": 0.0}


SIMILARITIES = np.array([[0.1, 0.9, 0.5, 0.3],
                         [0.4, 0.2, 0.8, 0.6]], dtype=np.float32)
GALLERY = ["g0", "g1", "g2", "g3"]


def test_rank_gallery_orders_by_similarity():
    assert rank_gallery(SIMILARITIES, GALLERY) == [["g1", "g2", "g3", "g0"],
                                                   ["g2", "g3", "g0", "g1"]]
    assert rank_gallery(torch.from_numpy(SIMILARITIES).half(), GALLERY, top_n=2) == [
        ["g1", "g2"], ["g2", "g3"]]


def test_rank_gallery_excludes_each_querys_reference():
    # row 0 drops its best (g1); row 1's excluded g0 is not in its top 2 anyway.
    assert rank_gallery(SIMILARITIES, GALLERY, top_n=2, exclude_ids=["g1", "g0"]) == [
        ["g2", "g3"], ["g2", "g3"]]
    assert rank_gallery(SIMILARITIES, GALLERY, exclude_ids=["g1", None]) == [
        ["g2", "g3", "g0"], ["g2", "g3", "g0", "g1"]]


def test_rank_gallery_checks_shapes():
    with pytest.raises(ValueError, match="do not match 3 gallery ids"):
        rank_gallery(SIMILARITIES, GALLERY[:3])
    with pytest.raises(ValueError, match="1 exclude ids for 2 queries"):
        rank_gallery(SIMILARITIES, GALLERY, exclude_ids=["g0"])
