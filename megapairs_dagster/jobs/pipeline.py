"""Materialise the whole graph stage by stage in process, skipping partitions already done.

This is what ``make demo`` runs. It records every run in the Dagster instance, so the UI
(``make ui``) shows the same materialisations and lineage afterwards.
"""


import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dagster import AssetKey, DagsterInstance, MultiPartitionKey, materialize

from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.resources.profiles import DEMO_RUNS
from megapairs_dagster.synthesis.views import VIEWS


@dataclass(frozen=True)
class Stage:
    assets: tuple[str, ...]
    per_shard: bool
    rebuild_when_shards_change: bool = True
    # Fixed partitions of a global stage (a model variant, a benchmark × model); None: unpartitioned.
    keys: tuple[str, ...] | None = None


STAGES: tuple[Stage, ...] = (
    Stage(("corpus_images", "corpus_rejects"), per_shard=True),
    Stage(("image_index",), per_shard=False),
    # The base encoders are the baseline: adding shards must not silently retrain them.
    Stage(("base_encoders",), per_shard=False, rebuild_when_shards_change=False),
    Stage(tuple(f"embeddings_{view}" for view in VIEWS), per_shard=True),
    Stage(tuple(f"knn_index_{view}" for view in VIEWS), per_shard=False),
    Stage(tuple(f"neighbors_{view}" for view in VIEWS), per_shard=True),
    Stage(("view_report",), per_shard=False),
    Stage(("image_pairs",), per_shard=True),
    Stage(("pair_descriptions", "description_rejects"), per_shard=True),
    Stage(("instructions", "instruction_rejects"), per_shard=True),
    Stage(("triplets",), per_shard=True),
    Stage(("megapairs_export",), per_shard=False),
    # The benchmark is fixed before any training and never depends on the corpus.
    Stage(("demo_benchmark",), per_shard=False, rebuild_when_shards_change=False),
    # The base encoder as it is, three seeds of the demo recipe and the equal-compute
    # caption-only control.
    Stage(("mmret_clip",), per_shard=False, keys=tuple(DEMO_RUNS)),
    Stage(
        ("benchmark_scores",), per_shard=False,
        keys=tuple(f"demo_cir|{model}" for model in DEMO_RUNS),
    ),
)


def materialize_pipeline(
    assets: Sequence,
    resources: dict,
    instance: DagsterInstance,
    shard_keys: Sequence[str],
    *,
    stages: Sequence[Stage] = STAGES,
    refresh_from: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """Run every stage for ``shard_keys``; returns what was materialised, per asset.

    Per-shard partitions that the instance already holds are skipped (a new shard never
    recomputes old ones); a global asset is rebuilt when any shard of this call was new to the
    stage before it, or when it has never been materialised. ``refresh_from`` names an asset
    whose stage and every later stage are recomputed for all shards (after a config change).
    """
    names = [name for stage in stages for name in stage.assets]
    if refresh_from is not None and refresh_from not in names:
        raise ValueError(f"--refresh-from {refresh_from!r} is not one of {names}")
    refreshing = False
    existing = set(instance.get_dynamic_partitions(shards.name))
    missing = [key for key in shard_keys if key not in existing]
    if missing:
        instance.add_dynamic_partitions(shards.name, missing)
    done: dict[str, list[str]] = {}
    shards_changed = False
    for stage in stages:
        first = AssetKey(stage.assets[0])
        refreshing = refreshing or refresh_from in stage.assets
        if stage.per_shard:
            materialized = set() if refreshing else instance.get_materialized_partitions(first)
            todo = [key for key in shard_keys if key not in materialized]
            for key in todo:
                _run(assets, resources, instance, stage, key, log)
            shards_changed = shards_changed or bool(todo)
            for name in stage.assets:
                done[name] = todo
        else:
            materialized = instance.get_materialized_partitions(first) if stage.keys else set()
            for key in stage.keys or (None,):
                never = (
                    key not in materialized
                    if key
                    else instance.get_latest_materialization_event(first) is None
                )
                if never or refreshing or (shards_changed and stage.rebuild_when_shards_change):
                    _run(assets, resources, instance, stage, key, log)
                    for name in stage.assets:
                        done.setdefault(name, []).append(key or "(global)")
    return done


def _run(assets, resources, instance, stage: Stage, partition: str | None, log) -> None:
    started = time.perf_counter()
    result = materialize(
        assets,
        selection=list(stage.assets),
        partition_key=_partition_key(partition),
        instance=instance,
        resources=resources,
        raise_on_error=True,
        # Progress lines (INFO) stay visible; Dagster's per-step DEBUG events go to the UI only.
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
    )
    where = f"[{partition}]" if partition else ""
    log(f"  {', '.join(stage.assets)}{where}: {time.perf_counter() - started:.1f}s "
        f"(run {result.run_id[:8]})")


def _partition_key(key: str | None):
    """Plain keys as they are; ``a|b`` as the multi-partition key with those dimension values."""
    if key is None or "|" not in key:
        return key
    benchmark, model = key.split("|")
    return MultiPartitionKey({"benchmark": benchmark, "model": model})
