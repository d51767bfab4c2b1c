"""``image_pairs`` (per shard): MegaPairs' heterogeneous KNN mining over the three views."""

from collections import Counter

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    Output,
    asset,
)

from megapairs_dagster.assets.diagnostics import relation_table
from megapairs_dagster.assets.lookup import corpus_lookup, ingested_shards
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.plots import histogram
from megapairs_dagster.demo.relations import RELATION_TYPES, attribute_differences
from megapairs_dagster.resources.settings import Mining
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.synthesis.diagnostics import relation_shares
from megapairs_dagster.synthesis.mining import mine_pairs
from megapairs_dagster.synthesis.views import VIEWS


@asset(
    partitions_def=shards,
    group_name="pairs",
    ins={f"neighbors_{view}": AssetIn() for view in VIEWS},
    deps=[AssetDep("corpus_images")],
    code_version="1",
    check_specs=[
        AssetCheckSpec("scores_inside_window", asset="image_pairs"),
        AssetCheckSpec("no_self_pairs", asset="image_pairs"),
        AssetCheckSpec("query_is_first_hard_negative", asset="image_pairs"),
    ],
    description="(query, target) pairs whose similarity in at least one view lies inside that "
    "view's window, with the views that found them and hard negatives (query first).",
)
def image_pairs(context: AssetExecutionContext, mining: Mining, store: ArtifactStore, **neighbors):
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
        "pairs": len(pairs),
        "queries": queries,
        "pairs_per_query": len(pairs) / queries if queries else 0.0,
        "queries_without_target": 1 - pairs["query_id"].nunique() / queries if queries else 0.0,
        **{f"pairs/{view}": per_view.get(view, 0) for view in VIEWS},
        "score_histogram": histogram(scores, bins=30, xlabel="similarity", title="pair scores"),
    }
    relations = _relations_by_view(store, pairs)
    if relations:
        metadata["relation_types"] = relation_table(relations)
    yield Output(pairs, metadata=metadata)
    yield from _checks(pairs, windows)


def _relations_by_view(store: ArtifactStore, pairs: pd.DataFrame) -> dict:
    """Per finding view, how often each scene attribute differs (corpora with scenes only)."""
    if pairs.empty:
        return {}
    # Targets may live in any shard: read the light columns of every ingested shard.
    _, scenes = corpus_lookup(store, ingested_shards(store))
    if not scenes:
        return {}
    result = {}
    for view in VIEWS:
        found = pairs[pairs["views"].map(lambda views, v=view: v in views)]
        shares = relation_shares(
            zip(found["query_id"], found["target_id"]), scenes, attribute_differences,
            RELATION_TYPES,
        )
        result[view] = {name: shares[name] for name in RELATION_TYPES}
    return result


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


