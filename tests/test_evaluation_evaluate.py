"""Scoring on tiny CIRR and FashionIQ folders in the official layouts, with an encoder whose
similarities are chosen by hand, so every metric is known; and the asset's skip and error paths.

The records are the first queries of the real ``cap.rc2.val.json`` and ``cap.<category>.val.json``
and the galleries entries of the real split files, in file order; the images are solid colours
that the fake encoder reads back to know which image it was given.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import small_demo_resources
from dagster import AssetKey, DagsterInstance, MultiPartitionKey, materialize
from PIL import Image

from megapairs_dagster.definitions import build_definitions
from megapairs_dagster.evaluation import evaluate
from megapairs_dagster.evaluation.datasets import load_cirr, load_fashioniq
from megapairs_dagster.evaluation.evaluate import (
    evaluate_circo_format,
    evaluate_cirr,
    evaluate_fashioniq,
)
from megapairs_dagster.evaluation.readers import BenchmarkInputError, CirQuery
from megapairs_dagster.resources.profiles import load_deployment
from megapairs_dagster.resources.settings import BenchmarkData

# --- a test double for the model ----------------------------------------------------------


def _colour(index: int) -> int:
    return 8 * index + 4  # steps of 8 survive JPEG's rounding of a solid colour


class HandChosenEncoder:
    """Image ``i`` of ``names`` embeds as the i-th unit vector; a composed query (reference,
    text) as a normalised vector whose entries fall along ``orders[(reference, text)]``, then
    along ``names`` for the images it does not list. Its similarity to a gallery image is that
    entry, so the ranking is the order chosen by hand."""

    def __init__(self, names: list[str], orders: dict[tuple[str, str], list[str]]):
        self.names, self.orders = names, orders

    def name_of(self, image: Image.Image) -> str:
        return self.names[round((image.getpixel((0, 0))[0] - 4) / 8)]

    def encode(self, images=None, text=None) -> torch.Tensor:
        names = [self.name_of(image) for image in images]
        if text is None:
            return torch.eye(len(self.names))[[self.names.index(name) for name in names]]
        rows = []
        for name, query_text in zip(names, text):
            listed = self.orders[(name, query_text)]  # KeyError: wrong reference or text
            order = listed + [other for other in self.names if other not in listed]
            row = torch.zeros(len(self.names))
            row[[self.names.index(other) for other in order]] = torch.arange(len(order), 0, -1.0)
            rows.append(row / row.norm())
        return torch.stack(rows)


def _write_image(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (_colour(index),) * 3).save(path)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))


# --- CIRCO format -------------------------------------------------------------------------


CIRCO_NAMES = ["1", "2", "3", "4", "5", "6"]
CIRCO_QUERIES = [CirQuery("0", "1", ("two cats", "is darker"), "2", ("2", "3")),
                 CirQuery("1", "4", ("a dog", "runs"), "5", ("5",))]
CIRCO_ORDERS = {
    # The reference stays in the gallery: ground truths at 2 and 4, AP@5 (1/2 + 2/4) / 2.
    ("1", "Find a picture that also two cats, but is darker."): ["1", "2", "6", "3"],
    ("4", "Find a picture that also a dog, but runs."): ["5"],
}


def circo_images() -> dict[str, Image.Image]:
    return {name: Image.new("RGB", (8, 8), (_colour(i),) * 3) for i, name in enumerate(CIRCO_NAMES)}


def test_circo_format_by_hand_overall_and_per_group():
    model = HandChosenEncoder(CIRCO_NAMES, CIRCO_ORDERS)
    metrics = evaluate_circo_format(model, CIRCO_QUERIES, CIRCO_NAMES, circo_images().__getitem__,
                                    groups={"0": "colour", "1": "shape"})
    assert {group: values["mAP@5"] for group, values in metrics.items()} == pytest.approx(
        {"all": 75.0, "colour": 50.0, "shape": 100.0})
    assert metrics["all"]["R@5"] == pytest.approx(100.0)


# --- CIRR ---------------------------------------------------------------------------------

SET_36 = ["dev-430-3-img0", "dev-63-0-img1", "dev-1028-1-img1", "dev-1028-2-img1",
          "dev-244-0-img0", "dev-1028-2-img0"]
SET_48 = ["dev-998-1-img0", "dev-940-3-img0", "dev-1042-2-img1", "dev-1044-1-img1",
          "dev-1004-2-img0", "dev-1042-0-img0"]
CIRR_CAPTIONS = [  # the first four records of cap.rc2.val.json
    {"pairid": 12060, "reference": "dev-244-0-img0", "target_hard": "dev-1028-1-img1",
     "target_soft": {"dev-1028-1-img1": 1.0}, "caption": "show three bottles of soft drink",
     "img_set": {"id": 36, "members": SET_36, "reference_rank": 2, "target_rank": 3}},
    {"pairid": 12062, "reference": "dev-63-0-img1", "target_hard": "dev-430-3-img0",
     "target_soft": {"dev-430-3-img0": 1.0, "dev-1028-1-img1": -1.0},
     "caption": "Fewer paper towels per pack",
     "img_set": {"id": 36, "members": SET_36, "reference_rank": 4, "target_rank": 5}},
    {"pairid": 12081, "reference": "dev-1042-0-img0", "target_hard": "dev-1044-1-img1",
     "target_soft": {"dev-1044-1-img1": 1.0},
     "caption": "Two animals that are of a different species from the first one, and no "
                "human appearing",
     "img_set": {"id": 48, "members": SET_48, "reference_rank": 0, "target_rank": 1}},
    {"pairid": 12082, "reference": "dev-1044-1-img1", "target_hard": "dev-1042-2-img1",
     "target_soft": {"dev-1042-2-img1": 1.0},
     "caption": "Human and one animal from a different species from the last two",
     "img_set": {"id": 48, "members": SET_48, "reference_rank": 1, "target_rank": 2}},
]
# The first 14 names of split.rc2.val.json: both image sets and two other images.
CIRR_GALLERY = ["dev-244-0-img0", "dev-1028-1-img1", "dev-430-3-img0", "dev-63-0-img1",
                "dev-1028-2-img1", "dev-1028-2-img0", "dev-1042-0-img0", "dev-1044-1-img1",
                "dev-998-1-img0", "dev-940-3-img0", "dev-1042-2-img1", "dev-1004-2-img0",
                "dev-150-2-img1", "dev-138-3-img1"]
CIRR_ORDERS = {
    # The reference comes first and the target second: removing the reference makes it R@1.
    ("dev-244-0-img0", "show three bottles of soft drink"):
        ["dev-244-0-img0", "dev-1028-1-img1"],
    # Seven images outside the set rank above the target, so R@5 misses it; within the
    # set it comes first, so R_subset@1 finds it.
    ("dev-63-0-img1", "Fewer paper towels per pack"):
        [*SET_48, "dev-150-2-img1", "dev-430-3-img0"],
    # Behind one member of its set: R@5 and R_subset@2, not R@1 or R_subset@1.
    ("dev-1042-0-img0", CIRR_CAPTIONS[2]["caption"]): ["dev-998-1-img0", "dev-1044-1-img1"],
    # Last of all: only R@50.
    ("dev-1044-1-img1", CIRR_CAPTIONS[3]["caption"]):
        [name for name in CIRR_GALLERY if name != "dev-1042-2-img1"] + ["dev-1042-2-img1"],
}


@pytest.fixture
def cirr_folder(tmp_path):
    """CIRR's layout: captions/ and image_splits/ beside img_raw/dev/<name>.png."""
    root = tmp_path / "cirr"
    _write_json(root / "captions" / "cap.rc2.val.json", CIRR_CAPTIONS)
    _write_json(root / "image_splits" / "split.rc2.val.json",
                {name: f"./dev/{name}.png" for name in CIRR_GALLERY})
    for index, name in enumerate(CIRR_GALLERY):
        _write_image(root / "img_raw" / "dev" / f"{name}.png", index)
    return root


def test_cirr_by_hand(cirr_folder, monkeypatch):
    monkeypatch.setattr(evaluate, "ENCODE_CHUNK", 3)  # several chunks, the last one short
    queries, gallery, load = load_cirr(cirr_folder, cirr_folder / "img_raw")
    assert gallery == CIRR_GALLERY and [q.query_id for q in queries] == [
        "12060", "12062", "12081", "12082"]
    metrics = evaluate_cirr(HandChosenEncoder(CIRR_GALLERY, CIRR_ORDERS), queries, gallery, load)
    # Target rank without the reference, overall / within its set: 1/1, 8/1, 2/2, 13/5.
    assert metrics == {"all": pytest.approx({
        "R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "R@50": 100.0,
        "R_subset@1": 50.0, "R_subset@2": 75.0, "R_subset@3": 75.0})}


def test_cirr_missing_image_is_named(cirr_folder):
    (cirr_folder / "img_raw" / "dev" / "dev-150-2-img1.png").unlink()
    with pytest.raises(BenchmarkInputError, match=r"img_raw \(paths from .*split.rc2.val.json\): "
                       r"1 images referenced by the annotations are missing, "
                       r"e.g. \['dev-150-2-img1'\]"):
        load_cirr(cirr_folder, cirr_folder / "img_raw")


def test_cirr_reference_outside_the_split_file_is_refused(cirr_folder):
    _write_json(cirr_folder / "image_splits" / "split.rc2.val.json",
                {name: f"./dev/{name}.png" for name in CIRR_GALLERY if name != "dev-63-0-img1"})
    with pytest.raises(BenchmarkInputError, match=r"e.g. \['dev-63-0-img1'\]"):
        load_cirr(cirr_folder, cirr_folder / "img_raw")


def test_cirr_missing_folders_and_files_are_named(cirr_folder, tmp_path):
    with pytest.raises(BenchmarkInputError, match="nowhere: folder not found"):
        load_cirr(tmp_path / "nowhere", cirr_folder / "img_raw")
    with pytest.raises(BenchmarkInputError, match="no_images: folder not found"):
        load_cirr(cirr_folder, tmp_path / "no_images")
    (cirr_folder / "image_splits" / "split.rc2.val.json").unlink()
    with pytest.raises(BenchmarkInputError, match="no file split.rc2.val.json here or in"):
        load_cirr(cirr_folder, cirr_folder / "img_raw")


# --- FashionIQ ----------------------------------------------------------------------------

FASHIONIQ_CAPTIONS = {  # the first two records of each cap.<category>.val.json
    "dress": [
        {"target": "B0084Y8XIU", "candidate": "B005X4PL1G",
         "captions": ["is shiny and silver with shorter sleeves", "fit and flare"]},
        {"target": "B00AKLK08G", "candidate": "B008XODTD0",
         "captions": ["is grey with black design", "is a light printed short dress"]},
    ],
    "shirt": [
        {"target": "B005AD7WZI", "candidate": "B00CZ7QJUG",
         "captions": ["is solid white", "is a lighter color"]},
        {"target": "B00BPD4N5E", "candidate": "B0083I6W08",
         "captions": ["is green with a four leaf clover", "is green and has no text"]},
    ],
    "toptee": [
        {"target": "B008CG1JJ0", "candidate": "B008CFZW76",
         "captions": ["is the same", "appears to be exactly the same"]},
        {"target": "B001AS562I", "candidate": "B0088WRQVS",
         "captions": ["i taank top", "has spaghetti straps"]},
    ],
}
# Entries of each split.<category>.val.json, in file order: the first 12 (dress) or 4, and the
# queries' images further down.
FASHIONIQ_GALLERIES = {
    "dress": ["B009PMCJLW", "B0084Y8XIU", "B007HNF4QI", "B00AKLK08G", "B00CMPE0C0",
              "B004UO3XYC", "B007U6KROG", "B004KHOPDW", "B0083E6W7U", "B007L3WP5W",
              "B0091PLEKA", "B004P7TNIY", "B005X4PL1G", "B008XODTD0"],
    "shirt": ["B000KENMD8", "B005AD7WZI", "B0013EO152", "B00DI9YY8O", "B00BPD4N5E",
              "B00CZ7QJUG", "B0083I6W08"],
    "toptee": ["B008CG1JJ0", "B001AS562I", "B00D2EVETW", "B009P4JF1W", "B008CFZW76",
               "B0088WRQVS"],
}
FASHIONIQ_NAMES = [asin for gallery in FASHIONIQ_GALLERIES.values() for asin in gallery]
DRESS = FASHIONIQ_GALLERIES["dress"]
FASHIONIQ_ORDERS = {
    # The reference kept at 1, ten images before the target: R@50 finds it, R@10 does not.
    ("B005X4PL1G", "is shiny and silver with shorter sleeves, and fit and flare"):
        ["B005X4PL1G", *[a for a in DRESS if a not in ("B005X4PL1G", "B0084Y8XIU")][:9],
         "B0084Y8XIU"],
    ("B008XODTD0", "is grey with black design, and is a light printed short dress"):
        ["B00AKLK08G"],
    ("B00CZ7QJUG", "is solid white, and is a lighter color"): ["B005AD7WZI"],
    ("B0083I6W08", "is green with a four leaf clover, and is green and has no text"):
        ["B0083I6W08", "B00BPD4N5E"],
    ("B008CFZW76", "is the same, and appears to be exactly the same"): ["B008CG1JJ0"],
    ("B0088WRQVS", "i taank top, and has spaghetti straps"): ["B0088WRQVS", "B001AS562I"],
}


@pytest.fixture
def fashioniq_folder(tmp_path):
    """FashionIQ's layout: captions/, image_splits/ and images/<asin>.png (toptee as .jpg)."""
    root = tmp_path / "fashioniq"
    for category, records in FASHIONIQ_CAPTIONS.items():
        _write_json(root / "captions" / f"cap.{category}.val.json", records)
        _write_json(root / "image_splits" / f"split.{category}.val.json",
                    FASHIONIQ_GALLERIES[category])
        suffix = ".jpg" if category == "toptee" else ".png"
        for asin in FASHIONIQ_GALLERIES[category]:
            _write_image(root / "images" / f"{asin}{suffix}", FASHIONIQ_NAMES.index(asin))
    return root


def test_fashioniq_by_hand(fashioniq_folder):
    queries, galleries, load = load_fashioniq(fashioniq_folder, fashioniq_folder / "images")
    assert galleries == FASHIONIQ_GALLERIES
    model = HandChosenEncoder(FASHIONIQ_NAMES, FASHIONIQ_ORDERS)
    metrics = evaluate_fashioniq(model, queries, galleries, load)
    # dress: target 11th behind its reference, then 1st; shirt and toptee: 1st or 2nd.
    assert metrics == {
        "all": pytest.approx({"R@10": 250 / 3, "R@50": 100.0, "avg": (250 / 3 + 100) / 2}),
        "dress": pytest.approx({"R@10": 50.0, "R@50": 100.0}),
        "shirt": pytest.approx({"R@10": 100.0, "R@50": 100.0}),
        "toptee": pytest.approx({"R@10": 100.0, "R@50": 100.0}),
    }


def test_fashioniq_missing_image_is_named(fashioniq_folder):
    (fashioniq_folder / "images" / "B0083I6W08.png").unlink()
    with pytest.raises(BenchmarkInputError, match=r"images \(<asin>.png or .jpg\): 1 images "
                       r"referenced by the annotations are missing, e.g. \['B0083I6W08'\]"):
        load_fashioniq(fashioniq_folder, fashioniq_folder / "images")


def test_fashioniq_needs_every_category(fashioniq_folder):
    (fashioniq_folder / "captions" / "cap.shirt.val.json").unlink()
    with pytest.raises(BenchmarkInputError, match="no file cap.shirt.val.json"):
        load_fashioniq(fashioniq_folder, fashioniq_folder / "images")


# --- the asset ----------------------------------------------------------------------------


# The paper code location has every real benchmark as a partition, configured or not (the demo
# has a real one only once its data is set); its assets run here on the small demo resources.
PAPER_ASSETS = list(build_definitions(load_deployment("paper")).assets)


def _score_partition(tmp_path, benchmark: str, data: BenchmarkData, **kwargs):
    """Score the base encoder's (never loaded) record with the shipped asset."""
    resources = small_demo_resources(tmp_path / "home")
    resources["benchmark_data"] = data
    record = {"checkpoint": None,
              "start": {"model_name": "megapairs-demo-clip", "pretrained": None, "stored": False}}
    resources["store"].client().write_bytes("mmret_clip/base_encoder.json",
                                            json.dumps(record).encode())
    return materialize(PAPER_ASSETS, selection=["benchmark_scores"], resources=resources,
                       **kwargs,
                       partition_key=MultiPartitionKey({"benchmark": benchmark,
                                                        "model": "base_encoder"}))


@pytest.mark.parametrize("benchmark, data, settings", [
    ("cirr", BenchmarkData(), "benchmark_data.cirr_annotations and benchmark_data.cirr_images"),
    ("fashioniq", BenchmarkData(fashioniq_annotations="/fiq"), "benchmark_data.fashioniq_images"),
    ("circo", BenchmarkData(cirr_annotations="/c", cirr_images="/i"),
     "benchmark_data.circo_annotations and benchmark_data.circo_images"),
])
def test_unconfigured_benchmark_is_skipped_naming_its_settings(tmp_path, benchmark, data,
                                                               settings):
    instance = DagsterInstance.ephemeral()
    result = _score_partition(tmp_path, benchmark, data, instance=instance)
    assert result.success
    # nothing is recorded as a score: the partition stays missing, the log says why
    assert not result.asset_materializations_for_node("benchmark_scores")
    assert not instance.get_materialized_partitions(AssetKey("benchmark_scores"))
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert f"{benchmark} not scored: set {settings}" in messages


def test_configured_benchmark_is_checked_before_any_model_loads(tmp_path):
    """No base_encoders were materialised: the failure is the benchmark's missing folder."""
    data = BenchmarkData(cirr_annotations=str(tmp_path / "cirr"), cirr_images=str(tmp_path))
    result = _score_partition(tmp_path, "cirr", data, raise_on_error=False)
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert f"{tmp_path / 'cirr'}: folder not found" in str(failure.step_failure_data.error)
