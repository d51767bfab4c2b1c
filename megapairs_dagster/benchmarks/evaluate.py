"""Score a retriever on a CIRCO-format benchmark: embed the gallery and the composed queries,
rank, and compute the official metrics, overall and per query group (e.g. edit type)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from PIL import Image

from megapairs_dagster.benchmarks.metrics import circo_metrics, rank_gallery
from megapairs_dagster.benchmarks.query_text import circo_query_text
from megapairs_dagster.benchmarks.readers import CirQuery

TOP_N = 50  # CIRCO's submission depth, and the deepest k of its metrics


class ComposedEncoder(Protocol):
    def encode(self, images=None, text=None) -> torch.Tensor: ...


def evaluate_circo_format(
    model: ComposedEncoder,
    queries: Sequence[CirQuery],
    gallery_ids: Sequence[str],
    load_image: Callable[[str], Image.Image],
    *,
    groups: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """``{"all": metrics, <group>: metrics, ...}``; ``groups`` maps query id to a group name.

    The reference image stays in the gallery, as CIRCO's evaluation keeps it.
    """
    gallery = model.encode(images=[load_image(image_id) for image_id in gallery_ids])
    composed = model.encode(
        images=[load_image(query.reference_id) for query in queries],
        text=[circo_query_text(query) for query in queries],
    )
    ranked = rank_gallery(composed @ gallery.T, gallery_ids, top_n=TOP_N)
    rankings = {query.query_id: ranking for query, ranking in zip(queries, ranked)}
    results = {"all": circo_metrics(queries, rankings)}
    for group in sorted(set((groups or {}).values())):
        members = [query for query in queries if groups[query.query_id] == group]
        results[group] = circo_metrics(members, {q.query_id: rankings[q.query_id] for q in members})
    return results
