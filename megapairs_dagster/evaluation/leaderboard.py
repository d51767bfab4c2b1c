"""Every model's headline number on every benchmark, in one table: which model is best.

The headlines are the numbers papers lead with (the MegaPairs paper's Tables 1–3, VLM2Vec's
MMEB overall), read from the ``all`` group of the ``benchmark_scores`` table and printed as
papers print them, with one decimal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

# benchmark -> (column title, metric of its "all" group), headline first.
HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "demo_cir": (("demo mAP@5", "mAP@5"),),
    "circo": (("CIRCO mAP@5", "mAP@5"),),
    "cirr": (("CIRR R@1", "R@1"), ("CIRR R_subset@1", "R_subset@1")),
    "fashioniq": (("FashionIQ R@10", "R@10"),),  # the mean over the three categories
    "genecis": (("GeneCIS R@1", "R@1"),),  # the mean over the four tasks
    "mmeb": (("MMEB overall", "hit@1"),),
}
MISSING = "–"


def leaderboard(scores: pd.DataFrame, models: Sequence[str],
                benchmarks: Sequence[str]) -> pd.DataFrame:
    """Models (rows, in the order given) × headline columns of ``benchmarks``; NaN where a
    model has no score. ``scores`` holds rows of the ``benchmark_scores`` table."""
    overall = scores[scores["query_group"] == "all"]
    values = overall.set_index(["benchmark", "model", "metric"])["value"].to_dict()
    return pd.DataFrame(
        {title: [values.get((benchmark, model, metric), math.nan) for model in models]
         for benchmark in benchmarks for title, metric in HEADLINES[benchmark]},
        index=pd.Index(list(models), name="model"))


def leaderboard_markdown(table: pd.DataFrame) -> str:
    """The table in markdown, values with one decimal, the best of each column in bold."""
    lines = ["| model | " + " | ".join(table.columns) + " |",
             "|---|" + "---:|" * len(table.columns)]
    best = table.max()
    for model, row in table.iterrows():
        cells = [MISSING if math.isnan(value) else
                 f"**{value:.1f}**" if f"{value:.1f}" == f"{best[column]:.1f}" else f"{value:.1f}"
                 for column, value in row.items()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
