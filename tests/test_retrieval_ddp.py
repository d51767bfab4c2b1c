"""Two torchrun processes x batch b train like one process x batch 2b (gloo, CPU), with
both loss terms: the composed InfoNCE and the image-caption term.

This file is also the worker torchrun starts: run as a script it trains the tiny CLIP and
rank 0 writes the loss curve to the path given as argument.
"""

import json
import os
import sys
from pathlib import Path

import pytest
from test_retrieval_model import tiny_model
from test_retrieval_train import shape_images, shapes_dataset
from torchrun import run_two_processes

from megapairs_dagster.retrieval import TrainConfig, train_mmret

pytestmark = pytest.mark.slow

STEPS = 4
GLOBAL_BATCH = 8


def config(world_size: int) -> TrainConfig:
    return TrainConfig(
        max_steps=STEPS, batch_size=GLOBAL_BATCH // world_size, learning_rate=1e-4, seed=3,
        caption_loss_weight=0.5,
    )


def dataset(model):
    captions = {image_id: f"image {image_id}" for image_id in shape_images()}
    return shapes_dataset(model, captions=captions)


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    out = tmp_path / "ddp_losses.json"
    completed = run_two_processes(__file__, str(out), timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    distributed = json.loads(out.read_text())
    assert distributed["world_size"] == 2 and distributed["samples"] == STEPS * GLOBAL_BATCH

    model = tiny_model()
    single = train_mmret(model, dataset(model), config(world_size=1))
    # The same global batches and the same candidates; only float sums run in another order
    # (DDP averages two gradients instead of one), which Adam's early steps amplify slightly.
    assert distributed["losses"] == pytest.approx(single.losses, rel=1e-4)
    assert len(set(single.losses)) == STEPS  # the weights do move between steps


if __name__ == "__main__":
    worker_model = tiny_model()
    report = train_mmret(
        worker_model, dataset(worker_model), config(int(os.environ["WORLD_SIZE"]))
    )
    if int(os.environ["RANK"]) == 0:
        Path(sys.argv[1]).write_text(
            json.dumps(
                {"losses": report.losses, "samples": report.samples,
                 "world_size": report.world_size}
            )
        )
