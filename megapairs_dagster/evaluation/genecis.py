"""GeneCIS (facebookresearch/genecis): the four tasks' annotation files, their per-query
galleries, the Visual Genome crop, prediction files and R@1/2/3.

Tasks: ``focus_attribute`` and ``change_attribute`` (Visual Genome 1.2 boxes, from VAW),
``focus_object`` and ``change_object`` (COCO val2017 images). Each annotation file is a JSON
list of ``{"reference", "target", "condition", "gallery": [...]}``; an item is
``{"val_image_id": int}`` (object tasks) or ``{"image_id", "instance_bbox": [x, y, w, h], ...}``
(attribute tasks; other VAW fields are ignored, as the official loader ignores them).

Official rules followed (read, not copied):

- Gallery: ``datasets/coco_dataset.py`` ``COCOValSubset.__getitem__`` and
  ``datasets/vaw_dataset.py`` ``VAWValSubset.__getitem__`` rank ``[target] + gallery``; the
  target is always at index 0 and the reference is not in the gallery.
- Crop: ``VAWDataset.load_cropped_image`` with ``DILATION = 0.7`` and ``PAD_CROP = True``: the
  box's left and top move out by 0.7 of its size (clipped at 0), right and bottom are the new
  left/top plus 1.7 times the size (clipped at the image), so the dilation grows the box to the
  left and up only; PIL rounds the corners; ``expand2square`` pads with black to a square.
  COCO images are ``{val_image_id:012d}.jpg`` (``COCODataset.load_sample``), VG images
  ``{image_id}.jpg``, both uncropped for the object tasks.
- Ranking and recall: ``eval/eval_functions.py`` ``validate`` sorts the gallery by similarity
  (``sort(descending=True)``) and ``utils/metric_utils.py`` ``get_recall`` counts a hit when
  index 0 (the target) is among the first k; ``AverageMeter`` averages over queries. The
  official script prints fractions; we report percentages, as the papers do.

Ids in predictions: an object item is its COCO id (``"153527"``); an attribute item is the VG
image id, a colon, and the four box numbers as JSON writes them (``json.dumps`` of each
number), comma-separated: ``"2365581:120,45.5,60,80"`` (see ``GenecisItem.item_id``). A
ranking lists each id once, so an image listed twice in a query's gallery (a distractor that
is also the target: ``change_object.json`` query 19) is ranked once. The official sort sees the
copies as separate entries with equal scores: we count a copy of the target as tied with it
and placed after it (as a stable sort keeps index 0 first), and each copy of a distractor as
its own entry at the distractor's place, so the target's rank is what the official sort gives
when equal scores keep their gallery order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from megapairs_dagster.evaluation.metrics import _percent
from megapairs_dagster.evaluation.readers import BenchmarkInputError, read_json

GENECIS_TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
GENECIS_KS = (1, 2, 3)
DILATION = 0.7  # VAWDataset.dilate

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class GenecisItem:
    """One image of a query: a COCO val2017 image (``box`` None) or a Visual Genome box."""

    image_id: str
    box: Box | None = None

    @property
    def item_id(self) -> str:
        """The id predictions rank: the COCO id, or ``"<VG image id>:<x>,<y>,<w>,<h>"``."""
        if self.box is None:
            return self.image_id
        return f"{self.image_id}:{','.join(json.dumps(value) for value in self.box)}"

    @property
    def file_name(self) -> str:
        """The image file: ``000000153527.jpg`` (COCO val2017) or ``2365581.jpg`` (VG 1.2)."""
        if self.box is None:
            return f"{int(self.image_id):012d}.jpg"
        return f"{self.image_id}.jpg"


@dataclass(frozen=True)
class GenecisQuery:
    """One GeneCIS query; ``query_id`` is its position in the annotation list, as a string.

    ``distractors`` are the file's ``gallery`` list as written (copies included); the gallery
    the official code ranks is ``(target, *distractors)``.
    """

    query_id: str
    reference: GenecisItem
    condition: str
    target: GenecisItem
    distractors: tuple[GenecisItem, ...]

    @property
    def gallery_ids(self) -> list[str]:
        """The ids a ranking of this query holds: the target first, then each other id once."""
        return list(dict.fromkeys([self.target.item_id]
                                  + [item.item_id for item in self.distractors]))


def _item(record: Any) -> GenecisItem:
    if not isinstance(record, dict):
        raise TypeError(f"an item must be a JSON object, got {record!r}")
    if "val_image_id" in record:
        value = record["val_image_id"]
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"val_image_id must be an integer, got {value!r}")
        return GenecisItem(str(value))
    image_id, box = record["image_id"], record["instance_bbox"]
    if not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or str(image_id) == "":
        raise TypeError(f"image_id must be a string or an integer, got {image_id!r}")
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise TypeError(f"instance_bbox must be four numbers [x, y, w, h], got {box!r}")
    return GenecisItem(str(image_id), (box[0], box[1], box[2], box[3]))


def read_genecis(path: str | Path) -> list[GenecisQuery]:
    """A GeneCIS annotation file (any of the four tasks) as queries, in file order.

    Every item of a file must be of one kind (COCO ids or VG boxes); a malformed record is a
    BenchmarkInputError naming the file and the record's position.
    """
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise BenchmarkInputError(f"{path}: expected a non-empty JSON list of queries")
    queries = []
    for position, record in enumerate(data):
        try:
            if not isinstance(record, dict):
                raise TypeError("not a JSON object")
            condition = record["condition"]
            if not isinstance(condition, str):
                raise TypeError(f"condition must be a string, got {condition!r}")
            distractors = record["gallery"]
            if not isinstance(distractors, list) or not distractors:
                raise TypeError("gallery must be a non-empty list of items")
            queries.append(GenecisQuery(
                query_id=str(position), reference=_item(record["reference"]),
                condition=condition, target=_item(record["target"]),
                distractors=tuple(_item(item) for item in distractors)))
        except (KeyError, TypeError, ValueError) as error:
            raise BenchmarkInputError(
                f"{path}: malformed record at position {position}: {error!r}") from error
    kinds = {item.box is None for query in queries
             for item in (query.reference, query.target, *query.distractors)}
    if len(kinds) > 1:
        raise BenchmarkInputError(f"{path}: mixes COCO ids (val_image_id) and Visual Genome "
                                  "boxes (image_id, instance_bbox); a task file holds one kind")
    return queries


def find_genecis_file(folder: str | Path, task: str) -> Path:
    """``<task>.json`` in ``folder`` or in its ``genecis/`` (the official repository's layout)."""
    if task not in GENECIS_TASKS:
        raise BenchmarkInputError(f"unknown GeneCIS task {task!r}; expected one of {GENECIS_TASKS}")
    folder = Path(folder)
    for candidate in (folder / f"{task}.json", folder / "genecis" / f"{task}.json"):
        if candidate.is_file():
            return candidate
    raise BenchmarkInputError(f"{folder}: no file {task}.json here or in genecis/")


def crop_genecis_box(item: GenecisItem, image: Image.Image) -> Image.Image:
    """The official attribute-task crop of ``item``'s box out of its whole VG ``image``.

    VAWDataset.load_cropped_image: left/top = box corner minus 0.7 of the box size, clipped at
    0; right/bottom = left/top plus 1.7 times the size, clipped at the image; PIL rounds the
    corners; then expand2square pads the crop with black (``(0,)`` for mode L) to a square,
    centred on the short side. The mode is kept (the official transform converts to RGB after).
    """
    if item.box is None:
        raise ValueError(f"{item.item_id} is a COCO image, not a Visual Genome box")
    x, y, width, height = item.box
    image_width, image_height = image.size
    left, top = max(0, x - DILATION * width), max(0, y - DILATION * height)
    right = min(image_width, left + (1 + DILATION) * width)
    bottom = min(image_height, top + (1 + DILATION) * height)
    crop = image.crop((left, top, right, bottom))
    crop_width, crop_height = crop.size
    if crop_width == crop_height:
        return crop
    side = max(crop_width, crop_height)
    square = Image.new(crop.mode, (side, side), (0,) if crop.mode == "L" else (0, 0, 0))
    square.paste(crop, ((side - crop_width) // 2, (side - crop_height) // 2))
    return square


def load_genecis_image(images_dir: str | Path, item: GenecisItem) -> Image.Image:
    """The RGB image the official loader gives ``item``: the COCO val2017 image from
    ``images_dir`` (the val2017 folder), or the cropped box of the VG 1.2 image (VG_100K_all)."""
    path = Path(images_dir) / item.file_name
    if not path.is_file():
        raise BenchmarkInputError(f"{path}: image of {item.item_id} not found")
    with Image.open(path) as image:
        image.load()
        if item.box is not None:
            image = crop_genecis_box(item, image)
        return image.convert("RGB")


def read_genecis_predictions(path: str | Path) -> dict[str, Any]:
    """A GeneCIS prediction file: a JSON object (checked against the queries when scored)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkInputError(f"{path}: expected a JSON object")
    return data


def _target_rank(query: GenecisQuery, ranking: Any) -> int | None:
    """The target's 0-based position in the official gallery order implied by ``ranking``
    (None if the ranking does not list it); refuses malformed rankings, naming the query."""
    where = f"query {query.query_id}"
    if not isinstance(ranking, list) or not all(isinstance(i, str) for i in ranking):
        raise BenchmarkInputError(f"{where}: expected a list of image ids (strings)")
    gallery = query.gallery_ids
    strangers = [image_id for image_id in ranking if image_id not in gallery]
    if strangers:
        raise BenchmarkInputError(f"{where}: {strangers[:5]} not in this query's gallery "
                                  f"(target and distractors: {gallery})")
    repeated = sorted(image_id for image_id, n in Counter(ranking).items() if n > 1)
    if repeated:
        raise BenchmarkInputError(f"{where}: the ranking lists {repeated} more than once")
    target = query.target.item_id
    if target not in ranking:
        return None
    copies = Counter(item.item_id for item in query.distractors)
    return sum(copies[image_id] for image_id in ranking[:ranking.index(target)])


def genecis_metrics(queries: Sequence[GenecisQuery], rankings: Mapping[str, Any],
                    ks: Sequence[int] = GENECIS_KS) -> dict[str, float]:
    """``R@k`` (percent) of one task: a query scores at k when its target is among the first k
    of the official gallery order (eval_functions.validate, metric_utils.get_recall).

    ``rankings`` maps every query id (its position) to gallery ids ranked best first; a ranking
    may stop early (a target not listed is a miss at every k). A missing or unknown query, an
    id outside the query's gallery and a repeated id are BenchmarkInputErrors naming the query.
    """
    by_id = {query.query_id: query for query in queries}
    missing = [query_id for query_id in by_id if query_id not in rankings]
    if missing:
        raise BenchmarkInputError(f"no predictions for {len(missing)} queries, e.g. query "
                                  f"{', '.join(missing[:5])}")
    unknown = sorted(set(rankings) - set(by_id))
    if unknown:
        raise BenchmarkInputError(f"predictions for unknown queries {unknown[:5]}; queries are "
                                  f"positions 0..{len(queries) - 1} of the annotation list")
    ranks = [_target_rank(query, rankings[query.query_id]) for query in queries]
    return {f"R@{k}": _percent([float(rank is not None and rank < k) for rank in ranks])
            for k in ks}


def genecis_task_metrics(queries_by_task: Mapping[str, Sequence[GenecisQuery]],
                         rankings_by_task: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{task}/R@k`` for each task given and, when all four are, ``avg/R@k``: the mean over
    the four tasks, ``avg/R@1`` being GeneCIS's headline (the paper's "Average R@1")."""
    if set(queries_by_task) != set(rankings_by_task):
        raise BenchmarkInputError(f"tasks differ: annotations {sorted(queries_by_task)}, "
                                  f"predictions {sorted(rankings_by_task)}")
    unknown = sorted(set(queries_by_task) - set(GENECIS_TASKS))
    if unknown:
        raise BenchmarkInputError(f"unknown GeneCIS tasks {unknown}; expected {GENECIS_TASKS}")
    scores: dict[str, float] = {}
    for task in (task for task in GENECIS_TASKS if task in queries_by_task):
        rankings = rankings_by_task[task]
        if not isinstance(rankings, Mapping):
            raise BenchmarkInputError(f"{task}: expected an object of query position -> ranking")
        try:
            task_scores = genecis_metrics(queries_by_task[task], rankings)
        except BenchmarkInputError as error:
            raise BenchmarkInputError(f"{task}: {error}") from error
        scores |= {f"{task}/{name}": value for name, value in task_scores.items()}
    if set(queries_by_task) == set(GENECIS_TASKS):
        for k in GENECIS_KS:
            scores[f"avg/R@{k}"] = sum(scores[f"{task}/R@{k}"] for task in GENECIS_TASKS) / 4
    return scores


def score_genecis(annotations: str | Path, predictions_path: str | Path) -> dict[str, float]:
    """Score a prediction file against one task's annotation file (predictions: query position
    -> ranking; returns ``R@k``) or a folder of the task files (predictions: task -> query
    position -> ranking, any of the four tasks; returns ``{task}/R@k`` and, with all four,
    ``avg/R@k``)."""
    predictions = read_genecis_predictions(predictions_path)
    annotations = Path(annotations)
    if not annotations.is_dir():
        return genecis_metrics(read_genecis(annotations), predictions)
    if not predictions:
        raise BenchmarkInputError(f"{predictions_path}: expected task -> (query position -> "
                                  f"ranking) for one or more of {GENECIS_TASKS}")
    queries = {task: read_genecis(find_genecis_file(annotations, task)) for task in predictions}
    return genecis_task_metrics(queries, predictions)
