"""Training throughput of MMRet-MLLM: ``train_mmret`` vs a plain peft + transformers loop.

Both train the same tiny random LLaVA-NeXT (tests/tiny_llava_next.py) with the same LoRA
(rank 32 on the language model's linear layers), gradient checkpointing and AdamW, on the same
batch size, and push the same sequences through it per sample: one query (task instruction,
instruction text, image) and 1 + K candidates (positive, query image, K - 1 mined negatives),
all in one left-padded forward, the embedding being the normalised last token. (a) the plain
loop takes one batch already built by the LLaVA-NeXT processor and on the device, and uses
InfoNCE over the batch's candidates; (b) ``train_mmret`` reads JPEG bytes through
``MMRetTrainingSet`` (decode, resize, tile, tokenise in the DataLoader, left-pad in
``MMRetMLLM.collate``) and computes the global-batch loss, three ways:

- ``train_mmret``: every image decoded and tiled in the training process, on every step;
- ``train_mmret_worker``: the same in one DataLoader worker, overlapping the steps (a real
  run's setting: the paper profile has 8 workers per GPU);
- ``train_mmret_cached``: the tiles from the dataset's pixel cache, as the plain loop's
  pre-built batch: the trainer's own overhead.

Each timed run is ``--steps`` steps. What a run does once counts in it: starting the
worker, its first batch and its shutdown cost ~65 ms, a step of this model ~60 ms on one
core, so 12-step runs put the worker variant ~5 % lower than 48-step ones
(docs/benchmarks/README.md); a real run's thousands of steps see only the per-step cost.
Reported: samples/s of each (median over interleaved repeats) and the ratios to (a).
Target: >= 0.9.

    .venv/bin/python bench/train_mllm.py --batch-size 4 --steps 48 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from megapairs_dagster.retrieval import MMRetMLLM, MMRetTrainingSet, TrainConfig, train_mmret
from megapairs_dagster.retrieval.mllm import LORA_TARGETS, candidate_prompt, query_prompt
from megapairs_dagster.synthesis.encoders import resolve_device

ROOT = Path(__file__).resolve().parents[1]
# The tiny LLaVA-NeXT is the tests' (tests/ is not a package; pytest puts it on sys.path), and
# the synthetic JPEG pairs are bench/train.py's.
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]
from tiny_llava_next import IMAGE_SIDE, save_tiny_llava_next
from train import emit, interleaved_rates, synthetic_pairs

TASK = "Find the target image:"


def plain_batch(
    processor: LlavaNextProcessor, dataset: MMRetTrainingSet, loader, size: int, side: int
):
    """One processor batch: the queries of items 0..size-1, then their candidates (positives,
    query images, mined negatives), as ``MMRetMLLM.training_embeddings`` orders them, every
    image resized to ``side`` squared."""
    image = processor.image_token
    queries, positives, query_images, negatives = [], [], [], []
    for index in range(size):
        example = dataset.examples[index]
        instruction, mined = dataset.draw(0, index)
        queries.append((query_prompt(instruction, image, TASK), loader(example.query)))
        positives.append(loader(example.target))
        query_images.append(loader(example.query))
        negatives += [loader(key) for key in mined]
    candidates = [(candidate_prompt(None, image), picture)
                  for picture in positives + query_images + negatives]
    prompts, pictures = zip(*queries, *candidates)
    pictures = [picture.resize((side, side)) for picture in pictures]
    processor.tokenizer.padding_side = "left"
    return processor(text=list(prompts), images=pictures, return_tensors="pt", padding=True)


def plain_model(base: Path, device: torch.device):
    torch.manual_seed(0)
    llava = LlavaNextForConditionalGeneration.from_pretrained(base)
    llava.activation_checkpointing_enable({"use_reentrant": False})
    return get_peft_model(
        llava, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=LORA_TARGETS)
    ).to(device)


def plain_loop(model, batch, size: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` steps of a textbook peft + transformers loop on a ready batch
    (bf16 autocast on CUDA, as ``train_mmret`` computes there)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = batch.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    started = time.perf_counter()
    for _ in range(steps):
        with autocast:
            hidden = model.get_base_model().model(**batch, use_cache=False).last_hidden_state
        embeddings = F.normalize(hidden[:, -1], dim=-1)
        queries, candidates = embeddings[:size], embeddings[size:]
        logits = queries @ candidates.T / 0.02
        loss = F.cross_entropy(logits, torch.arange(size, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hard-negatives", type=int, default=4)
    parser.add_argument("--steps", type=int, default=48, help="optimizer steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    examples, loader = synthetic_pairs(
        args.batch_size * args.steps, 4 * args.batch_size, 64, seed=0
    )
    with tempfile.TemporaryDirectory(prefix="tiny-llava-next-") as directory:
        base = save_tiny_llava_next(Path(directory))
        torch.manual_seed(0)
        model = MMRetMLLM.from_llava_next(base, image_side=IMAGE_SIDE, task_instruction=TASK)
        variants = {  # name: (images cached, DataLoader workers)
            "train_mmret": (0, 0),
            "train_mmret_worker": (0, 1),
            "train_mmret_cached": (len(loader.jpegs), 0),
        }
        datasets = {  # by images cached: the two decoding variants share one
            cache: MMRetTrainingSet(
                examples, loader, preprocess=model.preprocess, tokenizer=model.tokenize,
                hard_negatives=args.hard_negatives, cache_images=cache,
            )
            for cache, _ in variants.values()
        }
        batch = plain_batch(model.processor, datasets[0], loader, args.batch_size, IMAGE_SIDE)
        plain = plain_model(base, device)

        def rate(name: str) -> float:
            if name == "plain_peft":
                return args.batch_size * args.steps / plain_loop(
                    plain, batch, args.batch_size, args.steps, device
                )
            cache, workers = variants[name]
            config = TrainConfig(
                max_steps=args.steps, batch_size=args.batch_size, num_workers=workers,
                device=str(device), learning_rate=1e-4,
            )
            return train_mmret(model, datasets[cache], config).samples_per_s

        medians, rates = interleaved_rates(
            ["plain_peft", *variants], rate, args.warmup, args.repeats
        )
    result = {
        "model": "tests/tiny_llava_next.save_tiny_llava_next (random 2-layer CLIP + Llama)",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "hard_negatives": args.hard_negatives,
        "steps": args.steps,
        "sequence_length": batch["input_ids"].shape[1],
        "samples_per_s": medians,
        "all_samples_per_s": rates,
        "ratio": {name: medians[name] / medians["plain_peft"] for name in variants},
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
