"""MMEB v1 (TIGER-Lab/MMEB-eval, the VLM2Vec paper's benchmark): 36 datasets in four
meta-tasks, their test files, prediction files and hit@1.

Layout on disk (``--data DIR``), as the Hugging Face dataset repository lays it out: one folder
per dataset holding its ``test`` split as parquet, ``DIR/<dataset>/test-00000-of-00001.parquet``
(or the converter's ``DIR/<dataset>/test/0000.parquet``); shards are read in name order. Each
row is a query: ``qry_text``, ``qry_img_path`` (``""`` for a text-only query), and its
candidates ``tgt_text`` and ``tgt_img_path``, two lists of one length whose first entry is the
positive.

Official rule followed (read, not copied): VLM2Vec ``eval.py`` (branch ``v1``) with
``evaluation/eval_utils.py`` ``get_pred``. Embeddings are keyed by (text, image path)
(``src/dataset.py`` ``EvalDataset.get_paired_data``), so equal candidates get equal scores;
the prediction is ``np.argmax`` of the scores, the first of equal best scores; a query is
correct when that index is 0. Hence a chosen candidate counts as correct exactly when its
(text, image path) equals the positive's: choosing a later copy of the positive is correct
(argmax would return index 0), and a producer of predictions should break ties in score by
the lowest index, as argmax does. The script writes ``acc`` per dataset as a fraction; we report
percentages, and the paper's means (overall, per meta-task, IND, OOD) are unweighted means
over datasets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from megapairs_dagster.evaluation.metrics import _percent
from megapairs_dagster.evaluation.readers import BenchmarkInputError, read_json

# Dataset -> (meta-task, split of the benchmark). Sources: the VLM2Vec paper (arXiv
# 2410.05160, Table 2 and Section 3: 20 in-distribution datasets, those of MMEB-train, and 16
# out-of-distribution ones), the order and grouping of VLM2Vec ``experiments/report_score.py``
# (classification, VQA, retrieval, grounding), and the v1 README's list of the 20 MMEB-train
# subsets (where ImageNet-1K is spelled ImageNet_1K).
MMEB_DATASETS: dict[str, tuple[str, str]] = {
    "ImageNet-1K": ("classification", "ind"),
    "N24News": ("classification", "ind"),
    "HatefulMemes": ("classification", "ind"),
    "VOC2007": ("classification", "ind"),
    "SUN397": ("classification", "ind"),
    "Place365": ("classification", "ood"),
    "ImageNet-A": ("classification", "ood"),
    "ImageNet-R": ("classification", "ood"),
    "ObjectNet": ("classification", "ood"),
    "Country211": ("classification", "ood"),
    "OK-VQA": ("vqa", "ind"),
    "A-OKVQA": ("vqa", "ind"),
    "DocVQA": ("vqa", "ind"),
    "InfographicsVQA": ("vqa", "ind"),
    "ChartQA": ("vqa", "ind"),
    "Visual7W": ("vqa", "ind"),
    "ScienceQA": ("vqa", "ood"),
    "VizWiz": ("vqa", "ood"),
    "GQA": ("vqa", "ood"),
    "TextVQA": ("vqa", "ood"),
    "VisDial": ("retrieval", "ind"),
    "CIRR": ("retrieval", "ind"),
    "VisualNews_t2i": ("retrieval", "ind"),
    "VisualNews_i2t": ("retrieval", "ind"),
    "MSCOCO_t2i": ("retrieval", "ind"),
    "MSCOCO_i2t": ("retrieval", "ind"),
    "NIGHTS": ("retrieval", "ind"),
    "WebQA": ("retrieval", "ind"),
    "FashionIQ": ("retrieval", "ood"),
    "Wiki-SS-NQ": ("retrieval", "ood"),
    "OVEN": ("retrieval", "ood"),
    "EDIS": ("retrieval", "ood"),
    "MSCOCO": ("grounding", "ind"),
    "RefCOCO": ("grounding", "ood"),
    "RefCOCO-Matching": ("grounding", "ood"),
    "Visual7W-Pointing": ("grounding", "ood"),
}
MMEB_META_TASKS = ("classification", "vqa", "retrieval", "grounding")
MMEB_SPLIT = "test"

Candidate = tuple[str, str]  # (tgt_text, tgt_img_path)


@dataclass(frozen=True)
class MmebQuery:
    """One row of a dataset's test split; ``query_id`` is its position, as a string, and
    ``candidates[0]`` the positive."""

    query_id: str
    text: str
    image_path: str
    candidates: tuple[Candidate, ...]

    def is_correct(self, chosen: int) -> bool:
        """Whether choosing candidate ``chosen`` scores as the official argmax would: its
        (text, image path) is the positive's."""
        return self.candidates[chosen] == self.candidates[0]


def _test_files(data_dir: Path, dataset: str) -> list[Path]:
    folder = data_dir / dataset
    files = sorted(folder.glob(f"{MMEB_SPLIT}-*.parquet")) or sorted(
        (folder / MMEB_SPLIT).glob("*.parquet"))
    if not files:
        raise BenchmarkInputError(f"{folder}: no {MMEB_SPLIT}-*.parquet file here or in "
                                  f"{MMEB_SPLIT}/ (the MMEB-eval layout)")
    return files


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"{what} must be a list of strings, got {value!r}")
    return value


def read_mmeb_dataset(data_dir: str | Path, dataset: str) -> list[MmebQuery]:
    """The queries of one MMEB dataset's test split, in row order (shards in name order)."""
    if dataset not in MMEB_DATASETS:
        raise BenchmarkInputError(f"{dataset!r} is not one of the 36 MMEB v1 datasets: "
                                  f"{sorted(MMEB_DATASETS)}")
    columns = ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
    queries: list[MmebQuery] = []
    for path in _test_files(Path(data_dir), dataset):
        try:
            rows = pq.read_table(path, columns=columns).to_pylist()
        except (OSError, KeyError, ValueError) as error:  # pyarrow's errors derive from these
            raise BenchmarkInputError(f"{path}: not an MMEB parquet file with columns "
                                      f"{columns} ({error})") from error
        for row in rows:
            position = len(queries)
            try:
                if not isinstance(row["qry_text"], str) or not isinstance(row["qry_img_path"], str):
                    raise TypeError("qry_text and qry_img_path must be strings")
                texts = _strings(row["tgt_text"], "tgt_text")
                images = _strings(row["tgt_img_path"], "tgt_img_path")
                if len(texts) != len(images) or not texts:
                    raise ValueError(f"tgt_text has {len(texts)} entries, tgt_img_path "
                                     f"{len(images)}: expected the same number, at least 1")
            except (TypeError, ValueError) as error:
                raise BenchmarkInputError(
                    f"{path}: malformed row {position} of {dataset}: {error}") from error
            queries.append(MmebQuery(str(position), row["qry_text"], row["qry_img_path"],
                                     tuple(zip(texts, images))))
    return queries


def read_mmeb_predictions(path: str | Path) -> dict[str, Any]:
    """Our MMEB prediction file: ``{dataset: {row position: chosen candidate index}}``.

    MMEB has no server and no submission format, so this is the project's choice: for every
    row of each scored dataset's test split (its position, as a string), the index into
    ``tgt_text``/``tgt_img_path`` of the best candidate (on equal scores, the lowest index, as
    ``np.argmax`` picks). Contents are checked against the data when scored.
    """
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise BenchmarkInputError(f"{path}: expected a JSON object of dataset -> predictions")
    return data


def _hits(dataset: str, queries: Sequence[MmebQuery], chosen: Any) -> list[float]:
    if not isinstance(chosen, Mapping):
        raise BenchmarkInputError(f"{dataset}: expected an object of row position -> index")
    by_id = {query.query_id: query for query in queries}
    missing = [query_id for query_id in by_id if query_id not in chosen]
    if missing:
        raise BenchmarkInputError(f"{dataset}: no prediction for {len(missing)} of "
                                  f"{len(queries)} rows, e.g. row {', '.join(missing[:5])}")
    unknown = sorted(set(chosen) - set(by_id))
    if unknown:
        raise BenchmarkInputError(f"{dataset}: predictions for unknown rows {unknown[:5]}; rows "
                                  f"are positions 0..{len(queries) - 1} of its test split")
    hits = []
    for query in queries:
        index = chosen[query.query_id]
        if not isinstance(index, int) or isinstance(index, bool):
            raise BenchmarkInputError(f"{dataset}: row {query.query_id} maps to {index!r}, not a "
                                      "candidate index")
        if not 0 <= index < len(query.candidates):
            raise BenchmarkInputError(f"{dataset}: row {query.query_id} chooses candidate "
                                      f"{index}, but has {len(query.candidates)} candidates")
        hits.append(float(query.is_correct(index)))
    return hits


def mmeb_metrics(queries_by_dataset: Mapping[str, Sequence[MmebQuery]],
                 predictions_by_dataset: Mapping[str, Any]) -> dict[str, float]:
    """``{dataset}/hit@1`` (percent) per dataset and the unweighted means over datasets of each
    complete group: ``{meta-task}/hit@1``, ``ind/hit@1``, ``ood/hit@1``, ``overall/hit@1``.

    A group's mean is reported only when every dataset of it is scored, so a partial run never
    passes for the paper's numbers (all 36 give all of them).
    """
    if set(queries_by_dataset) != set(predictions_by_dataset):
        raise BenchmarkInputError(f"datasets differ: data {sorted(queries_by_dataset)}, "
                                  f"predictions {sorted(predictions_by_dataset)}")
    unknown = sorted(set(queries_by_dataset) - set(MMEB_DATASETS))
    if unknown:
        raise BenchmarkInputError(f"{unknown} are not MMEB v1 datasets: {sorted(MMEB_DATASETS)}")
    scored = [dataset for dataset in MMEB_DATASETS if dataset in queries_by_dataset]
    scores = {f"{dataset}/hit@1": _percent(_hits(dataset, queries_by_dataset[dataset],
                                                 predictions_by_dataset[dataset]))
              for dataset in scored}
    groups = {meta_task: [d for d, (task, _) in MMEB_DATASETS.items() if task == meta_task]
              for meta_task in MMEB_META_TASKS}
    groups |= {split: [d for d, (_, where) in MMEB_DATASETS.items() if where == split]
               for split in ("ind", "ood")}
    groups["overall"] = list(MMEB_DATASETS)
    for group, datasets in groups.items():
        if all(dataset in queries_by_dataset for dataset in datasets):
            scores[f"{group}/hit@1"] = (sum(scores[f"{d}/hit@1"] for d in datasets)
                                        / len(datasets))
    return scores


def score_mmeb(data_dir: str | Path, predictions_path: str | Path) -> dict[str, float]:
    """Read the datasets named in the prediction file from ``data_dir`` and score them."""
    predictions = read_mmeb_predictions(predictions_path)
    unknown = sorted(set(predictions) - set(MMEB_DATASETS))
    if unknown:
        raise BenchmarkInputError(f"{predictions_path}: {unknown} are not MMEB v1 datasets: "
                                  f"{sorted(MMEB_DATASETS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BenchmarkInputError(f"{data_dir}: folder not found")
    queries = {dataset: read_mmeb_dataset(data_dir, dataset) for dataset in predictions}
    return mmeb_metrics(queries, predictions)
