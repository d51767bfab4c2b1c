"""Test-server files: the CIRCO test and CIRR test1 splits ranked into submission files that pass
the readers' validation, from tiny folders in the official layouts, on their own and through
``benchmark_scores``; and the real test annotation files read as test splits.

The query records are the first ones of the real ``test.json`` and ``cap.rc2.test1.json``; the
images are solid colours that the fake encoder reads back to know which image it was given.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import BENCHMARKS, requires_shared_data
from dagster import DagsterInstance
from PIL import Image
from test_evaluation_evaluate import CIRR_CAPTIONS, CIRR_GALLERY, _score_partition

from megapairs_dagster.assets.evaluation import submission_relpath
from megapairs_dagster.evaluation.datasets import load_circo, load_cirr
from megapairs_dagster.evaluation.evaluate import (
    circo_test_submissions,
    cirr_test_submissions,
    evaluate_circo_format,
    reusing_gallery_embeddings,
)
from megapairs_dagster.evaluation.query_text import circo_query_text
from megapairs_dagster.evaluation.readers import (
    BenchmarkInputError,
    CirQuery,
    read_circo,
    read_cirr,
    read_cirr_gallery,
)
from megapairs_dagster.evaluation.submission import (
    check_test_gallery,
    read_circo_submission,
    read_cirr_submission,
    write_submission,
)
from megapairs_dagster.resources.settings import BenchmarkData

# --- a test double for the model, and the images it reads back ------------------------------


def _colour(index: int) -> tuple[int, int, int]:
    """Red and green in steps of 8 (they survive JPEG's rounding): up to 1024 images."""
    return (8 * (index % 32) + 4, 8 * (index // 32) + 4, 128)


class OrderEncoder:
    """Image ``i`` of ``names`` embeds as the i-th unit vector; a composed query (reference,
    text) as a vector whose entries fall along ``orders[(reference, text)]``, then along
    ``names``. The ranking is the order chosen by hand. Counts the images embedded alone."""

    def __init__(self, names: list[str], orders: dict[tuple[str, str], list[str]]):
        self.names, self.orders, self.gallery_images = names, orders, 0

    def name_of(self, image: Image.Image) -> str:
        red, green, _ = image.getpixel((0, 0))
        return self.names[round((red - 4) / 8) + 32 * round((green - 4) / 8)]

    def encode(self, images=None, text=None) -> torch.Tensor:
        names = [self.name_of(image) for image in images]
        if text is None:
            self.gallery_images += len(names)
            return torch.eye(len(self.names))[[self.names.index(name) for name in names]]
        rows = []
        for name, query_text in zip(names, text):
            listed = self.orders.get((name, query_text), [])
            order = listed + [other for other in self.names if other not in listed]
            row = torch.zeros(len(self.names))
            row[[self.names.index(other) for other in order]] = torch.arange(len(order), 0, -1.0)
            rows.append(row / row.norm())
        return torch.stack(rows)


def _write_image(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), _colour(index)).save(path, quality=95)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))


# --- CIRCO: test.json beside val.json, one gallery of unlabeled2017 images ------------------

CIRCO_TEST = [  # the first three records of test.json
    {"reference_img_id": 281438, "relative_caption": "has a higher quality and is taken during "
     "the daytime", "shared_concept": "a man sitting on an outdoor toilet", "id": 0},
    {"reference_img_id": 251485, "relative_caption": "is in a room with wooden walls",
     "shared_concept": "a double bed", "id": 1},
    {"reference_img_id": 232621, "relative_caption": "is sitting on the ground",
     "shared_concept": "a person looking at his laptop", "id": 2},
]
# 60 ids: the references and filler; load_circo orders the gallery by id as text.
CIRCO_GALLERY = sorted(["281438", "251485", "232621", *(str(500000 + i) for i in range(57))])
CIRCO_VAL = [  # val.json's shape, on this gallery
    {"id": 0, "reference_img_id": 500000, "target_img_id": 500001, "gt_img_ids": [500001, 500002],
     "relative_caption": "is blue", "shared_concept": "a square"},
    {"id": 1, "reference_img_id": 500003, "target_img_id": 500004, "gt_img_ids": [500004],
     "relative_caption": "is larger", "shared_concept": "a circle"},
]


@pytest.fixture
def circo_folder(tmp_path):
    """CIRCO's layout: annotations/val.json and test.json, images/NNNNNNNNNNNN.jpg."""
    root = tmp_path / "circo"
    _write_json(root / "annotations" / "val.json", CIRCO_VAL)
    _write_json(root / "annotations" / "test.json", CIRCO_TEST)
    for index, image_id in enumerate(CIRCO_GALLERY):
        _write_image(root / "images" / f"{int(image_id):012d}.jpg", index)
    return root


def test_circo_test_submission_passes_the_reader(circo_folder, tmp_path):
    queries, gallery, load = load_circo(circo_folder / "annotations", circo_folder / "images",
                                        "test")
    assert gallery == CIRCO_GALLERY and [q.query_id for q in queries] == ["0", "1", "2"]
    first = queries[0]
    # The reference ranks first and stays, as CIRCO's evaluation (and val scoring) keeps it.
    chosen = ["281438", "500010", "500020"]
    model = OrderEncoder(CIRCO_GALLERY, {(first.reference_id, circo_query_text(first)): chosen})
    files = circo_test_submissions(model, queries, gallery, load)
    path = write_submission(tmp_path / "submission_test.json", files["test"])
    read = read_circo_submission(path, queries)
    assert set(read) == {"0", "1", "2"}
    assert all(len(ranked) == 50 and set(ranked) <= set(CIRCO_GALLERY) for ranked in read.values())
    assert read["0"][:3] == chosen
    assert all(isinstance(i, int) for i in json.loads(path.read_text())["1"])


def test_circo_val_and_test_embed_their_gallery_once(circo_folder):
    val = load_circo(circo_folder / "annotations" / "val.json", circo_folder / "images")
    test = load_circo(circo_folder / "annotations" / "test.json", circo_folder / "images", "test")
    model = OrderEncoder(CIRCO_GALLERY, {})
    with reusing_gallery_embeddings():
        evaluate_circo_format(model, *val)
        circo_test_submissions(model, *test)
    assert model.gallery_images == len(CIRCO_GALLERY)
    evaluate_circo_format(model, *val)  # outside: embedded again
    assert model.gallery_images == 2 * len(CIRCO_GALLERY)


def test_circo_splits_are_told_apart(circo_folder):
    images = circo_folder / "images"
    with pytest.raises(BenchmarkInputError, match=r"test.json: query 0 \(position 0\) has no "
                       "ground truth: a test split"):
        load_circo(circo_folder / "annotations" / "test.json", images)
    with pytest.raises(BenchmarkInputError, match=r"val.json: query 0 \(position 0\) has a "
                       "ground truth: a val split"):
        load_circo(circo_folder / "annotations" / "val.json", images, "test")
    mixed = circo_folder / "mixed.json"
    _write_json(mixed, [*CIRCO_VAL, {**CIRCO_TEST[0], "id": 7}])
    with pytest.raises(BenchmarkInputError, match="1 of 3 queries have no ground truth"):
        read_circo(mixed)


def test_circo_missing_reference_image_is_named(circo_folder):
    (circo_folder / "images" / "000000251485.jpg").unlink()
    with pytest.raises(BenchmarkInputError, match=r"1 images referenced by the annotations are "
                       r"missing, e.g. \['251485'\]"):
        load_circo(circo_folder / "annotations", circo_folder / "images", "test")


# --- CIRR: test1 beside val, images in img_raw/test1/ ---------------------------------------

SET_1 = ["test1-147-1-img1", "test1-1001-2-img0", "test1-83-1-img1", "test1-359-0-img1",
         "test1-906-0-img1", "test1-83-0-img1"]
CIRR_TEST1 = [  # the first three records of cap.rc2.test1.json
    {"pairid": 12063, "reference": "test1-147-1-img1",
     "caption": "remove all but one dog and add a woman hugging it",
     "img_set": {"id": 1, "members": SET_1, "reference_rank": 3}},
    {"pairid": 12064, "reference": "test1-83-0-img1", "caption": "mirror the image",
     "img_set": {"id": 1, "members": SET_1, "reference_rank": 4}},
    {"pairid": 12065, "reference": "test1-83-1-img1", "caption": "shows two dogs eating",
     "img_set": {"id": 1, "members": SET_1, "reference_rank": 5}},
]
FILLER = [f"test1-{2000 + i}-0-img0" for i in range(50)]
CIRR_TEST1_GALLERY = [*SET_1, *FILLER]  # 56 images: 55 besides any reference
CIRR_TEST1_ORDERS = {
    # The reference first (left out), members among the filler: both lists follow this order.
    ("test1-147-1-img1", CIRR_TEST1[0]["caption"]):
        ["test1-147-1-img1", FILLER[0], "test1-906-0-img1", FILLER[1], "test1-83-1-img1",
         "test1-1001-2-img0"],
    # Every member below the top 50: the subset list still holds the best three of them.
    ("test1-83-0-img1", "mirror the image"): [*FILLER, "test1-359-0-img1", "test1-147-1-img1"],
}


@pytest.fixture
def cirr_folder(tmp_path):
    """CIRR's layout: captions/ and image_splits/ for val and test1, img_raw/{dev,test1}/."""
    root = tmp_path / "cirr"
    _write_json(root / "captions" / "cap.rc2.test1.json", CIRR_TEST1)
    _write_json(root / "image_splits" / "split.rc2.test1.json",
                {name: f"./test1/{name}.png" for name in CIRR_TEST1_GALLERY})
    for index, name in enumerate(CIRR_TEST1_GALLERY):
        _write_image(root / "img_raw" / "test1" / f"{name}.png", index)
    _write_json(root / "captions" / "cap.rc2.val.json", CIRR_CAPTIONS)
    _write_json(root / "image_splits" / "split.rc2.val.json",
                {name: f"./dev/{name}.png" for name in CIRR_GALLERY})
    for index, name in enumerate(CIRR_GALLERY):
        _write_image(root / "img_raw" / "dev" / f"{name}.png", index)
    return root


def _check_cirr_files(recall_path, subset_path, queries) -> tuple[dict, dict]:
    """Both files pass the readers; every list: 50 / 3 ids, never the reference, the subset
    list only img_set members."""
    recall = read_cirr_submission(recall_path, queries, "recall")
    subset = read_cirr_submission(subset_path, queries, "recall_subset")
    assert set(recall) == set(subset) == {q.query_id for q in queries}
    for query in queries:
        assert len(recall[query.query_id]) == 50 and len(subset[query.query_id]) == 3
        assert query.reference_id not in recall[query.query_id] + subset[query.query_id]
        assert set(subset[query.query_id]) <= set(query.subset_ids)
    return recall, subset


def test_cirr_test1_submissions_pass_the_readers(cirr_folder, tmp_path):
    queries, gallery, load = load_cirr(cirr_folder, cirr_folder / "img_raw", "test1")
    assert gallery == CIRR_TEST1_GALLERY
    files = cirr_test_submissions(OrderEncoder(CIRR_TEST1_GALLERY, CIRR_TEST1_ORDERS),
                                  queries, gallery, load)
    assert (files["test1_recall"]["metric"], files["test1_recall_subset"]["metric"]) == (
        "recall", "recall_subset")
    recall, subset = _check_cirr_files(
        write_submission(tmp_path / "recall.json", files["test1_recall"]),
        write_submission(tmp_path / "subset.json", files["test1_recall_subset"]), queries)
    assert recall["12063"][:5] == [FILLER[0], "test1-906-0-img1", FILLER[1], "test1-83-1-img1",
                                   "test1-1001-2-img0"]
    assert subset["12063"] == ["test1-906-0-img1", "test1-83-1-img1", "test1-1001-2-img0"]
    assert recall["12064"] == FILLER
    assert subset["12064"] == ["test1-359-0-img1", "test1-147-1-img1", "test1-1001-2-img0"]


def test_cirr_splits_are_told_apart(cirr_folder):
    images = cirr_folder / "img_raw"
    _write_json(cirr_folder / "captions" / "cap.rc2.val.json", CIRR_TEST1)
    with pytest.raises(BenchmarkInputError, match=r"query 12063 \(position 0\) has no ground "
                       "truth: a test split"):
        load_cirr(cirr_folder, images)
    _write_json(cirr_folder / "captions" / "cap.rc2.test1.json", CIRR_CAPTIONS)
    with pytest.raises(BenchmarkInputError, match=r"query 12060 \(position 0\) has a ground "
                       "truth: a val split"):
        load_cirr(cirr_folder, images, "test1")


# --- galleries too small for the servers' lists fail before any model ------------------------


def _query(reference: str, members: tuple[str, ...] = ()) -> CirQuery:
    return CirQuery("1", reference, ("text",), subset_ids=members)


def test_test_gallery_must_fill_every_list():
    names = [f"g{i}" for i in range(50)]
    check_test_gallery("circo", [_query("g0")], names)  # CIRCO keeps the reference: 50 do
    with pytest.raises(BenchmarkInputError, match="a gallery of 49 images cannot fill the top 50"):
        check_test_gallery("circo", [_query("g0")], names[:49])
    members = ("g0", "g1", "g2", "g3")
    check_test_gallery("cirr", [_query("g0", members)], [*names, "g50"])
    with pytest.raises(BenchmarkInputError, match="49 images besides the reference of query 1"):
        check_test_gallery("cirr", [_query("g0", members)], names)
    with pytest.raises(BenchmarkInputError, match="query 1 has 2 img_set members besides its "
                       "reference in the gallery"):
        check_test_gallery("cirr", [_query("g0", members)], [n for n in names if n != "g3"]
                           + ["x", "y"])
    with pytest.raises(BenchmarkInputError, match="fashioniq has no test server"):
        check_test_gallery("fashioniq", [], names)


# --- the real test annotation files --------------------------------------------------------


@requires_shared_data
def test_real_test_annotations_read_as_test_splits():
    circo = read_circo(BENCHMARKS / "circo" / "test.json", ground_truth=False)
    cirr = read_cirr(BENCHMARKS / "cirr" / "cap.rc2.test1.json", ground_truth=False)
    gallery = read_cirr_gallery(BENCHMARKS / "cirr" / "split.rc2.test1.json")
    print(f"CIRCO test: {len(circo)} queries; CIRR test1: {len(cirr)} queries, "
          f"{len(gallery)} images")
    assert (len(circo), len(cirr), len(gallery)) == (800, 4148, 2315)
    assert [q.query_id for q in circo[:3]] == ["0", "1", "2"]
    check_test_gallery("cirr", cirr, gallery)  # every img_set member is in the split file
    assert all(q.reference_id in set(gallery) for q in cirr)
    with pytest.raises(BenchmarkInputError, match="a val split"):
        read_circo(BENCHMARKS / "circo" / "val.json", ground_truth=False)
    with pytest.raises(BenchmarkInputError, match="a test split"):
        read_cirr(BENCHMARKS / "cirr" / "cap.rc2.test1.json", ground_truth=True)


# --- through benchmark_scores ----------------------------------------------------------------


def _materialized(result):
    (materialization,) = result.asset_materializations_for_node("benchmark_scores")
    return {key: getattr(value, "value", value)
            for key, value in materialization.metadata.items()}


def test_benchmark_scores_writes_the_circo_test_file(tmp_path, circo_folder):
    data = BenchmarkData(circo_annotations=str(circo_folder / "annotations" / "val.json"),
                         circo_images=str(circo_folder / "images"),
                         circo_test_annotations=str(circo_folder / "annotations" / "test.json"))
    metadata = _materialized(_score_partition(tmp_path, "circo", data))
    assert metadata["test_queries"] == 3 and "mAP@5" in metadata
    path = metadata["submission_test"]
    assert path.endswith(submission_relpath("circo", "base_encoder", "test"))
    queries = read_circo(circo_folder / "annotations" / "test.json")
    read = read_circo_submission(path, queries)
    assert set(read) == {"0", "1", "2"}
    assert all(len(ranked) == 50 and set(ranked) <= set(CIRCO_GALLERY) for ranked in read.values())


def test_benchmark_scores_writes_the_cirr_test1_files(tmp_path, cirr_folder):
    data = BenchmarkData(cirr_annotations=str(cirr_folder), cirr_images=str(cirr_folder / "img_raw"),
                         cirr_test_annotations=str(cirr_folder))
    metadata = _materialized(_score_partition(tmp_path, "cirr", data))
    assert metadata["test_queries"] == 3 and "R@1" in metadata
    recall, subset = metadata["submission_test1_recall"], metadata["submission_test1_recall_subset"]
    assert subset.endswith(submission_relpath("cirr", "base_encoder", "test1_recall_subset"))
    _check_cirr_files(recall, subset, read_cirr(cirr_folder / "captions" / "cap.rc2.test1.json"))


def test_benchmark_scores_without_the_test_split_says_so(tmp_path, cirr_folder):
    instance = DagsterInstance.ephemeral()
    data = BenchmarkData(cirr_annotations=str(cirr_folder), cirr_images=str(cirr_folder / "img_raw"))
    result = _score_partition(tmp_path, "cirr", data, instance=instance)
    metadata = _materialized(result)
    assert "R@1" in metadata and not any(key.startswith("submission") for key in metadata)
    assert "test_queries" not in metadata
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert ("cirr test-server files not written: set benchmark_data.cirr_test_annotations"
            in messages)
    assert not list((tmp_path / "home").rglob("submission_*.json"))
