"""Submission files (round trip, validation) and the ``score`` command end to end."""

import json
import subprocess
import sys

import pytest
from conftest import BENCHMARKS, SHARED_DATA, requires_shared_data

from megapairs_dagster.evaluation.cli import main
from megapairs_dagster.evaluation.readers import (
    FASHIONIQ_CATEGORIES,
    BenchmarkInputError,
    read_circo,
    read_cirr,
    read_fashioniq,
)
from megapairs_dagster.evaluation.submission import (
    build_circo_submission,
    build_cirr_submissions,
    read_circo_submission,
    read_cirr_submission,
    validate_circo_submission,
    validate_cirr_submission,
    write_submission,
)

DATA = SHARED_DATA
pytestmark = requires_shared_data
CIRCO_FILLER = [str(10**9 + i) for i in range(60)]  # no COCO id is this large


def _circo_rankings(queries, perfect=lambda position: True):
    return {q.query_id: (list(q.ground_truth_ids) if perfect(position) else []) + CIRCO_FILLER
            for position, q in enumerate(queries)}


def _cirr_rankings(queries, perfect=lambda position: True):
    """Target first (or absent), then the other members, the reference, and filler."""
    rankings = {}
    for position, q in enumerate(queries):
        others = [m for m in q.subset_ids if m not in (q.target_id, q.reference_id)]
        head = [q.target_id] if perfect(position) else []
        rankings[q.query_id] = head + others + [q.reference_id] + [f"x{i}" for i in range(50)]
    return rankings


def _score(capsys, *argv):
    main(["score", *map(str, argv)])
    return json.loads(capsys.readouterr().out)


# --- submission files -------------------------------------------------------------------


def test_circo_submission_round_trip(tmp_path):
    queries = read_circo(BENCHMARKS / "circo" / "test.json")
    rankings = {q.query_id: [str(1000 + int(q.query_id) + i) for i in range(70)] for q in queries}
    submission = build_circo_submission(rankings, queries)
    assert len(submission) == 800 and submission["3"][:2] == [1003, 1004]
    path = write_submission(tmp_path / "circo_test.json", submission)
    assert read_circo_submission(path, queries) == {k: v[:50] for k, v in rankings.items()}


def test_circo_repository_example_is_valid():
    queries = read_circo(BENCHMARKS / "circo" / "val.json")
    example = json.loads((BENCHMARKS / "circo" / "submission_val_example.json").read_text())
    validate_circo_submission(example, queries)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("5"), r"1 queries missing \(e.g. \['5'\]\)"),
    (lambda s: s.update({"999": s["0"]}), r"1 unknown keys \(e.g. \['999'\]\)"),
    (lambda s: s["0"].pop(), "query 0 has 49 ids, expected exactly 50"),
    (lambda s: s["1"].__setitem__(3, s["1"][0]), "query 1 has duplicate ids"),
    (lambda s: s["2"].__setitem__(0, "12"), "query 2 has ids that are not int"),
    (lambda s: s.__setitem__("3", 12), "query 3 maps to int, not a list"),
])
def test_circo_submission_errors(change, message):
    queries = read_circo(BENCHMARKS / "circo" / "val.json")
    submission = {q.query_id: list(range(50)) for q in queries}
    change(submission)
    with pytest.raises(BenchmarkInputError, match=message):
        validate_circo_submission(submission, queries)


def test_cirr_submissions_round_trip(tmp_path):
    queries = read_cirr(BENCHMARKS / "cirr" / "cap.rc2.test1.json")
    rankings = {q.query_id: [q.reference_id] + [f"g{i}" for i in range(10)]
                + [m for m in q.subset_ids if m != q.reference_id] + [f"h{i}" for i in range(40)]
                for q in queries}
    recall, subset = build_cirr_submissions(rankings, queries)
    first = queries[0]  # pairid 12063, reference test1-147-1-img1
    assert (recall["version"], recall["metric"], subset["metric"]) == ("rc2", "recall",
                                                                       "recall_subset")
    assert recall["12063"][:11] == [f"g{i}" for i in range(10)] + ["test1-1001-2-img0"]
    assert first.reference_id not in recall["12063"] and len(recall["12063"]) == 50
    assert subset["12063"] == ["test1-1001-2-img0", "test1-83-1-img1", "test1-359-0-img1"]
    recall_path = write_submission(tmp_path / "recall.json", recall)
    subset_path = write_submission(tmp_path / "subset.json", subset)
    assert read_cirr_submission(recall_path, queries, "recall")["12063"] == recall["12063"]
    assert read_cirr_submission(subset_path, queries, "recall_subset")["12064"] == subset["12064"]


@pytest.mark.parametrize("metric, change, message", [
    ("recall", lambda s: s.update(version="rc1"), "'version' must be 'rc2'"),
    ("recall", lambda s: s.update(metric="recall_subset"), "'metric' must be 'recall'"),
    ("recall", lambda s: s["12063"].pop(), "query 12063 has 49 ids, expected exactly 50"),
    ("recall_subset", lambda s: s.update({"12063": ["a", "b", "c"]}), "not img_set members"),
    ("recall_subset", lambda s: s.update({"12063": ["test1-147-1-img1", "test1-1001-2-img0",
                                                    "test1-83-1-img1"]}), "other than the reference"),
])
def test_cirr_submission_errors(metric, change, message):
    queries = read_cirr(BENCHMARKS / "cirr" / "cap.rc2.test1.json")
    recall, subset = build_cirr_submissions(_cirr_rankings(queries, lambda p: False), queries)
    submission = recall if metric == "recall" else subset
    change(submission)
    with pytest.raises(BenchmarkInputError, match=message):
        validate_cirr_submission(submission, queries, metric)


# --- the score command ------------------------------------------------------------------


def test_score_circo_perfect_and_known_imperfect(tmp_path, capsys):
    queries = read_circo(BENCHMARKS / "circo" / "val.json")
    perfect = write_submission(tmp_path / "perfect.json",
                               build_circo_submission(_circo_rankings(queries), queries))
    scores = _score(capsys, "circo", "--annotations", BENCHMARKS / "circo", "--predictions", perfect)
    assert scores == pytest.approx({f"{m}@{k}": 100.0 for m in ("mAP", "R") for k in (5, 10, 25, 50)})
    # Only query 0 ranks its ground truths first; the other 219 find nothing: 1/220 everywhere.
    only_first = build_circo_submission(_circo_rankings(queries, lambda p: p == 0), queries)
    path = write_submission(tmp_path / "one.json", only_first)
    scores = _score(capsys, "circo", "--annotations", BENCHMARKS / "circo" / "val.json",
                    "--predictions", path)
    assert list(scores.values()) == pytest.approx([100 / 220] * 8)


def test_score_cirr_perfect_and_known_imperfect(tmp_path, capsys):
    queries = read_cirr(BENCHMARKS / "cirr" / "cap.rc2.val.json")
    recall, subset = build_cirr_submissions(_cirr_rankings(queries), queries)
    recall_path = write_submission(tmp_path / "recall.json", recall)
    subset_path = write_submission(tmp_path / "subset.json", subset)
    scores = _score(capsys, "cirr", "--annotations", BENCHMARKS / "cirr",
                    "--predictions", recall_path, "--predictions-subset", subset_path)
    assert list(scores.values()) == pytest.approx([100.0] * 7)
    # Even positions rank the target first, odd ones never list it: 2091 of 4181 queries.
    recall, _ = build_cirr_submissions(_cirr_rankings(queries, lambda p: p % 2 == 0), queries)
    scores = _score(capsys, "cirr", "--annotations", BENCHMARKS / "cirr" / "cap.rc2.val.json",
                    "--predictions", write_submission(tmp_path / "half.json", recall))
    assert list(scores.values()) == pytest.approx([100 * 2091 / 4181] * 7)


def test_score_fashioniq_perfect_and_per_category(tmp_path, capsys):
    predictions = {}
    for category in FASHIONIQ_CATEGORIES:
        queries = read_fashioniq(BENCHMARKS / "fashioniq" / f"cap.{category}.val.json")
        # dress misses every target (ranked 51st); shirt and toptee rank it first.
        miss = category == "dress"
        predictions[category] = {
            q.query_id: [f"f{i}" for i in range(50 if miss else 0)] + [q.target_id] for q in queries}
    path = write_submission(tmp_path / "fiq.json", predictions)
    scores = _score(capsys, "fashioniq", "--annotations", BENCHMARKS / "fashioniq",
                    "--predictions", path)
    assert scores == pytest.approx({
        "dress/R@10": 0.0, "dress/R@50": 0.0, "shirt/R@10": 100.0, "shirt/R@50": 100.0,
        "toptee/R@10": 100.0, "toptee/R@50": 100.0,
        "avg/R@10": 200 / 3, "avg/R@50": 200 / 3, "avg": 200 / 3})
    single = write_submission(tmp_path / "shirt.json", {"shirt": predictions["shirt"]})
    scores = _score(capsys, "fashioniq", "--annotations",
                    BENCHMARKS / "fashioniq" / "cap.shirt.val.json", "--predictions", single)
    assert scores["avg"] == pytest.approx(100.0)


@pytest.mark.parametrize("benchmark, annotations, predictions, message", [
    ("circo", "circo", {"0": [1, 2]}, "queries missing"),
    ("cirr", "cirr", {"version": "rc2", "metric": "recall_subset"}, "'metric' must be 'recall'"),
    ("fashioniq", "fashioniq", {"dress": {}}, "exactly the categories"),
    ("circo", "cirr", {}, "no file val.json here or in captions/"),
    ("circo", "circo/test.json", {}, "query 0 (position 0) has no ground truth: a test split?"),
    ("cirr", "cirr/cap.rc2.test1.json", {}, "has no ground truth: a test split?"),
])
def test_score_malformed_input_exits_with_a_message(tmp_path, capsys, benchmark, annotations,
                                                     predictions, message):
    path = write_submission(tmp_path / "bad.json", predictions)
    with pytest.raises(SystemExit) as exit_info:
        main(["score", benchmark, "--annotations", str(BENCHMARKS / annotations),
              "--predictions", str(path)])
    assert f"score {benchmark}: error:" in str(exit_info.value.code)
    assert message in str(exit_info.value.code)


def test_score_as_a_module_process(tmp_path):
    queries = read_circo(BENCHMARKS / "circo" / "val.json")
    path = write_submission(tmp_path / "p.json",
                            build_circo_submission(_circo_rankings(queries), queries))
    command = [sys.executable, "-m", "megapairs_dagster.evaluation.cli", "score", "circo",
               "--annotations", str(BENCHMARKS / "circo"), "--predictions"]
    done = subprocess.run(command + [str(path)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["mAP@5"] == pytest.approx(100.0)
    failed = subprocess.run(command + [str(tmp_path / "missing.json")], check=False,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "missing.json: file not found" in failed.stderr
