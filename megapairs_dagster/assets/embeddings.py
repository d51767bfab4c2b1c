"""``embeddings_<view>`` (per shard): one asset per similarity view, built by one factory."""


import json
from functools import lru_cache

import pandas as pd
from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue, Output, asset

from megapairs_dagster.artifacts import Embeddings
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS, TRANSIENT_RETRY
from megapairs_dagster.resources.settings import Compute
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.synthesis.embed import embed_images, embed_texts
from megapairs_dagster.synthesis.views import DTYPES, VIEWS, open_view_encoder


def view_encoder(view: str, manifest: dict, store: ArtifactStore, compute: Compute):
    """The view's encoder, loaded once per process rather than once per partition."""
    return _cached_encoder(
        view, json.dumps(manifest, sort_keys=True), store.url, store.endpoint_url,
        compute.cache_dir, compute.device, compute.dtype,
    )


@lru_cache(maxsize=4)
def _cached_encoder(view, manifest_json, store_url, endpoint_url, cache_dir, device, dtype):
    client = ArtifactStore(url=store_url, endpoint_url=endpoint_url).client()
    return open_view_encoder(
        view,
        json.loads(manifest_json),
        resolve_stored=lambda rel: client.local_dir(rel, cache_dir),
        device=device,
        dtype=dtype,
    )


def build_embeddings_asset(view: str) -> AssetsDefinition:
    @asset(
        name=f"embeddings_{view}",
        partitions_def=shards,
        group_name="embeddings",
        ins={"corpus_images": AssetIn(), "base_encoders": AssetIn()},
        code_version="1",
        description=f"L2-normalised float16 {VIEWS[view]} embeddings, row-aligned with "
        "corpus_images.",
        pool=GPU_POOL,
        op_tags=GPU_TAGS,
        retry_policy=TRANSIENT_RETRY,
    )
    def _embeddings(
        context: AssetExecutionContext,
        corpus_images: pd.DataFrame,
        base_encoders: dict,
        compute: Compute,
        store: ArtifactStore,
    ):
        encoder = view_encoder(view, base_encoders, store, compute)
        total = len(corpus_images)

        def progress(done: int, _total: int = total) -> None:
            context.log.info(f"{view}: {done}/{_total} rows embedded")

        dtype = DTYPES[compute.dtype]
        if view == "clip_caption":
            result = embed_texts(
                encoder, list(corpus_images["caption"]), dtype=dtype, progress=progress
            )
        else:
            result = embed_images(
                encoder,
                list(corpus_images["jpeg"]),
                batch_size=compute.batch_size,
                num_workers=compute.num_workers,
                dtype=dtype,
                progress=progress,
            )
        embeddings = Embeddings(
            ids=corpus_images["image_id"].to_numpy(),
            vectors=result.vectors,
            produced_by={"view": view, "encoder": encoder.identity},
        )
        return Output(
            embeddings,
            metadata={
                "rows": int(result.rows),
                "dim": int(embeddings.vectors.shape[1]),
                "items_per_second": float(result.items_per_second),
                "seconds": float(result.seconds),
                "encoder": MetadataValue.json(encoder.identity),
            },
        )

    return _embeddings


embedding_assets = [build_embeddings_asset(view) for view in VIEWS]
