"""bench/report.py reads each bench script's JSON into one table, a summary JSON and a plot."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import report
from scaling import scaling_exponent

# The smallest JSON of each script that carries the fields the report reads.
RESULTS = {
    "embed": {"rows": [
        {"view": "clip_image", "threads": 2, "num_workers": 0, "ratio": 0.35},
        {"view": "clip_image", "threads": 2, "num_workers": 2, "ratio": 0.29},
        {"view": "dino_image", "error": "RuntimeError: workers killed"},
    ]},
    "knn": {"results": [{"spec": "IVF2048,Flat", "speedup": 13.0, "recall_at_20": 0.991,
                         "params": "nprobe=16"}]},
    "train": {"batch_size": 16, "device": "cpu",
              "ratio": {"train_mmret": 0.8, "train_mmret_cached": 0.95}},
    "train_launch": {"memory": {"streaming_growth_mb": 12.0, "in_memory_growth_mb": 300.0},
                     "launch": {"ratio": 0.7}},
    "generation": {"rows": [{"concurrency": 16, "ratio": 0.98, "pipeline_pairs_per_s": 40.0}]},
    "artifact_reads": {"rows": [{"case": "corpus shard, whole table from bytes",
                                 "pipeline_ms": 100.0, "pyarrow_default_ms": 95.0,
                                 "ratio": 0.95}]},
    "scaling": {
        "stages": [
            {"stage": "corpus_images", "1x_s": 1.0, "2x_s": 2.0, "4x_s": 4.0, "exponent": 1.0,
             "linear": True},
            {"stage": "image_index", "1x_s": 1.0, "2x_s": 3.0, "4x_s": 9.0, "exponent": 1.58,
             "linear": False},
        ],
        "new_shard": {"new_shard_s": 10.0, "full_recompute_4_shards_s": 40.0,
                      "full_over_new": 4.0},
    },
}


def test_report_tabulates_what_exists_and_lists_what_is_missing(tmp_path):
    for name, data in RESULTS.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    rows, missing = report.summarize(tmp_path, list(report.RUNS))
    assert missing == ["train_mllm", "dagster_overhead"]
    by_measure = {row["measure"]: row for row in rows}
    assert by_measure["clip_image pipeline / raw forward"]["value"] == 0.35  # the best setting
    assert not any("dino_image" in m for m in by_measure)  # a failed view has no ratio
    assert by_measure["IVF2048,Flat speed-up vs exact"]["value"] == 13.0
    assert "not linear" in by_measure["image_index: cost exponent 1x -> 4x"]["note"]
    assert by_measure["full recompute of 4 shards / one new shard"]["value"] == 4.0
    assert by_measure["corpus shard, whole table from bytes: pyarrow default / pipeline time"][
        "value"] == 0.95
    table = report.format_table(rows)
    assert len(table.splitlines()) == len(rows) + 1
    report.plot(rows, RESULTS["scaling"], tmp_path / "summary.png")
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("one", "four", "expected"), [
    (1.0, 4.0, 1.0), (2.0, 2.0, 0.0), (1.0, 16.0, 2.0), (0.0, 1.0, None),
])
def test_scaling_exponent(one, four, expected):
    exponent = scaling_exponent(one, four)
    assert exponent == expected if expected is None else math.isclose(exponent, expected)
