"""``image_pairs`` (per shard): MegaPairs' heterogeneous KNN mining over the three views."""

from collections import Counter

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    Output,
    asset,
)

from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.conditions import per_shard
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.plots import histogram
from megapairs_dagster.resources.settings import Mining
from megapairs_dagster.synthesis.mining import mine_pairs
from megapairs_dagster.synthesis.views import VIEWS


@asset(
    partitions_def=shards,
    group_name="synthesis",
    ins={f"neighbors_{view}": AssetIn() for view in VIEWS},
    code_version="1",
    metadata=versioned_by("mining"),
    automation_condition=per_shard(),
    # Pairs that break mining's contract must not reach the (GPU-bound) generation steps.
    check_specs=[
        AssetCheckSpec("scores_inside_window", asset="image_pairs", blocking=True),
        AssetCheckSpec("no_self_pairs", asset="image_pairs", blocking=True),
        AssetCheckSpec("query_is_first_hard_negative", asset="image_pairs", blocking=True),
    ],
    description="(query, target) pairs whose similarity in at least one view lies inside that "
    "view's window, with the views that found them and hard negatives (query first).",
)
def image_pairs(context: AssetExecutionContext, mining: Mining, **neighbors):
    windows = mining.all_windows()
    by_view = {view: neighbors[f"neighbors_{view}"] for view in VIEWS}
    pairs = mine_pairs(
        by_view,
        windows,
        targets_per_query=mining.targets_per_query,
        num_hard_negatives=mining.num_hard_negatives,
        seed=mining.seed,
    )
    queries = len(by_view[next(iter(VIEWS))])
    per_view = Counter(view for views in pairs["views"] for view in views)
    scores = {view: [] for view in VIEWS}
    for views, values in zip(pairs["views"], pairs["scores"]):
        for view, score in zip(views, values):
            scores[view].append(score)
    metadata = {
        "dagster/row_count": len(pairs),
        "queries": queries,
        "pairs_per_query": len(pairs) / queries if queries else 0.0,
        "queries_without_target": 1 - pairs["query_id"].nunique() / queries if queries else 0.0,
        **{f"pairs/{view}": per_view.get(view, 0) for view in VIEWS},
        "score_histogram": histogram(scores, bins=30, xlabel="similarity", title="pair scores"),
    }
    yield Output(pairs, metadata=metadata)
    yield from _checks(pairs, windows)


def _checks(pairs: pd.DataFrame, windows: dict[str, tuple[float, float]]):
    outside = sum(
        not (windows[view][0] < score < windows[view][1])
        for views, values in zip(pairs["views"], pairs["scores"])
        for view, score in zip(views, values)
    )
    yield AssetCheckResult(
        check_name="scores_inside_window", passed=outside == 0, metadata={"outside": outside}
    )
    selfs = int((pairs["query_id"] == pairs["target_id"]).sum())
    yield AssetCheckResult(check_name="no_self_pairs", passed=selfs == 0, metadata={"self": selfs})
    wrong = int(
        sum(len(h) == 0 or h[0] != q for q, h in zip(pairs["query_id"], pairs["hard_negative_ids"]))
    )
    yield AssetCheckResult(
        check_name="query_is_first_hard_negative", passed=wrong == 0, metadata={"wrong": wrong}
    )


