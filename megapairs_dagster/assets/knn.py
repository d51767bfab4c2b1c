"""``knn_index_<view>`` (global) and ``neighbors_<view>`` (per shard), one pair per view."""


import math

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    MetadataValue,
    Output,
    asset,
)

from megapairs_dagster.artifacts import Embeddings, KnnIndexArtifact
from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.conditions import UpdatedAfter, per_shard, rebuild_after_updates
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.policies import TRANSIENT_RETRY
from megapairs_dagster.resources.settings import Indexes
from megapairs_dagster.synthesis.knn import (
    build_index,
    choose_index_spec,
    deserialize_index,
    recall_at_k,
    search_neighbors,
    serialize_index,
)
from megapairs_dagster.synthesis.views import VIEWS


def index_pod_tags(indexes: Indexes) -> dict:
    """On Kubernetes an index step's pod asks for the memory its index may take, plus room for
    the vectors it reads (the k8s executor reads these tags for every run, however started)."""
    memory = f"{math.ceil(indexes.memory_budget_gb * 1.5) + 4}Gi"
    return {"dagster-k8s/config": {"container_config": {"resources": {
        "requests": {"memory": memory}, "limits": {"memory": memory},
    }}}}


def build_knn_assets(view: str, indexes: Indexes) -> list[AssetsDefinition]:
    index_name, neighbors_name = f"knn_index_{view}", f"neighbors_{view}"

    @asset(
        name=index_name,
        group_name="indexes",
        ins={"embeddings": AssetIn(f"embeddings_{view}")},
        code_version="1",
        metadata=versioned_by("indexes.memory_budget_gb", "indexes.index_spec"),
        automation_condition=rebuild_after_updates(),
        # An index that cannot find true neighbours must not feed mining.
        check_specs=[AssetCheckSpec("recall_at_k", asset=index_name, blocking=True)],
        op_tags=index_pod_tags(indexes),
        description=f"faiss index over every shard's {VIEWS[view]} embeddings; the type is "
        "chosen from the collection size and a memory budget.",
    )
    def _index(context: AssetExecutionContext, indexes: Indexes, embeddings: dict):
        parts: list[Embeddings] = [embeddings[key] for key in sorted(embeddings)]
        ids = np.concatenate([part.ids for part in parts])
        vectors = np.concatenate([part.vectors for part in parts])
        spec = indexes.index_spec
        if spec == "auto":
            budget = int(indexes.memory_budget_gb * 2**30)
            spec = choose_index_spec(len(vectors), vectors.shape[1], budget)
        index = build_index(vectors, spec)
        recall = recall_at_k(index, vectors, k=indexes.recall_k, sample_size=indexes.recall_sample)
        context.log.info(f"{index_name}: {spec} over {len(ids)} vectors, recall@{indexes.recall_k} "
                         f"{recall:.3f}")
        artifact = KnnIndexArtifact(
            ids=ids,
            index_bytes=serialize_index(index),
            produced_by={"view": view, "spec": spec, "shards": sorted(embeddings),
                         "recall": float(recall),
                         "encoder": parts[0].produced_by.get("encoder")},
        )
        yield Output(
            artifact,
            metadata={
                "spec": spec,
                "vectors": len(ids),
                "shards": len(parts),
                f"recall@{indexes.recall_k}": float(recall),
            },
        )
        yield AssetCheckResult(
            check_name="recall_at_k",
            passed=bool(recall >= indexes.min_recall),
            metadata={"recall": float(recall), "threshold": indexes.min_recall, "spec": spec},
        )

    @asset(
        name=neighbors_name,
        partitions_def=shards,
        group_name="neighbors",
        ins={"embeddings": AssetIn(f"embeddings_{view}"), "index": AssetIn(index_name)},
        code_version="1",
        metadata=versioned_by("indexes.neighbors_k"),
        # the index searched must already hold this shard's embeddings
        automation_condition=per_shard(
            global_deps=[index_name], fresh=UpdatedAfter(index_name, f"embeddings_{view}")
        ),
        retry_policy=TRANSIENT_RETRY,
        description=f"Top-k {VIEWS[view]} neighbours of each image of the shard, with scores "
        "(the image itself and exact duplicates excluded).",
    )
    def _neighbors(
        context: AssetExecutionContext,
        indexes: Indexes,
        embeddings: Embeddings,
        index: KnnIndexArtifact,
    ) -> Output[pd.DataFrame]:
        frame = search_neighbors(
            deserialize_index(index.index_bytes), index.ids, embeddings.vectors, embeddings.ids,
            k=indexes.neighbors_k,
        )
        top1 = [scores[0] for scores in frame["scores"] if len(scores)]
        return Output(
            frame,
            metadata={
                "dagster/row_count": len(frame),
                "k": indexes.neighbors_k,
                "index_spec": index.produced_by.get("spec", ""),
                "top1_score_median": float(np.median(top1)) if top1 else 0.0,
                "scores": MetadataValue.json(_score_quantiles(frame)),
            },
        )

    return [_index, _neighbors]


def _score_quantiles(frame: pd.DataFrame) -> dict[str, float]:
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s in frame["scores"]] or [[]])
    if not len(scores):
        return {}
    return {f"p{q}": round(float(np.percentile(scores, q)), 4) for q in (5, 25, 50, 75, 95)}


def knn_assets(indexes: Indexes) -> list[AssetsDefinition]:
    """Every view's index and neighbours, the index pods sized by the deployment's budget."""
    return [definition for view in VIEWS for definition in build_knn_assets(view, indexes)]
