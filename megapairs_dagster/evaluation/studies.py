"""Results of a study: training runs compared along one axis, each point trained per seed.

A study's rows are its points (a fraction of the triplets, a set of mining views, a hard
negative mode); its columns are each headline metric's value per seed and their mean, so a
reader sees both the effect and how much the seeds disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from megapairs_dagster.evaluation.leaderboard import MISSING


def study_table(board: pd.DataFrame, points: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Points (rows, in order) × ``<headline> seed k`` and ``<headline> mean`` columns, from a
    leaderboard of the study's runs (``leaderboard(scores, runs, benchmarks)``). A point with
    fewer seeds (the zero-shot model) has NaN in the others; the mean is over what exists."""
    seeds = max(len(runs) for runs in points.values())
    rows = {}
    for label, runs in points.items():
        row = {}
        for column in board.columns:
            values = [board.at[run, column] if run in board.index else math.nan for run in runs]
            values += [math.nan] * (seeds - len(values))
            row.update({f"{column} seed {k}": value for k, value in enumerate(values)})
            present = [value for value in values if not math.isnan(value)]
            row[f"{column} mean"] = sum(present) / len(present) if present else math.nan
        rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("point")


def study_markdown(table: pd.DataFrame, axis: str) -> str:
    """The table in markdown with one decimal; the best mean of each metric in bold."""
    lines = [f"| {axis} | " + " | ".join(table.columns) + " |",
             "|---|" + "---:|" * len(table.columns)]
    best = {column: f"{table[column].max():.1f}" for column in table.columns
            if column.endswith(" mean")}
    for label, row in table.iterrows():
        cells = []
        for column, value in row.items():
            text = MISSING if math.isnan(value) else f"{value:.1f}"
            cells.append(f"**{text}**" if best.get(column) == text else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
