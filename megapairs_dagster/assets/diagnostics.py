"""``view_report``: what each view's in-window neighbours have in common, across all shards."""

import json

import pandas as pd
from dagster import AssetDep, AssetExecutionContext, AssetIn, MetadataValue, Output, asset

from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.conditions import rebuild_after_updates
from megapairs_dagster.assets.lookup import corpus_lookup
from megapairs_dagster.demo.relations import RELATION_TYPES, attribute_differences
from megapairs_dagster.resources.settings import Mining
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.synthesis.diagnostics import view_report as measure_view
from megapairs_dagster.synthesis.views import VIEWS


def relation_table(rows: dict[str, dict[str, float]]) -> MetadataValue:
    """A markdown table: one row per view, one column per relation type (share that differs)."""
    lines = ["| view | " + " | ".join(RELATION_TYPES) + " |", "|---" * (len(RELATION_TYPES) + 1) + "|"]
    for view, shares in rows.items():
        lines.append(f"| {view} | " + " | ".join(f"{shares[n]:.0%}" for n in RELATION_TYPES) + " |")
    return MetadataValue.md("\n".join(lines))


@asset(
    group_name="diagnostics",
    deps=[AssetDep("corpus_images")],
    ins={f"neighbors_{view}": AssetIn() for view in VIEWS},
    code_version="1",
    metadata=versioned_by("mining.windows"),
    automation_condition=rebuild_after_updates(),
    description="Per view: share of neighbours inside the mining window, caption overlap of "
    "in-window pairs vs random pairs, and (when the corpus records scenes, as the demo does) "
    "how often each attribute differs between an image and its in-window neighbours.",
)
def view_report(context: AssetExecutionContext, mining: Mining, store: ArtifactStore, **neighbors):
    partitions = sorted(neighbors[f"neighbors_{next(iter(VIEWS))}"])
    captions, scenes = corpus_lookup(store, partitions)
    report = {}
    for view in VIEWS:
        frames = neighbors[f"neighbors_{view}"]
        report[view] = measure_view(
            pd.concat([frames[key] for key in sorted(frames)], ignore_index=True),
            mining.window(view),
            captions,
            scenes=scenes or None,
            relation_types=RELATION_TYPES,
            differences=attribute_differences,
        )
        context.log.info(f"{view}: {json.dumps(report[view])}")
    metadata = {view: MetadataValue.json(values) for view, values in report.items()}
    if scenes:
        metadata["attribute_differs"] = relation_table(
            {view: values["relation_differs"] for view, values in report.items()}
        )
    return Output(report, metadata=metadata)
