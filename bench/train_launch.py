"""Training as the ``mmret_clip`` asset runs it: memory as the data grows, and the launch.

(1) Peak memory of one training run (PSS summed over the training process and its
DataLoader workers, so pages shared after fork count once) at 1x and 4x the demo's data
(1,705 triplets over 2,000 images per 1x), reading images (a) the way training did before:
every referenced JPEG read into one in-memory dict first, then decoded from it, and (b) the
way the asset reads them now: one file each from ``megapairs_export``, opened by the
DataLoader workers as their items need them.
(2) samples/s of one training job launched in 2 torchrun processes through Dagster Pipes (as
the asset launches it with ``training.nproc_per_node: 2``) vs the same job trained in the
step's own process, at the same global batch.

    .venv/bin/python bench/train_launch.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
from PIL import Image
from train import synthetic_pairs

from megapairs_dagster.assets.training_run import (
    EXPORT,
    TRAINING_COLUMNS,
    TrainingJob,
    open_model,
    run_training,
)
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.retrieval import MMRetTrainingSet, TrainConfig, train_mmret
from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.megapairs_format import write_megapairs
from megapairs_dagster.synthesis.triplet_store import TRIPLETS_SCHEMA, TripletStore

DEMO_TRIPLETS, DEMO_IMAGES = 1705, 2000
MODEL = {"model_name": "megapairs-demo-clip", "pretrained": None, "stored": False}


def build_store(root: Path, scale: int, image_size: int) -> dict:
    """A store holding what training reads: triplets and their export (no corpus needed)."""
    examples, jpegs = synthetic_pairs(DEMO_TRIPLETS * scale, DEMO_IMAGES * scale, image_size,
                                      seed=scale)
    rows = pd.DataFrame({
        "query_id": [e.query for e in examples],
        "target_id": [e.target for e in examples],
        "instructions": [list(e.instructions) for e in examples],
        "hard_negative_ids": [[e.query, *e.negatives] for e in examples],
        "views": [["clip_image"]] * len(examples),
        "scores": [[0.9]] * len(examples),
    }).drop_duplicates(["query_id", "target_id"])
    for column in TRIPLETS_SCHEMA.names[6:]:
        rows[column] = "bench"
    client = ArtifactStoreClient(str(root))
    images = pd.DataFrame({"image_id": range(len(jpegs.jpegs)), "caption": "", "uri": "bench"})
    TripletStore(client).replace_shard("00000", rows, images)
    write_megapairs(rows, client.url(EXPORT),
                    images=lambda ids: ((i, jpegs.jpegs[i]) for i in ids))
    return {"triplets": len(rows), "images": len(jpegs.jpegs),
            "jpeg_mb": sum(map(len, jpegs.jpegs)) / 2**20}


def job_for(root: Path, args, batch_size: int) -> TrainingJob:
    index = root / "image_index.parquet"  # training on triplets alone reads no caption
    pd.DataFrame({"image_id": [], "shard": [], "row": []}).to_parquet(index)
    config = TrainConfig(max_steps=args.steps, batch_size=batch_size, warmup_steps=0,
                         num_workers=args.num_workers, caption_loss_weight=0.0)
    return TrainingJob(run="bench", data="triplets", source=MODEL,
                       store={"url": str(root), "endpoint_url": None, "cache_dir": None},
                       image_index=str(index), config=asdict(config), cache_images=0,
                       checkpoint="bench/model")


def train_in_memory(job: TrainingJob) -> None:
    """The pre-streaming path: every referenced JPEG in a dict, then the same trainer."""
    store = ArtifactStore(**job.store)
    client = store.client()
    frame = TripletStore(client).triplets_frame(columns=TRAINING_COLUMNS)
    ids = set(frame["query_id"]) | set(frame["target_id"])
    ids |= {i for negatives in frame["hard_negative_ids"] for i in negatives}
    jpegs = {i: client.read_bytes(f"{EXPORT}/images/{i}.jpg") for i in ids}
    model = open_model(job.source, store)
    dataset = MMRetTrainingSet.from_triplets(
        frame, lambda i: Image.open(io.BytesIO(jpegs[i])).convert("RGB"),
        preprocess=model.preprocess, tokenizer=model.tokenize, seed=0,
    )
    train_mmret(model, dataset, TrainConfig(**job.config))


def _tree_pss_mb(pid: int) -> float:
    """PSS of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def peak_pss(command: list[str]) -> float:
    """Run ``command``, sampling its process tree's PSS every 20 ms; the peak, in MiB."""
    process = subprocess.Popen(command)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _tree_pss_mb(process.pid))
        time.sleep(0.02)
    if process.returncode:
        raise SystemExit(f"{command} failed with code {process.returncode}")
    return peak


def launched_samples_per_s(job: TrainingJob, processes: int) -> float:
    """The job through Dagster Pipes and torchrun, exactly as ``mmret_clip`` launches it."""
    from dagster import MaterializeResult, materialize
    from dagster import asset as dagster_asset

    from megapairs_dagster.assets.training import _launched

    reports = []

    @dagster_asset(name="bench_training")
    def bench_training(context):
        with tempfile.TemporaryDirectory() as workdir:
            reports.append(_launched(context, job, processes, Path(workdir))["report"])
        return MaterializeResult()

    materialize([bench_training])
    return float(reports[0]["samples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=512, help="stored JPEG side (the corpus max_side)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", default="bench/results/train_launch.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path = args.child
        job = TrainingJob.read(path)
        train_in_memory(job) if mode == "in_memory" else run_training(job, log=lambda _: None)
        return
    results: dict = {"memory": {}, "launch": {}}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for scale in args.scales:
            root = Path(tmp, f"x{scale}")
            data = build_store(root, scale, args.image_size)
            job_path = job_for(root, args, args.batch_size).write(root / "job.json")
            row = {**data}
            for mode in ("in_memory", "streaming"):
                row[f"{mode}_peak_pss_mb"] = peak_pss(
                    [sys.executable, __file__, "--child", mode, str(job_path)])
            results["memory"][f"{scale}x"] = row
            print(f"{scale}x data ({data['triplets']} triplets, {data['images']} images, "
                  f"{data['jpeg_mb']:.0f} MiB of JPEG): peak PSS in-memory "
                  f"{row['in_memory_peak_pss_mb']:.0f} MiB, streaming "
                  f"{row['streaming_peak_pss_mb']:.0f} MiB", flush=True)
        root = Path(tmp, f"x{args.scales[0]}")
        single = run_training(job_for(root, args, args.batch_size), log=lambda _: None)
        two = launched_samples_per_s(job_for(root, args, args.batch_size // 2), 2)
        in_process = float(single["report"]["samples_per_s"])
        results["launch"] = {"in_process_samples_per_s": in_process,
                             "pipes_2_processes_samples_per_s": two, "ratio": two / in_process}
    memory = results["memory"]
    first, last = (memory[f"{s}x"] for s in (args.scales[0], args.scales[-1]))
    for mode in ("in_memory", "streaming"):
        grown = last[f"{mode}_peak_pss_mb"] - first[f"{mode}_peak_pss_mb"]
        results["memory"][f"{mode}_growth_mb"] = grown
    print(f"peak memory growth {args.scales[0]}x -> {args.scales[-1]}x: in-memory "
          f"{memory['in_memory_growth_mb']:+.0f} MiB, streaming "
          f"{memory['streaming_growth_mb']:+.0f} MiB")
    launch = results["launch"]
    print(f"samples/s at global batch {args.batch_size}: in the step's process "
          f"{launch['in_process_samples_per_s']:.1f}, 2 processes through Pipes "
          f"{launch['pipes_2_processes_samples_per_s']:.1f} (ratio {launch['ratio']:.2f}; "
          f"{os.cpu_count()} CPU cores)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
