"""Do the views mean something, and do they find different kinds of relation?

MegaPairs relies on three views finding *different* relations between images. These
measurements compare each view's in-window neighbours with random pairs (caption overlap)
and, where the corpus records scene attributes (the demo does), count how often each
attribute differs between an image and its in-window neighbours.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

_WORD = re.compile(r"[a-z]+")


def caption_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two captions' word sets (0 when both are empty)."""
    words_a, words_b = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    union = words_a | words_b
    return len(words_a & words_b) / len(union) if union else 0.0


def window_pairs(neighbors: pd.DataFrame, window: tuple[float, float]) -> pd.DataFrame:
    """(query, neighbour, score) rows whose score lies strictly inside ``window``."""
    low, high = window
    exploded = neighbors.explode(["neighbor_ids", "scores"]).dropna(subset=["neighbor_ids"])
    pairs = pd.DataFrame(
        {
            "query_id": exploded["image_id"].astype(np.int64).to_numpy(),
            "neighbor_id": exploded["neighbor_ids"].astype(np.int64).to_numpy(),
            "score": exploded["scores"].astype(np.float32).to_numpy(),
        }
    )
    return pairs[(pairs["score"] > low) & (pairs["score"] < high)].reset_index(drop=True)


def view_report(
    neighbors: pd.DataFrame,
    window: tuple[float, float],
    captions: Mapping[int, str],
    *,
    scenes: Mapping[int, dict] | None = None,
    relation_types: Iterable[str] = (),
    differences: Callable[[dict, dict], set[str]] | None = None,
    seed: int = 0,
) -> dict:
    """Summary of one view's neighbours inside ``window``.

    Returns the share of neighbours inside the window, mean caption overlap of in-window pairs
    and of as many random pairs, the share of queries with at least one in-window neighbour,
    and (when ``scenes`` are given) the fraction of in-window pairs in which each relation type
    differs.
    """
    pairs = window_pairs(neighbors, window)
    total = int(sum(len(ids) for ids in neighbors["neighbor_ids"]))
    ids = np.fromiter(captions.keys(), dtype=np.int64)
    rng = np.random.default_rng(seed)
    random_count = max(len(pairs), 1)
    random_a, random_b = rng.choice(ids, random_count), rng.choice(ids, random_count)
    report = {
        "window": list(window),
        "neighbors": total,
        "in_window": len(pairs),
        "in_window_share": len(pairs) / total if total else 0.0,
        "queries_with_target": float(pairs["query_id"].nunique() / max(len(neighbors), 1)),
        "caption_overlap_in_window": _mean_overlap(pairs["query_id"], pairs["neighbor_id"], captions),
        "caption_overlap_random": _mean_overlap(random_a, random_b, captions),
    }
    if scenes is not None and differences is not None:
        shares = relation_shares(
            zip(pairs["query_id"], pairs["neighbor_id"]), scenes, differences, relation_types
        )
        report["relation_pairs"] = shares.pop("pairs")
        report["relation_identical"] = shares.pop("identical")
        report["relation_differs"] = shares
    return report


def relation_shares(
    pairs: Iterable[tuple[int, int]],
    scenes: Mapping[int, dict],
    differences: Callable[[dict, dict], set[str]],
    relation_types: Iterable[str],
) -> dict:
    """Share of pairs in which each relation type differs, plus ``pairs`` and ``identical``.

    Pairs with an image whose scene is unknown are left out of the denominators.
    """
    counts = dict.fromkeys(relation_types, 0)
    identical = known = 0
    for first, second in pairs:
        if first not in scenes or second not in scenes:
            continue
        known += 1
        changed = differences(scenes[first], scenes[second])
        identical += not changed
        for name in changed:
            counts[name] = counts.get(name, 0) + 1
    shares = {name: count / known if known else 0.0 for name, count in counts.items()}
    return {**shares, "pairs": known, "identical": identical / known if known else 0.0}


def _mean_overlap(left: Iterable[int], right: Iterable[int], captions: Mapping[int, str]) -> float:
    values = [
        caption_overlap(captions[a], captions[b])
        for a, b in zip(left, right)
        if a in captions and b in captions
    ]
    return float(np.mean(values)) if values else 0.0


def scenes_from_meta(image_ids: Iterable[int], metas: Iterable[str]) -> dict[int, dict]:
    """Scene attributes recorded in the samples' source metadata (the demo corpus has them)."""
    scenes = {}
    for image_id, meta in zip(image_ids, metas):
        scene = json.loads(meta).get("scene") if meta else None
        if scene is not None:
            scenes[int(image_id)] = scene
    return scenes
