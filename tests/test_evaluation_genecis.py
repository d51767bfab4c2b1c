"""GeneCIS: readers on the official object files and small attribute files, the Visual Genome
crop, R@1/2/3 against the official rules (gallery order with copies, target at index 0), the
four-task mean, and ``score genecis``."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import BENCHMARKS, requires_shared_data
from PIL import Image

from megapairs_dagster.evaluation.cli import main
from megapairs_dagster.evaluation.genecis import (
    GENECIS_TASKS,
    GenecisItem,
    GenecisQuery,
    crop_genecis_box,
    genecis_metrics,
    genecis_task_metrics,
    load_genecis_image,
    read_genecis,
)
from megapairs_dagster.evaluation.readers import BenchmarkInputError

GENECIS = BENCHMARKS / "genecis"


def _vg(image_id, box, **extra):
    """A VAW-style attribute-task item (the official files carry more fields than the loader
    reads)."""
    return {"image_id": image_id, "instance_bbox": box, "object_name": "thing", **extra}


def _attribute_file(path, n_queries=3):
    """A small attribute-task file: query i's target is image 100+i; distractors 200.., one of
    them a second box of the target's image."""
    records = []
    for i in range(n_queries):
        records.append({
            "reference": _vg(str(10 + i), [1, 2, 3, 4]),
            "target": _vg(str(100 + i), [5, 6.5, 7, 8]),
            "condition": f"colour {i}",
            "gallery": [_vg(str(200 + j), [0, 0, 9, 9]) for j in range(3)]
            + [_vg(str(100 + i), [50, 60, 7, 8])],
        })
    path.write_text(json.dumps(records))
    return path


def _score(capsys, *argv):
    main(["score", *map(str, argv)])
    return json.loads(capsys.readouterr().out)


# --- readers ------------------------------------------------------------------------------


@requires_shared_data
def test_object_tasks_from_the_official_files():
    focus = read_genecis(GENECIS / "focus_object.json")
    change = read_genecis(GENECIS / "change_object.json")
    assert (len(focus), len(change)) == (1960, 1960)
    first = focus[0]
    assert (first.query_id, first.condition, first.reference.item_id, first.target.item_id) == (
        "0", "cardboard", "189213", "153527")
    assert len(first.distractors) == 14 and first.distractors[0] == GenecisItem("121506")
    assert first.gallery_ids[:3] == ["153527", "121506", "536947"] and len(first.gallery_ids) == 15
    assert first.target.file_name == "000000153527.jpg"
    # change_object query 19 lists its target (175364) among its 14 distractors too: the
    # ranking holds it once, 14 ids in all.
    odd = change[19]
    assert odd.target.item_id == "175364" and odd.distractors[13].item_id == "175364"
    assert len(odd.gallery_ids) == 14 and odd.gallery_ids[0] == "175364"


def test_attribute_items_and_their_ids(tmp_path):
    queries = read_genecis(_attribute_file(tmp_path / "focus_attribute.json"))
    query = queries[1]
    assert query.condition == "colour 1"
    assert query.target == GenecisItem("101", (5, 6.5, 7, 8))
    # The box is written as JSON writes each number: ints stay ints, floats keep their point.
    assert query.target.item_id == "101:5,6.5,7,8"
    assert query.gallery_ids == ["101:5,6.5,7,8", "200:0,0,9,9", "201:0,0,9,9", "202:0,0,9,9",
                                 "101:50,60,7,8"]
    assert query.target.file_name == "101.jpg"
    # An integer image id names the same item as its string.
    assert GenecisItem("2365581", (1.0, 2, 3, 4)).item_id == "2365581:1.0,2,3,4"


@pytest.mark.parametrize("record, message", [
    ({"reference": {"val_image_id": 1}, "target": {"val_image_id": "2"}, "condition": "c",
      "gallery": [{"val_image_id": 3}]}, "val_image_id must be an integer"),
    ({"reference": {"val_image_id": 1}, "target": {"val_image_id": 2}, "condition": "c",
      "gallery": []}, "gallery must be a non-empty list"),
    ({"reference": _vg("1", [1, 2, 3]), "target": _vg("2", [1, 2, 3, 4]), "condition": "c",
      "gallery": [_vg("3", [1, 2, 3, 4])]}, "instance_bbox must be four numbers"),
    ({"target": {"val_image_id": 2}, "condition": "c", "gallery": [{"val_image_id": 3}]},
     "KeyError('reference')"),
])
def test_malformed_annotation_records_name_their_position(tmp_path, record, message):
    good = {"reference": {"val_image_id": 1}, "target": {"val_image_id": 2}, "condition": "c",
            "gallery": [{"val_image_id": 3}]}
    path = tmp_path / "task.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(BenchmarkInputError, match="malformed record at position 1") as error:
        read_genecis(path)
    assert message in str(error.value)


def test_a_file_mixing_coco_ids_and_vg_boxes_is_refused(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{"reference": {"val_image_id": 1}, "condition": "c",
                                 "target": _vg("2", [1, 2, 3, 4]),
                                 "gallery": [{"val_image_id": 3}]}]))
    with pytest.raises(BenchmarkInputError, match="mixes COCO ids"):
        read_genecis(path)


# --- the Visual Genome crop ---------------------------------------------------------------


def _coordinates_image(width=100, height=80, mode="RGB"):
    """Pixel (x, y) holds (x, y, 7), so a crop shows which region it took."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x, y, np.full_like(x, 7)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image.convert("L") if mode == "L" else image


@pytest.mark.parametrize("box, region, paste", [
    # left = 30 - 7 = 23, top = 20 - 7 = 13; right = 23 + 17 = 40 = the box's own right edge:
    # the official dilation grows the box to the left and up only.
    ([30, 20, 10, 10], (23, 13, 40, 30), None),
    # Clipped at 0 on the left and top, the box then reaches 1.7 sizes right and down:
    # (0, 0, 34, 17), padded to 34 x 34 with the crop pasted at y = (34 - 17) // 2 = 8.
    ([2, 5, 20, 10], (0, 0, 34, 17), (0, 8)),
    # PIL rounds the float corners (6.9, 7.1, 15.4, 15.6) -> (7, 7, 15, 16): 8 x 9, pasted at
    # x = (9 - 8) // 2 = 0. Truncation would have given (6, 7, 15, 15).
    ([10.4, 10.6, 5, 5], (7, 7, 15, 16), (0, 0)),
    # Clipped at the image's right and bottom: left 85.2 -> 85, right min(100, 102.2) = 100.
    ([92.9, 70, 11, 4], (85, 67, 100, 74), (0, 4)),
])
def test_crop_follows_the_official_arithmetic(box, region, paste):
    image = _coordinates_image()
    crop = crop_genecis_box(GenecisItem("1", tuple(box)), image)
    left, top, right, bottom = region
    expected = np.asarray(image)[top:bottom, left:right]
    got = np.asarray(crop)
    side = max(right - left, bottom - top)
    assert crop.size == (side, side) and crop.mode == "RGB"
    px, py = paste or (0, 0)
    assert np.array_equal(got[py:py + bottom - top, px:px + right - left], expected)
    padding = np.ones(got.shape[:2], bool)
    padding[py:py + bottom - top, px:px + right - left] = False
    assert not got[padding].any()  # black elsewhere


def test_crop_pads_a_grey_image_with_black_and_keeps_its_mode():
    crop = crop_genecis_box(GenecisItem("1", (2, 5, 20, 10)), _coordinates_image(mode="L"))
    assert crop.mode == "L" and crop.size == (34, 34)
    assert np.asarray(crop)[:8].max() == 0 and np.asarray(crop)[8:25].max() > 0


def test_crop_refuses_a_coco_item():
    with pytest.raises(ValueError, match="not a Visual Genome box"):
        crop_genecis_box(GenecisItem("5"), _coordinates_image())


def test_load_genecis_image_names_files_as_the_official_loaders(tmp_path):
    _coordinates_image(40, 30).save(tmp_path / "000000000042.jpg")
    _coordinates_image(100, 80).save(tmp_path / "2365581.jpg")
    coco = load_genecis_image(tmp_path, GenecisItem("42"))
    assert coco.size == (40, 30) and coco.mode == "RGB"
    crop = load_genecis_image(tmp_path, GenecisItem("2365581", (2, 5, 20, 10)))
    assert crop.size == (34, 34) and crop.mode == "RGB"
    with pytest.raises(BenchmarkInputError, match="7.jpg: image of 7:1,1,1,1 not found"):
        load_genecis_image(tmp_path, GenecisItem("7", (1, 1, 1, 1)))


# --- metrics ------------------------------------------------------------------------------


def _query(query_id, target, distractors):
    return GenecisQuery(query_id, GenecisItem("ref"), "c", GenecisItem(target),
                        tuple(GenecisItem(d) for d in distractors))


def test_recall_by_hand():
    queries = [_query("0", "t0", ["a", "b", "c"]), _query("1", "t1", ["a", "b", "c"]),
               _query("2", "t2", ["a", "b", "c"])]
    rankings = {"0": ["t0", "a", "b", "c"],   # 1st
                "1": ["b", "t1", "a", "c"],   # 2nd
                "2": ["c", "b", "a", "t2"]}   # 4th
    assert genecis_metrics(queries, rankings) == pytest.approx(
        {"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 200 / 3})
    # A ranking may stop early; a target it does not list is a miss.
    rankings["0"] = ["a"]
    assert genecis_metrics(queries, rankings)["R@3"] == pytest.approx(100 / 3)


def test_copies_count_as_the_official_gallery_does():
    # Distractor "a" is listed twice: the official gallery [t, a, a, b] puts both copies of a
    # (equal scores) ahead of t when a is ranked first, so t is 3rd, not 2nd as the id list says.
    twice = _query("0", "t", ["a", "a", "b"])
    assert genecis_metrics([twice], {"0": ["a", "t", "b"]}) == pytest.approx(
        {"R@1": 0.0, "R@2": 0.0, "R@3": 100.0})
    # A distractor that is the target's image ties with the target at index 0, which a stable
    # sort keeps first: ranking the target first is a hit at 1.
    with_copy = _query("0", "t", ["b", "t"])
    assert with_copy.gallery_ids == ["t", "b"]
    assert genecis_metrics([with_copy], {"0": ["t", "b"]})["R@1"] == pytest.approx(100.0)


def _official_recalls(queries, score_of):
    """The official evaluation, re-enacted: score [target] + gallery (copies of an image get
    its score), sort descending (stably: equal scores keep gallery order), hit when index 0 is
    among the first k (eval_functions.validate, metric_utils.get_recall)."""
    hits = {k: 0 for k in (1, 2, 3)}
    for query in queries:
        gallery = [query.target, *query.distractors]
        scores = torch.tensor([score_of[(query.query_id, item.item_id)] for item in gallery])
        order = torch.sort(scores, descending=True, stable=True).indices
        for k in hits:
            hits[k] += int(0 in order[:k].tolist())
    return {f"R@{k}": 100 * hits[k] / len(queries) for k in hits}


def _rankings_and_scores(queries, seed):
    rng = random.Random(seed)
    score_of, rankings = {}, {}
    for query in queries:
        for image_id in query.gallery_ids:
            score_of[(query.query_id, image_id)] = rng.choice([0.1, 0.2, 0.3, 0.4, 0.5])
        # Ranked by score, equal scores in gallery order, as the stable sort above.
        rankings[query.query_id] = sorted(
            query.gallery_ids, key=lambda image_id: -score_of[(query.query_id, image_id)])
    return rankings, score_of


@requires_shared_data
def test_metrics_equal_the_official_evaluation_on_the_real_files():
    for task in ("focus_object", "change_object"):
        queries = read_genecis(GENECIS / f"{task}.json")
        rankings, score_of = _rankings_and_scores(queries, seed=len(task))
        assert genecis_metrics(queries, rankings) == pytest.approx(
            _official_recalls(queries, score_of))


def test_metrics_equal_the_official_evaluation_with_repeated_distractors():
    rng = random.Random(3)
    queries = [_query(str(i), f"t{i}", rng.choices(["a", "b", "c", "d", f"t{i}"], k=6))
               for i in range(300)]
    rankings, score_of = _rankings_and_scores(queries, seed=4)
    official = _official_recalls(queries, score_of)
    assert genecis_metrics(queries, rankings) == pytest.approx(official)
    # A naive scorer (the target's position in the id list) would differ on these files.
    naive = {k: 100 * sum(q.target.item_id in rankings[q.query_id][:k] for q in queries) / 300
             for k in (1, 2, 3)}
    assert naive[3] > official["R@3"]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("1"), "no predictions for 1 queries, e.g. query 1"),
    (lambda r: r.update({"7": ["t0"]}), "predictions for unknown queries ['7']"),
    (lambda r: r.update({"2": ["t2", "zz"]}), "query 2: ['zz'] not in this query's gallery"),
    (lambda r: r.update({"0": ["t1"]}), "query 0: ['t1'] not in this query's gallery"),
    (lambda r: r.update({"1": ["a", "t1", "a"]}), "query 1: the ranking lists ['a'] more than once"),
    (lambda r: r.update({"2": "t2"}), "query 2: expected a list of image ids"),
    (lambda r: r.update({"2": [2]}), "query 2: expected a list of image ids"),
])
def test_bad_predictions_name_the_query(change, message):
    queries = [_query(str(i), f"t{i}", ["a", "b"]) for i in range(3)]
    rankings = {q.query_id: q.gallery_ids for q in queries}
    change(rankings)
    with pytest.raises(BenchmarkInputError) as error:
        genecis_metrics(queries, rankings)
    assert message in str(error.value)


def test_task_means_need_all_four_tasks():
    queries = {task: [_query("0", "t", ["a"]), _query("1", "t", ["a"])] for task in GENECIS_TASKS}
    hits = {"focus_attribute": 2, "change_attribute": 1, "focus_object": 0, "change_object": 1}
    rankings = {task: {str(i): ["t", "a"] if i < n else ["a", "t"] for i in range(2)}
                for task, n in hits.items()}
    scores = genecis_task_metrics(queries, rankings)
    assert scores["focus_attribute/R@1"] == pytest.approx(100.0)
    assert scores["focus_object/R@1"] == pytest.approx(0.0)
    assert scores["avg/R@1"] == pytest.approx((100 + 50 + 0 + 50) / 4)
    assert scores["avg/R@2"] == pytest.approx(100.0)
    two = genecis_task_metrics({t: queries[t] for t in ("focus_object", "change_object")},
                               {t: rankings[t] for t in ("focus_object", "change_object")})
    assert set(two) == {f"{t}/R@{k}" for t in ("focus_object", "change_object") for k in (1, 2, 3)}


# --- the score command --------------------------------------------------------------------


@requires_shared_data
def test_score_genecis_one_task_file(tmp_path, capsys):
    queries = read_genecis(GENECIS / "change_object.json")
    # Even positions rank the target first, odd ones third: R@1 = R@2 = 980/1960, R@3 = 100.
    rankings = {q.query_id: (q.gallery_ids if int(q.query_id) % 2 == 0
                             else q.gallery_ids[1:3] + q.gallery_ids[:1]) for q in queries}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rankings))
    scores = _score(capsys, "genecis", "--annotations", GENECIS / "change_object.json",
                    "--predictions", path)
    assert scores == pytest.approx({"R@1": 50.0, "R@2": 50.0, "R@3": 100.0})


@requires_shared_data
def test_score_genecis_folder_of_all_four_tasks(tmp_path, capsys):
    folder = tmp_path / "genecis"
    folder.mkdir()
    for task in ("focus_object", "change_object"):
        (folder / f"{task}.json").write_text((GENECIS / f"{task}.json").read_text())
    for task in ("focus_attribute", "change_attribute"):
        _attribute_file(folder / f"{task}.json", n_queries=4)
    predictions = {}
    for task in GENECIS_TASKS:
        queries = read_genecis(folder / f"{task}.json")
        miss = task == "focus_attribute"  # ranks its target last
        predictions[task] = {q.query_id: q.gallery_ids[1:] + q.gallery_ids[:1] if miss
                             else q.gallery_ids for q in queries}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(predictions))
    scores = _score(capsys, "genecis", "--annotations", tmp_path, "--predictions", path)
    assert scores["focus_attribute/R@3"] == 0.0 and scores["change_object/R@1"] == 100.0
    assert scores["avg/R@1"] == pytest.approx(75.0)
    # Two tasks only, from the shared folder: per task scores, no four-task mean.
    path.write_text(json.dumps({t: predictions[t] for t in ("focus_object", "change_object")}))
    scores = _score(capsys, "genecis", "--annotations", GENECIS, "--predictions", path)
    assert "avg/R@1" not in scores and scores["focus_object/R@2"] == 100.0


@pytest.mark.parametrize("annotations, predictions, message", [
    ("task", {"0": ["2", "nope"], "1": ["2"]}, "query 0: ['nope'] not in this query's gallery"),
    ("task", {}, "no predictions for 2 queries, e.g. query 0, 1"),
    ("folder", {"focus_attribute": {}}, "no file focus_attribute.json here or in genecis/"),
    ("folder", {"focus_objects": {}}, "unknown GeneCIS task 'focus_objects'"),
    ("folder", {}, "expected task -> (query position -> ranking)"),
])
def test_score_genecis_errors_exit_with_a_message(tmp_path, annotations, predictions, message):
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps([
        {"reference": {"val_image_id": 1}, "target": {"val_image_id": 2}, "condition": "c",
         "gallery": [{"val_image_id": 3}]}] * 2))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(predictions))
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "genecis", "--annotations",
              str(task_file if annotations == "task" else tmp_path), "--predictions", str(path)])
    assert "score genecis: error:" in str(exit_info.value.code)
    assert message in str(exit_info.value.code)
