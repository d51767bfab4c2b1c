"""``knn_index_<view>`` (global) and ``neighbors_<view>`` (per shard), one pair per view."""


import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    Config,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from megapairs_dagster.artifacts import Embeddings, KnnIndexArtifact
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.policies import TRANSIENT_RETRY
from megapairs_dagster.synthesis.knn import (
    build_index,
    choose_index_spec,
    deserialize_index,
    recall_at_k,
    search_neighbors,
    serialize_index,
)
from megapairs_dagster.synthesis.views import VIEWS


class KnnIndexConfig(Config):
    memory_budget_gb: float = Field(default=8.0, description="Memory the index may take.")
    index_spec: str = Field(
        default="auto", description="A faiss index_factory string, or auto to choose by size."
    )
    recall_k: int = 20
    recall_sample: int = Field(default=1000, description="Queries used to estimate recall.")
    min_recall: float = Field(default=0.95, description="Asset check threshold for recall@k.")


class NeighborsConfig(Config):
    k: int = Field(default=20, description="Neighbours kept per image (itself excluded).")


def build_knn_assets(view: str) -> list[AssetsDefinition]:
    index_name, neighbors_name = f"knn_index_{view}", f"neighbors_{view}"

    @asset(
        name=index_name,
        group_name="knn",
        ins={"embeddings": AssetIn(f"embeddings_{view}")},
        code_version="1",
        check_specs=[AssetCheckSpec("recall_at_k", asset=index_name)],
        description=f"faiss index over every shard's {VIEWS[view]} embeddings; the type is "
        "chosen from the collection size and a memory budget.",
    )
    def _index(context: AssetExecutionContext, config: KnnIndexConfig, embeddings: dict):
        parts: list[Embeddings] = [embeddings[key] for key in sorted(embeddings)]
        ids = np.concatenate([part.ids for part in parts])
        vectors = np.concatenate([part.vectors for part in parts])
        spec = config.index_spec
        if spec == "auto":
            budget = int(config.memory_budget_gb * 2**30)
            spec = choose_index_spec(len(vectors), vectors.shape[1], budget)
        index = build_index(vectors, spec)
        recall = recall_at_k(index, vectors, k=config.recall_k, sample_size=config.recall_sample)
        context.log.info(f"{index_name}: {spec} over {len(ids)} vectors, recall@{config.recall_k} "
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
                f"recall@{config.recall_k}": float(recall),
            },
        )
        yield AssetCheckResult(
            check_name="recall_at_k",
            passed=bool(recall >= config.min_recall),
            metadata={"recall": float(recall), "threshold": config.min_recall, "spec": spec},
        )

    @asset(
        name=neighbors_name,
        partitions_def=shards,
        group_name="knn",
        ins={"embeddings": AssetIn(f"embeddings_{view}"), "index": AssetIn(index_name)},
        code_version="1",
        retry_policy=TRANSIENT_RETRY,
        description=f"Top-k {VIEWS[view]} neighbours of each image of the shard, with scores "
        "(the image itself and exact duplicates excluded).",
    )
    def _neighbors(
        context: AssetExecutionContext,
        config: NeighborsConfig,
        embeddings: Embeddings,
        index: KnnIndexArtifact,
    ) -> Output[pd.DataFrame]:
        frame = search_neighbors(
            deserialize_index(index.index_bytes), index.ids, embeddings.vectors, embeddings.ids,
            k=config.k,
        )
        top1 = [scores[0] for scores in frame["scores"] if len(scores)]
        return Output(
            frame,
            metadata={
                "rows": len(frame),
                "k": config.k,
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


knn_assets = [definition for view in VIEWS for definition in build_knn_assets(view)]
