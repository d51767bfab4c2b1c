"""GPU throughput of the pipeline's heavy steps, each against the GPU's bf16 FLOP ceiling.

One script for a machine with one GPU, sized to finish in under 8 minutes, so that a short
GPU lease yields every number at once. Sections (each its own line or lines in the table):

- embed: EVA02-L-14 (open_clip) and DINOv2-L (transformers) image embedding, bf16 weights,
  random init from the configs, through the pipeline's ``ClipImageEncoder`` /
  ``DinoImageEncoder.encode``; the batch size grows while it still pays (up to memory), so
  the GPU is full. Plus batched JPEG decoding (``torchvision.io.decode_jpeg`` on the device)
  as a separate line. Compared with clip-retrieval's published ~1,500 images/s (ViT-B/32 on
  one RTX 3080).
- faiss: flat and IVF inner-product indexes on clustered vectors (bench/knn.py's generator),
  build and top-20 search, on the GPU when ``faiss.get_num_gpus()`` > 0 and on the CPU of the
  same machine; recall@20 against the exact result.
- train: the project's ``train_mmret`` on ``MMRetCLIP`` (ViT-B-16 config, random weights;
  bf16 autocast on CUDA) over synthetic pixels held in memory.
- mllm: MMRet-MLLM's LoRA training on a LLaVA-NeXT of llava-v1.6-mistral-7b's shape (random
  bf16 weights built on the GPU): ``train_mmret`` decoding and tiling JPEGs in DataLoader
  workers, against bench/train_mllm.py's plain peft + transformers loop on the same model and
  a ready batch of the same size.
- generation: vLLM offline generation of a random Llama (config only, ``load_format=dummy``,
  token ids in and out, no tokenizer), when vLLM imports; otherwise a skip line saying why.

Achieved TFLOP/s = FLOPs per item (``torch.utils.flop_counter.FlopCounterMode`` on one small
batch; faiss: the inner products it must compute) x items/s, shown against the GPU's dense
bf16 peak from ``PEAK_BF16_TFLOPS`` (n/a for unknown GPUs and the CPU). Each section stops
early once its share of ``--budget-s`` is spent, saying so. ``--quick`` swaps in tiny models
and sizes that run on a CPU in seconds (the test runs it).

    python bench/gpu.py --json bench/results/gpu.json
    .venv/bin/python bench/gpu.py --quick --device cpu --json /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core TFLOP/s by the vendors' datasheets, first substring of
# torch.cuda.get_device_name that matches wins (so the PCIe H100 comes before the SXM one).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
# clip-retrieval's README: ~1,500 images/s embedding with ViT-B/32 on one RTX 3080.
CLIP_RETRIEVAL_IMAGES_PER_S = 1500.0
SECTIONS = ("embed", "faiss", "train", "mllm", "generation")
# Share of the time budget per section; a section that ends early leaves its rest to the next.
WEIGHTS = {"embed": 0.3, "faiss": 0.2, "train": 0.15, "mllm": 0.2, "generation": 0.15}
ROOT = Path(__file__).resolve().parents[1]
# The sibling benches whose data and loops the sections reuse (knn, train, train_mllm).
sys.path.insert(0, str(ROOT / "bench"))


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between a GPU run and ``--quick``."""

    label: str  # appended to the names of lines whose model is a tiny stand-in
    clip_overrides: dict  # open_clip model_kwargs over EVA02-L-14's config
    dino: dict  # Dinov2Config kwargs
    image_side: int
    batch_sizes: tuple[int, ...]  # tried in order while throughput still grows
    jpeg_count: int
    jpeg_size: tuple[int, int]
    vectors: int
    dim: int
    clusters: int
    queries: int
    nlist: int
    nprobe: int
    train_model: str
    train_batch: int
    train_steps: int
    mllm_vision: dict  # CLIPVisionConfig kwargs of the LLaVA-NeXT's vision tower
    mllm_text: dict  # MistralConfig kwargs of its language model
    mllm_pinpoints: tuple  # its "anyres" grid resolutions
    mllm_image_side: int  # every image resized to this square, as MMRetMLLM does
    mllm_batch: int
    mllm_steps: int  # timed steps per loop, at most (fewer when the clock runs out)
    mllm_workers: int  # DataLoader workers of train_mmret
    llama: dict  # LlamaConfig kwargs
    repeats: int  # timed calls per measurement (fewer when the clock runs out)
    prompts: int
    prompt_tokens: int
    new_tokens: int


FULL = Sizes(
    label="",
    clip_overrides={},
    dino={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
          "patch_size": 14, "image_size": 518},  # facebook/dinov2-large's shape
    image_side=224,
    batch_sizes=(64, 128, 256, 512, 1024, 2048),
    jpeg_count=512, jpeg_size=(512, 384),
    vectors=1_000_000, dim=768, clusters=10_000, queries=10_000, nlist=1024, nprobe=16,
    train_model="ViT-B-16", train_batch=64, train_steps=20,
    # llava-hf/llava-v1.6-mistral-7b-hf's shape: CLIP ViT-L/14 at 336 px, Mistral-7B; a
    # 512-px image is 5 tiles and ~2,900 tokens, so a sample (query + 5 candidates) ~17,600
    mllm_vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "patch_size": 14, "image_size": 336,
                 "projection_dim": 768},
    mllm_text={"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064,
               "max_position_embeddings": 32768, "sliding_window": None},
    mllm_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    mllm_image_side=512, mllm_batch=2, mllm_steps=4, mllm_workers=8,
    llama={"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
    prompts=256, prompt_tokens=128, new_tokens=256, repeats=5,
)
QUICK = Sizes(
    label=" [tiny]",
    clip_overrides={
        "vision_cfg": {"image_size": 56, "timm_model_name": "eva02_tiny_patch14_224",
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 1,
                     "layers": 1},
    },
    dino={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "patch_size": 14, "image_size": 56},
    image_side=56,
    batch_sizes=(2, 4),
    jpeg_count=8, jpeg_size=(64, 48),
    vectors=20_000, dim=64, clusters=200, queries=100, nlist=64, nprobe=8,
    train_model="megapairs-demo-clip", train_batch=4, train_steps=1,
    mllm_vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "patch_size": 8, "image_size": 16},
    mllm_text={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
               "max_position_embeddings": 1024},
    mllm_pinpoints=((16, 32), (32, 16), (32, 32)),
    mllm_image_side=32, mllm_batch=2, mllm_steps=2, mllm_workers=1,
    # head size 32: vLLM's CPU attention has no kernel for 16
    llama={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 1000},
    prompts=4, prompt_tokens=16, new_tokens=16, repeats=2,
)


class OutOfTime(Exception):
    """A section's share of the budget is spent; what it measured so far is kept."""


class Clock:
    """The section's deadline; ``check`` raises OutOfTime once it has passed."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise OutOfTime(f"{TIME_GUARD} before {what}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call: Callable[[], object], device: torch.device, clock: Clock,
                   repeats: int) -> float:
    """Median wall seconds of ``call`` after one untimed warm-up; fewer repeats (at least
    one) when the clock runs out."""
    call()
    sync(device)
    seconds = []
    while len(seconds) < repeats and (not seconds or clock.left() > 0):
        start = time.perf_counter()
        call()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def count_flops(call: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def peak_bf16_tflops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name; None (printed n/a) for one not in it."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def line(name: str, rate: float, unit: str, flops_per_item: float | None,
         peak: float | None, **extra) -> dict:
    """One table row: the rate, the achieved TFLOP/s and its share of the bf16 peak."""
    tflops = None if flops_per_item is None else rate * flops_per_item / 1e12
    return {
        "name": name, "rate": rate, "unit": unit, "flops_per_item": flops_per_item,
        "tflops": tflops,
        "peak_fraction": None if tflops is None or peak is None else tflops / peak,
        **extra,
    }


def skip(name: str, reason: str) -> dict:
    return {"name": name, "skipped": reason}


TIME_GUARD = "time guard: the section's share of the budget ran out"


def guarded(name: str, clock: Clock, measure: Callable[[], dict]) -> dict:
    """``measure()``'s row; a skip once the clock has run out; an error row if it raises, so
    that one failing line (a missing package, say) keeps the section's other lines."""
    if clock.left() <= 0:
        return skip(name, TIME_GUARD)
    try:
        return measure()
    except OutOfTime as stop:
        return skip(name, str(stop))
    except Exception as error:  # noqa: BLE001 - recorded in the row, and main exits 1
        return {"name": name, "error": f"{type(error).__name__}: {error}"}


def free_memory(device: torch.device) -> None:
    """Hand the GPU memory of a finished model back before the next one (vLLM sizes its
    cache from what is free); a no-op on the CPU, where a collection costs seconds."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# --- embed -------------------------------------------------------------------------------

def eva02_encoder(sizes: Sizes, device: torch.device):
    """EVA02-L-14's image tower as the pipeline's ClipImageEncoder, bf16, random weights."""
    import open_clip

    from megapairs_dagster.synthesis.encoders import ClipImageEncoder

    with torch.device(device):  # random init on the device: seconds, not a minute on the CPU
        model = open_clip.create_model("EVA02-L-14", pretrained=None, device=device,
                                       **sizes.clip_overrides)
    trunk = model.visual.trunk
    if tuple(trunk.patch_embed.img_size) != (sizes.image_side, sizes.image_side):
        trunk.set_input_size(img_size=sizes.image_side)  # open_clip gives timm no image size
    model = model.to(device, torch.bfloat16).eval()
    config = {**open_clip.get_model_config("EVA02-L-14"), **sizes.clip_overrides}
    return ClipImageEncoder(model=model, preprocess=None, identity={"model": "EVA02-L-14"},
                            embed_dim=config["embed_dim"], device=device, dtype=torch.bfloat16)


def dino_encoder(sizes: Sizes, device: torch.device):
    """DINOv2-L as the pipeline's DinoImageEncoder (CLS pooling), bf16, random weights."""
    from transformers import Dinov2Config, Dinov2Model

    from megapairs_dagster.synthesis.encoders import DinoImageEncoder

    with torch.device(device):
        model = Dinov2Model(Dinov2Config(**sizes.dino))
    model = model.to(device, torch.bfloat16).eval()
    return DinoImageEncoder(model=model, preprocess=None, identity={"model": "dinov2-large"},
                            embed_dim=model.config.hidden_size, device=device,
                            dtype=torch.bfloat16, pooling="cls")


def embedding_line(name: str, encoder, sizes: Sizes, device: torch.device, peak, clock: Clock):
    """Images/s at the batch size that fills the GPU: sizes are tried in order until one
    runs out of memory, gains < 5% or the clock runs out."""
    def batch(size: int) -> torch.Tensor:
        return torch.randn(size, 3, sizes.image_side, sizes.image_side, device=device,
                           dtype=torch.bfloat16)

    with torch.inference_mode():
        flops = count_flops(lambda: encoder.encode(batch(2))) / 2
        tried, best = {}, None
        for size in sizes.batch_sizes:
            try:
                seconds = median_seconds(partial(encoder.encode, batch(size)), device, clock,
                                         sizes.repeats)
            except torch.cuda.OutOfMemoryError:
                tried[size] = "out of memory"
                free_memory(device)
                break
            tried[size] = size / seconds
            if best is not None and tried[size] < 1.05 * tried[best]:
                break
            best = size
            if clock.left() <= 0:
                break
    if best is None:
        return skip(name, f"no batch size ran: {tried}")
    return line(name, tried[best], "images/s", flops, peak, batch_size=best,
                images_per_s_by_batch=tried,
                vs_clip_retrieval=tried[best] / CLIP_RETRIEVAL_IMAGES_PER_S)


def synthetic_jpegs(count: int, size: tuple[int, int]) -> list[bytes]:
    """Smooth random images (upsampled noise) as quality-90 JPEGs: photo-like entropy."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        noise = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noise).resize(size, Image.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def decode_line(name: str, sizes: Sizes, device: torch.device, clock: Clock) -> dict:
    """torchvision.io.decode_jpeg over the whole list in one batched call on the device."""
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
            for jpeg in synthetic_jpegs(sizes.jpeg_count, sizes.jpeg_size)]
    seconds = median_seconds(lambda: decode_jpeg(data, device=device), device, clock,
                             sizes.repeats)
    rate = len(data) / seconds
    return line(name, rate, "images/s", None, None,
                batch_size=len(data), image_size=list(sizes.jpeg_size),
                megapixels_per_s=rate * sizes.jpeg_size[0] * sizes.jpeg_size[1] / 1e6,
                jpeg_kib_mean=sum(int(d.numel()) for d in data) / len(data) / 1024,
                vs_clip_retrieval=rate / CLIP_RETRIEVAL_IMAGES_PER_S)


def embed_section(sizes: Sizes, device: torch.device, peak, clock: Clock) -> list[dict]:
    def model_line(name: str, build) -> dict:
        encoder = build(sizes, device)
        try:
            return embedding_line(name, encoder, sizes, device, peak, clock)
        finally:
            del encoder
            free_memory(device)

    decode = f"jpeg decode ({device.type}, batched)"
    return [
        guarded(decode, clock, lambda: decode_line(decode, sizes, device, clock)),
        *(guarded(name, clock, lambda name=name, build=build: model_line(name, build))
          for name, build in ((f"EVA02-L-14 image embed{sizes.label}", eva02_encoder),
                              (f"DINOv2-L image embed{sizes.label}", dino_encoder))),
    ]


# --- faiss -------------------------------------------------------------------------------

def faiss_section(sizes: Sizes, device: torch.device, peak, clock: Clock) -> list[dict]:
    """Flat and IVF-Flat, GPU first (its exact result is the reference when there), then the
    CPU; build = train + add, search = top-20 of every query; recall against the first flat
    result."""
    import faiss
    from knn import clustered_embeddings

    from megapairs_dagster.synthesis.knn import TUNING_K, label_recall

    vectors = clustered_embeddings(sizes.vectors, sizes.dim, sizes.clusters, 0.5, seed=0)
    vectors = vectors.astype(np.float32)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(len(vectors), sizes.queries, replace=False)]
    train_points = vectors[rng.choice(len(vectors), min(len(vectors), 64 * sizes.nlist),
                                      replace=False)]
    gpus = faiss.get_num_gpus()
    resources = faiss.StandardGpuResources() if gpus and device.type == "cuda" else None
    n, d, q = sizes.vectors, sizes.dim, sizes.queries
    search_flops = {  # inner products per query: every vector; or the centroids + probed lists
        "flat": 2 * n * d,
        "ivf": 2 * d * (sizes.nlist + sizes.nprobe * n / sizes.nlist),
    }
    exact, rows = [], []

    def measure(name: str, backend: str, kind: str) -> dict:
        index = (faiss.IndexFlatIP(d) if kind == "flat"
                 else faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, sizes.nlist,
                                         faiss.METRIC_INNER_PRODUCT))
        if backend == "gpu":
            index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
        start = time.perf_counter()
        if kind == "ivf":
            index.train(train_points)
        index.add(vectors)
        build = time.perf_counter() - start
        if kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = sizes.nprobe
        index.search(queries[:1], TUNING_K)  # one-off setup (GPU handles) stays untimed
        start = time.perf_counter()
        _, labels = index.search(queries, TUNING_K)
        search = time.perf_counter() - start
        if kind == "flat" and not exact:
            exact.append(labels)
        return line(name, q / search, "queries/s", search_flops[kind], peak,
                    build_s=build, search_s=search, vectors=n, dim=d, k=TUNING_K,
                    threads=faiss.omp_get_max_threads() if backend == "cpu" else None,
                    recall_at_k=label_recall(labels, exact[0]) if exact else None)

    for backend in ("gpu", "cpu"):
        for kind in ("flat", "ivf"):
            spec = "IndexFlatIP" if kind == "flat" else f"IVF{sizes.nlist},Flat nprobe={sizes.nprobe}"
            name = f"faiss-{backend} {spec}"
            if backend == "gpu" and resources is None:
                rows.append(skip(name, "faiss has no GPU support here (faiss.get_num_gpus() = "
                                       f"{gpus}, device {device})"))
                continue
            rows.append(guarded(name, clock, lambda name=name, backend=backend, kind=kind:
                                measure(name, backend, kind)))
    return rows


# --- train -------------------------------------------------------------------------------

def train_section(sizes: Sizes, device: torch.device, peak, clock: Clock) -> list[dict]:
    """``train_mmret`` samples/s over preprocessed pixels held in memory (the loader only
    stacks them), after a warm-up step; FLOPs counted over one 2-sample step."""
    from megapairs_dagster.retrieval import (
        MMRetCLIP,
        MMRetTrainingSet,
        PairExample,
        TrainConfig,
        train_mmret,
    )

    torch.manual_seed(0)
    model = MMRetCLIP.from_open_clip(sizes.train_model, None, device=device)
    side = model.clip.visual.image_size
    side = side if isinstance(side, int) else side[0]
    pool = [torch.randn(3, side, side) for _ in range(64)]
    rng = np.random.default_rng(0)

    def dataset(count: int) -> MMRetTrainingSet:
        examples = []
        for _ in range(count):
            query, target, *negatives = (int(i) for i in rng.choice(len(pool), 6, replace=False))
            examples.append(PairExample(query, ("show the same scene at night", "make it red"),
                                        target, tuple(negatives)))
        return MMRetTrainingSet(examples, pool.__getitem__, preprocess=torch.nn.Identity(),
                                tokenizer=model.tokenizer)

    def config(steps: int, batch: int) -> TrainConfig:
        return TrainConfig(max_steps=steps, batch_size=batch, device=str(device),
                           learning_rate=1e-5)

    flops = count_flops(lambda: train_mmret(model, dataset(2), config(1, 2))) / 2
    data = dataset(4 * sizes.train_batch)
    warm = train_mmret(model, data, config(1, sizes.train_batch))
    clock.check("the timed steps")
    step_s = warm.seconds / warm.steps
    steps = max(1, min(sizes.train_steps, int(0.8 * clock.left() / step_s)))
    report = train_mmret(model, data, config(steps, sizes.train_batch))
    name = f"MMRet train ({sizes.train_model}" + (", bf16 autocast)" if device.type == "cuda"
                                                  else ", fp32)")
    row = line(name, report.samples_per_s, "samples/s", flops, peak,
               batch_size=sizes.train_batch, steps=report.steps,
               images_per_sample=5, data_wait_share=report.data_wait_s / report.seconds)
    return [row]


# --- mllm --------------------------------------------------------------------------------

def llava_next(sizes: Sizes, device: torch.device):
    """A LLaVA-NeXT of the sizes' shape with random weights built on the device (bf16 on
    CUDA: seconds, and 15 GB instead of 30 for the 7B shape), and its processor around a
    tokenizer trained offline on the prompt format."""
    from transformers import CLIPVisionConfig, LlavaNextForConditionalGeneration, MistralConfig

    from megapairs_dagster.offline_models import IMAGE, byte_level_tokenizer
    from megapairs_dagster.retrieval.mllm import candidate_prompt, query_prompt
    from megapairs_dagster.retrieval.mllm_configs import llava_next_parts

    tokenizer = byte_level_tokenizer(
        [query_prompt("make it red at night", IMAGE, "Find the target image:"),
         candidate_prompt(None, IMAGE)]
    )
    config, processor = llava_next_parts(
        tokenizer, vision=CLIPVisionConfig(**sizes.mllm_vision),
        text=MistralConfig(**sizes.mllm_text, pad_token_id=tokenizer.pad_token_id),
        grid_pinpoints=[list(pair) for pair in sizes.mllm_pinpoints],
        vision_feature_layer=-2,  # llava-v1.6's: the vision tower's second-to-last layer
    )
    torch.manual_seed(0)
    with torch.device(device):
        llava = LlavaNextForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
        )
    return llava, processor


def mllm_section(sizes: Sizes, device: torch.device, peak, clock: Clock) -> list[dict]:
    """Samples/s of ``train_mmret`` on ``MMRetMLLM`` (LoRA rank 32, gradient checkpointing,
    JPEGs decoded and tiled in ``mllm_workers`` DataLoader workers) and of the plain peft loop
    on the same model and a ready batch, each after a warm-up step; FLOPs counted over one
    1-sample step of ``train_mmret``."""
    from train import synthetic_pairs
    from train_mllm import TASK, plain_batch, plain_loop

    from megapairs_dagster.retrieval import MMRetMLLM, MMRetTrainingSet, TrainConfig, train_mmret

    llava, processor = llava_next(sizes, device)
    model = MMRetMLLM.from_llava_next(llava, processor=processor, task_instruction=TASK,
                                      image_side=sizes.mllm_image_side, device=device)
    size = sizes.mllm_batch
    examples, loader = synthetic_pairs(64 * size, 8 * size, sizes.mllm_image_side, seed=0)
    data = MMRetTrainingSet(examples, loader, preprocess=model.preprocess,
                            tokenizer=model.tokenize, hard_negatives=4)

    def config(steps: int, batch: int, workers: int) -> TrainConfig:
        return TrainConfig(max_steps=steps, batch_size=batch, num_workers=workers,
                           device=str(device), learning_rate=1e-4)

    flops = count_flops(lambda: train_mmret(model, data, config(1, 1, 0)))
    warm = train_mmret(model, data, config(1, size, sizes.mllm_workers))
    ready = plain_batch(processor, data, loader, size, sizes.mllm_image_side)
    plain_loop(model.model, ready, size, 1, device)
    clock.check("the timed steps")
    step_s = warm.seconds / warm.steps
    steps = max(1, min(sizes.mllm_steps, int(0.4 * clock.left() / step_s)))  # two loops
    plain = size * steps / plain_loop(model.model, ready, size, steps, device)
    report = train_mmret(model, data, config(steps, size, sizes.mllm_workers))
    shape = "LLaVA-NeXT 7B shape" if not sizes.label else "LLaVA-NeXT"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    common = {"batch_size": size, "steps": steps, "sequence_length": ready["input_ids"].shape[1],
              "sequences_per_sample": len(ready["input_ids"]) // size,
              "parameters": sum(p.numel() for p in model.parameters()),
              "trainable_parameters": sum(p.numel() for p in model.parameters()
                                          if p.requires_grad)}
    return [
        line(f"MMRet-MLLM train ({shape}, LoRA, {precision}){sizes.label}",
             report.samples_per_s, "samples/s", flops, peak, **common,
             workers=sizes.mllm_workers, data_wait_share=report.data_wait_s / report.seconds,
             vs_plain_peft=report.samples_per_s / plain),
        line(f"plain peft loop, ready batch ({shape}){sizes.label}", plain, "samples/s",
             flops, peak, **common),
    ]


# --- generation --------------------------------------------------------------------------

def llama_flops_per_token(llama, length: int, device: torch.device) -> tuple[float, int]:
    """FLOPs per token of one forward over ``length`` tokens (transformers' Llama, the same
    config), and the parameter count."""
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(llama).to(torch.bfloat16).eval()
    ids = torch.randint(llama.vocab_size, (1, length), device=device)
    with torch.inference_mode():
        flops = count_flops(lambda: model(input_ids=ids, use_cache=False))
    return flops / length, sum(p.numel() for p in model.parameters())


def generation_section(sizes: Sizes, device: torch.device, peak, clock: Clock) -> list[dict]:
    """vLLM generating ``new_tokens`` after each random prompt, ignoring EOS, greedy."""
    name = "vLLM generation (random Llama)"
    try:
        import vllm
    except Exception as error:  # noqa: BLE001 - ImportError, or vLLM's own CUDA/torch checks
        return [skip(name, f"vllm does not import here: {type(error).__name__}: {error}")]
    from transformers import LlamaConfig

    length = sizes.prompt_tokens + sizes.new_tokens
    llama = LlamaConfig(**sizes.llama, max_position_embeddings=length,
                        architectures=["LlamaForCausalLM"])
    flops_per_token, params = llama_flops_per_token(llama, length, device)
    free_memory(device)
    clock.check("starting vLLM")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-llama-") as tmp:
        llama.save_pretrained(tmp)
        llm = vllm.LLM(model=tmp, load_format="dummy", skip_tokenizer_init=True,
                       dtype="bfloat16", max_model_len=length, enforce_eager=True,
                       gpu_memory_utilization=0.5, seed=0)
        rng = np.random.default_rng(0)
        prompts = [{"prompt_token_ids": rng.integers(llama.vocab_size,
                                                     size=sizes.prompt_tokens).tolist()}
                   for _ in range(sizes.prompts)]
        sampling = vllm.SamplingParams(max_tokens=sizes.new_tokens, ignore_eos=True,
                                       temperature=0.0, detokenize=False)
        llm.generate(prompts[:8], sampling, use_tqdm=False)
        clock.check("the timed generation")
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    processed = generated + sizes.prompts * sizes.prompt_tokens
    # every prompt and generated token passes the model once: FLOPs follow tokens processed
    return [line(name, generated / seconds, "tokens/s",
                 flops_per_token * processed / generated, peak,
                 vllm=vllm.__version__, parameters=params, prompts=sizes.prompts,
                 prompt_tokens=sizes.prompt_tokens, new_tokens=sizes.new_tokens,
                 processed_tokens_per_s=processed / seconds, enforce_eager=True)]


RUNNERS = {"embed": embed_section, "faiss": faiss_section, "train": train_section,
           "mllm": mllm_section, "generation": generation_section}


def run_section(name: str, sizes: Sizes, device, peak, seconds: float) -> dict:
    """The section's rows, or why it stopped; an exception is recorded, not raised."""
    clock, start = Clock(seconds), time.perf_counter()
    try:
        clock.check("the section started")
        result = {"status": "ok", "rows": RUNNERS[name](sizes, device, peak, clock)}
    except OutOfTime as stop:
        result = {"status": "skipped", "reason": str(stop)}
    except Exception as error:  # noqa: BLE001 - one broken section must not lose the others
        result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
    free_memory(device)
    return {**result, "budget_s": seconds, "seconds": time.perf_counter() - start}


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(results: dict) -> None:
    width = 60
    print(f"\n{'line':<{width}}{'rate':>12} {'unit':<10}{'batch':>6}{'TFLOP/s':>9}{'% peak':>8}"
          f"{'x ref':>7}")
    for section, result in results.items():
        if result["status"] != "ok":
            print(f"{section:<{width}}{result['status'].upper()}: "
                  f"{result.get('reason') or result.get('error')}")
            continue
        for row in result["rows"]:
            if "skipped" in row or "error" in row:
                status = "SKIPPED" if "skipped" in row else "ERROR"
                print(f"{row['name']:<{width}}{status}: {row.get('skipped') or row.get('error')}")
                continue
            share = None if row["peak_fraction"] is None else 100 * row["peak_fraction"]
            reference = row.get("vs_clip_retrieval", row.get("vs_plain_peft"))
            print(f"{row['name']:<{width}}{row['rate']:>12.1f} {row['unit']:<10}"
                  f"{fmt(row.get('batch_size'), 'd'):>6}{fmt(row['tflops'], '.2f'):>9}"
                  f"{fmt(share, '.1f'):>8}{fmt(reference, '.2f'):>7}")
    print("% peak: of the GPU's dense bf16 TFLOP/s; x ref: images/s over clip-retrieval's "
          f"~{CLIP_RETRIEVAL_IMAGES_PER_S:.0f} (ViT-B/32, one RTX 3080), or MMRet-MLLM's "
          "samples/s over the plain peft loop's")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and sizes (seconds on a CPU): checks the script")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total time guard (default 450; --quick 300)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list out of {','.join(SECTIONS)}")
    parser.add_argument("--json", metavar="PATH", help="also write header and sections here")
    args = parser.parse_args(argv)
    # plain torch, not the project's resolve_device: that module needs open_clip, and the
    # lines that do not (decode, faiss, vLLM) should still run where it is missing
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    sizes = QUICK if args.quick else FULL
    # --quick checks the code: a generous budget, so that a loaded CPU skips nothing
    budget = args.budget_s or (300.0 if args.quick else 450.0)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    started = time.perf_counter()
    header = {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(), "quick": args.quick,
        "budget_s": budget, "peak_bf16_tflops": peak,
        "clip_retrieval_images_per_s": CLIP_RETRIEVAL_IMAGES_PER_S,
    }
    print(f"{header['device_name']} ({device}), torch {torch.__version__}, peak bf16 "
          f"{fmt(peak, '.0f')} TFLOP/s, budget {budget:.0f} s{', quick' if args.quick else ''}",
          flush=True)
    results = {}
    for position, name in enumerate(sections):
        remaining = budget - (time.perf_counter() - started)
        weights = [WEIGHTS[later] for later in sections[position:]]
        share = max(0.0, remaining) * WEIGHTS[name] / sum(weights)
        results[name] = run_section(name, sizes, device, peak, share)
        print(f"[{name}] {results[name]['status']} in {results[name]['seconds']:.1f} s "
              f"(share {share:.0f} s)", flush=True)
        header["total_s"] = time.perf_counter() - started
        if args.json:  # after every section, so a killed run keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(
                json.dumps({"header": header, "sections": results}, indent=2, default=str))
    print_table(results)
    print(f"total {header['total_s']:.1f} s")
    failed = [name for name, result in results.items() if result["status"] == "error"
              or any("error" in row for row in result.get("rows", ()))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
