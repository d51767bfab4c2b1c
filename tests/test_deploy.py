"""The cluster deployment: deploy/ validates against Dagster's and dagster-k8s's schemas, and the
per-shard chain runs concurrently in separate processes on a Postgres instance with S3 artifacts,
giving the same data as the default local setup (sqlite instance, local folder store)."""

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg2
import pytest
import yaml
from conftest import small_demo_resources
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterInvalidConfigError,
    DagsterRunStatus,
    Definitions,
    materialize,
    validate_run_config,
)
from dagster._config import Shape, process_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config
from postgres_server import postgres_server
from s3_server import moto_s3

from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.resources.profiles import resources_for
from megapairs_dagster.resources.settings import Encoders
from megapairs_dagster.resources.store import artifact_relpath, load_artifact

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TESTS = Path(__file__).resolve().parent

# What the cluster's Secrets and ConfigMaps would put in the environment.
CLUSTER_ENV = {
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "from-a-secret",
    "DAGSTER_PG_HOST": "127.0.0.1",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_K8S_JOB_NAMESPACE": "megapairs",
    "DAGSTER_K8S_SERVICE_ACCOUNT": "dagster",
    "MEGAPAIRS_IMAGE": "registry.example.com/megapairs-dagster:0.1.0",
    "DAGSTER_K8S_INSTANCE_CONFIG_MAP": "dagster-instance",
    "DAGSTER_K8S_PG_PASSWORD_SECRET": "dagster-postgresql-secret",
    "MEGAPAIRS_STORE_URL": "s3://megapairs-artifacts/v1",
    "MEGAPAIRS_CORPUS_URL": "s3://megapairs-corpus/",
    "MEGAPAIRS_MLLM": "/models/mllm",
    "MEGAPAIRS_LLM": "/models/llm",
}

# The synthesis steps that must stay on GPUs; assets added to the `gpu` pool later are
# covered too (the run config must place every one of them on the GPU nodes).
SYNTHESIS_GPU_STEPS = {"embeddings_clip_image", "embeddings_dino_image",
                       "embeddings_clip_caption", "pair_descriptions", "instructions"}


def _yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture
def cluster_env(monkeypatch):
    for key, value in CLUSTER_ENV.items():
        monkeypatch.setenv(key, value)


# --- deploy/dagster.yaml ------------------------------------------------------------------------

def test_instance_config_validates_and_launcher_config_fits_dagster_k8s(cluster_env):
    config, _ = dagster_instance_config(str(DEPLOY), "dagster.yaml")
    assert set(config["storage"]) == {"postgres"}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["runs"]["max_concurrent_runs"] > 0
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = process_config(Shape(K8sRunLauncher.config_type()), launcher["config"])
    assert result.success, result.errors
    assert result.value["job_namespace"] == "megapairs"  # `env:` resolved from the environment
    assert result.value["job_image"] == CLUSTER_ENV["MEGAPAIRS_IMAGE"]
    assert "MEGAPAIRS_STORE_URL" in result.value["env_vars"]
    assert result.value["env_secrets"] == ["megapairs-aws"]
    # A typo in the launcher's config is caught by the same check.
    broken = {**launcher["config"], "job_namespce": "x"}
    assert not process_config(Shape(K8sRunLauncher.config_type()), broken).success


def test_instance_config_needs_its_environment(monkeypatch):
    for key in CLUSTER_ENV:
        monkeypatch.delenv(key, raising=False)
    config, _ = dagster_instance_config(str(DEPLOY), "dagster.yaml")
    result = process_config(Shape(K8sRunLauncher.config_type()), config["run_launcher"]["config"])
    assert not result.success
    assert any("DAGSTER_K8S_JOB_NAMESPACE" in error.message for error in result.errors)


def test_deploy_instance_loads_against_a_real_postgres(cluster_env, monkeypatch, tmp_path):
    """Everything but the K8s launcher is constructed: Postgres storages, queue, pools, logs."""
    text = (DEPLOY / "dagster.yaml").read_text()
    text = text.replace("/opt/dagster/dagster_home/compute_logs", str(tmp_path / "logs"))
    (tmp_path / "dagster.yaml").write_text(text)
    with postgres_server() as server:
        monkeypatch.setenv("DAGSTER_PG_PORT", str(server.port))
        monkeypatch.setenv("DAGSTER_PG_DB", server.db_name)
        monkeypatch.setenv("DAGSTER_PG_USERNAME", server.username)
        with DagsterInstance.from_config(str(tmp_path)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
            assert instance.event_log_storage.supports_global_concurrency_limits
            instance.add_dynamic_partitions("shards", ["00000", "00001"])
            # The limits the operations guide tells an operator to set, stored in Postgres.
            instance.event_log_storage.set_concurrency_slots(GPU_POOL, 8)
            assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 8
            assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        with DagsterInstance.from_config(str(tmp_path)) as again:
            assert again.get_dynamic_partitions("shards") == ["00000", "00001"]


# --- deploy/run_config_k8s.yaml and the GPU tags --------------------------------------------------

def _k8s_asset_job():
    k8s_defs = Definitions(assets=list(defs.assets), executor=k8s_job_executor,
                           resources=resources_for("paper"))
    return k8s_defs.resolve_implicit_global_asset_job_def()


def test_run_config_validates_against_a_job_on_the_k8s_executor(cluster_env):
    run_config = _yaml("run_config_k8s.yaml")
    job = _k8s_asset_job()
    validate_run_config(job, run_config)  # raises DagsterInvalidConfigError on any mismatch
    executor = process_config(k8s_job_executor.config_schema.config_type, run_config["execution"]["config"])
    assert executor.success, executor.errors
    # per_step_k8s_config keys are not checked by Dagster: they must be real step keys.
    step_keys = {node.name for node in job.graph.node_defs}
    per_step = run_config["execution"]["config"]["per_step_k8s_config"]
    assert set(per_step) <= step_keys, set(per_step) - step_keys
    gpu_ops = {asset.op.name for asset in defs.assets if asset.op.pool == GPU_POOL}
    assert gpu_ops >= SYNTHESIS_GPU_STEPS
    for step in gpu_ops:  # every GPU step is placed on the GPU node pool
        assert step in per_step, f"deploy/run_config_k8s.yaml: no GPU node placement for {step}"
        parsed = UserDefinedDagsterK8sConfig.from_dict(per_step[step])
        assert parsed.pod_spec_config["node_selector"] == {"nvidia.com/gpu.present": "true"}
    # Resources of the paper profile: S3 store, DuckDB on the shared volume.
    assert run_config["resources"]["store"]["config"]["url"].startswith("s3://")
    assert run_config["resources"]["triplet_db"]["config"]["path"].startswith("/mnt/")
    bad = json.loads(json.dumps(run_config))
    bad["execution"]["config"]["step_k8s_config"]["container_confg"] = {}
    with pytest.raises(DagsterInvalidConfigError, match="container_confg"):
        validate_run_config(job, bad)


def test_gpu_asset_tags_parse_as_dagster_k8s_config():
    assert UserDefinedDagsterK8sConfig.from_dict(GPU_TAGS["dagster-k8s/config"])
    for asset in defs.assets:
        if asset.op.pool != GPU_POOL:
            continue
        parsed = get_user_defined_k8s_config(asset.op.tags)  # the executor's own parser
        limits = parsed.container_config["resources"]["limits"]
        assert limits == {"nvidia.com/gpu": "1"}, asset.op.name
    with pytest.raises(DagsterInvalidConfigError, match="containr_config"):
        get_user_defined_k8s_config({"dagster-k8s/config": json.dumps({"containr_config": {}})})


# --- deploy/helm/values.yaml and secrets -------------------------------------------------------

def test_helm_values_have_the_required_keys():
    values = _yaml("helm/values.yaml")
    user = values["dagster-user-deployments"]
    assert user["enabled"] is True
    deployment = user["deployments"][0]
    assert deployment["image"]["repository"] and deployment["image"]["tag"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "megapairs_dagster.definitions"]
    assert {"name": "megapairs-aws"} in deployment["envSecrets"]
    assert {"name": "MEGAPAIRS_PROFILE", "value": "paper"} in deployment["env"]
    assert values["dagsterDaemon"]["enabled"] is True
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert values["postgresql"]["enabled"] is False and values["postgresql"]["postgresqlHost"]
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert {"name": "megapairs-aws"} in values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]


SECRET_KEY = re.compile(r"password|secret_access_key|access_key_id|token", re.IGNORECASE)


def _secret_literals(node, path=()):
    """Values under secret-looking keys that are literals rather than env/Secret references."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = (*path, str(key))
            if SECRET_KEY.search(str(key)) and isinstance(value, str | int) and not (
                str(key).endswith(("Secret", "SecretName", "_secret")) or key == "postgresqlSecretName"
            ):
                yield "/".join(here)
            yield from _secret_literals(value, here)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            if isinstance(item, str) and "=" in item and SECRET_KEY.search(item.split("=")[0]):
                yield "/".join((*path, str(index)))
            yield from _secret_literals(item, (*path, str(index)))


def test_no_secret_is_written_in_deploy_files():
    for name in ("dagster.yaml", "run_config_k8s.yaml", "helm/values.yaml"):
        assert list(_secret_literals(_yaml(name))) == [], name
    assert list(_secret_literals({"storage": {"password": "hunter2"}})) == ["storage/password"]
    assert list(_secret_literals({"env_vars": ["AWS_SECRET_ACCESS_KEY=x"]})) == ["env_vars/0"]


# --- Postgres + S3, shards in concurrent processes ------------------------------------------------

SHARDS = ["00000", "00001"]
PER_SHARD_TAIL = [
    "neighbors_clip_image", "neighbors_dino_image", "neighbors_clip_caption", "image_pairs",
    "pair_descriptions", "description_rejects", "instructions", "instruction_rejects", "triplets",
]
EMBEDDINGS = ["embeddings_clip_image", "embeddings_dino_image", "embeddings_clip_caption"]
INDEXES = ["knn_index_clip_image", "knn_index_dino_image", "knn_index_clip_caption"]
CORPUS = ["corpus_images", "corpus_rejects"]


class ShardWorkers:
    """One worker process per shard (tests/materialize_on_instance.py), driven stage by stage."""

    def __init__(self, home: Path, dagster_home: Path, store_args: list[str], logs: Path):
        env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "HF_HUB_OFFLINE": "1"}
        self.workers = []
        for shard in SHARDS:
            log = open(logs / f"worker-{shard}.log", "wb")  # noqa: SIM115
            process = subprocess.Popen(
                [sys.executable, str(TESTS / "materialize_on_instance.py"), str(home), shard,
                 *store_args],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            )
            self.workers.append((shard, log, process))
        try:
            self._answers("ready", "start")
        except BaseException:
            self.close()
            raise

    def _answers(self, expected: str, stage: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        for shard, log, process in self.workers:
            ready, _, _ = select.select([process.stdout], [], [], max(0, deadline - time.monotonic()))
            answer = process.stdout.readline().strip() if ready else "timed out"
            if answer != expected:
                log.flush()
                output = Path(log.name).read_text(errors="replace")
                raise AssertionError(f"{stage} for shard {shard}: {answer!r}\n{output[-4000:]}")

    def run(self, assets: list[str]) -> float:
        """Materialise ``assets`` for every shard at once; return the stage's wall time."""
        started = time.monotonic()
        for _shard, _log, process in self.workers:
            process.stdin.write(",".join(assets) + "\n")
            process.stdin.flush()
        self._answers("ok", ",".join(assets))
        return time.monotonic() - started

    def close(self) -> None:
        for _shard, log, process in self.workers:
            if process.stdin:
                process.stdin.close()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _in_process(assets, partition, resources, instance) -> None:
    result = materialize(list(defs.assets), selection=assets, partition_key=partition,
                         resources=resources, instance=instance)
    assert result.success


def test_shards_run_concurrently_on_postgres_and_s3_like_the_local_setup(tmp_path):
    home = tmp_path / "home"
    for index in range(len(SHARDS)):
        write_demo_shard(home / "demo_corpus", index, 24, seed=0)
    local_home = tmp_path / "local_home"
    shutil.copytree(home / "demo_corpus", local_home / "demo_corpus")
    logs = tmp_path / "logs"
    logs.mkdir()
    timings = {}
    with postgres_server() as server, moto_s3() as (endpoint, options):
        import s3fs

        s3 = s3fs.S3FileSystem(**options)
        s3.mkdir("megapairs")
        dagster_home = tmp_path / "dagster_home"
        dagster_home.mkdir()
        (dagster_home / "dagster.yaml").write_text(yaml.safe_dump({
            "telemetry": {"enabled": False},
            "storage": {"postgres": {"postgres_db": server.postgres_db()}},
        }))
        store_args = ["--store-url", "s3://megapairs/run", "--endpoint-url", endpoint]
        remote = small_demo_resources(home, url="s3://megapairs/run", endpoint_url=endpoint)
        # Trained once and shared by both setups (below), so its quality does not matter here.
        small = remote["encoders"]
        remote["encoders"] = Encoders(mode="bootstrap", dino_image_size=small.dino_image_size,
                                      bootstrap_max_images=small.bootstrap_max_images,
                                      bootstrap_max_seconds=2)
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            instance.add_dynamic_partitions("shards", SHARDS)
            started = time.monotonic()
            workers = ShardWorkers(home, dagster_home, store_args, logs)
            try:
                timings["2 worker processes start"] = time.monotonic() - started
                timings["corpus (concurrent)"] = workers.run(CORPUS)
                started = time.monotonic()
                _in_process(["base_encoders"], None, remote, instance)
                timings["base_encoders"] = time.monotonic() - started
                timings["embeddings (concurrent)"] = workers.run(EMBEDDINGS)
                started = time.monotonic()
                _in_process(INDEXES, None, remote, instance)
                timings["knn indexes"] = time.monotonic() - started
                timings["neighbours→triplets (concurrent)"] = workers.run(PER_SHARD_TAIL)
            finally:
                workers.close()

            # The Postgres instance recorded every run and materialisation.
            runs = instance.get_runs()
            assert len(runs) == 3 * len(SHARDS) + 2
            assert all(run.status == DagsterRunStatus.SUCCESS for run in runs)
            for asset in CORPUS + EMBEDDINGS + PER_SHARD_TAIL:
                assert instance.get_materialized_partitions(AssetKey(asset)) == set(SHARDS), asset
            for asset in ["base_encoders", *INDEXES]:
                assert instance.get_latest_materialization_event(AssetKey(asset)) is not None
        with psycopg2.connect(host=server.host, port=server.port, user=server.username,
                              dbname=server.db_name) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = "
                           "'ASSET_MATERIALIZATION'")
            materialisations = cursor.fetchone()[0]
        connection.close()
        assert materialisations == len(SHARDS) * len(CORPUS + EMBEDDINGS + PER_SHARD_TAIL) + 4

        # The artifacts are in the bucket.
        remote_store = remote["store"].client()
        for asset in ["corpus_images", "image_pairs", "pair_descriptions", "instructions"]:
            for shard in SHARDS:
                assert s3.exists(f"megapairs/run/{asset}/{shard}.parquet"), (asset, shard)
        assert s3.exists("megapairs/run/base_encoders/data.json")
        remote_data = {(asset, shard): load_artifact(remote_store, artifact_relpath([asset], shard))
                       for asset in ["corpus_images", "image_pairs", "instructions",
                                     "embeddings_clip_image"] for shard in SHARDS}
        # The bootstrap CLIP stops on a time budget, so it is trained once: the local setup
        # reuses the same encoder artifacts (manifest + weights), copied from the bucket.
        s3.get("megapairs/run/base_encoders/", str(local_home / "artifacts" / "base_encoders"),
               recursive=True)

    # The default local setup (sqlite instance in a folder, local artifact store), same inputs.
    local = small_demo_resources(local_home)
    started = time.monotonic()
    (tmp_path / "local_dagster_home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "local_dagster_home")) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        instance.add_dynamic_partitions("shards", SHARDS)
        for shard in SHARDS:
            _in_process(CORPUS, shard, local, instance)
        for shard in SHARDS:
            _in_process(EMBEDDINGS, shard, local, instance)
        _in_process(INDEXES, None, local, instance)
        for shard in SHARDS:
            _in_process(PER_SHARD_TAIL, shard, local, instance)
    timings["local setup, sequential"] = time.monotonic() - started
    print("stage timings (s):", {name: round(seconds, 1) for name, seconds in timings.items()})

    local_store = local["store"].client()
    total_pairs = 0
    for shard in SHARDS:
        def both(asset, shard=shard):
            return (remote_data[(asset, shard)],
                    load_artifact(local_store, artifact_relpath([asset], shard)))

        remote_images, local_images = both("corpus_images")
        assert list(remote_images["image_id"]) == list(local_images["image_id"])
        remote_vectors, local_vectors = both("embeddings_clip_image")
        np.testing.assert_array_equal(remote_vectors.ids, local_vectors.ids)
        np.testing.assert_allclose(remote_vectors.vectors, local_vectors.vectors, atol=1e-5)
        remote_pairs, local_pairs = both("image_pairs")
        assert len(remote_pairs) > 0
        total_pairs += len(remote_pairs)
        columns = ["pair_id", "query_id", "target_id"]
        pd.testing.assert_frame_equal(remote_pairs[columns], local_pairs[columns])
        remote_instructions, local_instructions = both("instructions")
        assert len(remote_instructions) > 0
        pd.testing.assert_series_equal(remote_instructions["pair_id"], local_instructions["pair_id"])
        assert [list(i) for i in remote_instructions["instructions"]] == [
            list(i) for i in local_instructions["instructions"]]
    assert total_pairs > 0
