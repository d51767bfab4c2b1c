"""``triplets`` (per shard, tables in the store) and ``megapairs_export`` (the released format)."""

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    MaterializeResult,
    MetadataValue,
    asset,
)

from megapairs_dagster.artifacts import artifact_relpath, load_columns
from megapairs_dagster.assets.conditions import per_shard, rebuild_after_updates
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.policies import TRANSIENT_RETRY
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.synthesis.image_index import iter_images
from megapairs_dagster.synthesis.megapairs_format import EXPORT_COLUMNS, write_megapairs
from megapairs_dagster.synthesis.triplet_store import TripletStore


def triplet_store(store: ArtifactStore) -> TripletStore:
    """The triplet, image and score tables of this deployment, kept in its artifact store."""
    return TripletStore(store.client())


@asset(
    partitions_def=shards,
    group_name="synthesis",
    ins={
        "image_pairs": AssetIn(),
        "pair_descriptions": AssetIn(),
        "instructions": AssetIn(),
    },
    deps=[AssetDep("corpus_images")],
    code_version="1",
    automation_condition=per_shard(),
    retry_policy=TRANSIENT_RETRY,
    check_specs=[
        # duplicates would be counted twice by training and the export
        AssetCheckSpec("no_duplicate_pairs", asset="triplets", blocking=True),
        AssetCheckSpec(
            "triplets_from_pairs", asset="triplets",
            description="A shard with mined pairs yields at least one triplet; none means "
            "every pair was rejected by the generation steps (see their reject tables).",
        ),
    ],
    description="The shard's rows of the tables `triplets` (one per pair with instructions) "
    "and `images`, Parquet files in the artifact store (queried through DuckDB views); a "
    "shard's files are replaced atomically.",
)
def triplets(
    context: AssetExecutionContext,
    image_pairs: pd.DataFrame,
    pair_descriptions: pd.DataFrame,
    instructions: pd.DataFrame,
    store: ArtifactStore,
):
    shard = context.partition_key
    joined = (
        image_pairs.merge(pair_descriptions[["pair_id", "description", "model"]], on="pair_id")
        .rename(columns={"model": "description_model"})
        .merge(
            instructions[
                ["pair_id", "instructions", "backend", "model", "prompt_version", "config_hash"]
            ],
            on="pair_id",
        )
        .rename(columns={"model": "instruction_model", "backend": "generator_backend"})
    )
    rows = joined[
        [
            "query_id", "target_id", "instructions", "hard_negative_ids", "views", "scores",
            "description", "generator_backend", "description_model", "instruction_model",
            "prompt_version", "config_hash",
        ]
    ].copy()
    for column in ("instructions", "hard_negative_ids", "views", "scores"):
        rows[column] = rows[column].map(list)
    images = load_columns(store.client(), "corpus_images", [shard], ["image_id", "caption"])
    source = store.client().url(artifact_relpath(["corpus_images"], shard) + ".parquet")
    images["uri"] = [f"{source}#image_id={image_id}" for image_id in images["image_id"]]
    written = triplet_store(store).replace_shard(shard, rows, images)
    # This shard's rows only: a shard's step never reads the others (the export checks all).
    duplicates = int(rows.duplicated(["query_id", "target_id"]).sum())
    context.log.info(f"{shard}: {written['triplets_inserted']} triplets written")
    yield MaterializeResult(
        metadata={
            "dagster/row_count": written["triplets_inserted"],
            "replaced": written["triplets_deleted"],
            "images": written["images_inserted"],
            "write_s": float(written["write_s"]),
            "tables": MetadataValue.path(store.client().url("tables")),
        }
    )
    yield AssetCheckResult(
        check_name="no_duplicate_pairs", passed=duplicates == 0, metadata={"duplicates": duplicates}
    )
    yield AssetCheckResult(
        check_name="triplets_from_pairs",
        severity=AssetCheckSeverity.WARN,  # an empty shard is suspicious, not wrong
        passed=len(rows) > 0 or len(image_pairs) == 0,
        metadata={"pairs": len(image_pairs), "triplets": len(rows)},
    )


@asset(
    group_name="export",
    deps=[AssetDep("triplets")],
    ins={"image_index": AssetIn()},
    code_version="1",
    automation_condition=rebuild_after_updates(),
    check_specs=[AssetCheckSpec(
        "no_duplicate_pairs_across_shards", asset="megapairs_export",
        description="No (query, target) pair in the triplets of two shards.",
    )],
    description="All triplets in the released MegaPairs format (q_img, q_text, t_img, hns with "
    "the query first) as jsonl and parquet, with every image they reference.",
)
def megapairs_export(store: ArtifactStore, image_index: pd.DataFrame):
    frame = triplet_store(store).triplets_frame(columns=[*EXPORT_COLUMNS, "shard"])
    client = store.client()

    def images(ids: list[int]):  # a row group at a time, not every image at once
        for chunk in iter_images(client, image_index, ids, ["jpeg"]):
            yield from chunk["jpeg"].items()

    counts = write_megapairs(
        frame, client.url("megapairs_export"), images=images,
        storage_options=client.storage_options,
    )
    yield MaterializeResult(
        metadata={
            "records": counts["records"],
            "images": counts["images"],
            "bytes": counts["image_bytes"],
            "jsonl": MetadataValue.path(counts["jsonl_url"]),
            "parquet": MetadataValue.path(counts["parquet_url"]),
        }
    )
    duplicates = int(frame.duplicated(["query_id", "target_id"]).sum())
    yield AssetCheckResult(
        check_name="no_duplicate_pairs_across_shards", passed=duplicates == 0,
        metadata={"duplicates": duplicates, "shards": int(frame["shard"].nunique())},
    )
