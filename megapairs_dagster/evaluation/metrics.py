"""CIR metrics on ranked id lists, computed as the official evaluation code does.

A ranking is a strict order: best first, each id once (a duplicate is a ValueError naming
the query, as in CIRCO's server). A ranking shorter than k is scored on what it holds,
so missing positions count as misses. Every query of the split must be ranked and no
other. Scores are percentages, the scale the official scripts print.

Sources of each quirk (read, not copied):
- CIRCO: miccunifi/CIRCO ``src/evaluation.py`` — precision is taken at each ground-truth
  position of the top k, summed and divided by min(k, #ground truths); the reference image
  stays in the gallery; recall@k looks only at ``target_img_id``.
- CIRR: ABaldrati/CLIP4Cir ``src/validate.py`` (the reference CIRR validation) — the
  reference image is deleted from the ranking before recall@k; R_subset@k ranks the
  ``img_set`` members in the order of that reference-free ranking.
- FashionIQ: VectorSpaceLab/MegaPairs ``eval/eval_fashioniq.py`` and CLIP4Cir — recall@k of
  the single target over the category's split gallery, reference kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from megapairs_dagster.evaluation.readers import CirQuery

if TYPE_CHECKING:  # torch loads when a gallery is ranked, not with the code location
    import torch

Rankings = Mapping[str, Sequence[str]]

CIRCO_KS = (5, 10, 25, 50)
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)


def _paired(queries: Sequence[CirQuery], rankings: Rankings) -> list[tuple[CirQuery, list[str]]]:
    """Match rankings to queries; refuse unknown, missing, duplicated or unscorable ones."""
    by_id = {query.query_id: query for query in queries}
    unknown = sorted(set(rankings) - set(by_id))
    if unknown:
        raise ValueError(f"predictions for unknown query ids: {unknown[:5]}")
    missing = sorted(set(by_id) - set(rankings))
    if missing:
        raise ValueError(f"no predictions for {len(missing)} queries, e.g. {missing[:5]}")
    paired = []
    for query_id, ranking in rankings.items():
        query = by_id[query_id]
        if query.target_id is None:
            raise ValueError(f"query {query_id} has no ground truth (a test split?)")
        ranked = [str(image_id) for image_id in ranking]
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"query {query_id}: the ranking holds duplicate ids")
        paired.append((query, ranked))
    return paired


def _percent(values: list[float]) -> float:
    return float(np.mean(values)) * 100.0


def circo_metrics(queries: Sequence[CirQuery], rankings: Rankings,
                  ks: Sequence[int] = CIRCO_KS) -> dict[str, float]:
    """``mAP@k`` over all ground truths and ``R@k`` of the first target, reference kept."""
    average_precisions: dict[int, list[float]] = {k: [] for k in ks}
    recalls: dict[int, list[float]] = {k: [] for k in ks}
    for query, ranked in _paired(queries, rankings):
        is_ground_truth = np.isin(np.array(ranked, dtype=object), list(query.ground_truth_ids))
        hits_so_far = np.cumsum(is_ground_truth)
        precision_at_hits = hits_so_far * is_ground_truth / np.arange(1, len(ranked) + 1)
        for k in ks:
            average_precisions[k].append(
                float(precision_at_hits[:k].sum()) / min(k, len(query.ground_truth_ids)))
            recalls[k].append(float(query.target_id in ranked[:k]))
    return ({f"mAP@{k}": _percent(average_precisions[k]) for k in ks}
            | {f"R@{k}": _percent(recalls[k]) for k in ks})


def _subset_ranking(query: CirQuery, ranked: list[str], from_subset_file: bool) -> list[str]:
    """The img_set members other than the reference, in ranked order."""
    members = set(query.subset_ids) - {query.reference_id}
    if from_subset_file:
        strangers = [image_id for image_id in ranked
                     if image_id not in members and image_id != query.reference_id]
        if strangers:
            raise ValueError(f"query {query.query_id}: subset ranking holds non-members {strangers}")
    return [image_id for image_id in ranked if image_id in members]


def cirr_metrics(queries: Sequence[CirQuery], rankings: Rankings,
                 subset_rankings: Rankings | None = None) -> dict[str, float]:
    """``R@1/5/10/50`` without the reference image and ``R_subset@1/2/3``.

    The subset ranking comes from ``subset_rankings`` (the server's recall_subset file:
    members only) or, when absent, from ``rankings`` restricted to the members — then pass
    rankings long enough to hold them (members absent from a top-50 list count as misses).
    """
    paired = _paired(queries, rankings)
    subset_source = (dict(_paired(queries, subset_rankings)) if subset_rankings is not None
                     else dict(paired))
    recalls: dict[int, list[float]] = {k: [] for k in CIRR_KS}
    subset_recalls: dict[int, list[float]] = {k: [] for k in CIRR_SUBSET_KS}
    for query, ranked in paired:
        without_reference = [image_id for image_id in ranked if image_id != query.reference_id]
        for k in CIRR_KS:
            recalls[k].append(float(query.target_id in without_reference[:k]))
        subset = _subset_ranking(query, subset_source[query], subset_rankings is not None)
        for k in CIRR_SUBSET_KS:
            subset_recalls[k].append(float(query.target_id in subset[:k]))
    return ({f"R@{k}": _percent(recalls[k]) for k in CIRR_KS}
            | {f"R_subset@{k}": _percent(subset_recalls[k]) for k in CIRR_SUBSET_KS})


def fashioniq_metrics(queries_by_category: Mapping[str, Sequence[CirQuery]],
                      rankings_by_category: Mapping[str, Rankings]) -> dict[str, float]:
    """``{category}/R@10``, ``{category}/R@50``, their means over categories
    (``avg/R@10``, ``avg/R@50``) and ``avg``, the mean of those two that papers report."""
    if set(queries_by_category) != set(rankings_by_category):
        raise ValueError(f"categories differ: annotations {sorted(queries_by_category)}, "
                         f"predictions {sorted(rankings_by_category)}")
    scores: dict[str, float] = {}
    for category, queries in queries_by_category.items():
        paired = _paired(queries, rankings_by_category[category])
        for k in FASHIONIQ_KS:
            scores[f"{category}/R@{k}"] = _percent(
                [float(query.target_id in ranked[:k]) for query, ranked in paired])
    for k in FASHIONIQ_KS:
        scores[f"avg/R@{k}"] = float(np.mean([scores[f"{c}/R@{k}"] for c in queries_by_category]))
    scores["avg"] = float(np.mean([scores[f"avg/R@{k}"] for k in FASHIONIQ_KS]))
    return scores


def rank_gallery(similarities: np.ndarray | torch.Tensor, gallery_ids: Sequence[str],
                 top_n: int | None = None,
                 exclude_ids: Sequence[str | None] | None = None) -> list[list[str]]:
    """Ranked gallery ids per query row of a (queries × gallery) similarity matrix.

    ``exclude_ids`` drops one id per query (CIRR's reference image) before cutting to
    ``top_n`` (None: the whole gallery). Equal scores come out in ``torch.topk``'s order,
    which is unspecified: break ties in the scores if the order must be reproducible.
    """
    import torch

    scores = torch.as_tensor(similarities)
    if scores.ndim != 2 or scores.shape[1] != len(gallery_ids):
        raise ValueError(f"similarities of shape {tuple(scores.shape)} do not match "
                         f"{len(gallery_ids)} gallery ids")
    if exclude_ids is not None and len(exclude_ids) != scores.shape[0]:
        raise ValueError(f"{len(exclude_ids)} exclude ids for {scores.shape[0]} queries")
    gallery_size = len(gallery_ids)
    wanted = gallery_size if top_n is None else min(top_n + (exclude_ids is not None), gallery_size)
    order = torch.topk(scores.float(), wanted, dim=1).indices.numpy()
    ranked = np.asarray(gallery_ids, dtype=object)[order]
    if exclude_ids is None:
        return ranked.tolist()
    keep = ranked != np.asarray(exclude_ids, dtype=object)[:, None]
    return [row[mask][:top_n].tolist() for row, mask in zip(ranked, keep)]
