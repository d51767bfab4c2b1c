"""``demo_benchmark`` and ``benchmark_scores`` (benchmark × model), with the CIRCO and CIRR
test-server submission files and a picture of a few queries' retrievals."""

import io
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    AssetObservation,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    StaticPartitionsDefinition,
    asset,
)
from PIL import Image

from megapairs_dagster.assets.plots import png_markdown
from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS
from megapairs_dagster.assets.training import trained_model
from megapairs_dagster.assets.triplets import triplet_store
from megapairs_dagster.demo import write_demo_benchmark
from megapairs_dagster.evaluation.datasets import (
    load_circo,
    load_cirr,
    load_fashioniq,
    load_genecis,
    load_mmeb,
)
from megapairs_dagster.evaluation.evaluate import (
    ComposedEncoder,
    Metrics,
    circo_test_submissions,
    cirr_test_submissions,
    collecting_examples,
    evaluate_circo_format,
    evaluate_cirr,
    evaluate_fashioniq,
    evaluate_genecis,
    evaluate_mmeb,
    reusing_gallery_embeddings,
)
from megapairs_dagster.evaluation.examples import draw_examples, png_bytes
from megapairs_dagster.evaluation.leaderboard import HEADLINES
from megapairs_dagster.evaluation.readers import read_circo
from megapairs_dagster.evaluation.submission import check_test_gallery, submission_json
from megapairs_dagster.resources.settings import BenchmarkData
from megapairs_dagster.resources.store import ArtifactStore

# The metric each benchmark's papers lead with: the one shown per query group in the metadata.
HEADLINE_METRIC = {benchmark: columns[0][1] for benchmark, columns in HEADLINES.items()}


def submission_relpath(benchmark: str, model: str, name: str) -> str:
    """Where ``benchmark_scores`` writes a test-server file in the artifact store."""
    return f"benchmark_scores/{benchmark}/{model}/submission_{name}.json"


def benchmark_by_model(models: Sequence[str], benchmarks: Sequence[str]
                       ) -> MultiPartitionsDefinition:
    """Benchmark × model, the model dimension being exactly the training runs of the scored
    training asset, so each score maps to the one checkpoint it scores."""
    return MultiPartitionsDefinition(
        {"benchmark": StaticPartitionsDefinition(list(benchmarks)),
         "model": StaticPartitionsDefinition(list(models))}
    )


# Which training asset each scores asset scores, with its group (a group is one job, and one
# job has one partitioning): Dagster maps a score's model to a training partition only when
# the model dimension holds exactly that asset's runs, so each model family has its own.
SCORED_TRAINERS = {
    "benchmark_scores": ("mmret_clip", "evaluation"),
    "mllm_benchmark_scores": ("mmret_mllm", "evaluation_mllm"),
}


@asset(
    group_name="demo",
    code_version="1",
    description="The demo CIR benchmark in the CIRCO annotation format: held-out images and "
    "one-edit queries whose ground truths follow from the generator's attributes. Fixed before "
    "any training and independent of every model.",
)
def demo_benchmark(store: ArtifactStore) -> MaterializeResult:
    client = store.client()
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_benchmark(tmp)
        queries = json.loads((Path(tmp) / "annotations" / "val.json").read_text())
        images = len(list((Path(tmp) / "images").glob("*.jpg")))
        client.upload_dir(tmp, "demo_benchmark")
    edits = sorted({query["semantic_aspects"][0] for query in queries})
    return MaterializeResult(
        metadata={"queries": len(queries), "gallery": images, "edit_types": ", ".join(edits),
                  "path": MetadataValue.path(client.url("demo_benchmark"))}
    )


# A benchmark, read and checked, waiting for the model to score.
Scorer = Callable[[ComposedEncoder], Metrics]


def _demo_cir(store: ArtifactStore) -> Scorer:
    client = store.client()
    raw = json.loads(client.read_bytes("demo_benchmark/annotations/val.json"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "val.json"
        path.write_text(json.dumps(raw))
        queries = read_circo(path)
    folder = client.path("demo_benchmark", "images")
    gallery = sorted(str(int(p.name.split(".")[0])) for p in folder.iterdir() if p.name.endswith(".jpg"))
    groups = {str(record["id"]): record["semantic_aspects"][0] for record in raw}

    def load(image_id: str) -> Image.Image:
        data = client.read_bytes(f"demo_benchmark/images/{int(image_id):012d}.jpg")
        return Image.open(io.BytesIO(data)).convert("RGB")

    return lambda model: evaluate_circo_format(model, queries, gallery, load, groups=groups)


def _circo(data: BenchmarkData) -> Scorer:
    queries, gallery, load = load_circo(data.circo_annotations, data.circo_images)
    return lambda model: evaluate_circo_format(model, queries, gallery, load)


def _cirr(data: BenchmarkData) -> Scorer:
    queries, gallery, load = load_cirr(data.cirr_annotations, data.cirr_images)
    return lambda model: evaluate_cirr(model, queries, gallery, load)


def _fashioniq(data: BenchmarkData) -> Scorer:
    queries, galleries, load = load_fashioniq(data.fashioniq_annotations, data.fashioniq_images)
    return lambda model: evaluate_fashioniq(model, queries, galleries, load)


def _genecis(data: BenchmarkData) -> Scorer:
    queries, load = load_genecis(data.genecis_annotations, data.genecis_coco_images,
                                 data.genecis_vg_images)
    return lambda model: evaluate_genecis(model, queries, load)


def _mmeb(data: BenchmarkData) -> Scorer:
    queries, load = load_mmeb(data.mmeb_data, data.mmeb_images)
    return lambda model: evaluate_mmeb(model, queries, load)


REAL_BENCHMARKS = {"circo": _circo, "cirr": _cirr, "fashioniq": _fashioniq,
                   "genecis": _genecis, "mmeb": _mmeb}


class PendingSubmission(NamedTuple):
    """A test split, read and checked, waiting for the model to rank it."""

    queries: int
    files: Callable[[ComposedEncoder], dict[str, dict]]  # model -> {file name: submission}


def _circo_test(data: BenchmarkData) -> PendingSubmission:
    queries, gallery, load = load_circo(data.circo_test_annotations, data.circo_images, "test")
    check_test_gallery("circo", queries, gallery)
    return PendingSubmission(
        len(queries), lambda model: circo_test_submissions(model, queries, gallery, load))


def _cirr_test(data: BenchmarkData) -> PendingSubmission:
    queries, gallery, load = load_cirr(data.cirr_test_annotations, data.cirr_images, "test1")
    check_test_gallery("cirr", queries, gallery)
    return PendingSubmission(
        len(queries), lambda model: cirr_test_submissions(model, queries, gallery, load))


TEST_SPLITS = {"circo": _circo_test, "cirr": _cirr_test}


def build_scores_asset(
    name: str, runs: Sequence[str], benchmarks: Sequence[str]
) -> AssetsDefinition:
    """A scores asset (``SCORED_TRAINERS``) over its training asset's runs and the deployment's
    benchmarks; only a deployment that scores the demo benchmark depends on it. Each score
    depends on the one training partition it scores, so retraining a run marks its scores
    stale and no other."""
    trainer, group = SCORED_TRAINERS[name]

    @asset(
        name=name,
        partitions_def=benchmark_by_model(runs, benchmarks),
        group_name=group,
        ins={"record": AssetIn(
            key=trainer,
            partition_mapping=MultiToSingleDimensionPartitionMapping(partition_dimension_name="model"),
        )},
        deps=[AssetDep("demo_benchmark")] if "demo_cir" in benchmarks else [],
        output_required=False,
        code_version="1",
        pool=GPU_POOL,
        op_tags=GPU_TAGS,
        description=f"Metrics of one `{trainer}` training run's model on one benchmark, as the "
        "official evaluation computes them; also rows of the `benchmark_scores` table, and a "
        "picture of the first queries' top 5 (`examples`, ground truths framed in green). A "
        "benchmark whose data is not configured is skipped: nothing is materialised, and an "
        "observation on the partition (`skipped`) names the settings to set. With "
        "`benchmark_data.<circo|cirr>_test_annotations` set, the "
        "model also ranks the test split into the test server's submission files, written "
        "beside the scores (`benchmark_scores/<benchmark>/<model>/submission_*.json`).",
    )
    def scores(
        context: AssetExecutionContext,
        record: dict,
        store: ArtifactStore,
        benchmark_data: BenchmarkData,
    ):
        keys = context.partition_key.keys_by_dimension
        benchmark, model_name = keys["benchmark"], keys["model"]
        unset = benchmark_data.unset(benchmark)
        if unset:
            settings = " and ".join(unset)
            context.log.warning(f"{benchmark} not scored: set {settings}")
            # Seen on the partition's page; the partition stays missing, so no table or
            # leaderboard takes it for a score, and a run once the data is set scores it.
            context.log_event(AssetObservation(
                context.asset_key, partition=context.partition_key,
                metadata={"skipped": f"{benchmark} data not configured: set {settings}"}))
            return
        # Read and check the benchmark before loading a model: a missing image fails fast.
        read = REAL_BENCHMARKS.get(benchmark)
        score = read(benchmark_data) if read else _demo_cir(store)
        test_unset = benchmark_data.unset_test(benchmark)
        if test_unset:
            context.log.info(f"{benchmark} test-server files not written: set {test_unset[0]}")
        submit = TEST_SPLITS[benchmark](benchmark_data) if test_unset == [] else None
        model = trained_model(record, store)
        checkpoint = record.get("checkpoint") or json.dumps(record["start"])
        # CIRCO's test split ranks val's gallery; the examples are the first val queries.
        with reusing_gallery_embeddings(), collecting_examples() as examples:
            metrics = score(model)
            submitted = _write_submissions(store, benchmark, model_name, model, submit)
        if submit:
            context.log.info(f"{benchmark} test-server files written: "
                             f"{', '.join(str(url.value) for url in submitted.values())}")
        rows = triplet_store(store).replace_scores(benchmark, model_name, metrics, checkpoint)
        overall, headline = metrics["all"], HEADLINE_METRIC[benchmark]
        yield MaterializeResult(
            metadata={
                **{name: float(value) for name, value in overall.items()},
                "by_group": MetadataValue.json(
                    {group: round(values[headline], 2) for group, values in metrics.items()
                     if headline in values}
                ),
                **({"examples": png_markdown(png_bytes(draw_examples(examples)), "top 5")}
                   if examples else {}),
                "checkpoint": checkpoint,
                "table_rows": rows,
                **submitted,
                **({"test_queries": submit.queries} if submit else {}),
            }
        )

    return scores


def _write_submissions(store: ArtifactStore, benchmark: str, model_name: str,
                       model: ComposedEncoder, submit: PendingSubmission | None) -> dict:
    """Rank the test split (if configured) and write its validated files; their URLs as
    metadata entries ``submission_<name>``."""
    if submit is None:
        return {}
    client = store.client()
    urls = {}
    for name, submission in submit.files(model).items():
        relpath = submission_relpath(benchmark, model_name, name)
        client.write_bytes(relpath, submission_json(submission))
        urls[f"submission_{name}"] = MetadataValue.path(client.url(relpath))
    return urls
