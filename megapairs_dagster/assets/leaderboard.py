"""``leaderboard``: every model's headline score on every benchmark, in one table and one plot,
so the UI answers "which model is best" without opening a partition."""

from collections.abc import Sequence

from dagster import AssetDep, AssetsDefinition, MaterializeResult, MetadataValue, asset

from megapairs_dagster.assets.conditions import summary_after_updates
from megapairs_dagster.assets.plots import grouped_bars
from megapairs_dagster.assets.triplets import triplet_store
from megapairs_dagster.evaluation.leaderboard import leaderboard, leaderboard_markdown
from megapairs_dagster.resources.store import ArtifactStore


def build_leaderboard_asset(models: Sequence[str], benchmarks: Sequence[str],
                            scores: Sequence[str]) -> AssetsDefinition:
    """The leaderboard of the deployment's training runs on its benchmarks, rebuilt after any
    of its ``scores`` assets (one per model family) changes."""

    @asset(
        name="leaderboard",
        # beside "evaluation": a group is one job, and this one is not partitioned
        group_name="evaluation_summary",
        deps=[AssetDep(name) for name in scores],
        automation_condition=summary_after_updates(),
        code_version="1",
        description="Headline metric of every model on every benchmark (CIRCO mAP@5, CIRR R@1 "
        "and R_subset@1, FashionIQ mean R@10, GeneCIS mean R@1, MMEB overall, demo mAP@5), one "
        "decimal as papers print them, the best in bold, – where not scored; rebuilt after "
        "any score changes.",
    )
    def leaderboard_asset(store: ArtifactStore) -> MaterializeResult:
        table = leaderboard(triplet_store(store).scores_frame(), models, benchmarks)
        scored = table.dropna(axis=1, how="all")
        return MaterializeResult(metadata={
            "leaderboard": MetadataValue.md(leaderboard_markdown(table)),
            "scores": int(table.notna().sum().sum()),
            **({"plot": grouped_bars(
                {column: scored[column].dropna().to_dict() for column in scored},
                ylabel="score (%)", title="headline metric per benchmark")}
               if not scored.empty else {}),
        })

    return leaderboard_asset
