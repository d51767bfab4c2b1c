"""``mmret_clip`` (per training run): MMRet-CLIP trained on the mined triplets.

A partition is a named training run of the deployment (``TrainingRun`` in
``resources/profiles.py``): the model it starts from, its data and its seed. The demo trains
its base CLIP on three seeds and once on captions alone (the equal-compute control); the
paper deployment trains ``base`` and ``large``; both have ``base_encoder``, zero training
steps, which scores the start model itself.
"""

import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    DataVersion,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    asset,
)

from megapairs_dagster import __version__
from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.plots import line_plot
from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS
from megapairs_dagster.assets.triplets import triplet_store
from megapairs_dagster.resources.profiles import BASE_ENCODER, TrainingRun
from megapairs_dagster.resources.settings import Compute, Training, domain_config
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.retrieval import (
    DEFAULT_HARD_NEGATIVES,
    CaptionSet,
    MMRetCLIP,
    MMRetTrainingSet,
    TrainConfig,
    train_mmret,
)
from megapairs_dagster.synthesis.encoders import RecordedFiles
from megapairs_dagster.synthesis.image_index import read_images

# A triplet sample encodes its query, its target and the other hard negatives (the query is
# the first): the caption-only control takes that many (image, caption) samples per sample.
IMAGES_PER_TRIPLET = 1 + DEFAULT_HARD_NEGATIVES


def training_partitions(runs: Mapping[str, TrainingRun]) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition(list(runs))


def start_model(run: TrainingRun, base_encoders: dict) -> dict:
    """Where a run's model comes from: an open_clip name and pretrained source, and whether
    that source is a folder in the artifact store (the demo's bootstrapped CLIP)."""
    if run.start != BASE_ENCODER:
        return {"model_name": run.start, "pretrained": run.pretrained, "stored": False}
    clip = base_encoders["clip"]
    return {"model_name": clip["model_name"], "pretrained": clip["pretrained"],
            "stored": bool(clip.get("stored")), "files": clip["identity"].get("files")}


def open_model(source: dict, store: ArtifactStore) -> MMRetCLIP:
    """The model ``start_model`` (or a checkpoint record) describes; the base encoder's files
    must still have the hashes ``base_encoders`` recorded."""
    client = store.client()
    if source["stored"]:
        return MMRetCLIP.from_pretrained(client.local_dir(source["pretrained"]))
    expected = RecordedFiles(source["files"], "base_encoders") if source.get("files") else None
    return MMRetCLIP.from_open_clip(
        source["model_name"], source["pretrained"], cache_dir=str(client.cache_dir),
        expected_files=expected,
    )


def _triplet_set(store: ArtifactStore, index: pd.DataFrame, model: MMRetCLIP, training: Training,
                 seed: int):
    database = triplet_store(store)
    frame = database.triplets_frame()
    if frame.empty:
        raise RuntimeError("no triplets in the store: materialise `triplets` for some shards first")
    ids = set(frame["query_id"]) | set(frame["target_id"])
    ids |= {i for negatives in frame["hard_negative_ids"] for i in negatives}
    rows = read_images(store.client(), index, ids, ["jpeg", "caption"])
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


def _caption_set(store: ArtifactStore, index: pd.DataFrame, model: MMRetCLIP, training: Training):
    table = read_images(store.client(), index, index["image_id"], ["caption", "jpeg"])
    jpegs = table["jpeg"].to_dict()
    dataset = CaptionSet.from_image_bytes(
        table["caption"].to_dict(), jpegs.__getitem__,
        preprocess=model.preprocess, tokenizer=model.tokenize,
        cache_images=training.cache_images,
    )
    return dataset, {"captioned_images": len(table), "shards": sorted(set(index["shard"]))}


def build_training_asset(runs: Mapping[str, TrainingRun]) -> AssetsDefinition:
    """``mmret_clip``, partitioned by the deployment's training runs."""

    @asset(
        partitions_def=training_partitions(runs),
        group_name="training",
        ins={"base_encoders": AssetIn(), "image_index": AssetIn()},
        deps=[AssetDep("triplets", partition_mapping=AllPartitionMapping())],
        code_version="1",
        metadata=versioned_by("training"),
        # no automation condition: a training run costs GPU-days and is launched deliberately
        pool=GPU_POOL,
        op_tags=GPU_TAGS,
        description="MMRet-CLIP checkpoint (safetensors + config) trained with InfoNCE over "
        "in-batch candidates plus hard negatives, with a record of data, config and code.",
    )
    def mmret_clip(
        context: AssetExecutionContext,
        training: Training,
        base_encoders: dict,
        image_index: pd.DataFrame,
        store: ArtifactStore,
        compute: Compute,
    ):
        name = context.partition_key
        run = runs[name]
        source = start_model(run, base_encoders)
        record = {"run": {"name": name, **asdict(run)}, "start": source,
                  "package_version": __version__}
        if run.data == "none":
            context.log.info(f"{name}: zero training steps, the start model is the checkpoint")
            return Output({**record, "checkpoint": None},
                          metadata={"start": MetadataValue.json(source)},
                          data_version=DataVersion(json.dumps(source, sort_keys=True)))
        model = open_model(source, store)
        seed = training.seed + run.seed_offset
        train_config = domain_config(TrainConfig, training, seed=seed, device=compute.device)
        if run.data == "captions":
            dataset, data = _caption_set(store, image_index, model, training)
            train_config.batch_size *= IMAGES_PER_TRIPLET
            train_config.caption_loss_weight = 1.0
        else:
            dataset, data = _triplet_set(store, image_index, model, training, seed)
        report = train_mmret(
            model, dataset, train_config,
            progress=lambda p: context.log.info(
                f"step {p.step}/{p.max_steps} loss {p.loss:.3f} ({p.samples_per_s:.0f} samples/s)"
            ) if p.step % 25 == 0 or p.step == p.max_steps else None,
        )
        relpath = f"mmret_clip/{name}/{context.run_id[:8]}"
        with tempfile.TemporaryDirectory() as tmp:
            store.client().upload_dir(model.save_pretrained(Path(tmp) / "model"), relpath)
        record.update({
            "checkpoint": relpath,
            "training": asdict(train_config),
            "data": data,
            "report": {
                "steps": report.steps, "samples_per_s": report.samples_per_s,
                "seconds": report.seconds, "final_loss": report.losses[-1],
            },
        })
        return Output(
            record,
            # Each training run is a new checkpoint: its scores turn stale even when code and
            # inputs are unchanged (Dagster would otherwise derive the same data version).
            data_version=DataVersion(relpath),
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

    return mmret_clip


def trained_model(record: dict, store: ArtifactStore) -> MMRetCLIP:
    """The model an ``mmret_clip`` record names: its checkpoint, or its start model when the
    run trained nothing."""
    if record.get("checkpoint"):
        return MMRetCLIP.from_pretrained(store.client().local_dir(record["checkpoint"]))
    return open_model(record["start"], store)
