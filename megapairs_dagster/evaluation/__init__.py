"""Framework-free benchmark readers, metrics and submission files (no dagster import).

- ``readers``: CIRCO, CIRR rc2 and FashionIQ annotation files -> ``CirQuery`` lists and
  gallery id lists (all ids as strings).
- ``query_text``: the query texts of the MegaPairs evaluation files (CIRCO, FashionIQ), and
  CIRR's relative caption.
- ``metrics``: CIRCO mAP@k / R@k, CIRR R@k / R_subset@k, FashionIQ R@10/50, matching the
  official evaluation code's quirks; ``rank_gallery`` turns similarities into rankings.
- ``genecis``: GeneCIS's four tasks (annotation files, per-query galleries, Visual Genome
  box crops) and R@1/2/3 as its official evaluation computes them.
- ``mmeb``: MMEB v1 (36 datasets in the official evaluation layout) and hit@1 per dataset,
  meta-task, in- and out-of-distribution.
- ``submission``: the CIRCO and CIRR test-server files, built and validated.
- ``datasets``: the official CIRCO, CIRR and FashionIQ data on disk (val and test splits), and
  GeneCIS's and MMEB's -> queries, galleries and a checked image loader.
- ``evaluate``: score a model exposing ``encode(images=..., text=...)`` on CIRCO-format, CIRR,
  FashionIQ, GeneCIS and MMEB benchmarks, and rank CIRCO's and CIRR's test splits into
  submission files.
- ``examples``: a picture of queries and what a model retrieves for them.
- ``leaderboard``: every model's headline metric per benchmark, as a table.
- ``cli``: the ``score`` command.
"""

from megapairs_dagster.evaluation.datasets import (
    find_annotation_file,
    is_test_split,
    load_circo,
    load_cirr,
    load_fashioniq,
)
from megapairs_dagster.evaluation.evaluate import circo_test_submissions, cirr_test_submissions
from megapairs_dagster.evaluation.genecis import (
    GENECIS_TASKS,
    crop_genecis_box,
    genecis_metrics,
    genecis_task_metrics,
    load_genecis_image,
    read_genecis,
)
from megapairs_dagster.evaluation.metrics import (
    circo_metrics,
    cirr_metrics,
    fashioniq_metrics,
    rank_gallery,
)
from megapairs_dagster.evaluation.mmeb import MMEB_DATASETS, mmeb_metrics, read_mmeb_dataset
from megapairs_dagster.evaluation.query_text import (
    circo_query_text,
    cirr_query_text,
    fashioniq_query_text,
)
from megapairs_dagster.evaluation.readers import (
    FASHIONIQ_CATEGORIES,
    BenchmarkInputError,
    CirQuery,
    read_circo,
    read_circo_gallery,
    read_cirr,
    read_cirr_gallery,
    read_cirr_split,
    read_fashioniq,
    read_fashioniq_gallery,
)
from megapairs_dagster.evaluation.submission import (
    build_circo_submission,
    build_cirr_submissions,
    check_test_gallery,
    read_circo_submission,
    read_cirr_submission,
    read_fashioniq_predictions,
    submission_json,
    validate_circo_submission,
    validate_cirr_submission,
    write_submission,
)

__all__ = [
    "FASHIONIQ_CATEGORIES",
    "GENECIS_TASKS",
    "MMEB_DATASETS",
    "BenchmarkInputError",
    "CirQuery",
    "build_circo_submission",
    "build_cirr_submissions",
    "check_test_gallery",
    "circo_metrics",
    "circo_query_text",
    "circo_test_submissions",
    "cirr_metrics",
    "cirr_query_text",
    "cirr_test_submissions",
    "crop_genecis_box",
    "fashioniq_metrics",
    "fashioniq_query_text",
    "find_annotation_file",
    "genecis_metrics",
    "genecis_task_metrics",
    "is_test_split",
    "load_circo",
    "load_cirr",
    "load_fashioniq",
    "load_genecis_image",
    "mmeb_metrics",
    "rank_gallery",
    "read_circo",
    "read_circo_gallery",
    "read_circo_submission",
    "read_cirr",
    "read_cirr_gallery",
    "read_cirr_split",
    "read_cirr_submission",
    "read_fashioniq",
    "read_fashioniq_gallery",
    "read_fashioniq_predictions",
    "read_genecis",
    "read_mmeb_dataset",
    "submission_json",
    "validate_circo_submission",
    "validate_cirr_submission",
    "write_submission",
]
