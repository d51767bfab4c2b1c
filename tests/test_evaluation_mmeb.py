"""MMEB v1: the dataset table, the reader of the MMEB-eval layout (small parquet fixtures),
hit@1 by the official argmax rule, the group means, and ``score mmeb``."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_dagster.evaluation.cli import main
from megapairs_dagster.evaluation.mmeb import (
    MMEB_DATASETS,
    MMEB_META_TASKS,
    MmebQuery,
    mmeb_metrics,
    read_mmeb_dataset,
    score_mmeb,
)
from megapairs_dagster.evaluation.readers import BenchmarkInputError


def _rows(n, n_candidates=3, prefix="q"):
    """Text-to-image style rows: candidate 0 is the positive."""
    return [{"qry_inst": "<|image_1|> Represent the given image.", "qry_text": f"{prefix}{i}",
             "qry_img_path": f"{prefix}/{i}.jpg",
             "tgt_text": [f"label {i}-{j}" for j in range(n_candidates)],
             "tgt_img_path": [""] * n_candidates} for i in range(n)]


def _write(root, dataset, rows, shards=1, layout="main"):
    """Write ``rows`` as the dataset's test split: ``<dataset>/test-0000k-of-0000n.parquet``
    (the repository's files) or ``<dataset>/test/000k.parquet`` (the parquet converter's)."""
    folder = root / dataset if layout == "main" else root / dataset / "test"
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // shards)
    for shard in range(shards):
        name = (f"test-{shard:05d}-of-{shards:05d}.parquet" if layout == "main"
                else f"{shard:04d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[shard * size:(shard + 1) * size]), folder / name)
    return root


def test_the_dataset_table_is_the_papers():
    assert len(MMEB_DATASETS) == 36
    by_task = {task: [d for d, (t, _) in MMEB_DATASETS.items() if t == task]
               for task in MMEB_META_TASKS}
    assert [len(by_task[t]) for t in MMEB_META_TASKS] == [10, 10, 12, 4]
    ind = {d for d, (_, split) in MMEB_DATASETS.items() if split == "ind"}
    assert len(ind) == 20 and len(MMEB_DATASETS) - len(ind) == 16
    # IND = the 20 MMEB-train subsets of VLM2Vec's v1 README (ImageNet_1K there).
    assert ind == {"A-OKVQA", "ChartQA", "HatefulMemes", "InfographicsVQA", "MSCOCO_i2t",
                   "N24News", "OK-VQA", "SUN397", "VisDial", "VisualNews_i2t", "WebQA", "CIRR",
                   "DocVQA", "ImageNet-1K", "MSCOCO", "MSCOCO_t2i", "NIGHTS", "VOC2007",
                   "Visual7W", "VisualNews_t2i"}
    assert [len([d for d in by_task[t] if d in ind]) for t in MMEB_META_TASKS] == [5, 6, 8, 1]


@pytest.mark.parametrize("layout", ["main", "converter"])
def test_reader_reads_rows_in_shard_order(tmp_path, layout):
    rows = _rows(5)
    rows[3]["qry_img_path"] = ""  # a text-only query
    _write(tmp_path, "CIRR", rows, shards=2, layout=layout)
    queries = read_mmeb_dataset(tmp_path, "CIRR")
    assert [q.query_id for q in queries] == ["0", "1", "2", "3", "4"]
    assert [q.text for q in queries] == ["q0", "q1", "q2", "q3", "q4"]  # shard 0 then 1
    assert queries[3] == MmebQuery("3", "q3", "", (("label 3-0", ""), ("label 3-1", ""),
                                                   ("label 3-2", "")))


@pytest.mark.parametrize("change, message", [
    (lambda row: row.update(tgt_img_path=["", ""]), "tgt_text has 3 entries, tgt_img_path 2"),
    (lambda row: row.update(tgt_text=[], tgt_img_path=[]), "expected the same number, at least 1"),
    (lambda row: row.update(qry_text=None), "qry_text and qry_img_path must be strings"),
])
def test_malformed_rows_name_dataset_and_row(tmp_path, change, message):
    rows = _rows(3)
    change(rows[2])
    _write(tmp_path, "VizWiz", rows)
    with pytest.raises(BenchmarkInputError, match="malformed row 2 of VizWiz") as error:
        read_mmeb_dataset(tmp_path, "VizWiz")
    assert message in str(error.value)


def test_reader_refuses_unknown_datasets_missing_files_and_columns(tmp_path):
    with pytest.raises(BenchmarkInputError, match="'CIFAR-100' is not one of the 36"):
        read_mmeb_dataset(tmp_path, "CIFAR-100")  # in the MMEB-eval repository, not in the 36
    with pytest.raises(BenchmarkInputError, match="no test-\\*.parquet file here or in test/"):
        read_mmeb_dataset(tmp_path, "GQA")
    _write(tmp_path, "GQA", [{"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"]}])
    with pytest.raises(BenchmarkInputError, match="not an MMEB parquet file"):
        read_mmeb_dataset(tmp_path, "GQA")


def test_hit_at_1_follows_the_official_argmax():
    # Equal (text, image path) pairs share one embedding, so equal scores; np.argmax takes the
    # first: choosing a later copy of the positive scores as index 0, a correct answer.
    candidates = (("cat", ""), ("dog", ""), ("cat", ""), ("", "cat.jpg"))
    query = MmebQuery("0", "q", "q.jpg", candidates)
    assert [query.is_correct(i) for i in range(4)] == [True, False, True, False]
    queries = {"ImageNet-1K": [MmebQuery(str(i), "q", "q.jpg", candidates) for i in range(3)]}
    scores = mmeb_metrics(queries, {"ImageNet-1K": {"0": 0, "1": 2, "2": 1}})
    assert scores == pytest.approx({"ImageNet-1K/hit@1": 200 / 3})  # a naive index == 0: 100/3


def test_hit_at_1_equals_the_official_evaluation_on_random_scores():
    """Re-enact VLM2Vec v1 ``eval.py``: embeddings keyed by (text, image path), so copies score
    alike; correct when ``np.argmax`` of the scores is 0. Distinct pairs score differently
    here, so the best-scoring candidates are copies of one pair; predictions choose the last of
    them, which the official rule must count as its first."""
    rng = random.Random(0)
    queries, chosen, official = [], {}, 0
    for i in range(400):
        pool = [("a", ""), ("b", ""), ("", "x.jpg"), ("a", "x.jpg")]
        candidates = tuple(rng.choice(pool) for _ in range(5))
        score_of = dict(zip(pool, rng.sample([0.1, 0.2, 0.3, 0.4], k=4)))
        scores = np.array([score_of[pair] for pair in candidates])
        official += int(np.argmax(scores) == 0)
        chosen[str(i)] = int(np.flatnonzero(scores == scores.max())[-1])
        queries.append(MmebQuery(str(i), "q", "", candidates))
    result = mmeb_metrics({"OVEN": queries}, {"OVEN": chosen})
    assert result["OVEN/hit@1"] == pytest.approx(100 * official / 400)
    naive = 100 * sum(index == 0 for index in chosen.values()) / 400
    assert naive < result["OVEN/hit@1"]


# Per meta-task hit pattern for the 36-dataset run below: classification all right, VQA half,
# retrieval IND right and OOD wrong, grounding: MSCOCO (4 rows) wrong, the others right.
def _accuracy(dataset):
    task, split = MMEB_DATASETS[dataset]
    if task == "classification":
        return 1.0
    if task == "vqa":
        return 0.5
    if task == "retrieval":
        return 1.0 if split == "ind" else 0.0
    return 0.0 if dataset == "MSCOCO" else 1.0


def _all_datasets(root):
    predictions = {}
    for dataset in MMEB_DATASETS:
        n = 4 if dataset == "MSCOCO" else 2
        _write(root, dataset, _rows(n, prefix=dataset))
        right = round(_accuracy(dataset) * n)
        predictions[dataset] = {str(i): 0 if i < right else 1 for i in range(n)}
    return predictions


def test_means_over_datasets_by_hand(tmp_path):
    predictions = _all_datasets(tmp_path)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(predictions))
    scores = score_mmeb(tmp_path, path)
    assert scores["VOC2007/hit@1"] == 100.0 and scores["GQA/hit@1"] == 50.0
    assert scores["MSCOCO/hit@1"] == 0.0 and scores["EDIS/hit@1"] == 0.0
    assert scores["classification/hit@1"] == pytest.approx(100.0)
    assert scores["vqa/hit@1"] == pytest.approx(50.0)
    assert scores["retrieval/hit@1"] == pytest.approx(8 * 100 / 12)
    assert scores["grounding/hit@1"] == pytest.approx(75.0)
    # IND: 5 cls at 100, 6 VQA at 50, 8 retrieval at 100, MSCOCO at 0 -> 1600 / 20.
    assert scores["ind/hit@1"] == pytest.approx(80.0)
    # OOD: 5 cls at 100, 4 VQA at 50, 4 retrieval at 0, 3 grounding at 100 -> 1000 / 16.
    assert scores["ood/hit@1"] == pytest.approx(62.5)
    # Overall is the mean over the 36 datasets (2600 / 36), not over the meta-tasks (72.9)
    # nor over rows (MSCOCO's 4 wrong rows would weigh double: 2600 / 38).
    assert scores["overall/hit@1"] == pytest.approx(2600 / 36)
    assert len(scores) == 36 + 4 + 3


def test_only_complete_groups_get_a_mean(tmp_path):
    grounding = [d for d, (task, _) in MMEB_DATASETS.items() if task == "grounding"]
    queries = {d: [MmebQuery("0", "q", "", (("a", ""), ("b", "")))] for d in grounding}
    scores = mmeb_metrics(queries, {d: {"0": 0 if d == "RefCOCO" else 1} for d in grounding})
    assert set(scores) == {f"{d}/hit@1" for d in grounding} | {"grounding/hit@1"}
    assert scores["grounding/hit@1"] == pytest.approx(25.0)


@pytest.mark.parametrize("predictions, message", [
    ({"CIRR": {"0": 0}}, "CIRR: no prediction for 1 of 2 rows, e.g. row 1"),
    ({"CIRR": {"0": 0, "1": 0, "2": 0}}, "CIRR: predictions for unknown rows ['2']"),
    ({"CIRR": {"0": 0, "1": 3}}, "CIRR: row 1 chooses candidate 3, but has 3 candidates"),
    ({"CIRR": {"0": -1, "1": 0}}, "CIRR: row 0 chooses candidate -1"),
    ({"CIRR": {"0": True, "1": 0}}, "CIRR: row 0 maps to True, not a candidate index"),
    ({"CIRR": {"0": "0", "1": 0}}, "CIRR: row 0 maps to '0', not a candidate index"),
    ({"CIRR": [0, 0]}, "CIRR: expected an object of row position -> index"),
    ({"CIFAR-100": {}}, "['CIFAR-100'] are not MMEB v1 datasets"),
    ({"GQA": {"0": 0}}, "GQA: no test-*.parquet file here or in test/"),
    ({}, "expected a JSON object of dataset -> predictions"),
])
def test_score_mmeb_errors_exit_with_a_message(tmp_path, predictions, message):
    _write(tmp_path, "CIRR", _rows(2))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(predictions))
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "mmeb", "--data", str(tmp_path), "--predictions", str(path)])
    assert "score mmeb: error:" in str(exit_info.value.code)
    assert message in str(exit_info.value.code)


def test_score_mmeb_command(tmp_path, capsys):
    _write(tmp_path, "NIGHTS", _rows(4))
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"NIGHTS": {"0": 0, "1": 2, "2": 0, "3": 0}}))
    main(["score", "mmeb", "--data", str(tmp_path), "--predictions", str(path)])
    assert json.loads(capsys.readouterr().out) == pytest.approx({"NIGHTS/hit@1": 75.0})


@pytest.mark.parametrize("argv, message", [
    (["mmeb", "--annotations", "x"], "mmeb takes --data (the MMEB-eval folder), not --annotations"),
    (["circo", "--data", "x"], "--data applies to mmeb only"),
    (["genecis"], "genecis needs --annotations"),
])
def test_score_options_belong_to_their_benchmarks(tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", *argv, "--predictions", str(tmp_path / "p.json")])
    assert message in str(exit_info.value.code)
