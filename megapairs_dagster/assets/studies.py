"""The studies (``MEGAPAIRS_STUDIES`` seeds, off by default): ``scaling_curve``,
``view_ablation`` and ``hard_negative_ablation``, one unpartitioned asset each.

Each reads the scores of its training runs (partitions of ``mmret_clip`` and
``benchmark_scores``, added to the deployment by ``profiles.with_studies``) and shows a table
per point and seed with a plot, so whether more or better-mixed mined data helps is read in
one place.
"""

from collections.abc import Mapping, Sequence

from dagster import AssetDep, AssetsDefinition, MaterializeResult, MetadataValue, asset

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.assets.conditions import summary_after_updates
from megapairs_dagster.assets.plots import grouped_bars, line_plot
from megapairs_dagster.assets.triplets import triplet_store
from megapairs_dagster.evaluation.leaderboard import leaderboard
from megapairs_dagster.evaluation.studies import study_markdown, study_table
from megapairs_dagster.resources.profiles import Study
from megapairs_dagster.resources.store import ArtifactStore


def _triplets_trained(store: ArtifactStore, run: str) -> int | None:
    """How many triplets a run trained on (0 for the zero-shot model; None if not trained)."""
    try:
        record = load_artifact(store.client(), artifact_relpath(["mmret_clip"], run))
    except FileNotFoundError:
        return None
    return int(record.get("data", {}).get("triplets", 0))


def build_study_asset(name: str, study: Study, benchmarks: Sequence[str]) -> AssetsDefinition:
    @asset(
        name=name,
        group_name="studies",
        deps=[AssetDep("benchmark_scores"), AssetDep("mmret_clip")],
        automation_condition=summary_after_updates(),
        code_version="1",
        description=f"Study: {study.title}. Headline metrics per point and seed, their mean, "
        "and a plot; – where a run is not scored yet.",
    )
    def study_asset(store: ArtifactStore) -> MaterializeResult:
        board = leaderboard(triplet_store(store).scores_frame(), study.runs, benchmarks)
        table = study_table(board, study.points)
        means = {column.removesuffix(" mean"): table[column] for column in table.columns
                 if column.endswith(" mean")}
        metadata = {"results": MetadataValue.md(study_markdown(table, study.axis)),
                    "runs": len(study.runs), "scored_runs": int(board.notna().any(axis=1).sum())}
        if study.axis == "triplets":
            trained = [_triplets_trained(store, runs[0]) for runs in study.points.values()]
            metadata["triplets"] = MetadataValue.json(dict(zip(study.points, trained)))
            if all(count is not None for count in trained):
                metadata["plot"] = line_plot(trained, {k: list(v) for k, v in means.items()},
                                             xlabel="training triplets", title=study.title)
        elif table.notna().any().any():
            metadata["plot"] = grouped_bars(
                {title: values.dropna().to_dict() for title, values in means.items()},
                ylabel="score (%)", title=study.title)
        return MaterializeResult(metadata=metadata)

    return study_asset


def build_study_assets(studies: Mapping[str, Study], benchmarks: Sequence[str]
                       ) -> list[AssetsDefinition]:
    return [build_study_asset(name, study, benchmarks) for name, study in studies.items()]
