"""Ingest: one corpus shard → normalised images plus the inputs rejected, with reasons."""


from collections import Counter

from dagster import AssetExecutionContext, AssetOut, MetadataValue, Output, multi_asset

from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.conditions import catch_up_only
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.policies import TRANSIENT_RETRY
from megapairs_dagster.resources.settings import CorpusSource, domain_config
from megapairs_dagster.synthesis.ingest import ingest_shard
from megapairs_dagster.synthesis.normalize import IngestRules
from megapairs_dagster.synthesis.readers import discover_shards


@multi_asset(
    outs={
        "corpus_images": AssetOut(
            description="Normalised RGB JPEGs (longest side ≤ max_side) with caption, "
            "content-derived int64 image_id, sha256 and size; repairs names what was done to "
            "the caption (source_caption_chars: its length as read).",
            metadata=versioned_by("corpus_source"),
            automation_condition=catch_up_only(),
        ),
        "corpus_rejects": AssetOut(
            description="Inputs that could not be used, each with a reason and detail.",
            metadata=versioned_by("corpus_source"),
            automation_condition=catch_up_only(),
        ),
    },
    partitions_def=shards,
    group_name="ingest_and_embed",
    code_version="2",
    retry_policy=TRANSIENT_RETRY,
)
def corpus(context: AssetExecutionContext, corpus_source: CorpusSource):
    options = corpus_source.storage_options()
    found = {s.name: s for s in discover_shards(corpus_source.url, options, corpus_source.format)}
    shard = found.get(context.partition_key)
    if shard is None:
        raise FileNotFoundError(
            f"shard {context.partition_key!r} is not at {corpus_source.url} (found {len(found)} shards)"
        )
    images, rejects = ingest_shard(
        shard,
        domain_config(IngestRules, corpus_source),
        storage_options=options,
        image_column=corpus_source.image_column,
        caption_column=corpus_source.caption_column,
        progress=lambda n: context.log.info(f"{shard.name}: {n} samples read"),
    )
    reasons = Counter(rejects["reason"])
    repairs = Counter(name for names in images["repairs"] for name in names.split(",") if name)
    context.log.info(f"{shard.name}: {len(images)} images kept, {len(rejects)} rejected")
    yield Output(
        images,
        output_name="corpus_images",
        metadata={
            "dagster/row_count": len(images),
            "source": MetadataValue.path(shard.url),
            **{f"repair/{name}": n for name, n in sorted(repairs.items())},
            "preview": MetadataValue.json(
                images[["key", "width", "height", "caption"]].head(5).to_dict("records")
            ),
        },
    )
    yield Output(
        rejects,
        output_name="corpus_rejects",
        metadata={"dagster/row_count": len(rejects), **{f"reason/{r}": n for r, n in sorted(reasons.items())}},
    )

