"""Training throughput: the MMRet trainer vs a plain open_clip training loop.

Both train the same model with AdamW on the same batch size and push the same work per
sample through it: 5 images (query, positive, 3 more hard negatives; the trainer reuses the
query image as the first hard negative) and 1 text. (a) the plain loop takes batches already
decoded and on the device and uses a text->image InfoNCE; (b) ``train_mmret`` reads JPEG
bytes through ``MMRetTrainingSet`` (decode, preprocess, tokenise in the DataLoader) and
computes the composed-query loss over the global batch, once decoding every image on every
step and once with the dataset's pixel cache (``Training.cache_images``, on in the demo
profile), which after the first pass decodes nothing. Reported: samples/s of each (median
over interleaved repeats) and the ratios to (a). Target: >= 0.9. The trainer asks AdamW for
its foreach implementation (PyTorch's default on CUDA, not on the CPU); the plain loop keeps
PyTorch's default, as a textbook loop would, unless ``--plain-foreach`` makes the optimizers
alike.

    .venv/bin/python bench/train.py --batch-size 16 --steps 4 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from megapairs_dagster.retrieval import (
    MMRetCLIP,
    MMRetTrainingSet,
    PairExample,
    TrainConfig,
    train_mmret,
)
from megapairs_dagster.synthesis.encoders import resolve_device

IMAGES_PER_SAMPLE = 5


class JpegImages:
    """Picklable image loader over in-memory JPEG bytes (DataLoader workers call it)."""

    def __init__(self, jpegs: list[bytes]):
        self.jpegs = jpegs

    def __call__(self, image_id: int) -> Image.Image:
        return Image.open(io.BytesIO(self.jpegs[image_id])).convert("RGB")


def synthetic_pairs(count: int, images: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(images):
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((size, size)).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    examples = []
    for _ in range(count):
        query, target, *negatives = (int(i) for i in rng.choice(images, 6, replace=False))
        examples.append(
            PairExample(query, ("show the same scene at night", "make it red"), target,
                        tuple(negatives))
        )
    return examples, JpegImages(jpegs)


def plain_loop(
    model: MMRetCLIP, pixels, tokens, steps: int, learning_rate: float, foreach: bool | None
) -> float:
    """Seconds for ``steps`` steps of a textbook open_clip loop on ready batches."""
    clip = model.clip.train()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=learning_rate, foreach=foreach)
    batch = len(tokens)
    started = time.perf_counter()
    for _ in range(steps):
        images = clip.encode_image(pixels, normalize=True)
        texts = clip.encode_text(tokens, normalize=True)
        logits = texts @ images.T / 0.02
        loss = F.cross_entropy(logits, torch.arange(batch, device=logits.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if pixels.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved_rates(
    names: list[str], rate: Callable[[str], float], warmup: int, repeats: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(median, all values) of ``rate(name)`` per name over ``repeats`` rounds after
    ``warmup``, the order reversed every other round so that no name always runs first."""
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        for name in names if round_index % 2 == 0 else list(reversed(names)):
            value = rate(name)
            if round_index >= warmup:
                rates[name].append(value)
    return {name: statistics.median(values) for name, values in rates.items()}, rates


def emit(result: dict, json_path: str | None) -> None:
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="megapairs-demo-clip")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--image-size", type=int, default=128, help="stored JPEG side")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plain-foreach", action="store_true",
                        help="give the plain loop AdamW's foreach implementation too")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = MMRetCLIP.from_open_clip(args.model, None, device=device)
    examples, loader = synthetic_pairs(
        args.batch_size * args.steps, 4 * args.batch_size, args.image_size, seed=0
    )
    datasets = {
        "train_mmret": MMRetTrainingSet(
            examples, loader, preprocess=model.preprocess, tokenizer=model.tokenizer
        ),
        "train_mmret_cached": MMRetTrainingSet(
            examples, loader, preprocess=model.preprocess, tokenizer=model.tokenizer,
            cache_images=len(loader.jpegs),
        ),
    }
    dataset = datasets["train_mmret"]
    ready = [dataset[(0, i)] for i in range(args.batch_size)]
    pixels = torch.cat(
        [torch.stack([item["query"], item["positive"], *item["negatives"]]) for item in ready]
    ).to(device)
    tokens = torch.stack([item["instruction"] for item in ready]).to(device)
    assert len(pixels) == IMAGES_PER_SAMPLE * args.batch_size
    config = TrainConfig(
        max_steps=args.steps, batch_size=args.batch_size, num_workers=args.num_workers,
        device=str(device), learning_rate=1e-5,
    )

    def rate(name: str) -> float:
        if name == "plain_open_clip":
            return args.batch_size * args.steps / plain_loop(
                model, pixels, tokens, args.steps, 1e-5, args.plain_foreach or None
            )
        return train_mmret(model, datasets[name], config).samples_per_s

    medians, rates = interleaved_rates(
        ["plain_open_clip", *datasets], rate, args.warmup, args.repeats
    )
    result = {
        "model": args.model,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "num_workers": args.num_workers,
        "plain_foreach": args.plain_foreach,
        "samples_per_s": medians,
        "all_samples_per_s": rates,
        "ratio": {name: medians[name] / medians["plain_open_clip"] for name in datasets},
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
