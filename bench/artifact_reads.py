"""Parquet reads as the pipeline does them (``artifacts.open_parquet``: no pre-buffering, no
Arrow thread pool, so no pool thread can outlive the interpreter holding a Python-owned
source) vs pyarrow's defaults (pre-buffered, decoded on its thread pools), side by side in one
run on the same sources:

- a corpus_images-like shard (JPEG-sized byte strings and captions): the whole table from
  bytes (``load_artifact``), the ``image_id`` column from an open file (``load_columns``,
  ``shard_entries``), and one row group's columns (``read_images``);
- a neighbours-like table (20 ids and scores per image, list columns) from bytes.

Ratio = pyarrow default time / pipeline time (> 1: the pipeline's read is faster).

    .venv/bin/python bench/artifact_reads.py --json bench/results/artifact_reads.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_dagster.artifacts import open_parquet, read_table, write_table


def images_table(rows: int, jpeg_bytes: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "image_id": np.arange(rows, dtype=np.int64),
        "caption": [f"a photo of object {i} on a table, seen from the side" for i in range(rows)],
        "jpeg": [rng.integers(0, 256, jpeg_bytes, dtype=np.uint8).tobytes() for _ in range(rows)],
        "width": np.full(rows, 512, dtype=np.int32),
        "height": np.full(rows, 384, dtype=np.int32),
    })


def neighbours_table(rows: int, k: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "image_id": np.arange(rows, dtype=np.int64),
        "neighbor_ids": list(rng.integers(0, rows, (rows, k), dtype=np.int64)),
        "scores": list(rng.random((rows, k), dtype=np.float32)),
    })


def default_read(source, columns=None) -> pd.DataFrame:
    return pq.read_table(pa.BufferReader(source) if isinstance(source, bytes) else source,
                         columns=columns).to_pandas()


def seconds(read: Callable[[], object]) -> float:
    started = time.perf_counter()
    read()
    return time.perf_counter() - started


def compare(label: str, repeats: int, pipeline: Callable[[], object],
            default: Callable[[], object]) -> dict:
    pipeline()  # warm the page cache and Arrow's pools
    default()
    pipeline_s, default_s = [], []
    for repeat in range(repeats):  # interleaved, each first in turn: drift hits both alike
        for read in (pipeline, default) if repeat % 2 == 0 else (default, pipeline):
            (pipeline_s if read is pipeline else default_s).append(seconds(read))
    row = {"case": label, "pipeline_ms": 1e3 * min(pipeline_s),
           "pyarrow_default_ms": 1e3 * min(default_s)}
    row["ratio"] = row["pyarrow_default_ms"] / row["pipeline_ms"]
    print(f"{label:58s} pipeline {row['pipeline_ms']:8.1f} ms  pyarrow default "
          f"{row['pyarrow_default_ms']:8.1f} ms  ratio {row['ratio']:.2f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--jpeg-bytes", type=int, default=30_000)
    parser.add_argument("--neighbours", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        shard = Path(folder) / "corpus_images.parquet"
        shard.write_bytes(write_table(images_table(args.images, args.jpeg_bytes), {}))
        neighbours = write_table(neighbours_table(args.neighbours), {})
        group = pq.ParquetFile(shard).num_row_groups // 2
        columns = ["image_id", "caption", "jpeg"]
        print(f"shard {shard.stat().st_size / 1e6:.0f} MB, neighbours {len(neighbours) / 1e6:.0f}"
              f" MB, {os.cpu_count()} CPUs, best of {args.repeats}", flush=True)

        def on_file(read: Callable) -> Callable[[], object]:
            def run():
                with shard.open("rb") as handle:
                    return read(handle)
            return run

        rows = [
            compare("corpus shard, whole table from bytes", args.repeats,
                    lambda: read_table(shard.read_bytes()),
                    lambda: default_read(shard.read_bytes())),
            compare("corpus shard, image_id column from an open file", args.repeats,
                    on_file(lambda h: read_table(h, ["image_id"])),
                    on_file(lambda h: default_read(h, ["image_id"]))),
            compare("corpus shard, one row group's columns from an open file", args.repeats,
                    on_file(lambda h: open_parquet(h).read_row_group(
                        group, columns=columns, use_threads=False).to_pandas(use_threads=False)),
                    on_file(lambda h: pq.ParquetFile(h).read_row_group(
                        group, columns=columns).to_pandas())),
            compare("neighbours, whole table from bytes", args.repeats,
                    lambda: read_table(neighbours), lambda: default_read(neighbours)),
        ]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"cpu_count": os.cpu_count(), "repeats": args.repeats, "rows": rows}, indent=2))
    # pyarrow's default reads above can leave a pool thread holding a Python-owned source,
    # which aborts the interpreter's exit (the race open_parquet avoids): results are
    # written, so leave without finalising.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
