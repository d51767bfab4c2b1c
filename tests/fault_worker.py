"""Bodies of the processes that the fault tests kill (tests/test_faults.py).

They run in children of a multiprocessing *forkserver* whose server has already imported
dagster, torch and the code location (``preload``), so a child starts in milliseconds and a
SIGKILL at a random delay lands inside the asset's work rather than inside interpreter start.
The forkserver itself never runs torch, so no OpenMP thread pool exists when it forks.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from conftest import small_demo_resources
from dagster import DagsterInstance, materialize

from megapairs_dagster.definitions import defs
from megapairs_dagster.resources.settings import Generation
from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.triplet_store import TripletStore

PRELOAD = [__name__]
CHUNK_SIZE = 4  # pairs per saved generation chunk: several chunks per tiny shard


def fault_resources(home: Path, **store_overrides) -> dict:
    resources = small_demo_resources(home, **store_overrides)
    resources["generation"] = Generation(chunk_size=CHUNK_SIZE, batch_size=CHUNK_SIZE)
    return resources


def materialize_step(home: str, shard: str, selection: list[str]) -> None:
    """Materialise ``selection`` for ``shard``; the exit code says whether it succeeded."""
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", [shard])
    result = materialize(list(defs.assets), selection=selection, partition_key=shard,
                         resources=fault_resources(Path(home)), instance=instance,
                         raise_on_error=False)
    os._exit(0 if result.success else 1)


def replace_shards_forever(root: str, versions: dict, progress) -> None:
    """Rewrite the given shards' table files in a loop until killed: round ``r`` replaces each
    shard's rows with its version ``r % len(versions[shard])`` (a ``(triplets, images)`` pair).

    ``progress`` is a shared array of two integers without a lock (a lock held by a killed
    writer would stay held): ``[0]`` becomes 1 once the loop begins, ``[1]`` counts the
    finished ``replace_shard`` calls, so the killer knows which call it interrupted.
    """
    store = TripletStore(ArtifactStoreClient(root))
    progress[0] = 1
    for round_ in itertools.count():
        for shard, shard_versions in versions.items():
            store.replace_shard(shard, *shard_versions[round_ % len(shard_versions)])
            progress[1] += 1
