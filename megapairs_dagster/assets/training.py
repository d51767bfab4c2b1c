"""``mmret_clip`` (per training run): MMRet-CLIP trained on the mined triplets.

A partition is a named training run (``TRAINING_RUNS``): the model it starts from, its data
and its seed. Besides ``base`` and ``large``, the demo trains its base CLIP on three seeds
and once on captions alone with the same compute (the control that shows what the mined
triplets add beyond more training).
"""

import tempfile
from dataclasses import asdict, dataclass
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
from megapairs_dagster.assets.lookup import image_rows, ingested_shards
from megapairs_dagster.assets.plots import line_plot
from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS
from megapairs_dagster.assets.triplets import triplet_store
from megapairs_dagster.resources.settings import Compute, Training, TripletDatabase
from megapairs_dagster.resources.store import ArtifactStore, load_columns
from megapairs_dagster.retrieval import (
    DEFAULT_HARD_NEGATIVES,
    CaptionSet,
    MMRetCLIP,
    MMRetTrainingSet,
    TrainConfig,
    train_mmret,
)


@dataclass(frozen=True)
class TrainingRun:
    start: str  # "demo": the demo base CLIP; "base" / "large": open_clip ViT-B-16 / ViT-L-14, OpenAI
    data: str = "triplets"  # "captions": image-caption pairs only, at equal compute
    seed_offset: int = 0  # added to the Training resource's seed


TRAINING_RUNS = {
    "demo": TrainingRun("demo"),
    "demo_seed1": TrainingRun("demo", seed_offset=1),
    "demo_seed2": TrainingRun("demo", seed_offset=2),
    "demo_captions": TrainingRun("demo", data="captions"),
    "base": TrainingRun("base"),
    "large": TrainingRun("large"),
}
DEMO_SEEDS = ("demo", "demo_seed1", "demo_seed2")
training_runs = StaticPartitionsDefinition(list(TRAINING_RUNS))
# A triplet sample encodes its query, its target and the other hard negatives (the query is
# the first): the caption-only control takes that many (image, caption) samples per sample.
IMAGES_PER_TRIPLET = 1 + DEFAULT_HARD_NEGATIVES


def open_start_model(start: str, base_encoders: dict, store: ArtifactStore, cache_dir: str):
    """The model a run starts from: the demo base CLIP, or an open_clip variant."""
    if start == "demo":
        clip = base_encoders["clip"]
        source = clip["pretrained"]
        if clip.get("stored"):
            source = str(store.client().local_dir(source, cache_dir))
        return MMRetCLIP.from_pretrained(source)
    return MMRetCLIP.from_pretrained(start)


def _triplet_set(database, store: ArtifactStore, model: MMRetCLIP, training: Training, seed: int):
    frame = database.triplets_frame()
    if frame.empty:
        raise RuntimeError("no triplets in DuckDB: materialise `triplets` for some shards first")
    ids = set(frame["query_id"]) | set(frame["target_id"])
    ids |= {i for negatives in frame["hard_negative_ids"] for i in negatives}
    rows = image_rows(store, ids, ["jpeg", "caption"])
    jpegs, captions = rows["jpeg"].to_dict(), rows["caption"].to_dict()
    dataset = MMRetTrainingSet.from_triplet_store(
        database, jpegs.__getitem__, preprocess=model.preprocess, tokenizer=model.tokenize,
        captions=captions if training.caption_loss_weight else None, seed=seed,
        cache_images=training.cache_images,
    )
    return dataset, {
        "triplets": len(frame),
        "shards": sorted(set(frame["shard"])),
        "generation_config_hashes": sorted(set(frame["config_hash"])),
    }


def _caption_set(store: ArtifactStore, model: MMRetCLIP, training: Training):
    shards = ingested_shards(store)
    table = load_columns(store.client(), "corpus_images", shards, ["image_id", "caption", "jpeg"])
    jpegs = dict(zip(table["image_id"].astype(int), table["jpeg"]))
    dataset = CaptionSet.from_image_bytes(
        dict(zip(table["image_id"].astype(int), table["caption"])), jpegs.__getitem__,
        preprocess=model.preprocess, tokenizer=model.tokenize,
        cache_images=training.cache_images,
    )
    return dataset, {"captioned_images": len(table), "shards": shards}


@asset(
    partitions_def=training_runs,
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
    name = context.partition_key
    run = TRAINING_RUNS[name]
    model = open_start_model(run.start, base_encoders, store, compute.cache_dir)
    seed = training.seed + run.seed_offset
    train_config = TrainConfig(
        max_steps=training.max_steps, batch_size=training.batch_size,
        grad_accum_steps=training.grad_accum_steps, learning_rate=training.learning_rate,
        warmup_steps=training.warmup_steps, caption_loss_weight=training.caption_loss_weight,
        seed=seed, device=compute.device,
    )
    if run.data == "captions":
        dataset, data = _caption_set(store, model, training)
        train_config.batch_size *= IMAGES_PER_TRIPLET
        train_config.caption_loss_weight = 1.0
    else:
        dataset, data = _triplet_set(triplet_store(triplet_db), store, model, training, seed)
    report = train_mmret(
        model, dataset, train_config,
        progress=lambda p: context.log.info(
            f"step {p.step}/{p.max_steps} loss {p.loss:.3f} ({p.samples_per_s:.0f} samples/s)"
        ) if p.step % 25 == 0 or p.step == p.max_steps else None,
    )
    relpath = f"mmret_clip/{name}/{context.run_id[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        store.client().upload_dir(model.save_pretrained(Path(tmp) / "model"), relpath)
    record = {
        "run": {"name": name, **asdict(run)},
        "checkpoint": relpath,
        "training": asdict(train_config),
        "data": data,
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
            "seconds": float(report.seconds),
            "final_loss": float(report.losses[-1]),
            **{key: value for key, value in data.items() if isinstance(value, int)},
            "checkpoint": MetadataValue.path(store.client().url(relpath)),
            "loss_curve": line_plot(
                list(range(1, len(report.losses) + 1)), {"loss": report.losses},
                xlabel="step", title=f"MMRet-CLIP ({name}) training loss",
            ),
        },
    )
