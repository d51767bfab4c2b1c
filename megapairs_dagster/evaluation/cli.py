"""``score``: metrics of a prediction file on a benchmark's labelled split, as JSON.

    score circo --annotations circo/ --predictions val_submission.json
    score cirr --annotations cirr/ --predictions recall.json [--predictions-subset subset.json]
    score fashioniq --annotations fashioniq/ --predictions fiq_predictions.json
    score genecis --annotations genecis/change_object.json --predictions genecis_co.json
    score mmeb --data MMEB-eval/ --predictions mmeb_predictions.json

Prediction files use the test servers' submission formats (CIRCO: query id -> top 50
COCO ids; CIRR: the ``recall`` file, optionally the ``recall_subset`` file, else
R_subset comes from the recall file's top 50). FashionIQ has no server: one JSON object
``{category: {query position in cap.<category>.val.json: [ranked ids]}}``.
``--annotations`` is an annotation file or the folder holding the official files
(CIRR's may sit in ``captions/``). Test splits have no ground truths: their servers score them.

GeneCIS: with one task file, ``{query position: [ids of the target and distractors, best
first]}`` (ids: the COCO id, ``"153527"``, or for the attribute tasks
``"<VG image id>:<x>,<y>,<w>,<h>"`` with the box as the file writes it); with the folder of the
task files, ``{task: {...}}`` for any of the four, and ``avg/R@k`` when all four are given.
MMEB: ``--data`` is the MMEB-eval folder (``<dataset>/test-*.parquet``); predictions are
``{dataset: {row position: index of the chosen candidate in tgt_text}}``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from megapairs_dagster.evaluation.datasets import find_annotation_file
from megapairs_dagster.evaluation.genecis import score_genecis
from megapairs_dagster.evaluation.metrics import circo_metrics, cirr_metrics, fashioniq_metrics
from megapairs_dagster.evaluation.mmeb import score_mmeb
from megapairs_dagster.evaluation.readers import (
    FASHIONIQ_CATEGORIES,
    BenchmarkInputError,
    read_circo,
    read_cirr,
    read_fashioniq,
)
from megapairs_dagster.evaluation.submission import (
    read_circo_submission,
    read_cirr_submission,
    read_fashioniq_predictions,
)

BENCHMARKS = ("circo", "cirr", "fashioniq", "genecis", "mmeb")


def _annotation_file(annotations: Path, name: str) -> Path:
    """``annotations`` itself if a file, else ``name`` in it or in its official sub-folders."""
    return annotations if annotations.is_file() else find_annotation_file(annotations, name)


def _fashioniq_annotation_files(annotations: Path, split: str) -> dict[str, Path]:
    if annotations.is_file():
        match = re.fullmatch(r"cap\.(\w+)\.\w+\.json", annotations.name)
        if match is None or match.group(1) not in FASHIONIQ_CATEGORIES:
            raise BenchmarkInputError(f"{annotations}: expected a file named cap.<category>.{split}.json")
        return {match.group(1): annotations}
    return {category: _annotation_file(annotations, f"cap.{category}.{split}.json")
            for category in FASHIONIQ_CATEGORIES}


def score(benchmark: str, annotations: Path | None, predictions: Path,
          predictions_subset: Path | None = None, split: str = "val",
          data: Path | None = None) -> dict[str, float]:
    """Read annotations and predictions, check them, and compute the benchmark's metrics."""
    if predictions_subset is not None and benchmark != "cirr":
        raise BenchmarkInputError("--predictions-subset applies to cirr only")
    if benchmark == "mmeb":
        if data is None or annotations is not None:
            raise BenchmarkInputError("mmeb takes --data (the MMEB-eval folder), not --annotations")
        return score_mmeb(data, predictions)
    if data is not None:
        raise BenchmarkInputError("--data applies to mmeb only")
    if annotations is None:
        raise BenchmarkInputError(f"{benchmark} needs --annotations")
    if benchmark == "genecis":
        return score_genecis(annotations, predictions)
    if benchmark == "circo":
        queries = read_circo(_annotation_file(annotations, f"{split}.json"), ground_truth=True)
        return circo_metrics(queries, read_circo_submission(predictions, queries))
    if benchmark == "cirr":
        queries = read_cirr(_annotation_file(annotations, f"cap.rc2.{split}.json"),
                           ground_truth=True)
        subset = (read_cirr_submission(predictions_subset, queries, "recall_subset")
                  if predictions_subset is not None else None)
        return cirr_metrics(queries, read_cirr_submission(predictions, queries, "recall"), subset)
    if benchmark == "fashioniq":
        files = _fashioniq_annotation_files(annotations, split)
        queries = {category: read_fashioniq(path) for category, path in files.items()}
        return fashioniq_metrics(queries, read_fashioniq_predictions(predictions, list(files)))
    raise BenchmarkInputError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")


def _run_score(args: argparse.Namespace) -> None:
    try:
        metrics = score(args.benchmark, args.annotations, args.predictions,
                        args.predictions_subset, args.split, args.data)
    except ValueError as error:  # BenchmarkInputError and the metrics' checks
        raise SystemExit(f"score {args.benchmark}: error: {error}") from error
    print(json.dumps(metrics, indent=2))


def add_score_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``score`` on a CLI's subparsers; ``args.run(args)`` then runs it."""
    parser = subparsers.add_parser("score", help="score a prediction file on a benchmark",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("--annotations", type=Path,
                        help="annotation file or folder of the official files (not mmeb)")
    parser.add_argument("--data", type=Path,
                        help="mmeb only: the MMEB-eval folder, <dataset>/test-*.parquet")
    parser.add_argument("--predictions", type=Path, required=True,
                        help="prediction file in the submission format")
    parser.add_argument("--predictions-subset", type=Path,
                        help="CIRR only: the recall_subset file")
    parser.add_argument("--split", default="val", choices=["val"],
                        help="only val has ground truths")
    parser.set_defaults(run=_run_score)
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m megapairs_dagster.evaluation.cli score ...``"""
    parser = argparse.ArgumentParser(prog="python -m megapairs_dagster.evaluation.cli")
    add_score_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
