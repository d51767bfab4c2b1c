"""Materialise the whole graph stage by stage in process, skipping partitions already done.

This is what ``make demo`` runs. The stages follow from the asset graph itself (topological
levels, split by partitioning), and global assets are rebuilt by the same rule automation
follows, so a new asset needs no entry here. Every run is recorded in the Dagster instance, so
the UI (``make ui``) shows the same materialisations and lineage afterwards.
"""


import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dagster import AssetKey, DagsterInstance, Definitions, materialize

from megapairs_dagster.assets.conditions import BASELINE
from megapairs_dagster.assets.partitions import shards

if TYPE_CHECKING:
    from dagster._core.definitions.assets.graph.asset_graph import AssetGraph


@dataclass(frozen=True)
class Stage:
    assets: tuple[str, ...]
    per_shard: bool
    # A baseline (the base encoders) is built once: adding shards must not silently rebuild it.
    baseline: bool = False
    # Fixed partitions of a global stage (a training run, a benchmark × model); None: unpartitioned.
    keys: tuple[str, ...] | None = None
    # Assets outside the stage whose rebuild makes this stage's output out of date.
    deps: frozenset[str] = frozenset()


def pipeline_stages(graph: "AssetGraph") -> tuple[Stage, ...]:
    """The stages of an asset graph (``defs.resolve_asset_graph()``) in dependency order: an
    asset's level is one more than its deepest dependency's, and the assets of one level with
    the same partitioning form a stage (the three views' embeddings run together).
    Multi-assets stay whole."""
    level: dict[AssetKey, int] = {}
    for key in graph.toposorted_asset_keys:
        level[key] = 1 + max((level[parent] for parent in graph.get(key).parent_keys), default=-1)
    placed: dict[tuple[int, str, bool, tuple[str, ...]], list[AssetKey]] = {}
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        siblings = sorted(node.execution_set_asset_keys)
        condition = node.automation_condition
        baseline = condition is not None and condition.get_label() == BASELINE
        # fixed partitions split by their keys: mmret_clip's runs are not mmret_mllm's
        keys = tuple(node.partitions_def.get_partition_keys()) if _kind(
            node.partitions_def) == "fixed" else ()
        place = (max(level[s] for s in siblings), _kind(node.partitions_def), baseline, keys)
        members = placed.setdefault(place, [])
        members.extend(s for s in siblings if s not in members)
    stages = []
    for (_, kind, baseline, _), keys in sorted(placed.items()):
        nodes = [graph.get(key) for key in keys]
        stages.append(Stage(
            assets=tuple(key.to_user_string() for key in keys),
            per_shard=kind == "shards",
            baseline=baseline,
            keys=tuple(nodes[0].partitions_def.get_partition_keys()) if kind == "fixed" else None,
            deps=frozenset(
                parent.to_user_string() for node in nodes for parent in node.parent_keys
            ) - {key.to_user_string() for key in keys},
        ))
    return tuple(stages)


def _kind(partitions_def) -> str:
    if partitions_def is None:
        return "global"
    return "shards" if partitions_def == shards else "fixed"


def stages_upstream_of(stages: Sequence[Stage], asset: str) -> tuple[Stage, ...]:
    """The stages that ``asset`` depends on, directly or not (to materialise up to it)."""
    needed: set[str] = set()
    for stage in reversed(stages):
        if asset in stage.assets or needed & set(stage.assets):
            needed |= stage.deps
    return tuple(stage for stage in stages if needed & set(stage.assets))


def materialize_pipeline(
    assets: Sequence,
    resources: dict,
    instance: DagsterInstance,
    shard_keys: Sequence[str],
    *,
    stages: Sequence[Stage] | None = None,
    refresh_from: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """Run every stage for ``shard_keys``; returns what was materialised, per asset.

    Per-shard partitions that the instance already holds are skipped (a new shard never
    recomputes old ones); a global asset is rebuilt when one of its dependencies was
    materialised by this call, or when it has never been materialised; a baseline only then.
    ``refresh_from`` names an asset whose stage and every later stage are recomputed for all
    shards (after a config change).
    """
    if stages is None:
        stages = pipeline_stages(
            Definitions(assets=list(assets), resources=resources).resolve_asset_graph()
        )
    names = [name for stage in stages for name in stage.assets]
    if refresh_from is not None and refresh_from not in names:
        raise ValueError(f"--refresh-from {refresh_from!r} is not one of {names}")
    refreshing = False
    existing = set(instance.get_dynamic_partitions(shards.name))
    missing = [key for key in shard_keys if key not in existing]
    if missing:
        instance.add_dynamic_partitions(shards.name, missing)
    done: dict[str, list[str]] = {}
    for stage in stages:
        first = AssetKey(stage.assets[0])
        refreshing = refreshing or refresh_from in stage.assets
        if stage.per_shard:
            materialized = set() if refreshing else instance.get_materialized_partitions(first)
            todo = [key for key in shard_keys if key not in materialized]
            for key in todo:
                _run(assets, resources, instance, stage, key, log)
            if todo:
                for name in stage.assets:
                    done[name] = todo
            continue
        inputs_changed = any(dep in done for dep in stage.deps) and not stage.baseline
        materialized = instance.get_materialized_partitions(first) if stage.keys else set()
        for key in stage.keys or (None,):
            never = (
                key not in materialized
                if key
                else instance.get_latest_materialization_event(first) is None
            )
            if never or refreshing or inputs_changed:
                _run(assets, resources, instance, stage, key, log)
                for name in stage.assets:
                    done.setdefault(name, []).append(key or "(global)")
    return done


def _run(assets, resources, instance, stage: Stage, partition: str | None, log) -> None:
    started = time.perf_counter()
    result = materialize(
        assets,
        selection=list(stage.assets),
        partition_key=partition,
        instance=instance,
        resources=resources,
        raise_on_error=True,
        # Progress lines (INFO) stay visible; Dagster's per-step DEBUG events go to the UI only.
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
    )
    where = f"[{partition}]" if partition else ""
    log(f"  {', '.join(stage.assets)}{where}: {time.perf_counter() - started:.1f}s "
        f"(run {result.run_id[:8]})")
