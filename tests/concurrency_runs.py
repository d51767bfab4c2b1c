"""Start one Dagster run per shard, all at once, on ``$DAGSTER_HOME``'s instance.

    DAGSTER_HOME=... MEGAPAIRS_HOME=... MEGAPAIRS_CONFIG=... MEGAPAIRS_EXECUTOR=multiprocess \
        python concurrency_runs.py ASSET[,ASSET...] SHARD [SHARD ...]

The shipped code location (``megapairs_dagster.definitions``, built from that environment) is
imported once; then one child per shard is forked and each executes the selection for its
shard as a run of the location's implicit asset job, on its executor (multiprocess: a
subprocess per step, forked from a forkserver that preloads this module). Forking after the
import lets the runs start together without each paying the interpreter start again. Each
child prints ``<shard> <run_id> ok|failed``; the exit status is 0 only if every run succeeded.
"""

import multiprocessing
import sys
import traceback

from dagster import AssetKey, DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from megapairs_dagster.definitions import defs

LOCATION = "megapairs_dagster.definitions"
ASSET_JOB = "__ASSET_JOB"
# Loaded and resolved once here: the forked runs, and the forkserver that preloads this module
# and forks every step's worker process, start from it.
defs.get_repository_def()
RUN_CONFIG = {"execution": {"config": {
    "start_method": {"forkserver": {"preload_modules": ["concurrency_runs"]}},
}}}


def run_shard(assets: list[str], shard: str) -> None:
    job = ReconstructableRepository.for_module(LOCATION, "defs").get_reconstructable_job(ASSET_JOB)
    try:
        with DagsterInstance.get() as instance:
            result = execute_job(job, instance, run_config=RUN_CONFIG,
                                 asset_selection=[AssetKey(name) for name in assets],
                                 tags={"dagster/partition": shard}, raise_on_error=False)
            print(f"{shard} {result.run_id} {'ok' if result.success else 'failed'}", flush=True)
            sys.exit(0 if result.success else 1)
    except Exception:  # noqa: BLE001 - report it, the test decides
        traceback.print_exc()
        print(f"{shard} - failed", flush=True)
        sys.exit(1)


def main() -> None:
    assets, shards = sys.argv[1].split(","), sys.argv[2:]
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=run_shard, args=(assets, shard)) for shard in shards]
    for child in children:
        child.start()
    for child in children:
        child.join()
    sys.exit(0 if all(child.exitcode == 0 for child in children) else 1)


if __name__ == "__main__":
    main()
