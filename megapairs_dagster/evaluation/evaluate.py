"""Score a retriever on CIRCO-format, CIRR and FashionIQ benchmarks: embed the gallery and the
composed queries, rank, and compute the official metrics, overall and per query group; and rank
CIRCO's and CIRR's test splits the same way into their servers' submission files.

Every evaluator returns ``{"all": {metric: value}, <group>: {...}, ...}``, the shape
``TripletStore.replace_scores`` stores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch
from PIL import Image

from megapairs_dagster.evaluation.metrics import (
    FASHIONIQ_KS,
    circo_metrics,
    cirr_metrics,
    fashioniq_metrics,
    rank_gallery,
)
from megapairs_dagster.evaluation.query_text import (
    circo_query_text,
    cirr_query_text,
    fashioniq_query_text,
)
from megapairs_dagster.evaluation.readers import CirQuery
from megapairs_dagster.evaluation.submission import build_circo_submission, build_cirr_submissions

TOP_N = 50  # CIRCO's submission depth, and the deepest k of the CIRCO and FashionIQ metrics
ENCODE_CHUNK = 256  # images decoded at a time, so that a large gallery never sits in memory

Metrics = dict[str, dict[str, float]]

# Inside ``reusing_gallery_embeddings``: (model id, gallery ids) -> the gallery's embeddings.
_GALLERY_CACHE: ContextVar[dict | None] = ContextVar("gallery_embeddings", default=None)


class ComposedEncoder(Protocol):
    def encode(self, images=None, text=None) -> torch.Tensor: ...


def _encode(model: ComposedEncoder, image_ids: Sequence[str],
            load_image: Callable[[str], Image.Image],
            texts: Sequence[str] | None = None) -> torch.Tensor:
    """Embeddings of the images, or with ``texts`` of the composed queries (image i, text i)."""
    chunks = []
    for start in range(0, len(image_ids), ENCODE_CHUNK):
        images = [load_image(image_id) for image_id in image_ids[start:start + ENCODE_CHUNK]]
        text = None if texts is None else list(texts[start:start + ENCODE_CHUNK])
        chunks.append(model.encode(images=images, text=text))
    return torch.cat(chunks)


@contextmanager
def reusing_gallery_embeddings() -> Iterator[None]:
    """Within it, a model embeds a gallery (the same ids, in the same order) once, however
    many evaluators and test-split rankers use it: CIRCO's val and test splits rank the same
    unlabeled2017 images. The embeddings are dropped on leaving."""
    token = _GALLERY_CACHE.set({})
    try:
        yield
    finally:
        _GALLERY_CACHE.reset(token)


def _gallery_embeddings(model: ComposedEncoder, gallery_ids: Sequence[str],
                        load_image: Callable[[str], Image.Image]) -> torch.Tensor:
    cache = _GALLERY_CACHE.get()
    if cache is None:
        return _encode(model, gallery_ids, load_image)
    key = (id(model), tuple(gallery_ids))
    if key not in cache:
        cache[key] = _encode(model, gallery_ids, load_image)
    return cache[key]


def _rank(
    model: ComposedEncoder,
    queries: Sequence[CirQuery],
    query_text: Callable[[CirQuery], str],
    gallery_ids: Sequence[str],
    load_image: Callable[[str], Image.Image],
    top_n: int | None,
) -> dict[str, list[str]]:
    """Query id -> gallery ids best first (``top_n`` of them, None: all), ranked by the
    similarity of the composed query (reference image + ``query_text``) to each image."""
    gallery = _gallery_embeddings(model, gallery_ids, load_image)
    composed = _encode(model, [query.reference_id for query in queries], load_image,
                       [query_text(query) for query in queries])
    ranked = rank_gallery(composed @ gallery.T, gallery_ids, top_n=top_n)
    return {query.query_id: ranking for query, ranking in zip(queries, ranked)}


def evaluate_circo_format(
    model: ComposedEncoder,
    queries: Sequence[CirQuery],
    gallery_ids: Sequence[str],
    load_image: Callable[[str], Image.Image],
    *,
    groups: Mapping[str, str] | None = None,
) -> Metrics:
    """``{"all": metrics, <group>: metrics, ...}``; ``groups`` maps query id to a group name.

    The reference image stays in the gallery, as CIRCO's evaluation keeps it.
    """
    rankings = _rank(model, queries, circo_query_text, gallery_ids, load_image, TOP_N)
    results = {"all": circo_metrics(queries, rankings)}
    for group in sorted(set((groups or {}).values())):
        members = [query for query in queries if groups[query.query_id] == group]
        results[group] = circo_metrics(members, {q.query_id: rankings[q.query_id] for q in members})
    return results


def evaluate_cirr(
    model: ComposedEncoder,
    queries: Sequence[CirQuery],
    gallery_ids: Sequence[str],
    load_image: Callable[[str], Image.Image],
) -> Metrics:
    """``{"all": {R@1/5/10/50, R_subset@1/2/3}}``, the reference removed from each ranking.

    The whole gallery is ranked, so that R_subset orders the ``img_set`` members as the full
    ranking does, the way CIRR's reference validation derives it (a top-50 cut would miss
    members ranked lower).
    """
    rankings = _rank(model, queries, cirr_query_text, gallery_ids, load_image, None)
    return {"all": cirr_metrics(queries, rankings)}


def evaluate_fashioniq(
    model: ComposedEncoder,
    queries_by_category: Mapping[str, Sequence[CirQuery]],
    galleries_by_category: Mapping[str, Sequence[str]],
    load_image: Callable[[str], Image.Image],
) -> Metrics:
    """``{"all": {R@10, R@50, avg}, <category>: {R@10, R@50}}``.

    Each category's queries rank that category's gallery, reference kept; "all" holds the
    means over categories and ``avg``, the mean of those two that papers report.
    """
    rankings = {
        category: _rank(model, queries, fashioniq_query_text, galleries_by_category[category],
                        load_image, TOP_N)
        for category, queries in queries_by_category.items()
    }
    scores = fashioniq_metrics(queries_by_category, rankings)
    results = {"all": {**{f"R@{k}": scores[f"avg/R@{k}"] for k in FASHIONIQ_KS},
                       "avg": scores["avg"]}}
    for category in queries_by_category:
        results[category] = {f"R@{k}": scores[f"{category}/R@{k}"] for k in FASHIONIQ_KS}
    return results


def circo_test_submissions(
    model: ComposedEncoder,
    queries: Sequence[CirQuery],
    gallery_ids: Sequence[str],
    load_image: Callable[[str], Image.Image],
) -> dict[str, dict]:
    """``{"test": file}``: CIRCO's server file for the test queries (``test.json``), each
    query's top 50 ranked as ``evaluate_circo_format`` ranks val (reference kept, as CIRCO's
    own code and SEARLE's test-submission code keep it), validated."""
    rankings = _rank(model, queries, circo_query_text, gallery_ids, load_image, TOP_N)
    return {"test": build_circo_submission(rankings, queries)}


def cirr_test_submissions(
    model: ComposedEncoder,
    queries: Sequence[CirQuery],
    gallery_ids: Sequence[str],
    load_image: Callable[[str], Image.Image],
) -> dict[str, dict]:
    """``{"test1_recall": file, "test1_recall_subset": file}``: CIRR's two server files for
    test1, ranked as ``evaluate_cirr`` ranks val (the whole gallery, reference removed; the
    subset list orders the img_set members as the full ranking does), validated."""
    rankings = _rank(model, queries, cirr_query_text, gallery_ids, load_image, None)
    recall, recall_subset = build_cirr_submissions(rankings, queries)
    return {"test1_recall": recall, "test1_recall_subset": recall_subset}
