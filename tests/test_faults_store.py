"""Object store faults (issue 15): an S3 endpoint (moto) behind tests/s3_fault_proxy.py that
answers with 500s or SlowDown, hangs past the read timeout, drops the connection in the middle
of a PUT, or goes away altogether.

What must hold: transient faults are retried and the bytes arrive intact; persistent ones end,
after exactly the configured attempts, in an ``ArtifactStoreError`` naming the object; a write
that fails leaves the previous object or none at its key, never part of one; and a run of a
shipped asset that failed under a fault completes on a rerun with the fault-free run's
artifacts (ignoring ``run_id`` in their ``produced_by`` record, which differs by design).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from botocore.exceptions import ReadTimeoutError
from dagster import DagsterInstance, materialize
from pydantic import ValidationError
from s3_fault_proxy import Rule, S3FaultProxy, fault_proxy
from s3_server import DUMMY_AWS_ENVIRONMENT, moto_s3
from test_triplet_store import image_rows, triplet_rows

from megapairs_dagster.artifacts import load_artifact
from megapairs_dagster.definitions import build_definitions
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.resources.profiles import load_deployment
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.storage import ArtifactStoreClient, ArtifactStoreError, S3Retries
from megapairs_dagster.synthesis.triplet_store import TripletStore

pytestmark = pytest.mark.faults

BUCKET = "faults"
ATTEMPTS = 3
# Short enough to keep each fault's retries within seconds, long enough for moto on a busy CI.
READ_TIMEOUT_S = 2.0
HANG_S = 4.0  # longer than the read timeout: the client gives up first
SECRET = DUMMY_AWS_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"]


class Endpoint:
    """moto directly (what a reader sees) and through the fault proxy (what the store uses)."""

    def __init__(self, proxy: S3FaultProxy, direct: s3fs.S3FileSystem):
        self.proxy = proxy
        self.direct = direct

    def client(self, prefix: str, attempts: int = ATTEMPTS) -> ArtifactStoreClient:
        return ArtifactStoreClient(
            f"s3://{BUCKET}/{prefix}", {"client_kwargs": {"endpoint_url": self.proxy.url}},
            retries=S3Retries(attempts, connect_timeout_s=1.0, read_timeout_s=READ_TIMEOUT_S),
        )

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object below ``prefix`` as moto holds it, read past the proxy."""
        self.direct.invalidate_cache()
        root = f"{BUCKET}/{prefix}"
        return {path.removeprefix(root + "/"): self.direct.cat_file(path)
                for path in self.direct.find(root)}


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as (endpoint_url, options), fault_proxy(endpoint_url) as proxy:
        direct = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        direct.mkdir(BUCKET)
        yield Endpoint(proxy, direct)


@pytest.fixture
def endpoint(s3):
    s3.proxy.clear()
    s3.proxy.requests.clear()
    if not s3.proxy.running:  # a test that stopped it failed before starting it again
        s3.proxy.start()
    yield s3


def payload(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


@pytest.mark.parametrize("status", [500, 503])
def test_fewer_faults_than_attempts_are_retried_and_the_bytes_arrive_intact(endpoint, status):
    store = endpoint.client(f"transient{status}")
    data = payload(300_000, seed=status)
    put = endpoint.proxy.add(Rule("error", method="PUT", status=status, times=ATTEMPTS - 1))
    store.write_bytes("a/blob.bin", data)
    assert put.matched == ATTEMPTS - 1
    assert endpoint.proxy.count("PUT", "/a/blob.bin") == ATTEMPTS
    assert endpoint.objects(f"transient{status}") == {"a/blob.bin": data}

    get = endpoint.proxy.add(Rule("error", method="GET", status=status, times=ATTEMPTS - 1))
    assert store.read_bytes("a/blob.bin") == data
    assert get.matched == ATTEMPTS - 1


@pytest.mark.parametrize("attempts", [2, 3])
def test_persistent_500s_fail_after_the_configured_attempts_naming_the_object(endpoint, attempts):
    store = endpoint.client("persistent", attempts)
    store.write_bytes("kept.bin", b"readable before the fault")
    put = endpoint.proxy.add(Rule("error", method="PUT"))
    with pytest.raises(ArtifactStoreError) as failed:
        store.write_bytes("shard/00000.parquet", b"never stored")
    message = str(failed.value)
    assert f"writing s3://{BUCKET}/persistent/shard/00000.parquet failed" in message
    assert f"up to {attempts} attempts per S3 request" in message
    assert "InternalError" in message or "injected" in message
    assert isinstance(failed.value.__cause__, OSError)  # the original error stays attached
    assert SECRET not in message
    assert put.matched == attempts
    assert endpoint.objects("persistent") == {"kept.bin": b"readable before the fault"}

    get = endpoint.proxy.add(Rule("error", method="GET"))
    with pytest.raises(ArtifactStoreError, match=f"reading s3://{BUCKET}/persistent/kept.bin"):
        store.read_bytes("kept.bin")
    assert get.matched == attempts


def test_a_missing_artifact_is_not_reported_as_a_store_fault(endpoint):
    """Callers tell "not written yet" from "store unreachable" by the exception type."""
    store = endpoint.client("missing")
    with pytest.raises(FileNotFoundError) as missing:
        store.read_bytes("nothing/here.bin")
    assert not isinstance(missing.value, ArtifactStoreError)
    assert store.exists("nothing/here.bin") is False


def test_a_response_slower_than_the_read_timeout_is_retried(endpoint):
    store = endpoint.client("slow")
    data = payload(50_000, seed=1)
    hang = endpoint.proxy.add(Rule("hang", method="PUT", times=1, delay_s=HANG_S))
    started = time.monotonic()
    store.write_bytes("model/weights.bin", data)
    assert hang.matched == 1
    assert time.monotonic() - started >= READ_TIMEOUT_S
    assert endpoint.proxy.count("PUT", "/model/weights.bin") == 2
    assert endpoint.objects("slow") == {"model/weights.bin": data}


def test_a_store_that_stays_silent_fails_after_the_attempts_with_a_timeout(endpoint):
    attempts = 2
    store = endpoint.client("silent", attempts)
    store.write_bytes("table.parquet", b"complete")
    hang = endpoint.proxy.add(Rule("hang", method="GET", delay_s=HANG_S))
    started = time.monotonic()
    with pytest.raises(ArtifactStoreError,
                       match=f"reading s3://{BUCKET}/silent/table.parquet") as failed:
        store.read_bytes("table.parquet")
    elapsed = time.monotonic() - started
    assert isinstance(failed.value.__cause__, ReadTimeoutError)
    assert hang.matched == attempts
    # Every attempt waited for the read timeout, and no longer than the hang.
    assert attempts * READ_TIMEOUT_S <= elapsed < attempts * HANG_S + 10


def test_a_connection_dropped_mid_write_leaves_the_previous_object_whole(endpoint):
    store = endpoint.client("dropped")
    old, new = payload(400_000, seed=2), payload(400_000, seed=3)
    store.write_bytes("embeddings/00000.npz", old)
    drop = endpoint.proxy.add(Rule("drop", method="PUT", fraction=0.5))
    with pytest.raises(ArtifactStoreError, match=f"writing s3://{BUCKET}/dropped/embeddings/"
                       "00000.npz failed") as failed:
        store.write_bytes("embeddings/00000.npz", new)
    assert isinstance(failed.value.__cause__, BotocoreConnectionError)
    # aiohttp itself sends an idempotent request once more when a kept-alive connection drops.
    assert ATTEMPTS <= drop.matched <= 2 * ATTEMPTS
    with pytest.raises(ArtifactStoreError):
        store.write_bytes("embeddings/00001.npz", new)
    # Half of each body reached the store, yet the old object is whole and the new key empty.
    assert drop.forwarded >= drop.matched * len(new) // 2
    assert endpoint.objects("dropped") == {"embeddings/00000.npz": old}
    endpoint.proxy.clear()
    assert store.read_bytes("embeddings/00000.npz") == old
    store.write_bytes("embeddings/00000.npz", new)  # the rerun
    assert endpoint.objects("dropped") == {"embeddings/00000.npz": new}


def test_a_folder_upload_cut_off_leaves_only_whole_files_and_a_rerun_completes(endpoint, tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    files = {"config.json": b'{"width": 64}', "model.safetensors": payload(200_000, seed=4),
             "tokenizer.json": b'{"vocab": []}'}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    store = endpoint.client("folders")
    endpoint.proxy.add(Rule("drop", method="PUT", path=r"/model\.safetensors$", fraction=0.3))
    with pytest.raises(ArtifactStoreError, match="checkpoint/model.safetensors"):
        store.upload_dir(folder, "checkpoint")
    # Files go in name order: the one before the fault is whole, nothing of the rest is there.
    assert endpoint.objects("folders") == {"checkpoint/config.json": files["config.json"]}

    endpoint.proxy.clear()
    store.upload_dir(folder, "checkpoint")
    assert endpoint.objects("folders") == {f"checkpoint/{n}": d for n, d in files.items()}

    # A download that fails leaves nothing in the cache, so the next one starts afresh.
    reader = ArtifactStoreClient(store.url(), store.storage_options, tmp_path / "cache",
                                 S3Retries(ATTEMPTS, 1.0, READ_TIMEOUT_S))
    endpoint.proxy.add(Rule("error", method="GET", path=r"/model\.safetensors"))
    with pytest.raises(ArtifactStoreError, match="downloading s3://"):
        reader.local_dir("checkpoint")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    endpoint.proxy.clear()
    local = reader.local_dir("checkpoint")
    assert {p.name: p.read_bytes() for p in local.iterdir()} == files


def test_a_table_file_cut_off_mid_write_keeps_the_old_rows_readable(endpoint):
    tables = TripletStore(endpoint.client("tables"))
    tables.replace_shard("00000", triplet_rows(0, 5), image_rows("00000", 0, 5))
    before = tables.triplets_frame()
    endpoint.proxy.add(Rule("drop", method="PUT", path=r"/tables/triplets/", fraction=0.5))
    with pytest.raises(ArtifactStoreError, match="tables/triplets/00000.parquet"):
        tables.replace_shard("00000", triplet_rows(0, 9), image_rows("00000", 0, 9))
    endpoint.proxy.clear()
    # Images (written first) are new; the triplets file, the shard's commit point, is the old.
    pd.testing.assert_frame_equal(tables.triplets_frame(), before)
    assert tables.counts() == {"triplets": 5, "images": 9, "shards": 1}
    tables.replace_shard("00000", triplet_rows(0, 9), image_rows("00000", 0, 9))
    assert tables.counts() == {"triplets": 9, "images": 9, "shards": 1}


def test_the_endpoint_going_away_fails_the_write_and_it_completes_once_back(endpoint):
    store = endpoint.client("outage")
    data = payload(100_000, seed=5)
    store.write_bytes("warm.bin", b"a kept-alive connection to cut")
    endpoint.proxy.stop()
    try:
        with pytest.raises(ArtifactStoreError, match=f"writing s3://{BUCKET}/outage/data.bin"):
            store.write_bytes("data.bin", data)
    finally:
        endpoint.proxy.start()
    assert endpoint.objects("outage") == {"warm.bin": b"a kept-alive connection to cut"}
    store.write_bytes("data.bin", data)
    assert store.read_bytes("data.bin") == data


def test_the_store_settings_reach_botocore_and_nonsense_is_refused():
    store = ArtifactStore(url=f"s3://{BUCKET}/settings", retry_attempts=7, connect_timeout_s=3,
                          read_timeout_s=30)
    fs = store.client().fs
    assert fs.config_kwargs == {"retries": {"total_max_attempts": 7, "mode": "standard"},
                                "connect_timeout": 3, "read_timeout": 30}
    assert fs.retries == 1  # no second layer of retries in s3fs
    assert ArtifactStoreClient("relative/folder").retries is None  # a local store has none
    for wrong in ({"retry_attempts": 0}, {"read_timeout_s": 0}, {"connect_timeout_s": -1}):
        with pytest.raises(ValidationError, match=next(iter(wrong))):
            ArtifactStore(url="s3://b/p", **wrong)


def _materialize_corpus(assets, deployment, instance):
    return materialize(
        assets, selection=["corpus_images", "corpus_rejects"], partition_key="00000",
        resources=deployment.resources, instance=instance, raise_on_error=False,
    )


def _instance() -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00000"])
    return instance


def _deployment(tmp_path, prefix: str, endpoint_url: str):
    """The shipped demo deployment with its store on S3, set through a deployment config file
    as an operator would."""
    config = tmp_path / f"{prefix}.yaml"
    store = {"url": f"s3://{BUCKET}/{prefix}", "endpoint_url": endpoint_url,
             "retry_attempts": 2, "connect_timeout_s": 1.0, "read_timeout_s": READ_TIMEOUT_S,
             "cache_dir": str(tmp_path / "cache")}
    config.write_text(yaml.safe_dump({"resources": {"store": {"config": store}}}))
    return load_deployment("demo", str(tmp_path), str(config))


def test_a_shipped_asset_fails_under_a_fault_and_its_rerun_matches_a_fault_free_run(
    endpoint, tmp_path, monkeypatch
):
    monkeypatch.delenv("MEGAPAIRS_CONFIG", raising=False)
    write_demo_shard(tmp_path / "demo_corpus", 0, 40, seed=0)
    reference = _deployment(tmp_path, "reference", endpoint.proxy.url)
    assets = list(build_definitions(reference).assets)  # the store is a resource, given per run
    assert _materialize_corpus(assets, reference, _instance()).success

    faulted = _deployment(tmp_path, "faulted", endpoint.proxy.url)
    assert faulted.resources["store"].retry_attempts == 2
    instance = _instance()
    drop = endpoint.proxy.add(Rule("drop", method="PUT", path="/faulted/corpus_images/"))
    # The step's retry policy (two retries, ~5 s and ~15 s apart) runs into the fault too.
    failed = _materialize_corpus(assets, faulted, instance)
    assert not failed.success
    error = "\n".join(
        str(event.step_failure_data.error) for event in failed.all_events
        if event.is_step_failure
    )
    assert "ArtifactStoreError" in error
    assert f"writing s3://{BUCKET}/faulted/corpus_images/00000.parquet failed" in error
    assert "up to 2 attempts per S3 request" in error
    # 3 step attempts x 2 store attempts, each sent once more by aiohttp at most.
    assert 3 * 2 <= drop.matched <= 2 * 3 * 2
    assert failed.get_asset_materialization_events() == []
    assert not any(key.startswith("corpus_images/") for key in endpoint.objects("faulted"))
    with pytest.raises(FileNotFoundError, match="materialise the upstream asset"):
        load_artifact(faulted.resources["store"].client(), "corpus_images/00000")

    endpoint.proxy.clear()
    assert _materialize_corpus(assets, faulted, instance).success
    rerun, expected = endpoint.objects("faulted"), endpoint.objects("reference")
    assert sorted(rerun) == sorted(expected) == [
        "corpus_images/00000.parquet", "corpus_rejects/00000.parquet"
    ]
    for key in expected:
        assert _without_run_id(rerun[key]) == _without_run_id(expected[key]), key


def _without_run_id(parquet: bytes) -> tuple:
    """A table file's rows and metadata, less the run id that differs from run to run."""
    table = pq.read_table(pa.BufferReader(parquet))
    metadata = dict(table.schema.metadata)
    produced_by = json.loads(metadata.pop(b"megapairs.produced_by"))
    assert produced_by.pop("run_id")
    return table.replace_schema_metadata(None).to_pylist(), metadata, produced_by
