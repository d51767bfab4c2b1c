"""Heterogeneous KNN pair mining, MegaPairs' first step.

Each view's neighbours of a query become candidate targets only when their similarity lies
strictly inside that view's window: below it they are unrelated, above it near-duplicates.
Targets are drawn round-robin across the views that found candidates, so one dominant view
cannot crowd the others out (each view finds a different kind of relation). Hard negatives
are the query itself first (as in the released data), then other images retrieved for the
same query.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

PAIR_COLUMNS = ["pair_id", "query_id", "target_id", "views", "scores", "hard_negative_ids"]


def pair_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed from the run seed and identifiers (Python's hash() is salted)."""
    text = ":".join(str(part) for part in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def mine_pairs(
    neighbors: Mapping[str, pd.DataFrame],
    windows: Mapping[str, tuple[float, float]],
    *,
    targets_per_query: int = 3,
    num_hard_negatives: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Mine (query, target) pairs from each view's neighbour table.

    ``neighbors[view]`` has columns ``image_id``, ``neighbor_ids``, ``scores`` (one row per
    query, scores descending). Returns one row per (query, target) with every view that found
    the target and its score, and the hard negatives (query first).
    """
    if targets_per_query < 1 or num_hard_negatives < 0:
        raise ValueError("targets_per_query must be ≥ 1 and num_hard_negatives ≥ 0")
    missing = set(neighbors) - set(windows)
    if missing:
        raise ValueError(f"no similarity window configured for views {sorted(missing)}")
    for view, (low, high) in windows.items():
        if not low < high:
            raise ValueError(f"window of {view} must have low < high, got ({low}, {high})")

    # query -> view -> [(neighbour, score)] in rank order
    retrieved: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for view in sorted(neighbors):
        frame = neighbors[view]
        for query, ids, scores in zip(frame["image_id"], frame["neighbor_ids"], frame["scores"]):
            pairs = [(int(i), float(s)) for i, s in zip(ids, scores) if int(i) != int(query)]
            retrieved.setdefault(int(query), {})[view] = pairs

    rows = []
    for query in sorted(retrieved):
        by_view = retrieved[query]
        found: dict[int, dict[str, float]] = {}
        for view, pairs in by_view.items():
            low, high = windows[view]
            for target, score in pairs:
                if low < score < high:
                    found.setdefault(target, {}).setdefault(view, score)
        if not found:
            continue
        rng = np.random.default_rng(pair_seed(seed, query))
        targets = _round_robin_targets(found, targets_per_query, rng)
        pool = sorted({n for pairs in by_view.values() for n, _ in pairs} - {query})
        for target in targets:
            others = [n for n in pool if n != target]
            picked = rng.permutation(len(others))[:num_hard_negatives]
            views = sorted(found[target])
            rows.append(
                (
                    f"{query}-{target}",
                    query,
                    target,
                    views,
                    [found[target][v] for v in views],
                    [query] + [others[i] for i in sorted(picked)],
                )
            )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS).astype(
        {"query_id": "int64", "target_id": "int64"}
    )


def _round_robin_targets(
    found: dict[int, dict[str, float]], count: int, rng: np.random.Generator
) -> list[int]:
    """Up to ``count`` distinct targets, taking turns between the views that found any."""
    queues = {}
    for view in sorted({v for views in found.values() for v in views}):
        candidates = sorted(t for t, views in found.items() if view in views)
        queues[view] = [candidates[i] for i in rng.permutation(len(candidates))]
    order = [list(queues)[i] for i in rng.permutation(len(queues))]
    chosen: list[int] = []
    while len(chosen) < count and any(queues.values()):
        for view in order:
            while queues[view] and queues[view][0] in chosen:
                queues[view].pop(0)
            if queues[view] and len(chosen) < count:
                chosen.append(queues[view].pop(0))
    return chosen
