"""Materialise assets for one shard in a separate process (for kill and concurrency tests).

    python materialize_in_subprocess.py HOME SHARD ASSET[,ASSET...] [--slow-describe SECONDS]
"""

import argparse
import sys
import time
from pathlib import Path

from conftest import small_demo_resources
from dagster import DagsterInstance, materialize

from megapairs_dagster.definitions import defs
from megapairs_dagster.resources.settings import Generation
from megapairs_dagster.synthesis.generation.template import TemplateDescriber


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("home", type=Path)
    parser.add_argument("shard")
    parser.add_argument("assets")
    parser.add_argument("--slow-describe", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    if args.slow_describe:
        describe = TemplateDescriber.describe

        def slow(self, requests):
            time.sleep(args.slow_describe)
            return describe(self, requests)

        TemplateDescriber.describe = slow
    resources = small_demo_resources(args.home)
    resources["generation"] = Generation(chunk_size=args.chunk_size, batch_size=args.chunk_size)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", [args.shard])
    result = materialize(list(defs.assets), selection=args.assets.split(","),
                         partition_key=args.shard, resources=resources, instance=instance,
                         raise_on_error=False)
    sys.exit(0 if result.success else 1)


if __name__ == "__main__":
    main()
