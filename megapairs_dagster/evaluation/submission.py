"""Test-server submission files of CIRCO and CIRR: build, validate, write, read.

CIRCO (miccunifi/CIRCO ``README.md`` "Submission Format" and
``submission_examples/``): a JSON object mapping every query id, as a string, to its
top 50 COCO image ids as integers, without duplicates.

CIRR (Cuberick-Orion/CIRR ``Test-split_server.md`` and ``demo_files/``): one file per
metric, a JSON object with ``"version": "rc2"``, ``"metric": "recall"`` or
``"recall_subset"``, and every pairid, as a string, mapped to its top 50 (recall) or
top 3 (recall_subset) image names. As in the repository's demo files (checked: no list
holds its query's reference), the reference image is left out of both lists, and the
subset list holds img_set members only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megapairs_dagster.evaluation.metrics import Rankings
from megapairs_dagster.evaluation.readers import BenchmarkInputError, CirQuery, read_json

CIRCO_TOP = 50
CIRR_VERSION = "rc2"
CIRR_TOP = {"recall": 50, "recall_subset": 3}


def _check_query_keys(keys: set[str], queries: Sequence[CirQuery], what: str) -> None:
    expected = {query.query_id for query in queries}
    unknown = sorted(keys - expected)
    missing = sorted(expected - keys)
    if unknown or missing:
        raise BenchmarkInputError(f"{what}: {len(missing)} queries missing (e.g. {missing[:5]}), "
                                  f"{len(unknown)} unknown keys (e.g. {unknown[:5]})")


def _check_list(query_id: str, ranked: Any, length: int, item_type: type, what: str) -> None:
    if not isinstance(ranked, list):
        raise BenchmarkInputError(f"{what}: query {query_id} maps to {type(ranked).__name__}, "
                                  "not a list")
    if len(ranked) != length:
        raise BenchmarkInputError(f"{what}: query {query_id} has {len(ranked)} ids, "
                                  f"expected exactly {length}")
    if not all(isinstance(i, item_type) and not isinstance(i, bool) for i in ranked):
        raise BenchmarkInputError(f"{what}: query {query_id} has ids that are not "
                                  f"{item_type.__name__}")
    if len(set(ranked)) != length:
        raise BenchmarkInputError(f"{what}: query {query_id} has duplicate ids")


def validate_circo_submission(submission: Any, queries: Sequence[CirQuery]) -> None:
    """Raise BenchmarkInputError unless ``submission`` follows CIRCO's server rules."""
    if not isinstance(submission, dict):
        raise BenchmarkInputError("CIRCO submission: expected a JSON object")
    _check_query_keys(set(submission), queries, "CIRCO submission")
    for query_id, ranked in submission.items():
        _check_list(query_id, ranked, CIRCO_TOP, int, "CIRCO submission")


def build_circo_submission(rankings: Rankings,
                           queries: Sequence[CirQuery]) -> dict[str, list[int]]:
    """The top 50 of each ranking with integer ids, validated."""
    submission = {query_id: [int(image_id) for image_id in ranked[:CIRCO_TOP]]
                  for query_id, ranked in rankings.items()}
    validate_circo_submission(submission, queries)
    return submission


def validate_cirr_submission(submission: Any, queries: Sequence[CirQuery], metric: str) -> None:
    """Raise BenchmarkInputError unless ``submission`` is a valid CIRR ``metric`` file."""
    what = f"CIRR {metric} submission"
    if metric not in CIRR_TOP:
        raise BenchmarkInputError(f"unknown CIRR metric {metric!r}; expected one of {list(CIRR_TOP)}")
    if not isinstance(submission, dict):
        raise BenchmarkInputError(f"{what}: expected a JSON object")
    if submission.get("version") != CIRR_VERSION:
        raise BenchmarkInputError(f"{what}: 'version' must be {CIRR_VERSION!r}, "
                                  f"got {submission.get('version')!r}")
    if submission.get("metric") != metric:
        raise BenchmarkInputError(f"{what}: 'metric' must be {metric!r}, "
                                  f"got {submission.get('metric')!r}")
    predictions = {key: value for key, value in submission.items() if key not in ("version", "metric")}
    _check_query_keys(set(predictions), queries, what)
    by_id = {query.query_id: query for query in queries}
    for query_id, ranked in predictions.items():
        _check_list(query_id, ranked, CIRR_TOP[metric], str, what)
        if metric == "recall_subset":
            query = by_id[query_id]
            allowed = set(query.subset_ids) - {query.reference_id}
            if not set(ranked) <= allowed:
                raise BenchmarkInputError(
                    f"{what}: query {query_id} lists {sorted(set(ranked) - allowed)}, which are "
                    "not img_set members other than the reference")


def build_cirr_submissions(rankings: Rankings, queries: Sequence[CirQuery]) -> tuple[dict, dict]:
    """The recall and recall_subset files from reference-free rankings, validated.

    Each ranking must be long enough to hold 3 img_set members besides the reference:
    rank the whole gallery (``rank_gallery(..., top_n=None)``) to be safe.
    """
    by_id = {query.query_id: query for query in queries}
    recall: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
    recall_subset: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for query_id, ranked in rankings.items():
        query = by_id.get(query_id)
        if query is None:
            raise BenchmarkInputError(f"rankings for unknown CIRR pairid {query_id}")
        without_reference = [image_id for image_id in ranked if image_id != query.reference_id]
        members = set(query.subset_ids) - {query.reference_id}
        recall[query_id] = without_reference[:CIRR_TOP["recall"]]
        recall_subset[query_id] = [i for i in without_reference if i in members][:CIRR_TOP["recall_subset"]]
    validate_cirr_submission(recall, queries, "recall")
    validate_cirr_submission(recall_subset, queries, "recall_subset")
    return recall, recall_subset


def check_test_gallery(benchmark: str, queries: Sequence[CirQuery],
                       gallery_ids: Sequence[str]) -> None:
    """Raise BenchmarkInputError unless ranking ``gallery_ids`` can fill every list of the
    ``benchmark``'s submission files: 50 ids per query (CIRCO: reference kept; CIRR: besides
    the reference) and, for CIRR, 3 img_set members other than the reference. Checked before
    a model is loaded, so that a small or partial gallery fails at once."""
    gallery = set(gallery_ids)
    if benchmark == "circo":
        if len(gallery) < CIRCO_TOP:
            raise BenchmarkInputError(f"CIRCO test: a gallery of {len(gallery)} images cannot "
                                      f"fill the top {CIRCO_TOP} the server expects")
        return
    if benchmark != "cirr":
        raise BenchmarkInputError(f"{benchmark} has no test server; expected circo or cirr")
    for query in queries:
        others = gallery - {query.reference_id}
        if len(others) < CIRR_TOP["recall"]:
            raise BenchmarkInputError(
                f"CIRR test: a gallery of {len(others)} images besides the reference of query "
                f"{query.query_id} cannot fill the top {CIRR_TOP['recall']} the server expects")
        members = (set(query.subset_ids) - {query.reference_id}) & gallery
        if len(members) < CIRR_TOP["recall_subset"]:
            raise BenchmarkInputError(
                f"CIRR test: query {query.query_id} has {len(members)} img_set members besides "
                f"its reference in the gallery; recall_subset needs {CIRR_TOP['recall_subset']}")


def submission_json(submission: dict) -> bytes:
    """A built submission as compact UTF-8 JSON (CIRR's server takes at most 5 MB)."""
    return json.dumps(submission).encode("utf-8")


def write_submission(path: str | Path, submission: dict) -> Path:
    """Write a built submission as compact JSON (CIRR's server takes at most 5 MB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(submission_json(submission))
    return path


def read_circo_submission(path: str | Path, queries: Sequence[CirQuery]) -> dict[str, list[str]]:
    """A validated CIRCO submission file as rankings with string ids."""
    submission = read_json(path)
    validate_circo_submission(submission, queries)
    return {query_id: [str(image_id) for image_id in ranked] for query_id, ranked in submission.items()}


def read_cirr_submission(path: str | Path, queries: Sequence[CirQuery],
                         metric: str) -> dict[str, list[str]]:
    """A validated CIRR ``metric`` file as rankings (without version and metric)."""
    submission = read_json(path)
    validate_cirr_submission(submission, queries, metric)
    return {key: value for key, value in submission.items() if key not in ("version", "metric")}


def read_fashioniq_predictions(path: str | Path, categories: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """Our FashionIQ prediction file: ``{category: {query position: [ranked ids]}}``.

    FashionIQ has no test server and no submission format, so this one JSON object keyed
    by category (the queries keyed by their position in ``cap.{category}.val.json``) is
    this project's choice. Rankings may have any length; recall@50 needs at least 50.
    """
    data = read_json(path)
    if not isinstance(data, dict) or set(data) != set(categories):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise BenchmarkInputError(f"{path}: expected a JSON object with exactly the categories "
                                  f"{sorted(categories)}, got {found}")
    for category, rankings in data.items():
        if not isinstance(rankings, dict):
            raise BenchmarkInputError(f"{path}: {category} must map query positions to rankings")
        for query_id, ranked in rankings.items():
            if not isinstance(ranked, list) or not all(isinstance(i, str) for i in ranked):
                raise BenchmarkInputError(f"{path}: {category} query {query_id} is not a list "
                                          "of image ids")
    return data
