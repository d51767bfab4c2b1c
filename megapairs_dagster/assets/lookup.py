"""``image_index`` (global): image id → shard and row, the one way to reach another shard's images.

Every step that needs images of other shards (the generation steps, training, the export)
takes this asset as an input, so Dagster's lineage and staleness see the dependency, and a
step reads only the row groups it needs instead of listing every shard.
"""

import json

from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    DagsterEventType,
    MetadataValue,
    Output,
    asset,
)

from megapairs_dagster.artifacts import artifact_relpath, load_artifact, load_columns
from megapairs_dagster.assets.conditions import rebuild_after_updates
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.synthesis.diagnostics import scenes_from_meta
from megapairs_dagster.synthesis.image_index import build_image_index

CORPUS = AssetKey("corpus_images")


@asset(
    group_name="indexes",
    deps=[AssetDep("corpus_images")],
    code_version="1",
    automation_condition=rebuild_after_updates(),
    description="Every ingested image's shard and row in corpus_images (sorted by image id). "
    "Rebuilt incrementally: only shards ingested since the last build are read.",
)
def image_index(context: AssetExecutionContext, store: ArtifactStore):
    instance = context.instance
    sources = instance.get_latest_storage_id_by_partition(
        CORPUS, DagsterEventType.ASSET_MATERIALIZATION,
        partitions=set(instance.get_dynamic_partitions("shards")),
    )
    previous, reuse = None, set()
    last = instance.get_latest_materialization_event(context.asset_key)
    if last is not None and last.asset_materialization is not None:
        recorded = last.asset_materialization.metadata.get("sources")
        recorded = json.loads(recorded.value) if recorded is not None else {}
        reuse = {shard for shard, storage_id in sources.items() if recorded.get(shard) == storage_id}
        if reuse:
            previous = load_artifact(store.client(), artifact_relpath(["image_index"], None))
    index = build_image_index(store.client(), sources, previous, reuse)
    read = sorted(set(sources) - reuse)
    context.log.info(f"image_index: {len(index)} images over {len(sources)} shards "
                     f"({len(read)} read, {len(reuse)} reused)")
    return Output(
        index,
        metadata={
            "dagster/row_count": len(index),
            "shards": len(sources),
            "shards_read": len(read),
            "duplicate_ids": int(index["image_id"].duplicated().sum()),
            "sources": MetadataValue.text(json.dumps(sources, sort_keys=True)),
        },
    )


def corpus_lookup(store: ArtifactStore, partitions: list[str]) -> tuple[dict, dict]:
    """Captions and (where recorded) scenes of every image of ``partitions``, by image id."""
    table = load_columns(store.client(), "corpus_images", partitions, ["image_id", "caption", "meta"])
    captions = dict(zip(table["image_id"].astype(int), table["caption"]))
    return captions, scenes_from_meta(table["image_id"], table["meta"])
