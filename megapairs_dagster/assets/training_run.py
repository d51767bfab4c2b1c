"""The body of an ``mmret_clip`` or ``mmret_mllm`` training run, shared by the two ways the
assets run it (the start record's ``kind`` says which model).

With ``training.nproc_per_node == 1`` the step's own process trains. With more, the step
starts ``torchrun --nproc_per_node N -m megapairs_dagster.assets.training_run JOB`` through a
Dagster Pipes session (``launch_torchrun``): every process rebuilds the model and the data
from the artifact store and trains its slice of each global batch; rank 0 sends its log lines
and the run's record back through Pipes. On Kubernetes the step's pod asks for the N GPUs
(``policies.gpu_tags``) and torchrun runs inside it.

Either way the resumable training state goes to the artifact store at every checkpoint
(``training.checkpoint_every``), keyed by everything that fixes the run's result, and a
failed or cancelled run picks it up on its next try; it is deleted once the model is saved.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

from megapairs_dagster.assets.triplets import triplet_store
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.retrieval import (
    DEFAULT_HARD_NEGATIVES,
    CaptionSet,
    ExportedImages,
    MMRetCLIP,
    MMRetMLLM,
    MMRetTrainingSet,
    TrainConfig,
    hf_clip,
    nested_subset,
    train_mmret,
    triplets_from_views,
)
from megapairs_dagster.retrieval.defaults import DEMO_BASE
from megapairs_dagster.retrieval.mllm_configs import save_demo_llava_next
from megapairs_dagster.retrieval.mmeb_train import (
    composed_pairs,
    mmeb_training_set,
    read_mmeb_train,
)
from megapairs_dagster.retrieval.train import STATE_FILE
from megapairs_dagster.synthesis.encoders import RecordedFiles
from megapairs_dagster.synthesis.image_index import read_images
from megapairs_dagster.synthesis.megapairs_format import EXPORT_COLUMNS, PARQUET_NAME

STDERR_TAIL_LINES = 60  # of torchrun's output, quoted when a worker fails
EXPORT = "megapairs_export"  # where the images training reads lie, one file each
TRAINING_COLUMNS = [*EXPORT_COLUMNS, "views", "shard", "config_hash"]


def open_model(source: dict, store: ArtifactStore) -> MMRetCLIP | MMRetMLLM:
    """The model a start record describes; the base encoder's files must still have the
    hashes ``base_encoders`` recorded."""
    client = store.client()
    if source.get("kind") == "mllm":
        return _open_mllm(source, client)
    if source["stored"]:
        return MMRetCLIP.from_pretrained(client.local_dir(source["pretrained"]))
    expected = RecordedFiles(source["files"], "base_encoders") if source.get("files") else None
    return MMRetCLIP.from_open_clip(
        source["model_name"], source["pretrained"], cache_dir=str(client.cache_dir),
        expected_files=expected,
    )


def _open_mllm(source: dict, client) -> MMRetMLLM:
    """A fresh LoRA adapter on the LLaVA-NeXT base a start record names: a model name or
    directory, a checkpoint in the store (a stage continuing from another), or the demo's
    small model, built from its config (the same in every process)."""
    options = {"lora_rank": source["lora_rank"], "lora_alpha": 2 * source["lora_rank"],
               "image_side": source["image_side"],
               "gradient_checkpointing": source["gradient_checkpointing"],
               "dtype": torch.bfloat16 if source["bf16"] else None}
    if source["stored"]:
        return MMRetMLLM.from_llava_next(client.local_dir(source["base_model"]), **options)
    if source["base_model"] != DEMO_BASE:
        return MMRetMLLM.from_llava_next(source["base_model"], **options)
    with tempfile.TemporaryDirectory(prefix="demo-llava-next-") as built:
        return MMRetMLLM.from_llava_next(save_demo_llava_next(built), **options)


@dataclass(frozen=True)
class TrainingJob:
    """Everything a training process needs, as JSON: the processes torchrun starts share
    nothing else with the step."""

    run: str  # the partition: a training run's name
    data: str  # "triplets" or "captions"
    source: dict  # where the model starts (training.start_model)
    store: dict  # the ArtifactStore's settings (credentials come from the environment)
    image_index: str  # a parquet copy of the image index, local to the step's machine
    config: dict  # TrainConfig's fields
    cache_images: int
    checkpoint: str  # where the trained model goes in the store
    hard_negatives: int = DEFAULT_HARD_NEGATIVES  # per item, counting the query image
    views: list[str] | None = None  # train on the pairs these views mined; None: all
    export_transformers: bool = False  # also save the transformers CLIPModel layout
    triplets_fraction: float | None = None  # a nested subset of the triplets; None: all
    asset: str = "mmret_clip"  # whose run this is: where its resumable state lives
    mmeb_train: dict | None = None  # data "mmeb_train": read_mmeb_train's arguments, images

    def state_key(self) -> str:
        """Where the resumable state lives: a new start, config or data starts afresh."""
        fixed = {"run": self.run, "data": self.data, "source": self.source,
                 "config": {k: v for k, v in self.config.items() if k != "num_workers"},
                 "hard_negatives": self.hard_negatives, "views": self.views,
                 "triplets_fraction": self.triplets_fraction,
                 **({"mmeb_train": self.mmeb_train} if self.mmeb_train else {})}
        digest = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.asset}/{self.run}/state/{digest}/{STATE_FILE}"

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> TrainingJob:
        return cls(**json.loads(Path(path).read_text()))


def _training_set(job: TrainingJob, store: ArtifactStore, index: pd.DataFrame,
                  model: MMRetCLIP, caption_loss_weight: float, seed: int):
    """The triplets (only the columns training reads) and a loader of their images from
    ``megapairs_export``, with a record of what they are."""
    client = store.client()
    frame = triplet_store(store).triplets_frame(columns=TRAINING_COLUMNS)
    exported = _exported_records(client)
    if exported != len(frame):
        raise RuntimeError(
            f"megapairs_export holds {exported} triplets, the triplet store {len(frame)}: "
            "materialise megapairs_export after triplets, then train"
        )
    frame = nested_subset(triplets_from_views(frame, job.views), job.triplets_fraction)
    if frame.empty:
        raise RuntimeError(
            "no triplets in the store" + (f" mined by {job.views}" if job.views else "")
            + (f" in a {job.triplets_fraction} subset" if job.triplets_fraction else "")
            + ": materialise `triplets` for some shards first"
        )
    captions = None
    if caption_loss_weight:  # the caption column alone: no image is read here
        captions = read_images(client, index, set(frame["query_id"]), ["caption"])["caption"]
    dataset = MMRetTrainingSet.from_triplets(
        frame, ExportedImages(client.url(EXPORT), client.storage_options),
        preprocess=model.preprocess, tokenizer=model.tokenize,
        captions=None if captions is None else captions.to_dict(), seed=seed,
        cache_images=job.cache_images, hard_negatives=job.hard_negatives,
    )
    return dataset, {
        "triplets": len(frame),
        "views": job.views or "all",
        "triplets_fraction": job.triplets_fraction or 1.0,
        "shards": sorted(set(frame["shard"])),
        "generation_config_hashes": sorted(set(frame["config_hash"])),
    }


def _exported_records(client) -> int:
    """How many triplets the export's parquet holds (its footer; 0 when never exported)."""
    path = f"{EXPORT}/{PARQUET_NAME}"
    if not client.exists(path):
        return 0
    with client.path(path).open("rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def _caption_set(job: TrainingJob, store: ArtifactStore, index: pd.DataFrame, model: MMRetCLIP):
    table = read_images(store.client(), index, index["image_id"], ["caption", "jpeg"])
    jpegs = table["jpeg"].to_dict()
    dataset = CaptionSet.from_image_bytes(
        table["caption"].to_dict(), jpegs.__getitem__,
        preprocess=model.preprocess, tokenizer=model.tokenize, cache_images=job.cache_images,
    )
    return dataset, {"captioned_images": len(table), "shards": sorted(set(index["shard"]))}


def _mmeb_train_set(job: TrainingJob, model: MMRetMLLM, seed: int):
    """MMEB-train's composed (image + text -> image) examples, the query image the only hard
    negative (MMEB-train mines none)."""
    settings = dict(job.mmeb_train)
    images = settings.pop("images")
    pairs, counts = composed_pairs(read_mmeb_train(**settings), images)
    if not pairs:
        raise RuntimeError(f"MMEB-train at {settings['root']}: no example with a query image and "
                           f"a positive image ({counts})")
    dataset = mmeb_training_set(pairs, preprocess=model.preprocess, tokenizer=model.tokenize,
                                seed=seed, cache_images=job.cache_images, hard_negatives=1)
    return dataset, {"examples": len(pairs), "per_subset": counts, "split": settings["split"]}


def run_training(job: TrainingJob, log: Callable[[str], None]) -> dict | None:
    """Train, save the model to the store and return the run's record (rank 0; other ranks
    return None)."""
    rank = int(os.environ.get("RANK", "0"))
    store = ArtifactStore(**job.store)
    client = store.client()
    model = open_model(job.source, store)
    if job.export_transformers:  # refused now, not after the training
        hf_clip.clip_config(model.model_cfg)
    index = pd.read_parquet(job.image_index)
    config = TrainConfig(**job.config)
    if job.data == "captions":
        dataset, data = _caption_set(job, store, index, model)
    elif job.data == "mmeb_train":
        dataset, data = _mmeb_train_set(job, model, config.seed)
    else:
        dataset, data = _training_set(job, store, index, model, config.caption_loss_weight,
                                      config.seed)
    state_key = job.state_key()
    with tempfile.TemporaryDirectory(prefix=f"mmret-{job.run}-") as local:
        resumed_from = None
        if config.checkpoint_every:
            config.checkpoint_dir = local
            if client.exists(state_key):  # every rank loads the state it resumes from
                Path(local, STATE_FILE).write_bytes(client.read_bytes(state_key))
                resumed_from = client.url(state_key)

        def upload(path: Path, step: int) -> None:
            client.write_bytes(state_key, path.read_bytes())
            log(f"step {step}: training state saved to {client.url(state_key)}")

        def progress(p) -> None:
            if p.step % 25 == 0 or p.step == p.max_steps:
                log(f"step {p.step}/{p.max_steps} loss {p.loss:.3f} "
                    f"({p.samples_per_s:.0f} samples/s)")

        report = train_mmret(model, dataset, config, progress=progress,
                             on_checkpoint=upload if config.checkpoint_every else None)
    if rank != 0:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        # An MLLM's adapter is merged: a standalone LLaVA-NeXT, as the released weights are.
        merged = {"merge_lora": True} if isinstance(model, MMRetMLLM) else {}
        client.upload_dir(model.save_pretrained(Path(tmp) / "model", **merged), job.checkpoint)
        if job.export_transformers:
            exported = model.save_pretrained(Path(tmp) / "transformers", layout="transformers")
            client.upload_dir(exported, f"{job.checkpoint}/transformers")
    if client.exists(state_key):  # the model is saved: nothing left to resume
        client.fs.rm(client.path(state_key).path)
    config.checkpoint_dir = None
    return {
        "checkpoint": job.checkpoint,
        "transformers_checkpoint": f"{job.checkpoint}/transformers" if job.export_transformers
        else None,
        "training": asdict(config),
        "data": data,
        "report": {
            "steps": report.steps, "samples_per_s": report.samples_per_s,
            "seconds": report.seconds, "final_loss": report.losses[-1],
            "world_size": report.world_size, "resumed_from_step": report.resumed_from_step,
            "resumed_from": resumed_from,
        },
        "losses": report.losses,
    }


class WorkerFailed(RuntimeError):
    """torchrun exited non-zero: a worker failed or was killed."""


def launch_torchrun(job: TrainingJob, nproc: int, pipes_env: dict[str, str],
                    log: Callable[[str], None], workdir: Path) -> None:
    """Run the job in ``nproc`` processes on this machine; raise ``WorkerFailed`` quoting the
    end of torchrun's output (which names the failed rank and its error) when one fails."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "megapairs_dagster.assets.training_run",
        str(job.write(workdir / "job.json")),
    ]
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    log(f"launching {' '.join(command[2:])}")
    process = subprocess.Popen(command, env={**env, **pipes_env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    def forward() -> None:  # the step's own output still shows everything torchrun prints
        for line in process.stdout:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    returncode = process.wait()
    reader.join(timeout=10)
    if returncode:
        raise WorkerFailed(
            f"torchrun ({nproc} processes) exited with code {returncode}; the end of its "
            "output:\n" + "\n".join(tail)
        )


def main(job_path: str) -> None:
    """A torchrun process: rank 0 reports through Dagster Pipes, the others only train."""
    job = TrainingJob.read(job_path)
    if int(os.environ.get("RANK", "0")) != 0:
        run_training(job, log=lambda _: None)
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        record = run_training(job, log=pipes.log.info)
        pipes.report_custom_message(record)


if __name__ == "__main__":
    main(sys.argv[1])
