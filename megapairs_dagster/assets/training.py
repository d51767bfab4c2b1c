"""``mmret_clip`` (per model variant): MMRet-CLIP trained on the mined triplets."""

import tempfile
from dataclasses import asdict
from pathlib import Path

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    asset,
)

from megapairs_dagster import __version__
from megapairs_dagster.assets.lookup import image_rows
from megapairs_dagster.assets.plots import line_plot
from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS
from megapairs_dagster.assets.triplets import triplet_store
from megapairs_dagster.resources.settings import Compute, Training, TripletDatabase
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.retrieval import MMRetCLIP, MMRetTrainingSet, TrainConfig, train_mmret

# demo: the demo base CLIP; base / large: open_clip ViT-B-16 / ViT-L-14 with OpenAI weights.
model_variants = StaticPartitionsDefinition(["demo", "base", "large"])


def open_start_model(variant: str, base_encoders: dict, store: ArtifactStore, cache_dir: str):
    """The model a variant starts from: the demo base CLIP, or an open_clip variant."""
    if variant == "demo":
        clip = base_encoders["clip"]
        source = clip["pretrained"]
        if clip.get("stored"):
            source = str(store.client().local_dir(source, cache_dir))
        return MMRetCLIP.from_pretrained(source)
    return MMRetCLIP.from_pretrained(variant)


@asset(
    partitions_def=model_variants,
    group_name="training",
    ins={"base_encoders": AssetIn()},
    deps=[AssetDep("triplets", partition_mapping=AllPartitionMapping())],
    code_version="1",
    pool=GPU_POOL,
    op_tags=GPU_TAGS,
    description="MMRet-CLIP checkpoint (safetensors + config) trained with InfoNCE over "
    "in-batch candidates plus hard negatives, with a record of data, config and code.",
)
def mmret_clip(
    context: AssetExecutionContext,
    training: Training,
    base_encoders: dict,
    triplet_db: TripletDatabase,
    store: ArtifactStore,
    compute: Compute,
):
    variant = context.partition_key
    model = open_start_model(variant, base_encoders, store, compute.cache_dir)
    database = triplet_store(triplet_db)
    frame = database.triplets_frame()
    if frame.empty:
        raise RuntimeError("no triplets in DuckDB: materialise `triplets` for some shards first")
    ids = set(frame["query_id"]) | set(frame["target_id"])
    ids |= {i for negatives in frame["hard_negative_ids"] for i in negatives}
    rows = image_rows(store, ids, ["jpeg", "caption"])
    jpegs, captions = rows["jpeg"].to_dict(), rows["caption"].to_dict()
    dataset = MMRetTrainingSet.from_triplet_store(
        database, jpegs.__getitem__, preprocess=model.preprocess, tokenizer=model.tokenize,
        captions=captions if training.caption_loss_weight else None, seed=training.seed,
    )
    train_config = TrainConfig(
        max_steps=training.max_steps, batch_size=training.batch_size,
        grad_accum_steps=training.grad_accum_steps, learning_rate=training.learning_rate,
        warmup_steps=training.warmup_steps, caption_loss_weight=training.caption_loss_weight,
        seed=training.seed, device=compute.device,
    )
    report = train_mmret(
        model, dataset, train_config,
        progress=lambda p: context.log.info(
            f"step {p.step}/{p.max_steps} loss {p.loss:.3f} ({p.samples_per_s:.0f} samples/s)"
        ) if p.step % 25 == 0 or p.step == p.max_steps else None,
    )
    relpath = f"mmret_clip/{variant}/{context.run_id[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        store.client().upload_dir(model.save_pretrained(Path(tmp) / "model"), relpath)
    record = {
        "variant": variant,
        "checkpoint": relpath,
        "training": asdict(train_config),
        "data": {
            "triplets": len(frame),
            "shards": sorted(set(frame["shard"])),
            "generation_config_hashes": sorted(set(frame["config_hash"])),
        },
        "package_version": __version__,
        "report": {
            "steps": report.steps, "samples_per_s": report.samples_per_s,
            "seconds": report.seconds, "final_loss": report.losses[-1],
        },
    }
    return Output(
        record,
        metadata={
            "samples_per_s": float(report.samples_per_s),
            "final_loss": float(report.losses[-1]),
            "triplets": len(frame),
            "checkpoint": MetadataValue.path(store.client().url(relpath)),
            "loss_curve": line_plot(
                list(range(1, len(report.losses) + 1)), {"loss": report.losses},
                xlabel="step", title=f"MMRet-CLIP ({variant}) training loss",
            ),
        },
    )
