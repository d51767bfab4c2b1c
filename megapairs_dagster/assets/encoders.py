"""``base_encoders``: the pinned encoders of the three similarity views."""


import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from dagster import AssetDep, AssetExecutionContext, MetadataValue, Output, asset

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.conditions import baseline_once
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.plots import line_plot
from megapairs_dagster.resources.settings import Encoders
from megapairs_dagster.resources.store import ArtifactStore


def _training_sample(context: AssetExecutionContext, store, limit: int, seed: int):
    """Up to ``limit`` (jpeg, caption) pairs drawn evenly from every ingested shard."""
    client = store.client()
    keys = context.instance.get_dynamic_partitions(shards.name)
    frames = []
    for key in sorted(keys):
        relpath = artifact_relpath(["corpus_images"], key)
        if client.exists(relpath + ".parquet"):
            frames.append(load_artifact(client, relpath)[["jpeg", "caption"]])
    if not frames:
        raise RuntimeError("bootstrap needs corpus_images: materialise at least one shard first")
    rows = [row for frame in frames for row in frame.itertuples(index=False)]
    order = np.random.default_rng(seed).permutation(len(rows))[:limit]
    return [rows[i].jpeg for i in order], [rows[i].caption for i in order], len(frames)


@asset(
    group_name="encoders",
    deps=[AssetDep("corpus_images")],
    code_version="2",  # 2: the demo CLIP is trained by the MMRet trainer
    metadata=versioned_by("encoders"),
    # the baseline every embedding was made with: adding shards must not silently retrain it
    automation_condition=baseline_once(),
    description="Encoders of the clip_image, clip_caption and dino_image views, pinned by "
    "name, tag and file hashes. The demo profile trains a small CLIP on the corpus captions.",
)
def base_encoders(context: AssetExecutionContext, encoders: Encoders, store: ArtifactStore):
    # torch and open_clip load in this step, not in every process that loads the code location
    from megapairs_dagster.synthesis.bootstrap import train_demo_clip
    from megapairs_dagster.synthesis.encoders import build_demo_dino, load_clip, load_dino

    client = store.client()
    if encoders.mode == "pretrained":
        _, text = load_clip(encoders.clip_model, encoders.clip_pretrained)
        dino = load_dino(
            encoders.dino_model,
            image_size=encoders.dino_image_size,
            trust_remote_code=encoders.trust_remote_code,
        )
        manifest = {
            "mode": "pretrained",
            "clip": {"model_name": encoders.clip_model, "pretrained": encoders.clip_pretrained,
                     "stored": False, "identity": text.identity},
            "dino": {"name_or_path": encoders.dino_model, "stored": False,
                     "identity": dino.identity},
        }
        return Output(_with_view_settings(manifest, encoders), metadata=_identity_metadata(manifest))

    jpegs, captions, num_shards = _training_sample(
        context, store, encoders.bootstrap_max_images, encoders.seed
    )
    context.log.info(f"training the demo CLIP on {len(jpegs)} images from {num_shards} shards")
    with tempfile.TemporaryDirectory() as tmp:
        report = train_demo_clip(
            jpegs,
            captions,
            Path(tmp) / "clip",
            model_name=encoders.clip_model,
            seed=encoders.seed,
            max_seconds=encoders.bootstrap_max_seconds,
            progress=lambda msg: context.log.info(str(msg)),
        )
        dino_identity = build_demo_dino(Path(tmp) / "dino", seed=encoders.seed)
        version = context.run_id[:8]
        clip_rel, dino_rel = f"base_encoders/{version}/clip", f"base_encoders/{version}/dino"
        client.upload_dir(Path(tmp) / "clip", clip_rel)
        client.upload_dir(Path(tmp) / "dino", dino_rel)
    curve = report.curve
    manifest = {
        "mode": "bootstrap",
        "clip": {"model_name": encoders.clip_model, "pretrained": clip_rel, "stored": True,
                 "identity": report.identity},
        "dino": {"name_or_path": dino_rel, "stored": True, "identity": dino_identity},
        "bootstrap": {
            "images": len(jpegs),
            "stopped_because": report.stopped_because,
            "curve": [asdict(point) for point in curve],
        },
    }
    metadata = _identity_metadata(manifest)
    metadata["bootstrap/curve"] = line_plot(
        [p.seconds for p in curve],
        {
            "image→text R@1": [p.image_to_text_r1 for p in curve],
            "text→image R@1": [p.text_to_image_r1 for p in curve],
        },
        xlabel="training seconds",
        title="demo CLIP: held-out caption retrieval",
    )
    metadata["bootstrap/best_mean_r1"] = float(report.best.mean_r1)
    metadata["bootstrap/stopped_because"] = report.stopped_because
    return Output(_with_view_settings(manifest, encoders), metadata=metadata)


def _with_view_settings(manifest: dict, encoders: Encoders) -> dict:
    manifest["dino"]["foreground_only"] = encoders.foreground_only
    manifest["dino"]["image_size"] = encoders.dino_image_size
    return manifest


def _identity_metadata(manifest: dict) -> dict:
    return {
        "clip": MetadataValue.json(manifest["clip"]),
        "dino": MetadataValue.json(manifest["dino"]),
    }
