"""``megapairs``: the commands that are not Dagster's own.

    megapairs demo-corpus --out data/demo_corpus      write the procedural demo corpus
    megapairs demo-benchmark --out data/demo_bench    write the demo CIR benchmark (CIRCO format)
    megapairs demo                                    materialise the graph on the demo profile
    megapairs score circo --annotations F --predictions P   score a submission-format file
    megapairs shards register                         add the source's shards as partitions
    megapairs vllm-servers --image vllm/vllm-openai:T  Kubernetes manifests of the generators
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from megapairs_dagster.evaluation.cli import add_score_command


def _demo_corpus(args: argparse.Namespace) -> None:
    from megapairs_dagster.demo import write_demo_corpus

    started = time.perf_counter()
    paths = write_demo_corpus(args.out, args.shards, args.images_per_shard, args.seed)
    print(f"wrote {len(paths)} shards × {args.images_per_shard} images to {args.out} "
          f"in {time.perf_counter() - started:.1f}s")


def _demo_benchmark(args: argparse.Namespace) -> None:
    from megapairs_dagster.demo import write_demo_benchmark

    out = write_demo_benchmark(args.out, args.queries, args.gallery, args.seed)
    print(f"wrote the demo benchmark to {out}")


def _demo(args: argparse.Namespace) -> None:
    os.environ.setdefault("MEGAPAIRS_PROFILE", "demo")
    from dagster import DagsterInstance

    from megapairs_dagster.definitions import build_definitions
    from megapairs_dagster.demo import write_demo_shard
    from megapairs_dagster.evaluation.leaderboard import HEADLINES, leaderboard
    from megapairs_dagster.evaluation.studies import study_markdown, study_table
    from megapairs_dagster.jobs.pipeline import materialize_pipeline
    from megapairs_dagster.jobs.sensors import claim_instance
    from megapairs_dagster.reports import (
        format_scores,
        format_summary,
        pipeline_summary,
        training_reports,
    )
    from megapairs_dagster.resources.profiles import (
        DEMO_CONTROL,
        DEMO_SEEDS,
        load_deployment,
    )
    from megapairs_dagster.synthesis.readers import discover_shards
    from megapairs_dagster.synthesis.triplet_store import TripletStore

    started = time.perf_counter()
    home = Path(args.home)
    corpus_dir = home / "demo_corpus"
    for index in range(args.shards):
        if not (corpus_dir / f"{index:05d}.tar").exists():
            write_demo_shard(corpus_dir, index, args.images_per_shard, args.seed)
    shard_keys = [shard.name for shard in discover_shards(str(corpus_dir))]
    print(f"demo corpus: {len(shard_keys)} shards in {corpus_dir}")
    deployment = load_deployment("demo", str(home))
    resources = deployment.resources
    instance = DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()
    claim_instance(instance, resources["store"])
    assets = list(build_definitions(deployment).assets)
    materialize_pipeline(assets, resources, instance, shard_keys, refresh_from=args.refresh_from)
    client = resources["store"].client()
    summary = pipeline_summary(client, shard_keys)
    database = TripletStore(client)
    summary["triplets"] = database.counts()
    summary["export"] = client.url("megapairs_export")
    print("\n" + format_summary(summary))
    training = training_reports(client, {run: "mmret_clip" for run in deployment.training_runs}
                                | {run: "mmret_mllm" for run in deployment.mllm_runs})
    scores = database.scores_frame()
    print("\n" + format_scores(scores, seeds=DEMO_SEEDS, control=DEMO_CONTROL, training=training))
    for name, study in deployment.studies.items():  # with MEGAPAIRS_STUDIES set
        scored = [b for b in HEADLINES if b in set(scores["benchmark"])]
        table = study_table(leaderboard(scores, study.runs, scored), study.points)
        print(f"\n{name}: {study.title}\n{study_markdown(table, study.axis)}")
    print(f"\ndemo pipeline finished in {time.perf_counter() - started:.0f}s")


def _shards(args: argparse.Namespace) -> None:
    """Register the shards found at the deployment's corpus source as ``shards`` partitions,
    what the shard sensor does, for users who run ``dagster asset materialize`` without the
    daemon."""
    from dagster import DagsterInstance

    from megapairs_dagster.assets.partitions import shards
    from megapairs_dagster.jobs.sensors import claim_instance
    from megapairs_dagster.resources.profiles import load_deployment
    from megapairs_dagster.synthesis.readers import discover_shards

    if not os.environ.get("DAGSTER_HOME"):
        raise ValueError("set DAGSTER_HOME to the deployment's Dagster home first")
    resources = load_deployment().resources
    source = resources["corpus_source"].process_config_and_initialize()
    found = [s.name for s in discover_shards(source.url, source.storage_options(), source.format)]
    with DagsterInstance.get() as instance:
        claim_instance(instance, resources["store"].process_config_and_initialize())
        known = set(instance.get_dynamic_partitions(shards.name))
        new = [name for name in found if name not in known]
        if new and args.command_action == "register":
            instance.add_dynamic_partitions(shards.name, new)
    verb = "registered" if args.command_action == "register" else "not registered yet"
    print(f"{len(found)} shards at {source.url}; {len(new)} {verb}"
          + (f": {', '.join(new)}" if new else ""))


def _vllm_servers(args: argparse.Namespace) -> None:
    import yaml

    from megapairs_dagster.resources.profiles import load_deployment
    from megapairs_dagster.resources.vllm_servers import STEPS, server_manifests, service_url

    resources = load_deployment().resources
    manifests = server_manifests(
        resources["generation"].process_config_and_initialize(),
        resources["generation_server"].process_config_and_initialize(),
        image=args.image, models_claim=args.models_claim,
    )
    print(yaml.safe_dump(manifests, sort_keys=False), end="")
    urls = ", ".join(f"{step}_url: {service_url(step)}" for step in STEPS)
    print(f"# then set generation_server: {{config: {{{urls}}}}}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="megapairs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    corpus = commands.add_parser("demo-corpus", help="write the procedural demo corpus")
    corpus.add_argument("--out", default="data/demo_corpus")
    corpus.add_argument("--shards", type=int, default=4)
    corpus.add_argument("--images-per-shard", type=int, default=500)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.set_defaults(run=_demo_corpus)

    bench = commands.add_parser("demo-benchmark", help="write the demo CIR benchmark")
    bench.add_argument("--out", default="data/demo_benchmark")
    bench.add_argument("--queries", type=int, default=200)
    bench.add_argument("--gallery", type=int, default=1000)
    bench.add_argument("--seed", type=int, default=1234)
    bench.set_defaults(run=_demo_benchmark)

    demo = commands.add_parser("demo", help="materialise the whole graph on the demo profile")
    demo.add_argument("--home", default=os.environ.get("MEGAPAIRS_HOME", "data"))
    demo.add_argument("--shards", type=int, default=4)
    demo.add_argument("--images-per-shard", type=int, default=500)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--refresh-from", metavar="ASSET",
                      help="recompute this asset's stage and every later one for all shards")
    demo.set_defaults(run=_demo)

    shard_commands = commands.add_parser(
        "shards", help="list or register the corpus source's shards as partitions")
    shard_commands.add_argument("command_action", choices=["list", "register"])
    shard_commands.set_defaults(run=_shards)

    servers = commands.add_parser(
        "vllm-servers", help="print Kubernetes manifests (Deployment + Service per generation "
        "step) that serve the deployment's generation models with vLLM")
    servers.add_argument("--image", required=True,
                         help="the vLLM OpenAI-server image, pinned, e.g. vllm/vllm-openai:<tag>")
    servers.add_argument("--models-claim", default="megapairs-models",
                         help="PersistentVolumeClaim holding the models, mounted at /models")
    servers.set_defaults(run=_vllm_servers)

    add_score_command(commands)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"megapairs {args.command}: {error}")


if __name__ == "__main__":
    main()
