"""The MMRet-CLIP trainer: AdamW, linear LR decay, global-batch InfoNCE, DDP, resume.

Data order is ours, not a sampler's: each epoch is a permutation seeded by (seed, epoch);
each optimizer step takes the next ``batch_size x grad_accum_steps x world_size`` indices and
process r takes the r-th contiguous slice. So the global batch of a step is the same for
any number of processes, and a resumed run continues with exactly the batches it would have
seen. Incomplete last batches of an epoch are dropped.

Gradient accumulation caches embeddings (as GradCache does): all micro-batches are first
embedded without gradient, the loss is taken over the full batch, and each micro-batch is
then embedded again and back-propagated with its slice of the embedding gradient. Plain
accumulation of per-micro-batch losses would shrink the contrastive candidate set; this way
``grad_accum_steps=2, batch_size=b`` takes the same step as ``batch_size=2b`` (when the
forward is deterministic: no dropout), for one extra forward pass.

CLIP's learned ``logit_scale`` (and ``logit_bias``) is frozen: the temperature is fixed
(paper: 0.02), and a parameter that gets no gradient would stall DistributedDataParallel.
Every other weight is trained. MMRet-MLLM comes with its own trainable set (its LoRA
adapter), batches (``collate``), embedding step (``training_embeddings``) and training state
(the adapter alone: its frozen base is not written at every checkpoint).

A run ends after ``max_steps``, or earlier when the ``progress`` callback says so: the demo
bootstrap trains its CLIP from scratch here, evaluating every few steps until held-out
retrieval plateaus (it then keeps the learning rate constant, as it cannot know the length).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from megapairs_dagster.retrieval.data import CaptionSet, MMRetTrainingSet
from megapairs_dagster.retrieval.loss import training_loss, world
from megapairs_dagster.retrieval.mllm import MMRetMLLM
from megapairs_dagster.retrieval.model import DEFAULT_TEMPERATURE, MMRetCLIP
from megapairs_dagster.synthesis.encoders import resolve_device

STATE_FILE = "training_state.pt"
FROZEN_PARAMETERS = ("logit_scale", "logit_bias")


@dataclass
class TrainConfig:
    max_steps: int
    batch_size: int = 32  # per process and micro-batch
    grad_accum_steps: int = 1
    learning_rate: float = 5e-6  # the paper's
    warmup_steps: int = 0
    lr_decay: bool = True  # linear to 0 at max_steps; False: constant after the warmup
    weight_decay: float = 0.01
    temperature: float = DEFAULT_TEMPERATURE
    caption_loss_weight: float = 0.0  # 0 = the paper's recipe (triplets only)
    query_as_negative: bool = True  # the query image is every query's first hard negative
    max_grad_norm: float | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # bf16 autocast; only ever on CUDA
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end
    resume: bool = True  # continue from checkpoint_dir's state when present


@dataclass(frozen=True)
class StepProgress:
    step: int  # optimizer steps done
    max_steps: int
    loss: float
    learning_rate: float
    samples_per_s: float


@dataclass
class TrainReport:
    steps: int
    samples: int  # training samples processed by this run (all processes)
    seconds: float
    samples_per_s: float
    data_wait_s: float  # time this process waited for batches (the loader's share)
    world_size: int
    resumed_from_step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, from step 1
    learning_rates: list[float] = field(default_factory=list)


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if not config.lr_decay:
            return 1.0
        remaining = config.max_steps - step
        return max(0.0, remaining / max(1, config.max_steps - config.warmup_steps))

    return factor


def _epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


def _local_batches(
    size: int, config: TrainConfig, rank: int, world_size: int, first_step: int
) -> Iterator[list[tuple[int, int]]]:
    """(epoch, index) keys of this process's share of every step from ``first_step`` on."""
    local = config.batch_size * config.grad_accum_steps
    global_batch = local * world_size
    steps_per_epoch = size // global_batch
    order_epoch, order = None, None
    for step in range(first_step, config.max_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, _epoch_order(size, config.seed, epoch)
        start = position * global_batch + rank * local
        yield [(epoch, int(index)) for index in order[start : start + local]]


def _setup_distributed(device_name: str) -> tuple[torch.device, bool]:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); returns the
    device and whether this call created the group (and so must destroy it)."""
    wants_group = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(device_name, setting="compute.device")
    if device.type == "cuda" and wants_group:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if wants_group and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device, True
    return device, False


def _embed(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast,
    query_as_negative: bool = True,
) -> dict[str, torch.Tensor]:
    """Normalised embeddings of a batch: composed queries, positives, hard negatives
    (query image first, unless ``query_as_negative`` is off), query images and, when
    present, captions; a caption-only batch gives images and captions."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    if isinstance(module, MMRetMLLM):
        return module.training_embeddings(model, batch, autocast, query_as_negative)
    if "query" not in batch:
        with autocast:
            image_features, text_features = model(batch["image"], batch["caption"])
        return {
            "images": F.normalize(image_features.float(), dim=-1),
            "captions": F.normalize(text_features.float(), dim=-1),
        }
    queries, positives, negatives = batch["query"], batch["positive"], batch["negatives"]
    size, others = len(queries), negatives.shape[1]
    pixels = torch.cat([queries, positives, negatives.flatten(0, 1)])
    tokens = batch["instruction"]
    if "caption" in batch:
        tokens = torch.cat([tokens, batch["caption"]])
    with autocast:
        image_features, text_features = model(pixels, tokens)
    query_image, positive, negative = image_features.float().split(
        [size, size, size * others]
    )
    text_features = text_features.float()
    query_images = F.normalize(query_image, dim=-1)
    mined = F.normalize(negative, dim=-1).view(size, others, query_image.shape[-1])
    embeddings = {
        "queries": MMRetCLIP.fuse(query_image, text_features[:size]),
        "positives": F.normalize(positive, dim=-1),
        "negatives": torch.cat([query_images[:, None], mined], dim=1) if query_as_negative
        else mined,
        "query_images": query_images,
    }
    if "caption" in batch:
        embeddings["captions"] = F.normalize(text_features[size:], dim=-1)
    return embeddings


def _loss(embeddings: dict[str, torch.Tensor], config: TrainConfig) -> torch.Tensor:
    return training_loss(
        embeddings, temperature=config.temperature,
        caption_loss_weight=config.caption_loss_weight,
    )


def _backward_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], config: TrainConfig, autocast
) -> torch.Tensor:
    """Accumulate the gradient of one optimizer step; returns this process's loss."""
    if config.grad_accum_steps == 1:
        loss = _loss(_embed(model, batch, autocast, config.query_as_negative), config)
        loss.backward()
        return loss.detach()
    micro_batches = [
        {key: value.split(config.batch_size)[i] for key, value in batch.items()}
        for i in range(config.grad_accum_steps)
    ]
    with torch.no_grad():
        cached = [_embed(model, micro, autocast, config.query_as_negative)
                  for micro in micro_batches]
    full = {
        key: torch.cat([part[key] for part in cached]).requires_grad_()
        for key in cached[0]
    }
    loss = _loss(full, config)
    loss.backward()
    for i, micro in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        sync = nullcontext() if is_last or not isinstance(model, DistributedDataParallel) else (
            model.no_sync()
        )
        rows = slice(i * config.batch_size, (i + 1) * config.batch_size)
        with sync:
            embeddings = _embed(model, micro, autocast, config.query_as_negative)
            surrogate = sum(  # an embedding the loss did not use has no gradient
                (embeddings[key] * full[key].grad[rows]).sum()
                for key in embeddings if full[key].grad is not None
            )
            surrogate.backward()
    return loss.detach()


def _save_state(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous state intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _data_signature(config: TrainConfig, dataset_size: int, world_size: int) -> dict:
    """What fixes the data order; a resumed run must agree on it."""
    return {
        "seed": config.seed,
        "global_batch": config.batch_size * config.grad_accum_steps * world_size,
        "dataset_size": dataset_size,
    }


def train_mmret(
    model: MMRetCLIP | MMRetMLLM,
    dataset: MMRetTrainingSet | CaptionSet,
    config: TrainConfig,
    progress: Callable[[StepProgress], bool | None] | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> TrainReport:
    """Train ``model`` in place for ``config.max_steps`` optimizer steps (across resumes);
    ``progress``, called after every step, ends the run by returning True; ``on_checkpoint``
    gets the state file and its step on rank 0 after each save (to copy it off the machine).

    Under ``torchrun`` (WORLD_SIZE > 1) every process calls this with the same arguments
    (and its ``progress`` must return the same); only rank 0 writes checkpoints.
    """
    if config.caption_loss_weight and not dataset.has_captions:
        raise ValueError("caption_loss_weight > 0 needs a dataset built with captions")
    if isinstance(dataset, CaptionSet) and not config.caption_loss_weight:
        raise ValueError("a caption-only dataset trains nothing with caption_loss_weight 0")
    is_mllm = isinstance(model, MMRetMLLM)
    if is_mllm and (config.caption_loss_weight or isinstance(dataset, CaptionSet)):
        raise ValueError("MMRet-MLLM trains on triplets only (caption_loss_weight 0)")
    device, owns_group = _setup_distributed(config.device)
    rank, world_size = world()
    global_batch = config.batch_size * config.grad_accum_steps * world_size
    if len(dataset) < global_batch:
        raise ValueError(f"{len(dataset)} examples cannot fill one global batch of {global_batch}")

    model.to(device).train()
    if not is_mllm:
        for name, parameter in model.clip.named_parameters():
            parameter.requires_grad_(name not in FROZEN_PARAMETERS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has nothing to train (a LoRA adapter loaded for inference?)")
    model_state = model.training_state_dict if is_mllm else model.state_dict
    load_model_state = model.load_training_state_dict if is_mllm else model.load_state_dict
    # foreach: one kernel per step for all tensors. PyTorch picks it by default only on CUDA;
    # on the CPU it makes this optimizer step 2.4x faster (bench/train.py).
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    signature = _data_signature(config, len(dataset), world_size)
    state_path = Path(config.checkpoint_dir) / STATE_FILE if config.checkpoint_dir else None
    start_step, losses, learning_rates = 0, [], []
    if state_path is not None and config.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["data"] != signature:
            raise ValueError(
                f"{state_path} was written with data order {state['data']}, "
                f"this run has {signature}; resume needs the same order"
            )
        load_model_state(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_step, losses, learning_rates = state["step"], state["losses"], state["lrs"]

    trained = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world_size > 1
        else model
    )
    use_bf16 = config.mixed_precision and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_local_batches(len(dataset), config, rank, world_size, start_step),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=model.collate if is_mllm else None,
    )

    def checkpoint(step: int) -> None:
        if state_path is None:
            return
        if rank == 0:
            _save_state(
                state_path,
                {
                    "model": {k: v.detach().cpu() for k, v in model_state().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "losses": losses,
                    "lrs": learning_rates,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "data": signature,
                    "config": asdict(config),
                },
            )
            if on_checkpoint is not None:
                on_checkpoint(state_path, step)
        if world_size > 1:
            dist.barrier()

    started = time.perf_counter()
    checkpoint_s = data_wait_s = 0.0
    step = start_step
    try:
        waited = time.perf_counter()
        for batch in loader:
            data_wait_s += time.perf_counter() - waited
            if not config.caption_loss_weight:
                batch.pop("caption", None)
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            loss = _backward_step(trained, batch, config, autocast)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            if world_size > 1:
                dist.all_reduce(loss)
                loss /= world_size
            step += 1
            losses.append(float(loss))
            learning_rates.append(learning_rate)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                saving = time.perf_counter()
                checkpoint(step)
                checkpoint_s += time.perf_counter() - saving
            if progress is not None:
                elapsed = time.perf_counter() - started - checkpoint_s
                stop = progress(
                    StepProgress(
                        step=step,
                        max_steps=config.max_steps,
                        loss=losses[-1],
                        learning_rate=learning_rate,
                        samples_per_s=(step - start_step) * global_batch / elapsed,
                    )
                )
                if stop:
                    break
            waited = time.perf_counter()
        seconds = time.perf_counter() - started - checkpoint_s
        if step > start_step and (
            not config.checkpoint_every or step % config.checkpoint_every
        ):
            checkpoint(step)
    finally:
        if owns_group:
            dist.destroy_process_group()
    samples = (step - start_step) * global_batch
    model.eval()
    return TrainReport(
        steps=step,
        samples=samples,
        seconds=seconds,
        samples_per_s=samples / seconds if seconds > 0 else math.nan,
        data_wait_s=data_wait_s,
        world_size=world_size,
        resumed_from_step=start_step,
        losses=losses,
        learning_rates=learning_rates,
    )
