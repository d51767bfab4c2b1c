"""``mmret_mllm`` (per MLLM training run): MMRet-MLLM, LoRA on LLaVA-NeXT, trained like
``mmret_clip`` (the same job, launch, resume and record, ``training_run``).

The paper's two stages are two runs: ``mllm_s1`` on the mined triplets, ``mllm_s2`` from S1's
merged checkpoint (a fresh adapter) on MMEB-train, skipped until ``mllm_training.mmeb_train``
is set. Checkpoints are merged LLaVA-NeXT models that ``MMRetMLLM.from_pretrained`` opens.
"""

from collections.abc import Mapping
from dataclasses import asdict

import pandas as pd
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    AssetObservation,
    AssetsDefinition,
    asset,
)

from megapairs_dagster import __version__
from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.policies import GPU_POOL, gpu_tags
from megapairs_dagster.assets.training import (
    check_processes,
    train,
    trained_output,
    training_partitions,
)
from megapairs_dagster.resources.profiles import MLLM_BASE, MLLMRun
from megapairs_dagster.resources.settings import Compute, MLLMTraining, Training, domain_config
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.retrieval import HARD_NEGATIVE_MODES

ASSET = "mmret_mllm"


def mllm_start(run: MLLMRun, settings: MLLMTraining, store: ArtifactStore) -> dict:
    """Where a run's model comes from: the base model, or the checkpoint of the run it
    continues (which must have been trained)."""
    if run.start == MLLM_BASE:
        base, stored = settings.base_model, False
    else:
        try:
            previous = load_artifact(store.client(), artifact_relpath([ASSET], run.start))
        except FileNotFoundError:
            raise RuntimeError(f"this run continues {run.start}: materialise "
                               f"mmret_mllm[{run.start}] first") from None
        base, stored = previous["checkpoint"], True
    return {"kind": "mllm", "base_model": base, "stored": stored, "continues": run.start,
            "lora_rank": settings.lora_rank, "image_side": settings.image_side,
            "bf16": settings.bf16, "gradient_checkpointing": settings.gradient_checkpointing}


def _mmeb_train(settings: MLLMTraining) -> dict:
    return {"root": settings.mmeb_train, "images": settings.mmeb_train_images or
            settings.mmeb_train, "split": settings.mmeb_train_split,
            "subsets": settings.mmeb_train_subsets, "per_subset": settings.mmeb_train_per_subset}


def build_mllm_training_asset(runs: Mapping[str, MLLMRun], gpus: int = 1) -> AssetsDefinition:
    """``mmret_mllm``, partitioned by the deployment's MLLM runs; ``gpus`` as ``mmret_clip``'s
    (``training.nproc_per_node``)."""

    @asset(
        name=ASSET,
        partitions_def=training_partitions(runs),
        # its own group: a group is one job, one partitioning
        group_name="training_mllm",
        ins={"image_index": AssetIn()},
        deps=[AssetDep("triplets", partition_mapping=AllPartitionMapping()),
              AssetDep("megapairs_export")],
        code_version="1",
        metadata=versioned_by("mllm_training"),
        # no automation condition: a training run costs GPU-days and is launched deliberately
        pool=GPU_POOL,
        op_tags=gpu_tags(gpus),
        output_required=False,
        description="MMRet-MLLM checkpoint (LLaVA-NeXT with its LoRA adapter merged) trained "
        "with InfoNCE like MMRet-CLIP, with a record of data, config and code. A stage on "
        "MMEB-train is skipped (an observation says so) until mllm_training.mmeb_train is set.",
    )
    def mmret_mllm(
        context: AssetExecutionContext,
        mllm_training: MLLMTraining,
        training: Training,
        image_index: pd.DataFrame,
        store: ArtifactStore,
        compute: Compute,
    ):
        from megapairs_dagster.retrieval import TrainConfig  # torch: in the step, not at load

        name = context.partition_key
        run = runs[name]
        if run.data == "mmeb_train" and not mllm_training.mmeb_train:
            message = f"{name} not trained: set mllm_training.mmeb_train (a local MMEB-train copy)"
            context.log.warning(message)
            context.log_event(AssetObservation(context.asset_key, partition=name,
                                               metadata={"skipped": message}))
            return
        check_processes(training, gpus)
        source = mllm_start(run, mllm_training, store)
        hard_negatives = "query" if run.data == "mmeb_train" else mllm_training.hard_negatives
        query_as_negative, negatives_per_item = HARD_NEGATIVE_MODES[hard_negatives]
        train_config = domain_config(
            TrainConfig, mllm_training, seed=mllm_training.seed + run.seed_offset,
            device=compute.device, max_steps=run.max_steps or mllm_training.max_steps,
            query_as_negative=query_as_negative, caption_loss_weight=0.0,
        )
        result = train(
            context, store, image_index, training.nproc_per_node,
            run=name, data=run.data, source=source, config=asdict(train_config),
            cache_images=mllm_training.cache_images,
            checkpoint=f"{ASSET}/{name}/{context.run_id[:8]}",
            hard_negatives=negatives_per_item, asset=ASSET,
            mmeb_train=_mmeb_train(mllm_training) if run.data == "mmeb_train" else None,
        )
        record = {"run": {"name": name, **asdict(run)}, "start": source,
                  "package_version": __version__, **result, "hard_negatives": hard_negatives}
        yield trained_output(record, result, store, f"MMRet-MLLM ({name})")

    return mmret_mllm
