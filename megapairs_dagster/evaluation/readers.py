"""Readers of the official CIRCO, CIRR (rc2) and FashionIQ annotation files.

Every id is returned as a string (CIRCO's COCO ids included) so that metrics and
rankings treat the three benchmarks alike; the CIRCO submission writer turns them back
into the integers its server expects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


class BenchmarkInputError(ValueError):
    """An annotation, prediction or submission file that cannot be used as it is."""


@dataclass(frozen=True)
class CirQuery:
    """One composed-image-retrieval query.

    ``target_id`` is the image the caption was written for (CIRCO ``target_img_id``,
    CIRR ``target_hard``, FashionIQ ``target``); ``ground_truth_ids`` are all correct
    images (CIRCO ``gt_img_ids``, otherwise the target alone). Both are empty on test
    splits. ``subset_ids`` are CIRR's ``img_set`` members, reference included as in the file.
    """

    query_id: str
    reference_id: str
    text_parts: tuple[str, ...]
    target_id: str | None = None
    ground_truth_ids: tuple[str, ...] = ()
    subset_ids: tuple[str, ...] = ()


def read_json(path: str | Path) -> Any:
    """Parsed JSON, with a BenchmarkInputError naming the file if missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkInputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BenchmarkInputError(f"{path}: not valid JSON ({error})") from error


def _records(path: str | Path, parse: Callable[[dict, int], CirQuery],
             ground_truth: bool | None = None) -> list[CirQuery]:
    """Parse a JSON list of records, naming the file and record position on failure.

    ``ground_truth``: True (a val split) refuses a query without one, False (a test split) a
    query with one, None takes either but not both in one file.
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise BenchmarkInputError(f"{path}: expected a JSON list of queries")
    queries = []
    for position, record in enumerate(data):
        try:
            if not isinstance(record, dict):
                raise TypeError("not a JSON object")
            queries.append(parse(record, position))
        except (KeyError, TypeError, ValueError) as error:
            raise BenchmarkInputError(
                f"{path}: malformed record at position {position}: {error!r}") from error
    ids = [query.query_id for query in queries]
    if len(set(ids)) != len(ids):
        raise BenchmarkInputError(f"{path}: duplicate query ids")
    _check_ground_truth(path, queries, ground_truth)
    return queries


def _check_ground_truth(path: str | Path, queries: list[CirQuery],
                        ground_truth: bool | None) -> None:
    labelled = [query.target_id is not None for query in queries]
    if ground_truth is None and len(set(labelled)) > 1:
        raise BenchmarkInputError(
            f"{path}: {labelled.count(False)} of {len(labelled)} queries have no ground truth: "
            "a split has ground truths for every query (val) or for none (test)")
    if ground_truth is not None and not all(has == ground_truth for has in labelled):
        position = labelled.index(not ground_truth)
        if ground_truth:
            raise BenchmarkInputError(
                f"{path}: query {queries[position].query_id} (position {position}) has no "
                "ground truth: a test split? Scoring needs the val split's annotations")
        raise BenchmarkInputError(
            f"{path}: query {queries[position].query_id} (position {position}) has a ground "
            "truth: a val split? Test-server files are for the test split's annotations")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def read_circo(path: str | Path, ground_truth: bool | None = None) -> list[CirQuery]:
    """CIRCO ``val.json`` (with ground truths) or ``test.json`` (without).

    ``ground_truth``: True requires one for every query (``gt_img_ids`` and
    ``target_img_id``: scoring a val split), False for none (test), None takes either.
    """

    def parse(record: dict, _: int) -> CirQuery:
        has_targets = "gt_img_ids" in record
        return CirQuery(
            query_id=str(int(record["id"])),
            reference_id=str(int(record["reference_img_id"])),
            text_parts=(_text(record["shared_concept"]), _text(record["relative_caption"])),
            target_id=str(int(record["target_img_id"])) if has_targets else None,
            ground_truth_ids=tuple(str(int(i)) for i in record["gt_img_ids"]) if has_targets else (),
        )

    return _records(path, parse, ground_truth)


def read_cirr(path: str | Path, ground_truth: bool | None = None) -> list[CirQuery]:
    """CIRR rc2 ``cap.rc2.{val,test1}.json``; ``target_hard`` exists on val only.

    ``ground_truth``: True requires ``target_hard`` in every record (val), False in none
    (test1), None takes either.
    """

    def parse(record: dict, _: int) -> CirQuery:
        target = record.get("target_hard")
        members = record["img_set"]["members"]
        if not isinstance(members, list):
            raise TypeError("img_set.members is not a list")
        return CirQuery(
            query_id=str(int(record["pairid"])),
            reference_id=_text(record["reference"]),
            text_parts=(_text(record["caption"]),),
            target_id=_text(target) if target is not None else None,
            ground_truth_ids=(_text(target),) if target is not None else (),
            subset_ids=tuple(_text(member) for member in members),
        )

    return _records(path, parse, ground_truth)


def read_fashioniq(path: str | Path) -> list[CirQuery]:
    """FashionIQ ``cap.{category}.val.json``; query ids are positions in the file.

    The file has no query ids, so the position (as a string) is the id, which is also
    the key our FashionIQ prediction files use.
    """

    def parse(record: dict, position: int) -> CirQuery:
        captions = record["captions"]
        if not isinstance(captions, list) or len(captions) != 2:
            raise TypeError(f"captions must be a list of two strings, got {captions!r}")
        target = _text(record["target"])
        return CirQuery(
            query_id=str(position),
            reference_id=_text(record["candidate"]),
            text_parts=tuple(_text(caption) for caption in captions),
            target_id=target,
            ground_truth_ids=(target,),
        )

    return _records(path, parse)


def read_cirr_split(path: str | Path) -> dict[str, str]:
    """A CIRR split file (``split.rc2.{val,test1}.json``): image name -> path relative to the
    folder of CIRR's image folders (``./dev/dev-244-0-img0.png``), in file order."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(value, str) for value in data.values()):
        raise BenchmarkInputError(f"{path}: expected a JSON object of image name -> path")
    return data


def read_cirr_gallery(path: str | Path) -> list[str]:
    """Image names of a CIRR split file (``split.rc2.{val,test1}.json``), in file order."""
    return list(read_cirr_split(path))


def read_fashioniq_gallery(path: str | Path) -> list[str]:
    """Image ids of a FashionIQ split file (``split.{category}.val.json``), in file order."""
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise BenchmarkInputError(f"{path}: expected a JSON list of image ids")
    return data


def read_circo_gallery(path: str | Path) -> list[str]:
    """COCO ids of ``image_info_unlabeled2017.json``, the gallery CIRCO ranks against."""
    data = read_json(path)
    try:
        return [str(int(image["id"])) for image in data["images"]]
    except (KeyError, TypeError, ValueError) as error:
        raise BenchmarkInputError(f"{path}: expected {{'images': [{{'id': int}}, ...]}}") from error
