"""Benchmark readers and MegaPairs query texts on the real annotation files."""

import json
from pathlib import Path

import pytest
from conftest import BENCHMARKS, SHARED_DATA, requires_shared_data

from megapairs_dagster.evaluation.query_text import circo_query_text, fashioniq_query_text
from megapairs_dagster.evaluation.readers import (
    FASHIONIQ_CATEGORIES,
    BenchmarkInputError,
    CirQuery,
    read_circo,
    read_circo_gallery,
    read_cirr,
    read_cirr_gallery,
    read_fashioniq,
    read_fashioniq_gallery,
)

DATA = SHARED_DATA
pytestmark = requires_shared_data


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_circo_val_and_test():
    val = read_circo(BENCHMARKS / "circo" / "val.json")
    test = read_circo(BENCHMARKS / "circo" / "test.json")
    assert (len(val), len(test)) == (220, 800)
    assert val[0] == CirQuery(
        query_id="0", reference_id="271520",
        text_parts=("a girl with a traditional Chinese umbrella",
                    "shows two people and has a more colorful background"),
        target_id="355099", ground_truth_ids=("355099", "528417", "534704"))
    assert all(q.target_id is None and q.ground_truth_ids == () for q in test)
    assert test[0].reference_id == "281438"


def test_cirr_val_and_test1_with_galleries():
    val = read_cirr(BENCHMARKS / "cirr" / "cap.rc2.val.json")
    test1 = read_cirr(BENCHMARKS / "cirr" / "cap.rc2.test1.json")
    assert (len(val), len(test1)) == (4181, 4148)
    first = val[0]
    assert (first.query_id, first.reference_id, first.target_id) == (
        "12060", "dev-244-0-img0", "dev-1028-1-img1")
    assert first.text_parts == ("show three bottles of soft drink",)
    assert first.subset_ids == ("dev-430-3-img0", "dev-63-0-img1", "dev-1028-1-img1",
                                "dev-1028-2-img1", "dev-244-0-img0", "dev-1028-2-img0")
    assert test1[0].target_id is None and len(test1[0].subset_ids) == 6
    val_gallery = read_cirr_gallery(BENCHMARKS / "cirr" / "split.rc2.val.json")
    assert len(val_gallery) == 2297 and val_gallery[0] == "dev-244-0-img0"
    assert len(read_cirr_gallery(BENCHMARKS / "cirr" / "split.rc2.test1.json")) == 2315
    gallery = set(val_gallery)
    assert all(q.reference_id in gallery and q.target_id in gallery for q in val)


@pytest.mark.parametrize("category, queries, gallery", [
    ("dress", 2017, 3817), ("shirt", 2038, 6346), ("toptee", 1961, 5373)])
def test_fashioniq_val_per_category(category, queries, gallery):
    read = read_fashioniq(BENCHMARKS / "fashioniq" / f"cap.{category}.val.json")
    ids = read_fashioniq_gallery(BENCHMARKS / "fashioniq" / f"split.{category}.val.json")
    assert (len(read), len(ids)) == (queries, gallery)
    assert [q.query_id for q in read[:3]] == ["0", "1", "2"]
    assert all(q.ground_truth_ids == (q.target_id,) and len(q.text_parts) == 2 for q in read)


def test_fashioniq_first_dress_query():
    first = read_fashioniq(BENCHMARKS / "fashioniq" / "cap.dress.val.json")[0]
    assert (first.reference_id, first.target_id) == ("B005X4PL1G", "B0084Y8XIU")
    assert first.text_parts == ("is shiny and silver with shorter sleeves", "fit and flare")


def test_circo_query_text_reproduces_every_megapairs_line():
    expected = _jsonl(BENCHMARKS / "megapairs_eval" / "circo_query.jsonl")
    queries = read_circo(BENCHMARKS / "circo" / "test.json")
    assert len(expected) == len(queries) == 800
    for query, line in zip(queries, expected):
        assert str(line["id"]) == query.query_id
        assert line["q_img"] == f"{int(query.reference_id):012d}.jpg"
        assert circo_query_text(query) == line["q_text"]


@pytest.mark.parametrize("category", FASHIONIQ_CATEGORIES)
def test_fashioniq_query_text_reproduces_every_megapairs_line(category):
    expected = _jsonl(BENCHMARKS / "megapairs_eval" / f"fashioniq_{category}_query_val.jsonl")
    queries = read_fashioniq(BENCHMARKS / "fashioniq" / f"cap.{category}.val.json")
    assert len(expected) == len(queries)
    for query, line in zip(queries, expected):
        assert (line["q_img"], line["positive_key"]) == (
            f"./images/{query.reference_id}.png", query.target_id)
        assert fashioniq_query_text(query) == line["q_text"]


def test_query_texts_keep_captions_verbatim():
    circo = CirQuery("7", "1", ("two cats", "Is Darker."), "2", ("2",))
    assert circo_query_text(circo) == "Find a picture that also two cats, but Is Darker.."
    fashion = CirQuery("0", "A", ("Is red.", "has sleeves"), "B", ("B",))
    assert fashioniq_query_text(fashion) == "Is red., and has sleeves"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(BenchmarkInputError, match="nope.json: file not found"):
        read_circo(tmp_path / "nope.json")


def test_invalid_json_is_named(tmp_path):
    path = tmp_path / "val.json"
    path.write_text("[{")
    with pytest.raises(BenchmarkInputError, match="not valid JSON"):
        read_circo(path)


@pytest.mark.parametrize("reader, records, position", [
    (read_circo, [{"id": 0, "reference_img_id": 1, "relative_caption": "x"}], 0),
    (read_cirr, [{"pairid": 1, "reference": "a", "caption": "c", "img_set": {"members": []}},
                 {"pairid": 2, "reference": "a", "caption": "c"}], 1),
    (read_fashioniq, [{"candidate": "a", "target": "b", "captions": ["only one"]}], 0),
    (read_fashioniq, ["not a record"], 0),
])
def test_malformed_record_names_its_position(tmp_path, reader, records, position):
    path = tmp_path / "cap.json"
    path.write_text(json.dumps(records))
    with pytest.raises(BenchmarkInputError, match=f"malformed record at position {position}"):
        reader(path)


def test_not_a_list_and_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"id": 0}))
    with pytest.raises(BenchmarkInputError, match="expected a JSON list"):
        read_circo(path)
    record = {"id": 3, "reference_img_id": 1, "relative_caption": "r", "shared_concept": "s"}
    path.write_text(json.dumps([record, record]))
    with pytest.raises(BenchmarkInputError, match="duplicate query ids"):
        read_circo(path)


def test_circo_gallery_from_coco_image_info(tmp_path):
    path = tmp_path / "image_info_unlabeled2017.json"
    path.write_text(json.dumps({"images": [{"id": 42, "file_name": "000000000042.jpg"},
                                           {"id": 7, "file_name": "000000000007.jpg"}]}))
    assert read_circo_gallery(path) == ["42", "7"]
    path.write_text(json.dumps({"images": [{"file_name": "x.jpg"}]}))
    with pytest.raises(BenchmarkInputError, match="expected"):
        read_circo_gallery(path)


def test_galleries_refuse_wrong_shapes(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(["a", "b"]))
    with pytest.raises(BenchmarkInputError, match="image name -> path"):
        read_cirr_gallery(path)
    path.write_text(json.dumps({"a": "./a.png"}))
    with pytest.raises(BenchmarkInputError, match="list of image ids"):
        read_fashioniq_gallery(path)
