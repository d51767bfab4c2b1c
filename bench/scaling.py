"""Each pipeline stage's cost at 1x, 2x and 4x the demo corpus, and one new shard vs a full
recompute, measured in one run on the demo profile, in process.

The stages through ``--through`` (default the export, i.e. the synthesis; training and
evaluation run a fixed number of steps whatever the corpus). One Dagster instance and store:
shard 0 is materialised (1x); both shards recomputed from the first stage (2x,
``refresh_from`` as ``megapairs demo --refresh-from``); shards 2 and 3 added one at a time
(each runs only the new shard's per-shard steps and the global stages its data changes);
then all 4 recomputed (4x). A stage's cost is the sum of its runs' step durations from
Dagster's event log (STEP_SUCCESS: step start to success, IO included), not wall time around
the call. The exponent log(cost 4x / cost 1x) / log 4 is printed per stage (1: linear,
0: constant). The demo's CLIP bootstrap is shortened with MEGAPAIRS_BOOTSTRAP_SECONDS (5 s
unless set), and training (with ``--through ''``) to ``--train-steps`` steps.

    .venv/bin/python bench/scaling.py --images-per-shard 100 --json bench/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import yaml
from dagster import DagsterEventType, DagsterInstance

SCALES = (1, 2, 4)
# Exponents inside this band count as linear in the printed verdict.
LINEAR_BAND = (0.75, 1.25)


def step_durations(instance: DagsterInstance, run_id: str) -> dict[str, float]:
    """Seconds per step of one run, from its STEP_SUCCESS events."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_SUCCESS).records
    return {
        r.event_log_entry.step_key: r.event_log_entry.dagster_event.event_specific_data.duration_ms
        / 1e3
        for r in records
    }


def stage_costs(instance: DagsterInstance, run_ids: set[str], stages) -> dict[str, float]:
    """Step seconds of the given runs, summed per stage (named by the assets a run
    materialised; the ephemeral job's runs carry no asset selection)."""
    costs: dict[str, float] = {}
    for run_id in run_ids:
        records = instance.get_records_for_run(
            run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
        made = {r.event_log_entry.dagster_event.asset_key.to_user_string() for r in records}
        name = next((", ".join(s.assets) for s in stages if made & set(s.assets)), "(other)")
        costs[name] = costs.get(name, 0.0) + sum(step_durations(instance, run_id).values())
    return costs


def scaling_exponent(cost_1x: float, cost_4x: float) -> float | None:
    """log(cost at 4x / cost at 1x) / log 4: 1 for a linear stage, 0 for a constant one."""
    if cost_1x <= 0 or cost_4x <= 0:
        return None
    return math.log(cost_4x / cost_1x) / math.log(4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-shard", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=10,
                        help="max_steps of each demo training run (the demo uses 300)")
    parser.add_argument("--train-batch-size", type=int, default=8,
                        help="the demo's 32 needs more triplets than 100 images give")
    parser.add_argument("--through", default="megapairs_export",
                        help="last asset to materialise ('' for the whole graph: training and "
                             "evaluation at fixed steps, many minutes on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MEGAPAIRS_BOOTSTRAP_SECONDS", "5")

    from megapairs_dagster.definitions import build_definitions
    from megapairs_dagster.demo import write_demo_shard
    from megapairs_dagster.jobs.pipeline import (
        materialize_pipeline,
        pipeline_stages,
        stages_upstream_of,
    )
    from megapairs_dagster.jobs.sensors import claim_instance
    from megapairs_dagster.resources.profiles import load_deployment

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        home, dagster_home = Path(tmp, "home"), Path(tmp, "dagster_home")
        dagster_home.mkdir()
        (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        config = Path(tmp, "config.yaml")
        config.write_text(yaml.safe_dump(
            {"resources": {"training": {"config": {"max_steps": args.train_steps,
                                                   "batch_size": args.train_batch_size}}}}))
        keys = [f"{i:05d}" for i in range(max(SCALES))]
        for index in range(len(keys)):
            write_demo_shard(home / "demo_corpus", index, args.images_per_shard, args.seed)
        deployment = load_deployment("demo", str(home), str(config))
        resources = deployment.resources
        assets = list(build_definitions(deployment).assets)
        stages = pipeline_stages(build_definitions(deployment).resolve_asset_graph())
        if args.through:
            upstream = stages_upstream_of(stages, args.through)
            stages = tuple(s for s in stages if s in upstream or args.through in s.assets)
        instance = DagsterInstance.from_config(str(dagster_home))
        claim_instance(instance, resources["store"])

        def call(shard_keys: list[str], label: str, refresh: bool = False) -> dict:
            before = {run.run_id for run in instance.get_runs()}
            wall = time.perf_counter()
            materialize_pipeline(assets, resources, instance, shard_keys, stages=stages,
                                 log=lambda _: None, refresh_from=stages[0].assets[0] if refresh else None)
            wall = time.perf_counter() - wall
            run_ids = {run.run_id for run in instance.get_runs()} - before
            costs = stage_costs(instance, run_ids, stages)
            print(f"{label}: {len(run_ids)} runs, {sum(costs.values()):.1f} s in steps, "
                  f"{wall:.1f} s wall", flush=True)
            return {"runs": len(run_ids), "wall_s": wall, "step_s": sum(costs.values()),
                    "stages": costs}

        calls = {
            "1x": call(keys[:1], "1x: shard 0 from scratch"),
            "2x": call(keys[:2], "2x: shards 0-1 recomputed", refresh=True),
            "new_shard_3rd": call(keys[:3], "new shard 2 on top of 2"),
            "new_shard_4th": call(keys[:4], "new shard 3 on top of 3"),
            "4x": call(keys[:4], "4x: shards 0-3 recomputed", refresh=True),
        }
        instance.dispose()

    names = [", ".join(stage.assets) for stage in stages]
    rows = []
    for name in names:
        cost = {f"{s}x": calls[f"{s}x"]["stages"].get(name, 0.0) for s in SCALES}
        exponent = scaling_exponent(cost["1x"], cost["4x"])
        rows.append({"stage": name, **{f"{k}_s": v for k, v in cost.items()},
                     "exponent": exponent,
                     "linear": exponent is not None
                     and LINEAR_BAND[0] <= exponent <= LINEAR_BAND[1]})
    new, full = calls["new_shard_4th"]["step_s"], calls["4x"]["step_s"]
    summary = {"new_shard_s": new, "full_recompute_4_shards_s": full,
               "full_over_new": full / new if new else None}

    print(f"\n{args.images_per_shard} images per shard, training {args.train_steps} steps, "
          f"bootstrap {os.environ['MEGAPAIRS_BOOTSTRAP_SECONDS']} s, {os.cpu_count()} CPUs")
    print(f"{'stage':<58}{'1x s':>8}{'2x s':>8}{'4x s':>8}{'exponent':>10}")
    for row in rows:
        exponent = "-" if row["exponent"] is None else f"{row['exponent']:.2f}"
        flag = "" if row["linear"] else "  (not linear)"
        print(f"{row['stage'][:57]:<58}{row['1x_s']:>8.2f}{row['2x_s']:>8.2f}{row['4x_s']:>8.2f}"
              f"{exponent:>10}{flag}")
    print(f"one new shard (4th): {new:.1f} s in steps; full recompute of 4 shards: {full:.1f} s "
          f"({summary['full_over_new']:.1f}x); total {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"config": vars(args), "cpu_count": os.cpu_count(), "stages": rows,
             "new_shard": summary, "calls": calls}, indent=2))


if __name__ == "__main__":
    main()
