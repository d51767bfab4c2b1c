"""Score a retriever on CIRCO-format, CIRR, FashionIQ, GeneCIS and MMEB benchmarks: embed the
gallery and the queries, rank, and compute the official metrics, overall and per query group;
and rank CIRCO's and CIRR's test splits the same way into their servers' submission files.

Every evaluator returns ``{"all": {metric: value}, <group>: {...}, ...}``, the shape
``TripletStore.replace_scores`` stores; within ``collecting_examples`` it also keeps the first
queries it ranks, to be drawn (``examples``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
from PIL import Image

from megapairs_dagster.evaluation.examples import TOP, Candidate, RetrievalExample
from megapairs_dagster.evaluation.genecis import GENECIS_KS, GenecisQuery, genecis_task_metrics
from megapairs_dagster.evaluation.metrics import (
    FASHIONIQ_KS,
    circo_metrics,
    cirr_metrics,
    fashioniq_metrics,
    rank_gallery,
)
from megapairs_dagster.evaluation.mmeb import MmebQuery, mmeb_metrics
from megapairs_dagster.evaluation.query_text import (
    circo_query_text,
    cirr_query_text,
    fashioniq_query_text,
)
from megapairs_dagster.evaluation.readers import CirQuery
from megapairs_dagster.evaluation.submission import build_circo_submission, build_cirr_submissions

if TYPE_CHECKING:  # torch loads when a model is scored, not with the code location
    import torch

TOP_N = 50  # CIRCO's submission depth, and the deepest k of the CIRCO and FashionIQ metrics
ENCODE_CHUNK = 256  # images decoded at a time, so that a large gallery never sits in memory
EXAMPLE_QUERIES = 3  # queries drawn per scored model
# Phi-3-V's image placeholder, which MMEB's texts carry; a CLIP text tower has no use for it.
MMEB_IMAGE_TOKEN = "<|image_1|>"

Metrics = dict[str, dict[str, float]]

# Inside ``reusing_gallery_embeddings``: (model id, gallery ids) -> the gallery's embeddings.
_GALLERY_CACHE: ContextVar[dict | None] = ContextVar("gallery_embeddings", default=None)
# Inside ``collecting_examples``: the examples kept so far.
_EXAMPLES: ContextVar[list[RetrievalExample] | None] = ContextVar("examples", default=None)

Query = TypeVar("Query")


class ComposedEncoder(Protocol):
    def encode(self, images=None, text=None) -> torch.Tensor: ...


def _encode(model: ComposedEncoder, image_ids: Sequence[str] | None,
            load_image: Callable[[str], Image.Image],
            texts: Sequence[str] | None = None) -> torch.Tensor:
    """Embeddings of the images, of the texts (``image_ids`` None), or of the composed queries
    (image i, text i)."""
    import torch

    chunks = []
    for start in range(0, len(image_ids if image_ids is not None else texts), ENCODE_CHUNK):
        images = None if image_ids is None else [
            load_image(image_id) for image_id in image_ids[start:start + ENCODE_CHUNK]]
        text = None if texts is None else list(texts[start:start + ENCODE_CHUNK])
        chunks.append(model.encode(images=images, text=text))
    return torch.cat(chunks)


@contextmanager
def collecting_examples() -> Iterator[list[RetrievalExample]]:
    """Within it, the evaluators put the first ``EXAMPLE_QUERIES`` queries they rank, with
    their top candidates, into the list it yields: what ``examples.draw_examples`` draws."""
    examples: list[RetrievalExample] = []
    token = _EXAMPLES.set(examples)
    try:
        yield examples
    finally:
        _EXAMPLES.reset(token)


def _keep_examples(queries: Sequence[Query],
                   describe: Callable[[Query], RetrievalExample]) -> None:
    examples = _EXAMPLES.get()
    if examples is not None:
        room = max(0, EXAMPLE_QUERIES - len(examples))
        examples.extend(describe(query) for query in queries[:room])


def _keep_cir_examples(queries: Sequence[CirQuery], rankings: Mapping[str, Sequence[str]],
                       query_text: Callable[[CirQuery], str],
                       load_image: Callable[[str], Image.Image],
                       drop_reference: bool = False) -> None:
    def describe(query: CirQuery) -> RetrievalExample:
        ranked = [image_id for image_id in rankings[query.query_id]
                  if not (drop_reference and image_id == query.reference_id)]
        return RetrievalExample(
            load_image(query.reference_id), query_text(query),
            [Candidate(load_image(image_id), image_id, image_id in query.ground_truth_ids)
             for image_id in ranked[:TOP]])

    _keep_examples(queries, describe)


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
    _keep_cir_examples(queries, rankings, circo_query_text, load_image)
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
    _keep_cir_examples(queries, rankings, cirr_query_text, load_image, drop_reference=True)
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
    for category, queries in queries_by_category.items():
        _keep_cir_examples(queries, rankings[category], fashioniq_query_text, load_image)
    scores = fashioniq_metrics(queries_by_category, rankings)
    results = {"all": {**{f"R@{k}": scores[f"avg/R@{k}"] for k in FASHIONIQ_KS},
                       "avg": scores["avg"]}}
    for category in queries_by_category:
        results[category] = {f"R@{k}": scores[f"{category}/R@{k}"] for k in FASHIONIQ_KS}
    return results


def _ranked_by_score(scores: torch.Tensor) -> list[int]:
    """Indices best first; equal scores keep their order (the lower index first)."""
    import torch

    return torch.sort(scores, descending=True, stable=True).indices.tolist()


def evaluate_genecis(
    model: ComposedEncoder,
    queries_by_task: Mapping[str, Sequence[GenecisQuery]],
    load_item: Callable[[str], Image.Image],
) -> Metrics:
    """``{"all": {R@1, R@2, R@3}, <task>: {R@1, R@2, R@3}}``, "all" holding the mean over the
    four tasks (GeneCIS's "Average R@k"; empty unless all four are given).

    The query is the reference (an attribute task's: its cropped box, as ``load_item`` gives
    it) composed with the condition; each query ranks its own gallery, the target and its
    distractors, by cosine similarity, equal scores in gallery order (the target first), as
    the official evaluation sorts them.
    """
    rankings_by_task = {}
    for task, queries in queries_by_task.items():
        item_ids = list(dict.fromkeys(item_id for query in queries
                                      for item_id in query.gallery_ids))
        row = {item_id: index for index, item_id in enumerate(item_ids)}
        gallery = _encode(model, item_ids, load_item)
        composed = _encode(model, [query.reference.item_id for query in queries], load_item,
                           [query.condition for query in queries])
        rankings = {}
        for query, vector in zip(queries, composed):
            ids = query.gallery_ids
            order = _ranked_by_score(gallery[[row[item_id] for item_id in ids]] @ vector)
            rankings[query.query_id] = [ids[index] for index in order]
        rankings_by_task[task] = rankings
        _keep_examples(queries, lambda query, rankings=rankings: RetrievalExample(
            load_item(query.reference.item_id), query.condition,
            [Candidate(load_item(item_id), item_id, item_id == query.target.item_id)
             for item_id in rankings[query.query_id][:TOP]]))
    scores = genecis_task_metrics(queries_by_task, rankings_by_task)
    results = {"all": {f"R@{k}": scores[f"avg/R@{k}"] for k in GENECIS_KS
                       if f"avg/R@{k}" in scores}}
    for task in queries_by_task:
        results[task] = {f"R@{k}": scores[f"{task}/R@{k}"] for k in GENECIS_KS}
    return results


def _mmeb_text(text: str) -> str:
    return text.replace(MMEB_IMAGE_TOKEN, "").strip()


def _mmeb_shown(text: str, image: str, load_image: Callable[[str], Image.Image]
                ) -> tuple[Image.Image | None, str]:
    """What an MMEB input shows: its image (None for text only) and its text."""
    return (load_image(image) if image else None), _mmeb_text(text)


def _encode_mixed(model: ComposedEncoder, inputs: Sequence[tuple[str, str]],
                  load_image: Callable[[str], Image.Image]) -> torch.Tensor:
    """Embeddings of (text, image path) inputs: composed when both are given, else the
    image's or the text's (an input with neither embeds the empty text)."""
    import torch

    kinds: dict[tuple[bool, bool], list[int]] = {}
    for index, (text, image) in enumerate(inputs):
        kinds.setdefault((bool(text) or not image, bool(image)), []).append(index)
    rows: list[torch.Tensor | None] = [None] * len(inputs)
    for (has_text, has_image), indices in kinds.items():
        embeddings = _encode(model, [inputs[i][1] for i in indices] if has_image else None,
                             load_image, [inputs[i][0] for i in indices] if has_text else None)
        for index, embedding in zip(indices, embeddings):
            rows[index] = embedding
    return torch.stack(rows)


def evaluate_mmeb(
    model: ComposedEncoder,
    queries_by_dataset: Mapping[str, Sequence[MmebQuery]],
    load_image: Callable[[str], Image.Image],
) -> Metrics:
    """``{"all": {hit@1}, <dataset or group>: {hit@1}}``: hit@1 (P@1) per dataset and the
    means of each complete group (meta-task, ind, ood); "all" is the overall mean over the 36
    datasets (empty unless all are given).

    A query is its text (without MMEB's image placeholder) and its image when it has one, a
    candidate likewise; inputs are embedded once per (text, image path), as the official
    evaluation keys them, and each query chooses the best of its candidates, the lowest index
    on equal scores (``np.argmax``).
    """
    predictions = {}
    for dataset, queries in queries_by_dataset.items():
        keys = list(dict.fromkeys(key for query in queries
                                  for key in ((query.text, query.image_path), *query.candidates)))
        row = {key: index for index, key in enumerate(keys)}
        embeddings = _encode_mixed(model, [(_mmeb_text(text), image) for text, image in keys],
                                   load_image)
        scores = {query.query_id: (embeddings[[row[key] for key in query.candidates]]
                                   @ embeddings[row[(query.text, query.image_path)]])
                  for query in queries}
        predictions[dataset] = {query_id: int(np.argmax(values.numpy()))
                                for query_id, values in scores.items()}

        def describe(query: MmebQuery, scores=scores) -> RetrievalExample:
            return RetrievalExample(
                *_mmeb_shown(query.text, query.image_path, load_image),
                [Candidate(*_mmeb_shown(*query.candidates[index], load_image),
                           query.is_correct(index))
                 for index in _ranked_by_score(scores[query.query_id])[:TOP]])

        _keep_examples(queries, describe)
    scores = mmeb_metrics(queries_by_dataset, predictions)
    results = {"all": {"hit@1": scores["overall/hit@1"]} if "overall/hit@1" in scores else {}}
    for name, value in scores.items():
        if not name.startswith("overall/"):
            results[name.removesuffix("/hit@1")] = {"hit@1": value}
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
