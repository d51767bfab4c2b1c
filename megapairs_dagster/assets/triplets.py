"""``triplets`` (per shard, DuckDB) and ``megapairs_export`` (the released MegaPairs format)."""

from pathlib import Path

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    MaterializeResult,
    MetadataValue,
    asset,
)

from megapairs_dagster.assets.lookup import image_rows
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.policies import TRANSIENT_RETRY
from megapairs_dagster.resources.settings import TripletDatabase
from megapairs_dagster.resources.store import ArtifactStore, artifact_relpath, load_columns
from megapairs_dagster.synthesis.megapairs_format import write_megapairs
from megapairs_dagster.synthesis.triplet_store import TripletStore


def triplet_store(database: TripletDatabase) -> TripletStore:
    Path(database.path).parent.mkdir(parents=True, exist_ok=True)
    return TripletStore(database.path, lock_timeout_s=database.lock_timeout_s)


@asset(
    partitions_def=shards,
    group_name="triplets",
    ins={
        "image_pairs": AssetIn(),
        "pair_descriptions": AssetIn(),
        "instructions": AssetIn(),
    },
    deps=[AssetDep("corpus_images")],
    code_version="1",
    pool="duckdb",
    retry_policy=TRANSIENT_RETRY,
    check_specs=[AssetCheckSpec("no_duplicate_pairs", asset="triplets")],
    description="Rows of the DuckDB tables `triplets` (one per pair with instructions) and "
    "`images`; materialising a shard replaces its rows in one transaction.",
)
def triplets(
    context: AssetExecutionContext,
    image_pairs: pd.DataFrame,
    pair_descriptions: pd.DataFrame,
    instructions: pd.DataFrame,
    triplet_db: TripletDatabase,
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
    database = triplet_store(triplet_db)
    written = database.replace_shard(shard, rows, images)
    duplicates = database.duplicate_pairs()
    counts = database.counts()
    context.log.info(f"{shard}: {written['triplets_inserted']} triplets written ({counts})")
    yield MaterializeResult(
        metadata={
            "triplets": written["triplets_inserted"],
            "replaced": written["triplets_deleted"],
            "images": written["images_inserted"],
            "lock_wait_s": float(written["wait_s"]),
            "table_total": counts["triplets"],
            "database": MetadataValue.path(str(Path(triplet_db.path).resolve())),
        }
    )
    yield AssetCheckResult(
        check_name="no_duplicate_pairs", passed=duplicates == 0, metadata={"duplicates": duplicates}
    )


@asset(
    group_name="triplets",
    deps=[AssetDep("triplets")],
    code_version="1",
    pool="duckdb",
    description="All triplets in the released MegaPairs format (q_img, q_text, t_img, hns with "
    "the query first) as jsonl and parquet, with every image they reference.",
)
def megapairs_export(triplet_db: TripletDatabase, store: ArtifactStore) -> MaterializeResult:
    frame = triplet_store(triplet_db).triplets_frame()
    ids = set(frame["query_id"]) | set(frame["target_id"])
    ids |= {i for negatives in frame["hard_negative_ids"] for i in negatives}
    jpegs = image_rows(store, ids, ["jpeg"])["jpeg"] if ids else {}
    client = store.client()
    counts = write_megapairs(
        frame,
        client.url("megapairs_export"),
        image_bytes=lambda image_id: jpegs[image_id],
        storage_options=client.storage_options,
    )
    return MaterializeResult(
        metadata={
            "records": counts["records"],
            "images": counts["images"],
            "bytes": counts["image_bytes"],
            "jsonl": MetadataValue.path(counts["jsonl_url"]),
            "parquet": MetadataValue.path(counts["parquet_url"]),
        }
    )
