"""``embeddings_<view>`` (per shard): one asset per similarity view, built by one factory."""


import json
from functools import lru_cache

import pandas as pd
from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue, Output, asset

from megapairs_dagster.artifacts import Embeddings
from megapairs_dagster.assets.conditions import per_shard
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS, SHARDS_PER_RUN, TRANSIENT_RETRY
from megapairs_dagster.resources.settings import Compute
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.synthesis.views import VIEWS, open_view_encoder


def view_encoder(view: str, manifest: dict, store: ArtifactStore, compute: Compute):
    """The view's encoder, loaded once per process rather than once per partition."""
    return _cached_encoder(
        view, json.dumps(manifest, sort_keys=True), store.url, store.endpoint_url,
        store.cache_dir, compute.device, compute.dtype,
    )


@lru_cache(maxsize=4)
def _cached_encoder(view, manifest_json, store_url, endpoint_url, cache_dir, device, dtype):
    client = ArtifactStore(url=store_url, endpoint_url=endpoint_url, cache_dir=cache_dir).client()
    return open_view_encoder(
        view,
        json.loads(manifest_json),
        resolve_stored=client.local_dir,
        device=device,
        dtype=dtype,
    )


def build_embeddings_asset(view: str) -> AssetsDefinition:
    @asset(
        name=f"embeddings_{view}",
        partitions_def=shards,
        group_name="ingest_and_embed",
        ins={"corpus_images": AssetIn(), "base_encoders": AssetIn()},
        # The encoder comes from base_encoders: no settings of its own. Image views' 2: JPEGs
        # larger than twice the model's input are decoded at a reduced DCT scale
        # (synthesis/decode.py), which moves pixels by ~1 grey level on average.
        code_version="1" if view == "clip_caption" else "2",
        automation_condition=per_shard(global_deps=["base_encoders"]),
        description=f"L2-normalised float16 {VIEWS[view]} embeddings, row-aligned with "
        "corpus_images.",
        pool=GPU_POOL,
        op_tags=GPU_TAGS,
        retry_policy=TRANSIENT_RETRY,
        backfill_policy=SHARDS_PER_RUN,
    )
    def _embeddings(
        context: AssetExecutionContext,
        corpus_images,  # a DataFrame, or {shard: DataFrame} when the run spans several shards
        base_encoders: dict,
        compute: Compute,
        store: ArtifactStore,
    ):
        # A backfill may hand one run several shards: the encoder is loaded once for all.
        shards_in_run = (
            corpus_images if isinstance(corpus_images, dict)
            else {context.partition_key: corpus_images}
        )
        encoder = view_encoder(view, base_encoders, store, compute)
        results, seconds, rows = {}, 0.0, 0
        for shard, images in shards_in_run.items():
            result = _embed_shard(context, view, encoder, images, compute, shard)
            results[shard] = Embeddings(
                ids=images["image_id"].to_numpy(),
                vectors=result.vectors,
                produced_by={"view": view, "encoder": encoder.identity},
            )
            seconds, rows = seconds + result.seconds, rows + result.rows
        return Output(
            results if isinstance(corpus_images, dict) else results[context.partition_key],
            metadata={
                "dagster/row_count": rows,
                "shards": len(results),
                "dim": int(next(iter(results.values())).vectors.shape[1]),
                "items_per_second": rows / seconds if seconds else 0.0,
                "seconds": seconds,
                "encoder": MetadataValue.json(encoder.identity),
            },
        )

    return _embeddings


def _embed_shard(context, view: str, encoder, images: pd.DataFrame, compute: Compute, shard: str):
    # torch loads in the step that embeds, not in every process that loads the code location
    from megapairs_dagster.synthesis.embed import embed_images, embed_texts
    from megapairs_dagster.synthesis.encoders import DTYPES

    def progress(done: int, total: int) -> None:
        context.log.info(f"{view}[{shard}]: {done}/{total} rows embedded")

    dtype = DTYPES[compute.dtype]
    if view == "clip_caption":
        return embed_texts(encoder, list(images["caption"]), dtype=dtype, progress=progress)
    return embed_images(
        encoder,
        list(images["jpeg"]),
        batch_size=compute.batch_size,
        num_workers=compute.num_workers,
        dtype=dtype,
        progress=progress,
    )


embedding_assets = [build_embeddings_asset(view) for view in VIEWS]
