"""The one Definitions object of the code location, built from the deployment the environment
describes (profile, config file, executor: ``resources/profiles.py``)."""

from dagster import Definitions, load_assets_from_modules

from megapairs_dagster.assets import (
    corpus,
    diagnostics,
    embeddings,
    encoders,
    instructions,
    lookup,
    pairs,
    triplets,
)
from megapairs_dagster.assets.code_versions import with_config_versions
from megapairs_dagster.assets.evaluation import (
    REAL_BENCHMARKS,
    build_scores_asset,
    demo_benchmark,
)
from megapairs_dagster.assets.knn import knn_assets
from megapairs_dagster.assets.leaderboard import build_leaderboard_asset
from megapairs_dagster.assets.studies import build_study_assets
from megapairs_dagster.assets.training import build_training_asset
from megapairs_dagster.assets.training_mllm import build_mllm_training_asset
from megapairs_dagster.jobs import build_jobs, sensors
from megapairs_dagster.resources.profiles import Deployment, load_deployment


def build_definitions(deployment: Deployment) -> Definitions:
    """The code location of a deployment: its training runs are the partitions of training
    and scoring, asset code versions follow its configuration, its executor runs every job.
    Only the demo deployment has the demo benchmark; MMRet-MLLM is there only when its runs are
    (the paper's; the demo's with ``MEGAPAIRS_DEMO_MLLM=1``), scored by its own scores asset
    into the same table and leaderboard as MMRet-CLIP. Each asset's policies (automation, code
    version inputs, pool, retries) are on its decorator; jobs follow the asset groups."""
    demo = deployment.profile == "demo"
    benchmarks = list(REAL_BENCHMARKS)
    if demo:  # the demo scores its own benchmark, and a real one only once its data is set
        data = deployment.resources["benchmark_data"]
        benchmarks = ["demo_cir", *(name for name in benchmarks if not data.unset(name))]
    gpus = deployment.resources["training"].nproc_per_node
    mllm = deployment.mllm_runs
    assets = [
        *load_assets_from_modules(
            [corpus, lookup, encoders, embeddings, diagnostics, pairs, instructions, triplets]
        ),
        *knn_assets(deployment.resources["indexes"]),
        build_training_asset(deployment.training_runs, gpus=gpus),
        *([build_mllm_training_asset(mllm, gpus=gpus)] if mllm else []),
        *([demo_benchmark] if demo else []),
        build_scores_asset("benchmark_scores", list(deployment.training_runs), benchmarks),
        *([build_scores_asset("mllm_benchmark_scores", list(mllm), benchmarks)] if mllm else []),
        build_leaderboard_asset([*deployment.training_runs, *mllm], benchmarks,
                                ["benchmark_scores", *(["mllm_benchmark_scores"] if mllm else [])]),
        *build_study_assets(deployment.studies, benchmarks),
    ]
    return Definitions(
        assets=with_config_versions(assets, deployment.resources),
        jobs=build_jobs(assets),
        sensors=sensors,
        resources=deployment.resources,
        executor=deployment.executor_definition(),
    )


defs = build_definitions(load_deployment())
