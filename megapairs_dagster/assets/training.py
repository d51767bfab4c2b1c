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
from typing import TYPE_CHECKING, Any

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
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    StaticPartitionsDefinition,
    asset,
    open_pipes_session,
)

from megapairs_dagster import __version__
from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.plots import line_plot
from megapairs_dagster.assets.policies import GPU_POOL, gpu_tags
from megapairs_dagster.resources.profiles import BASE_ENCODER, TrainingRun
from megapairs_dagster.resources.settings import Compute, Training, domain_config
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.retrieval import DEFAULT_HARD_NEGATIVES, HARD_NEGATIVE_MODES

# The trainer, the models and training_run (all torch) load in the steps that use them, not in
# every process that loads the code location (tests/test_import_cost.py).
if TYPE_CHECKING:
    from megapairs_dagster.assets.training_run import TrainingJob
    from megapairs_dagster.retrieval import MMRetCLIP, MMRetMLLM

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


def _settings(store: ArtifactStore) -> dict:
    """The store's settings, for a process that opens it itself."""
    return {"url": store.url, "endpoint_url": store.endpoint_url, "cache_dir": store.cache_dir}


def _launched(context: AssetExecutionContext, job: "TrainingJob", nproc: int, workdir: Path
              ) -> dict:
    """The job run by torchrun in ``nproc`` processes, rank 0 reporting through Pipes."""
    from megapairs_dagster.assets.training_run import WorkerFailed, launch_torchrun

    with open_pipes_session(
        context=context, context_injector=PipesTempFileContextInjector(),
        message_reader=PipesTempFileMessageReader(),
    ) as session:
        try:
            launch_torchrun(job, nproc, dict(session.get_bootstrap_env_vars()),
                            context.log.info, workdir)
        except WorkerFailed as error:
            context.log.error(str(error))
            raise
    (record,) = session.get_custom_messages()
    return record


def train(context: AssetExecutionContext, store: ArtifactStore, image_index: pd.DataFrame,
          nproc: int, **job: Any) -> dict:
    """The result of the ``TrainingJob`` of ``job``'s fields, trained in the step's process or
    by torchrun in ``nproc``; the job reads the store and a copy of the image index."""
    from megapairs_dagster.assets.training_run import TrainingJob, run_training

    with tempfile.TemporaryDirectory(prefix="mmret-job-") as workdir:
        index_path = Path(workdir) / "image_index.parquet"
        image_index.to_parquet(index_path)
        training_job = TrainingJob(store=_settings(store), image_index=str(index_path), **job)
        if nproc == 1:
            return run_training(training_job, log=context.log.info)
        return _launched(context, training_job, nproc, Path(workdir))


def check_processes(training: Training, gpus: int) -> None:
    """Refuse to train in more processes than the step asked GPUs for (or fewer)."""
    if training.nproc_per_node != gpus:
        raise ValueError(
            f"training.nproc_per_node is {training.nproc_per_node} but the code location "
            f"was built for {gpus} (the step's GPU request): reload it with the new setting"
        )


def trained_output(record: dict, result: dict, store: ArtifactStore, title: str) -> Output:
    """The record of a finished training run, with its report as metadata."""
    losses = result["losses"]
    report = result["report"]
    client = store.client()
    return Output(
        record,
        # Each training run is a new checkpoint: its scores turn stale even when code and
        # inputs are unchanged (Dagster would otherwise derive the same data version).
        data_version=DataVersion(result["checkpoint"]),
        metadata={
            "samples_per_s": float(report["samples_per_s"]),
            "seconds": float(report["seconds"]),
            "final_loss": float(report["final_loss"]),
            "processes": report["world_size"],
            "resumed_from_step": report["resumed_from_step"],
            **{key: value for key, value in result["data"].items() if isinstance(value, int)},
            "checkpoint": MetadataValue.path(client.url(result["checkpoint"])),
            "loss_curve": line_plot(
                list(range(1, len(losses) + 1)), {"loss": losses},
                xlabel="step", title=f"{title} training loss",
            ),
        },
    )


def build_training_asset(runs: Mapping[str, TrainingRun], gpus: int = 1) -> AssetsDefinition:
    """``mmret_clip``, partitioned by the deployment's training runs; each step asks for
    ``gpus`` GPUs (``training.nproc_per_node``) and trains in that many processes."""

    @asset(
        partitions_def=training_partitions(runs),
        group_name="training",
        ins={"base_encoders": AssetIn(), "image_index": AssetIn()},
        # the triplets' rows, and their images one file each in the export (read as the
        # DataLoader workers need them, so memory does not grow with the data)
        deps=[AssetDep("triplets", partition_mapping=AllPartitionMapping()),
              AssetDep("megapairs_export")],
        code_version="2",
        metadata=versioned_by("training"),
        # no automation condition: a training run costs GPU-days and is launched deliberately
        pool=GPU_POOL,
        op_tags=gpu_tags(gpus),
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
        from megapairs_dagster.retrieval import TrainConfig

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
        check_processes(training, gpus)
        hard_negatives = run.hard_negatives or training.hard_negatives
        query_as_negative, negatives_per_item = HARD_NEGATIVE_MODES[hard_negatives]
        train_config = domain_config(
            TrainConfig, training, seed=training.seed + run.seed_offset, device=compute.device,
            max_steps=run.max_steps or training.max_steps, query_as_negative=query_as_negative,
        )
        if run.data == "captions":
            train_config.batch_size *= IMAGES_PER_TRIPLET
            train_config.caption_loss_weight = 1.0
        result = train(
            context, store, image_index, training.nproc_per_node,
            run=name, data=run.data, source=source, config=asdict(train_config),
            cache_images=training.cache_images,
            checkpoint=f"mmret_clip/{name}/{context.run_id[:8]}",
            hard_negatives=negatives_per_item,
            views=list(run.views) if run.views else training.views,
            export_transformers=training.export_transformers,
            triplets_fraction=run.triplets_fraction,
        )
        record.update(result, hard_negatives=hard_negatives)
        return trained_output(record, result, store, f"MMRet-CLIP ({name})")

    return mmret_clip


def trained_model(record: dict, store: ArtifactStore) -> "MMRetCLIP | MMRetMLLM":
    """The model an ``mmret_clip`` or ``mmret_mllm`` record names: its checkpoint, or its
    start model when the run trained nothing."""
    from megapairs_dagster.assets.training_run import open_model
    from megapairs_dagster.retrieval import MMRetCLIP, MMRetMLLM

    if record.get("checkpoint"):
        kind = MMRetMLLM if record["start"].get("kind") == "mllm" else MMRetCLIP
        return kind.from_pretrained(store.client().local_dir(record["checkpoint"]))
    return open_model(record["start"], store)
