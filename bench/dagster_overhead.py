"""Dagster's overhead per partition: wall time of a materialisation of a trivially small shard
vs the time spent inside its steps, measured side by side in one run.

- in process (`dagster.materialize`): corpus_images+corpus_rejects of a 4-image shard, and
  image_pairs of one shard (its upstream is materialised first, untimed);
- `dagster asset materialize` CLI (process start, code loading and run included).

Step time = the STEP_SUCCESS durations (the asset body plus its IO-manager reads/writes).
Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/dagster_overhead.py --json out.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dagster import DagsterInstance, materialize
from scaling import step_durations

from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.resources.profiles import resources_for
from megapairs_dagster.resources.settings import Compute, Encoders

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def step_seconds(instance: DagsterInstance, run_id: str) -> float:
    return sum(step_durations(instance, run_id).values())


def in_process(defs_assets, resources, instance, selection, partition) -> tuple[float, float]:
    started = time.perf_counter()
    result = materialize(defs_assets, selection=selection, partition_key=partition,
                         instance=instance, resources=resources, run_config=QUIET)
    wall = time.perf_counter() - started
    return wall, step_seconds(instance, result.run_id)


def cli(home: Path, dagster_home: Path, selection: str, partition: str) -> tuple[float, float]:
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "MEGAPAIRS_HOME": str(home),
           "MEGAPAIRS_BOOTSTRAP_SECONDS": "3"}
    started = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize",
         "-m", "megapairs_dagster.definitions", "--select", selection, "--partition", partition],
        env=env, check=True, capture_output=True,
    )
    wall = time.perf_counter() - started
    instance = DagsterInstance.from_config(str(dagster_home))
    run = instance.get_runs(limit=1)[0]
    steps = step_seconds(instance, run.run_id)
    instance.dispose()
    return wall, steps


def report(label: str, samples: list[tuple[float, float]]) -> dict:
    wall = statistics.median(s[0] for s in samples)
    steps = statistics.median(s[1] for s in samples)
    print(f"{label:<58} wall {wall:6.2f}s  in steps {steps:6.2f}s  overhead {wall - steps:6.2f}s"
          f"  wall/steps {wall / max(steps, 1e-9):6.1f}x")
    return {"label": label, "wall_s": wall, "step_s": steps, "overhead_s": wall - steps,
            "wall_over_steps": wall / max(steps, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    repeats = args.repeats
    from megapairs_dagster.definitions import defs
    from megapairs_dagster.jobs.pipeline import (
        materialize_pipeline,
        pipeline_stages,
        stages_upstream_of,
    )

    assets = list(defs.assets)
    with tempfile.TemporaryDirectory() as tmp:
        home, dagster_home = Path(tmp) / "home", Path(tmp) / "dagster_home"
        dagster_home.mkdir()
        (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        write_demo_shard(home / "demo_corpus", 0, 24, seed=0)  # for image_pairs' upstream
        write_demo_shard(home / "demo_corpus", 1, 4, seed=0)  # the trivially small shard
        resources = resources_for("demo", str(home))
        resources["encoders"] = Encoders(mode="bootstrap", bootstrap_max_seconds=3,
                                         dino_image_size=resources["encoders"].dino_image_size)
        resources["compute"] = Compute(num_workers=0, batch_size=32, cache_dir=str(home / "cache"))
        instance = DagsterInstance.from_config(str(dagster_home))
        print("preparing shard 00000 through image_pairs (untimed)...", flush=True)
        stages = pipeline_stages(defs.resolve_asset_graph())
        through_pairs = stages_upstream_of(stages, "pair_descriptions")
        materialize_pipeline(assets, resources, instance, ["00000"], stages=through_pairs,
                             log=lambda _: None)
        instance.add_dynamic_partitions("shards", ["00001"])

        ingest = [in_process(assets, resources, instance, ["corpus_images", "corpus_rejects"],
                             "00001") for _ in range(repeats)]
        pairs = [in_process(assets, resources, instance, ["image_pairs"], "00000")
                 for _ in range(repeats)]
        instance.dispose()
        ingest_cli = [cli(home, dagster_home, "corpus_images,corpus_rejects", "00001")
                      for _ in range(repeats)]
        pairs_cli = [cli(home, dagster_home, "image_pairs", "00000") for _ in range(repeats)]

    print(f"\nmedian of {repeats} runs each (this machine: {os.cpu_count()} CPUs)")
    rows = [
        report("in process: corpus_images+corpus_rejects, 4-image shard", ingest),
        report("in process: image_pairs, one 24-image shard", pairs),
        report("CLI dagster asset materialize: corpus (4 images)", ingest_cli),
        report("CLI dagster asset materialize: image_pairs", pairs_cli),
    ]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"repeats": repeats, "cpu_count": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
