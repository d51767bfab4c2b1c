"""A worker process that materialises one shard's assets on ``$DAGSTER_HOME``'s instance.

    DAGSTER_HOME=... python materialize_on_instance.py HOME SHARD \
        [--store-url s3://bucket/prefix --endpoint-url http://127.0.0.1:PORT]

It reads one comma-separated asset selection per line on stdin, materialises it for SHARD and
answers ``ok`` or ``failed`` on stdout; it exits at end of input. One worker per shard lets
tests/test_deploy.py run shards concurrently stage after stage without paying the interpreter
start (torch, dagster imports) at every stage. S3 keys come from the environment.
"""

import argparse
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import small_demo_resources
from dagster import DagsterInstance, materialize

from megapairs_dagster.definitions import defs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("home", type=Path)
    parser.add_argument("shard")
    parser.add_argument("--store-url")
    parser.add_argument("--endpoint-url")
    args = parser.parse_args()
    overrides = {"url": args.store_url, "endpoint_url": args.endpoint_url} if args.store_url else {}
    resources = small_demo_resources(args.home, **overrides)
    print("ready", flush=True)
    with DagsterInstance.get() as instance:
        for line in sys.stdin:
            selection = line.strip().split(",")
            try:
                result = materialize(list(defs.assets), selection=selection,
                                     partition_key=args.shard, resources=resources,
                                     instance=instance, raise_on_error=False)
                ok = result.success
            except Exception:  # noqa: BLE001 - report it, the test decides
                traceback.print_exc()
                ok = False
            print("ok" if ok else "failed", flush=True)


if __name__ == "__main__":
    main()
