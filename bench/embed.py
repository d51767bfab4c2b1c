"""Embedding throughput: the raw model forward vs the pipeline's embed_images / embed_texts.

Per view, on the same model, dtype and batch size, measured in one run: (a) raw
``encoder.encode`` on batches already decoded, preprocessed (or tokenised) and on the device;
(b) the pipeline, ``embed_images`` from JPEG bytes (decode + preprocess in DataLoader workers)
or ``embed_texts`` from strings; and the ratio (b)/(a). Target: >= 0.85. For image views,
(c) the loader's work alone, in this process: ``synthesis.decode``'s decode and batch
normalisation with no model (on the CPU, (a) and (c) share the cores, so a ratio near 1
needs (c) far faster than (a); docs/benchmarks/embed.md). The calls of one
setting take turns after a warm-up round and medians are reported, so that load from other
processes hits them alike. ``--threads`` and ``--num-workers`` take comma lists to sweep. On
CUDA, GPU utilisation is sampled with nvidia-smi while (b) runs, and peak allocated memory is
reported per view.

    .venv/bin/python bench/embed.py --profile demo --threads 1,2 --num-workers 0,1,2
    python bench/embed.py --profile paper --device cuda --dtype bfloat16 \\
        --batch-size 256 --n-images 4096 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.synthesis.decode import split_preprocess
from megapairs_dagster.synthesis.embed import embed_images, embed_texts
from megapairs_dagster.synthesis.encoders import (
    DTYPES,
    build_demo_dino,
    load_clip,
    load_dino,
    resolve_device,
)

UNIQUE_IMAGES = 512  # rendered demo images; longer inputs cycle them (decoding cost is the same)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: dict[str, Callable[[], object]], *, device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median wall seconds of each call. The calls take turns (order reversed every other
    round); the first `warmup` rounds are not timed."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        names = list(calls) if round_index % 2 == 0 else list(reversed(calls))
        for name in names:
            sync(device)
            start = time.perf_counter()
            calls[name]()
            sync(device)
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


class GpuMonitor:
    """Polls nvidia-smi every `interval` seconds inside `watch`; a no-op without CUDA/nvidia-smi."""

    def __init__(self, device: torch.device, interval: float = 0.2):
        self.interval = interval
        self.command = None
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = device.index if device.index is not None else torch.cuda.current_device()
            gpu = visible.split(",")[index].strip() if visible else str(index)
            self.command = [
                "nvidia-smi", f"--id={gpu}",
                "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
            ]

    @contextmanager
    def watch(self, samples: list[tuple[float, float]]):
        if self.command is None:
            yield
            return
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    line = subprocess.run(
                        self.command, capture_output=True, text=True, timeout=5, check=False
                    ).stdout.strip().splitlines()[0]
                    util, memory = (float(field) for field in line.split(","))
                    samples.append((util, memory))
                except (subprocess.SubprocessError, OSError, ValueError, IndexError):
                    pass
                stop.wait(self.interval)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def demo_inputs(n: int, jpeg_side: int, seed: int = 0) -> tuple[list[bytes], list[str]]:
    """`n` demo JPEGs (re-encoded at `jpeg_side` px if > 0) and captions."""
    with tempfile.TemporaryDirectory() as tmp:
        shard = write_demo_shard(tmp, 0, min(n, UNIQUE_IMAGES), seed)
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted(name.removesuffix(".jpg") for name in members if name.endswith(".jpg"))
    jpegs = [members[f"{key}.jpg"] for key in keys]
    if jpeg_side > 0:
        jpegs = [resized_jpeg(data, jpeg_side) for data in jpegs]
    captions = [members[f"{key}.txt"].decode("utf-8") for key in keys]
    return [jpegs[i % len(keys)] for i in range(n)], [captions[i % len(keys)] for i in range(n)]


def resized_jpeg(data: bytes, side: int) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").resize((side, side), Image.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def open_encoders(profile: str, device: torch.device, dtype: torch.dtype, tmp: Path) -> dict:
    """The three views' encoders as the pipeline's demo/paper profile opens them."""
    if profile == "demo":
        clip_image, clip_text = load_clip("megapairs-demo-clip", None, device=device, dtype=dtype)
        build_demo_dino(tmp / "dino", seed=0)
        dino = load_dino(
            str(tmp / "dino"), device=device, dtype=dtype, foreground_only=True, image_size=128
        )
    else:
        from transformers import Dinov2Config, Dinov2Model

        clip_image, clip_text = load_clip("EVA02-B-16", None, device=device, dtype=dtype)
        Dinov2Model(Dinov2Config()).save_pretrained(tmp / "dinov2-base")
        dino = load_dino(
            str(tmp / "dinov2-base"), device=device, dtype=dtype, foreground_only=False,
            image_size=224,
        )
    return {"clip_image": clip_image, "dino_image": dino, "clip_caption": clip_text}


def raw_batches(encoder, view: str, jpegs: list[bytes], captions: list[str], n: int, bs: int):
    """Batches covering `n` inputs, ready for `encode`: one batch's worth of distinct inputs
    is prepared up front and sliced (the forward's cost does not depend on the content)."""
    k = min(bs, n)
    if view == "clip_caption":
        ready = encoder.tokenize(captions[:k]).to(encoder.device)
    else:
        pixels = []
        for data in jpegs[:k]:
            with Image.open(io.BytesIO(data)) as image:
                pixels.append(encoder.preprocess(image.convert("RGB")))
        ready = torch.stack(pixels).to(encoder.device, encoder.dtype)
    return [ready[: min(bs, n - start)] for start in range(0, n, bs)]


def bench_view(view, encoder, jpegs, captions, args, device, dtype, monitor) -> list[dict]:
    batches = raw_batches(encoder, view, jpegs, captions, len(jpegs), args.batch_size)
    autocast_on = dtype != torch.float32

    def raw() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=autocast_on):
            for batch in batches:
                encoder.encode(batch)

    workers = [None] if view == "clip_caption" else args.num_workers
    gpu_samples = {w: [] for w in workers}
    split = None if view == "clip_caption" else split_preprocess(encoder.preprocess)

    def decode() -> None:
        split.to_tensor([split.decode(data) for data in jpegs])

    def pipeline(w):
        with monitor.watch(gpu_samples[w]):
            if w is None:
                embed_texts(encoder, captions, batch_size=args.batch_size, dtype=dtype)
            else:
                embed_images(encoder, jpegs, batch_size=args.batch_size, num_workers=w,
                             dtype=dtype)

    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for threads in args.threads:
        torch.set_num_threads(threads)
        calls = {"raw": raw} | {w: (lambda w=w: pipeline(w)) for w in workers}
        if split is not None:
            calls["decode"] = decode
        seconds = time_interleaved(calls, device=device, warmup=args.warmup, repeats=args.repeats)
        raw_rate = len(jpegs) / seconds["raw"]
        decode_rate = len(jpegs) / seconds["decode"] if split is not None else None
        for w in workers:
            rate = len(jpegs) / seconds[w]
            util = [u for u, _ in gpu_samples[w]]
            rows.append({
                "view": view, "threads": threads, "num_workers": w,
                "raw_items_per_s": raw_rate, "pipeline_items_per_s": rate,
                "decode_items_per_s": decode_rate,
                "ratio": rate / raw_rate,
                "gpu_util_mean": statistics.mean(util) if util else None,
                "gpu_util_max": max(util) if util else None,
                "gpu_mem_used_max_mib": max((m for _, m in gpu_samples[w]), default=None),
            })
            gpu_samples[w].clear()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        for row in rows:
            row["peak_allocated_mib"] = peak
    return rows


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def default_workers() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return ",".join(str(w) for w in sorted({2, max(1, cores // 2), cores}))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("demo", "paper"), default="demo")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-images", type=int, default=256, help="inputs per view and call")
    parser.add_argument("--num-workers", type=int_list, default=default_workers(),
                        help="comma list of DataLoader worker counts (default: 2, cores/2, cores)")
    parser.add_argument("--threads", type=int_list, default=str(torch.get_num_threads()),
                        help="comma list of torch intra-op thread counts (default: torch's)")
    parser.add_argument("--views", default="clip_image,dino_image,clip_caption")
    parser.add_argument("--jpeg-side", type=int, default=0,
                        help="re-encode the 128 px demo JPEGs at this side (0: keep)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the header and rows here")
    args = parser.parse_args()

    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    start = time.perf_counter()
    jpegs, captions = demo_inputs(args.n_images, args.jpeg_side)
    with tempfile.TemporaryDirectory() as tmp:
        encoders = open_encoders(args.profile, device, dtype, Path(tmp))
    views = [view.strip() for view in args.views.split(",")]
    header = {
        "torch": torch.__version__, "device": str(device), "device_name": device_name(device),
        "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "profile": args.profile, "dtype": args.dtype, "batch_size": args.batch_size,
        "n_images": args.n_images, "jpeg_bytes_mean": sum(map(len, jpegs)) / len(jpegs),
        "jpeg_side": args.jpeg_side or 128, "setup_s": time.perf_counter() - start,
        "models": {view: encoders[view].identity for view in views},
    }
    print(f"torch {header['torch']} on {header['device']}: {header['device_name']}; "
          f"{header['cpu_cores']} cores, torch threads {header['torch_threads']}")
    print(f"profile {args.profile}, dtype {args.dtype}, batch {args.batch_size}, "
          f"{args.n_images} inputs ({header['jpeg_side']} px JPEGs, "
          f"{header['jpeg_bytes_mean'] / 1024:.1f} KiB mean), setup {header['setup_s']:.1f} s")
    for view in views:
        shown = {k: v for k, v in encoders[view].identity.items() if k != "files"}
        print(f"  {view}: {json.dumps(shown)}")

    monitor = GpuMonitor(device)
    rows = []
    print(f"\n{'view':13} {'threads':>7} {'workers':>7} {'raw/s':>9} {'pipeline/s':>10} "
          f"{'ratio':>6} {'decode/s':>9} {'gpu%mean':>8} {'gpu%max':>7} {'peakMiB':>8}")
    for view in views:
        try:
            view_rows = bench_view(view, encoders[view], jpegs, captions, args, device, dtype,
                                   monitor)
        except RuntimeError as error:  # e.g. workers killed (small /dev/shm), CUDA OOM: go on
            print(f"{view:13} FAILED: {type(error).__name__}: {error}", flush=True)
            rows.append({"view": view, "error": f"{type(error).__name__}: {error}"})
            continue
        for row in view_rows:
            rows.append(row)
            print(f"{view:13} {row['threads']:>7} {fmt(row['num_workers'], ''):>7} "
                  f"{row['raw_items_per_s']:>9.1f} {row['pipeline_items_per_s']:>10.1f} "
                  f"{row['ratio']:>6.2f} {fmt(row['decode_items_per_s'], '.1f'):>9} "
                  f"{fmt(row['gpu_util_mean'], '.0f'):>8} "
                  f"{fmt(row['gpu_util_max'], '.0f'):>7} "
                  f"{fmt(row.get('peak_allocated_mib'), '.0f'):>8}", flush=True)
        write_json(args.json, header, rows)  # after every view, so a timeout keeps the rest
    header["total_s"] = time.perf_counter() - start
    print(f"\ntotal {header['total_s']:.1f} s; target ratio >= 0.85")
    write_json(args.json, header, rows)


def write_json(path: str | None, header: dict, rows: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
