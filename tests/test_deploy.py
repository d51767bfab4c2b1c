"""The cluster deployment: deploy/ validates against Dagster's and dagster-k8s's schemas and against
the shipped code location as the cluster loads it (paper profile, k8s executor, the deployment
config file), and the per-shard chain runs concurrently in separate processes on a Postgres
instance with its artifacts and tables in S3, giving the same data as the default local setup
(sqlite instance, local folder store)."""

import json
import os
import posixpath
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
    in_process_executor,
    materialize,
    multiprocess_executor,
)
from dagster._config import Shape, process_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)
from postgres_server import postgres_server
from s3_server import moto_s3

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS
from megapairs_dagster.definitions import build_definitions, defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.resources.profiles import Deployment, load_deployment
from megapairs_dagster.resources.settings import Encoders
from megapairs_dagster.synthesis.triplet_store import TripletStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TESTS = Path(__file__).resolve().parent
CONFIG_FILE = DEPLOY / "config_paper.yaml"

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
}

# The synthesis steps that must stay on GPUs; assets added to the `gpu` pool later are
# covered too (the run config must place every one of them on the GPU nodes).
SYNTHESIS_GPU_STEPS = {"embeddings_clip_image", "embeddings_dino_image",
                       "embeddings_clip_caption", "pair_descriptions", "instructions"}
INDEX_STEPS = {"knn_index_clip_image", "knn_index_dino_image", "knn_index_clip_caption"}


def _yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _user_deployment() -> dict:
    return _yaml("helm/values.yaml")["dagster-user-deployments"]["deployments"][0]


def _launcher_values() -> dict:
    return _yaml("helm/values.yaml")["runLauncher"]["config"]["k8sRunLauncher"]


@pytest.fixture
def cluster_env(monkeypatch):
    for key, value in CLUSTER_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def no_deployment_env(monkeypatch):
    """No MEGAPAIRS_* setting of the developer's shell leaks into a deployment built here."""
    for key in list(os.environ):
        if key.startswith("MEGAPAIRS_"):
            monkeypatch.delenv(key)


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
    # Run and step pods get the same deployment as the Helm values give them.
    helm_env = set(_launcher_values()["envVars"])
    deployment_env = {v for v in result.value["env_vars"] if v.startswith("MEGAPAIRS_") and "=" in v}
    assert {"MEGAPAIRS_PROFILE=paper", "MEGAPAIRS_EXECUTOR=k8s"} <= deployment_env
    assert deployment_env == {v for v in helm_env if v.startswith("MEGAPAIRS_")}
    _assert_config_file_mounted(result.value["env_vars"], result.value["volumes"],
                                result.value["volume_mounts"])
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


# --- The shipped code location as the cluster loads it -------------------------------------------
#
# `defs` is built when megapairs_dagster.definitions is imported, from the environment. This test
# module (and the rest of the suite) already imported it with the demo profile, so the code
# location the cluster runs is loaded the way `dagster api grpc -m megapairs_dagster.definitions`
# loads it: a fresh interpreter with the code server's environment from deploy/helm/values.yaml.
# Calling build_definitions(load_deployment()) here instead would test those functions, not the
# module-level `defs` the code server serves.

SHIPPED_PROBE = r"""
import json
import sys
from pathlib import Path

import yaml
from dagster import EnvVar, validate_run_config
from dagster._core.execution.api import create_execution_plan
from dagster_k8s import k8s_job_executor

from megapairs_dagster.definitions import defs

deploy = Path(sys.argv[1])


def check(job, config):
    try:
        validate_run_config(job, config)
    except Exception as error:  # reported; the test decides
        return f"{type(error).__name__}: {error}"
    return "ok"


def plain(value):
    return f"env:{value.env_var_name}" if isinstance(value, EnvVar) else value


asset_job = defs.resolve_implicit_global_asset_job_def()
jobs = {job.name: job for job in defs.resolve_all_job_defs()}
files = {
    path.relative_to(deploy).as_posix(): yaml.safe_load(path.read_text())
    for path in sorted(deploy.rglob("run_config*.yaml"))
}
broken = json.loads(json.dumps(files["run_config_k8s.yaml"]))
broken["execution"]["config"]["step_k8s_config"]["container_confg"] = {}
plan = create_execution_plan(asset_job)
print(json.dumps({
    "executors": {
        name: {"name": job.executor_def.name, "is_k8s_job_executor": job.executor_def is k8s_job_executor}
        for name, job in jobs.items()
    },
    "asset_job": asset_job.name,
    "job_ops": {name: sorted(node.name for node in job.graph.node_defs) for name, job in jobs.items()},
    "validation": {
        name: {job_name: check(job, config) for job_name, job in jobs.items()}
        for name, config in files.items()
    },
    "typo": check(asset_job, broken),
    "steps": {step.key: {"op": step.op_name, "tags": dict(step.tags)} for step in plan.steps},
    "pools": {node.name: node.pool for node in asset_job.graph.node_defs},
    "resources": {
        key: {name: plain(getattr(resource, name)) for name in type(resource).model_fields}
        for key, resource in defs.resources.items() if key != "io_manager"
    },
    "training_runs": defs.get_assets_def("mmret_clip").partitions_def.get_partition_keys(),
}, default=str))
"""


def _code_server_env(**overrides) -> dict:
    """The code server's environment as deploy/helm/values.yaml gives it, on this machine."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MEGAPAIRS_")}
    env.update(CLUSTER_ENV)
    env.update({item["name"]: item["value"] for item in _user_deployment()["env"]})
    # The ConfigMap is made from deploy/<that file name> (see the values' header): use the file.
    env["MEGAPAIRS_CONFIG"] = str(DEPLOY / Path(env["MEGAPAIRS_CONFIG"]).name)
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def shipped():
    """What the shipped code location holds under the cluster's environment, and what it says
    when MEGAPAIRS_EXECUTOR names no executor (both interpreters run at once)."""
    probe = subprocess.Popen([sys.executable, "-c", SHIPPED_PROBE, str(DEPLOY)], cwd=ROOT,
                             env=_code_server_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    bogus = subprocess.Popen([sys.executable, "-c", "import megapairs_dagster.definitions"],
                             cwd=ROOT, env=_code_server_env(MEGAPAIRS_EXECUTOR="bogus"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = probe.communicate(timeout=600)
    _, bogus_err = bogus.communicate(timeout=600)
    assert probe.returncode == 0, err[-6000:]
    result = json.loads(out.strip().splitlines()[-1])
    result["bogus"] = {"returncode": bogus.returncode, "stderr": bogus_err}
    return result


def test_shipped_code_location_runs_every_job_on_the_k8s_executor(shipped):
    env = {item["name"]: item["value"] for item in _user_deployment()["env"]}
    assert (env["MEGAPAIRS_PROFILE"], env["MEGAPAIRS_EXECUTOR"]) == ("paper", "k8s")
    executors = shipped["executors"]
    assert shipped["asset_job"] in executors and {"synthesis", "indexes", "training"} <= set(executors)
    for name, executor in executors.items():
        assert executor == {"name": "k8s", "is_k8s_job_executor": True}, name
    # The deployment config file was read: the paper's training runs, its resources.
    assert set(shipped["training_runs"]) >= {"base_encoder", "base", "large"}
    assert shipped["resources"]["compute"]["device"] == "cuda"
    assert shipped["resources"]["generation"]["description_model"].startswith("/models/")
    assert shipped["resources"]["store"]["url"] == "env:MEGAPAIRS_STORE_URL"


def test_run_configs_validate_against_the_shipped_jobs(shipped):
    validation = shipped["validation"]
    assert "run_config_k8s.yaml" in validation
    for name, per_job in validation.items():  # every deploy/**/run_config*.yaml
        assert per_job[shipped["asset_job"]] == "ok", (name, per_job[shipped["asset_job"]])
    # The executor config fits every job of the code location (`-j synthesis -c ...`).
    assert all(result == "ok" for result in validation["run_config_k8s.yaml"].values()), \
        validation["run_config_k8s.yaml"]
    # A typo in the executor's config is refused by the same validation.
    assert "DagsterInvalidConfigError" in shipped["typo"] and "container_confg" in shipped["typo"]
    run_config = _yaml("run_config_k8s.yaml")
    executor = process_config(k8s_job_executor.config_schema.config_type, run_config["execution"]["config"])
    assert executor.success, executor.errors


def test_per_step_k8s_config_names_real_steps(shipped):
    per_step = _yaml("run_config_k8s.yaml")["execution"]["config"]["per_step_k8s_config"]
    steps = shipped["steps"]
    # Dagster does not check these keys (a Map): they must be step keys of the shipped job. The
    # executor looks them up by the step's op name, which is the step key for an asset's op.
    assert set(per_step) <= set(steps), set(per_step) - set(steps)
    assert all(steps[key]["op"] == key for key in per_step)
    assert "image_index" in per_step


def test_placement_every_run_needs_is_in_op_tags_not_run_config(shipped):
    """Runs started by sensors, automation or schedules get no run config: GPU requests, the
    GPU nodes' toleration and the index pods' memory must come from the op tags."""
    steps = shipped["steps"]
    gpu_steps = {step for step, pool in shipped["pools"].items() if pool == GPU_POOL}
    assert gpu_steps >= SYNTHESIS_GPU_STEPS | {
        "mmret_clip", "benchmark_scores", "mmret_mllm", "mllm_benchmark_scores"}
    for step in gpu_steps:
        parsed = get_user_defined_k8s_config(steps[step]["tags"])
        assert [t["key"] for t in parsed.pod_spec_config["tolerations"]] == ["nvidia.com/gpu"]
    # deploy/config_paper.yaml gives the indexes a 64 GB budget: 64 × 1.5 + 4 GiB per pod
    for step in INDEX_STEPS:
        parsed = get_user_defined_k8s_config(steps[step]["tags"])
        assert parsed.container_config["resources"]["requests"]["memory"] == "100Gi", step


def test_gpu_steps_carry_a_gpu_request_that_dagster_k8s_reads(shipped):
    assert UserDefinedDagsterK8sConfig.from_dict(GPU_TAGS["dagster-k8s/config"])
    for step, info in shipped["steps"].items():
        parsed = get_user_defined_k8s_config(info["tags"])  # the executor's own parser
        limits = parsed.container_config.get("resources", {}).get("limits", {})
        if shipped["pools"][info["op"]] == GPU_POOL:
            # Training (both retrievers) asks for its processes' GPUs (deploy/config_paper.yaml:
            # 8), others one.
            gpus = "8" if info["op"] in ("mmret_clip", "mmret_mllm") else "1"
            assert limits == {"nvidia.com/gpu": gpus}, step
        else:
            assert "nvidia.com/gpu" not in limits, step
    with pytest.raises(DagsterInvalidConfigError, match="containr_config"):
        get_user_defined_k8s_config({"dagster-k8s/config": json.dumps({"containr_config": {}})})


def _step_pod(step: str, tags: dict):
    """The pod the k8s executor builds for ``step``: the order of K8sStepHandler's
    _get_container_context (run launcher, the code location's container context as the chart
    passes it, the executor's step_k8s_config, the op tags, per_step_k8s_config), rendered by
    dagster-k8s's construct_dagster_k8s_job."""
    launcher = _launcher_values()
    deployment = _user_deployment()
    execution = _yaml("run_config_k8s.yaml")["execution"]["config"]
    contexts = [
        K8sContainerContext(
            env_secrets=[secret["name"] for secret in launcher["envSecrets"]],
            env_vars=launcher["envVars"], volumes=launcher["volumes"],
            volume_mounts=launcher["volumeMounts"], namespace="megapairs",
        ),
        # What the chart writes to DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT with
        # includeConfigInLaunchedRuns (helpers: dagsterUserDeployments.k8sContainerContext).
        K8sContainerContext.create_from_config({"k8s": {
            "env_secrets": [secret["name"] for secret in deployment["envSecrets"]],
            "volumes": deployment["volumes"], "volume_mounts": deployment["volumeMounts"],
            "resources": deployment["resources"], "env": deployment["env"],
            "namespace": "megapairs",
        }}),
        K8sContainerContext(
            namespace=execution.get("job_namespace"),
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(execution["step_k8s_config"]),
        ),
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)),
        K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
            execution["per_step_k8s_config"].get(step, {}))),
    ]
    context = K8sContainerContext()
    for other in contexts:
        context = context.merge(other)
    job_config = DagsterK8sJobConfig(job_image=CLUSTER_ENV["MEGAPAIRS_IMAGE"],
                                     dagster_home="/opt/dagster/dagster_home",
                                     instance_config_map="dagster-instance")
    job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"],
                                    f"dagster-step-{step.replace('_', '-')}",
                                    user_defined_k8s_config=context.run_k8s_config,
                                    component="step_worker")
    return job.spec.template.spec


def test_step_pods_get_the_deployment_the_gpu_and_no_shared_volume(shipped):
    # The chart passes the code location's env, volumes and resources on to launched runs.
    assert _user_deployment()["includeConfigInLaunchedRuns"] == {"enabled": True}
    config_path = {item["name"]: item["value"] for item in _user_deployment()["env"]}[
        "MEGAPAIRS_CONFIG"]
    for step in ["instructions", "knn_index_clip_image", "image_index", "triplets"]:
        pod = _step_pod(step, shipped["steps"][step]["tags"])
        (container,) = pod.containers
        env = {item.name: item.value for item in container.env}
        assert env["MEGAPAIRS_PROFILE"] == "paper" and env["MEGAPAIRS_EXECUTOR"] == "k8s"
        assert env["MEGAPAIRS_CONFIG"] == config_path
        names = [volume.name for volume in pod.volumes]
        assert len(names) == len(set(names)), names  # given twice, kept once
        volumes = {volume.name: volume for volume in pod.volumes}
        mounts = {mount.mount_path: mount for mount in container.volume_mounts}
        config_mount = mounts[posixpath.dirname(config_path)]
        assert volumes[config_mount.name].config_map.name == "megapairs-config"
        assert all(mount.read_only for mount in container.volume_mounts), step
        assert all(volume.config_map or volume.persistent_volume_claim.read_only
                   for volume in pod.volumes), step
        assert [source.secret_ref.name for source in container.env_from
                if source.secret_ref] == ["megapairs-aws"]
        limits, requests = container.resources.limits, container.resources.requests
        if step == "instructions":
            assert limits["nvidia.com/gpu"] == "1"
            assert [t.key for t in pod.tolerations] == ["nvidia.com/gpu"]
            assert requests["cpu"] == "4"  # step_k8s_config over the code location's default
        else:
            assert "nvidia.com/gpu" not in (limits or {}) and not pod.tolerations
        if step == "knn_index_clip_image":  # the op tags over the executor's defaults
            assert (requests["cpu"], requests["memory"], limits["memory"]) == (
                "4", "100Gi", "100Gi")


# --- Executor and deployment config file --------------------------------------------------------

def _assert_config_file_mounted(env_vars, volumes, volume_mounts):
    config_path = dict(item.split("=", 1) for item in env_vars if "=" in item)["MEGAPAIRS_CONFIG"]
    assert Path(config_path).name == CONFIG_FILE.name  # the ConfigMap key: --from-file=<it>
    (mount,) = [m for m in volume_mounts
                if (m.get("mountPath") or m.get("mount_path")) == posixpath.dirname(config_path)]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    config_map = volume.get("configMap") or volume.get("config_map")
    assert config_map == {"name": "megapairs-config"}


def test_deployment_config_file_loads_for_the_paper_profile(no_deployment_env, monkeypatch):
    deployment = load_deployment("paper", config_file=str(CONFIG_FILE))
    assert deployment.config_file == str(CONFIG_FILE)
    assert deployment.executor == "multiprocess"  # the file chooses resources, not the executor
    resources = deployment.resources
    assert (resources["compute"].device, resources["compute"].dtype) == ("cuda", "bfloat16")
    assert resources["compute"].batch_size == 256
    assert resources["mining"].all_windows() == {
        view: (0.8, 0.96) for view in ("clip_image", "dino_image", "clip_caption")}
    generation = resources["generation"]
    assert (generation.backend, generation.device, generation.dtype) == (
        "openai", "cuda", "bfloat16")
    assert resources["encoders"].mode == "pretrained"
    # Every model is a local path on the models volume the pods mount (no hub in the cluster).
    (models_mount,) = [m["mountPath"] for m in _launcher_values()["volumeMounts"]
                       if m["name"] == "megapairs-models"]
    models = [generation.description_model, generation.instruction_model,
              resources["encoders"].clip_pretrained, resources["encoders"].dino_model]
    runs = deployment.training_runs
    assert {"base_encoder", "base", "large"} <= set(runs)
    assert (runs["base"].start, runs["large"].start) == ("ViT-B-16", "ViT-L-14")
    models += [runs["base"].pretrained, runs["large"].pretrained]
    for model in models:
        assert isinstance(model, str) and model.startswith(models_mount + "/"), model
    # The store and corpus stay with the environment (the paper profile's EnvVars).
    assert resources["store"].url == "MEGAPAIRS_STORE_URL"
    # The same file through MEGAPAIRS_CONFIG, as the pods read it.
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "paper")
    monkeypatch.setenv("MEGAPAIRS_CONFIG", str(CONFIG_FILE))
    assert load_deployment().resources["compute"].device == "cuda"


@pytest.mark.parametrize(("profile", "executor"), [
    ("demo", in_process_executor), ("paper", multiprocess_executor)])
def test_each_profile_has_its_default_executor_for_every_job(no_deployment_env, monkeypatch,
                                                              tmp_path, profile, executor):
    monkeypatch.setenv("MEGAPAIRS_PROFILE", profile)
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path))
    deployment = load_deployment()
    assert deployment.executor == executor.name
    jobs = build_definitions(deployment).resolve_all_job_defs()
    assert jobs and all(job.executor_def is executor for job in jobs)


def test_an_unknown_executor_is_a_clear_error(no_deployment_env, monkeypatch, shipped):
    monkeypatch.setenv("MEGAPAIRS_EXECUTOR", "bogus")
    with pytest.raises(ValueError, match=r"MEGAPAIRS_EXECUTOR='bogus'.*in_process.*k8s"):
        load_deployment("paper")
    # The shipped code location refuses to load, saying why.
    assert shipped["bogus"]["returncode"] != 0
    last_line = shipped["bogus"]["stderr"].strip().splitlines()[-1]
    assert "MEGAPAIRS_EXECUTOR='bogus'" in last_line and "'k8s'" in last_line, last_line


def test_the_k8s_executor_without_dagster_k8s_points_to_the_deploy_extra(monkeypatch):
    deployment = Deployment("paper", {}, {}, executor="k8s")
    assert deployment.executor_definition() is k8s_job_executor
    monkeypatch.setitem(sys.modules, "dagster_k8s", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"megapairs-dagster\[deploy\]"):
        deployment.executor_definition()


def test_deploy_extra_carries_the_cluster_packages_pinned():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", requirement)[0].lower() for requirement in requirements}

    deploy = names(extras["deploy"])
    # The k8s executor and launcher, the Postgres storage, and the driver that
    # deploy/dagster.yaml names (scheme postgresql+psycopg2).
    assert deploy >= {"dagster-k8s", "dagster-postgres", "psycopg2-binary"}
    assert "postgresql+psycopg2" in (DEPLOY / "dagster.yaml").read_text()
    assert "megapairs-dagster[deploy]" in extras["dev"]  # the tests check the deploy files with them
    pins = {line.split("==")[0].strip().lower()
            for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert deploy <= pins, deploy - pins


# --- deploy/helm/values.yaml, secrets, no shared filesystem ---------------------------------------

def test_helm_values_have_the_required_keys():
    values = _yaml("helm/values.yaml")
    user = values["dagster-user-deployments"]
    assert user["enabled"] is True
    deployment = user["deployments"][0]
    assert deployment["image"]["repository"] and deployment["image"]["tag"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "megapairs_dagster.definitions"]
    assert {"name": "megapairs-aws"} in deployment["envSecrets"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert (env["MEGAPAIRS_PROFILE"], env["MEGAPAIRS_EXECUTOR"]) == ("paper", "k8s")
    _assert_config_file_mounted([f"{k}={v}" for k, v in env.items()], deployment["volumes"],
                                deployment["volumeMounts"])
    assert values["dagsterDaemon"]["enabled"] is True
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert values["postgresql"]["enabled"] is False and values["postgresql"]["postgresqlHost"]
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert {"name": "megapairs-aws"} in launcher["envSecrets"]
    # Run and step pods load the same deployment as the code server.
    for name in ("MEGAPAIRS_PROFILE", "MEGAPAIRS_EXECUTOR", "MEGAPAIRS_CONFIG"):
        assert f"{name}={env[name]}" in launcher["envVars"], name
    _assert_config_file_mounted(launcher["envVars"], launcher["volumes"], launcher["volumeMounts"])
    # Given in both places, the config volume must be the same (dagster-k8s then keeps one).
    config_volume = [v for v in deployment["volumes"] if v["name"] == "megapairs-config"]
    assert config_volume == [v for v in launcher["volumes"] if v["name"] == "megapairs-config"]


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


def _deploy_files() -> list[str]:
    return sorted(path.relative_to(DEPLOY).as_posix() for path in DEPLOY.rglob("*.yaml"))


def test_no_secret_is_written_in_deploy_files():
    files = _deploy_files()
    assert {"dagster.yaml", "run_config_k8s.yaml", "helm/values.yaml",
            "config_paper.yaml"} <= set(files)
    for name in files:
        assert list(_secret_literals(_yaml(name))) == [], name
    assert list(_secret_literals({"storage": {"password": "hunter2"}})) == ["storage/password"]
    assert list(_secret_literals({"env_vars": ["AWS_SECRET_ACCESS_KEY=x"]})) == ["env_vars/0"]


def _volumes(node):
    """Every (volumes, volume mounts) list in a deploy file, whatever its spelling."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("volumes", "volumeMounts", "volume_mounts") and isinstance(value, list):
                yield key, value
            else:
                yield from _volumes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _volumes(item)


def test_no_pod_shares_a_writable_volume():
    """Steps share nothing but the store: volumes are a ConfigMap, a read-only claim, or a
    pod's own scratch (an emptyDir, e.g. a vLLM server's /dev/shm), which no other pod sees."""
    for name in _deploy_files():
        data = _yaml(name)
        text = yaml.safe_dump(data)
        for gone in ("triplet_db", "megapairs-shared", "ReadWriteMany", "duckdb", "cache_dir"):
            assert gone not in text, (name, gone)
        pod_local = {entry["name"] for key, entries in _volumes(data) if key == "volumes"
                     for entry in entries if "emptyDir" in entry or "empty_dir" in entry}
        for key, entries in _volumes(data):
            for entry in entries:
                if entry.get("name") in pod_local:
                    continue
                if key == "volumes":
                    claim = entry.get("persistentVolumeClaim") or entry.get("persistent_volume_claim")
                    assert entry.get("configMap") or entry.get("config_map") or (
                        claim and (claim.get("readOnly") or claim.get("read_only"))), (name, entry)
                else:
                    assert entry.get("readOnly") or entry.get("read_only"), (name, entry)


# --- Postgres + S3, shards in concurrent processes ------------------------------------------------

SHARDS = ["00000", "00001"]
PER_SHARD_TAIL = [
    "neighbors_clip_image", "neighbors_dino_image", "neighbors_clip_caption", "image_pairs",
    "pair_descriptions", "description_rejects", "instructions", "instruction_rejects", "triplets",
]
EMBEDDINGS = ["embeddings_clip_image", "embeddings_dino_image", "embeddings_clip_caption"]
INDEXES = ["knn_index_clip_image", "knn_index_dino_image", "knn_index_clip_caption"]
CORPUS = ["corpus_images", "corpus_rejects"]
# Global assets the per-shard tail reads: the encoders, and where every image lives.
GLOBAL_INPUTS = ["base_encoders", "image_index"]


class ShardWorkers:
    """One worker process per shard (tests/materialize_on_instance.py), driven stage by stage."""

    def __init__(self, home: Path, dagster_home: Path, store_args: list[str], logs: Path):
        # A remote store's model folders are cached under $XDG_CACHE_HOME/megapairs/<store URL>:
        # a fresh one per test, so no earlier run's weights for the same URL are reused.
        env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "HF_HUB_OFFLINE": "1",
               "XDG_CACHE_HOME": str(home / "xdg_cache")}
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
        remote = small_demo_resources(home, url="s3://megapairs/run", endpoint_url=endpoint,
                                      cache_dir=str(home / "store_cache"))
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
                _in_process(GLOBAL_INPUTS, None, remote, instance)
                timings["base_encoders + image_index"] = time.monotonic() - started
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
            for asset in [*GLOBAL_INPUTS, *INDEXES]:
                assert instance.get_latest_materialization_event(AssetKey(asset)) is not None
        with psycopg2.connect(host=server.host, port=server.port, user=server.username,
                              dbname=server.db_name) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = "
                           "'ASSET_MATERIALIZATION'")
            materialisations = cursor.fetchone()[0]
        connection.close()
        assert materialisations == (len(SHARDS) * len(CORPUS + EMBEDDINGS + PER_SHARD_TAIL)
                                    + len(GLOBAL_INPUTS + INDEXES))

        # The artifacts are in the bucket.
        remote_store = remote["store"].client()
        for asset in ["corpus_images", "image_pairs", "pair_descriptions", "instructions"]:
            for shard in SHARDS:
                assert s3.exists(f"megapairs/run/{asset}/{shard}.parquet"), (asset, shard)
        assert s3.exists("megapairs/run/base_encoders/data.json")
        assert s3.exists("megapairs/run/image_index/data.parquet")
        # The tables: each shard's `triplets` step wrote its own Parquet files to the bucket,
        # concurrently and without a lock; DuckDB reads them back as one table.
        for table in ["triplets", "images"]:
            for shard in SHARDS:
                assert s3.exists(f"megapairs/run/tables/{table}/{shard}.parquet"), (table, shard)
        remote_tables = TripletStore(remote_store)
        remote_counts = remote_tables.counts()
        assert remote_counts["shards"] == len(SHARDS) and remote_counts["triplets"] > 0
        assert remote_tables.duplicate_pairs() == 0
        remote_triplets = remote_tables.triplets_frame()
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
        _in_process(["image_index"], None, local, instance)
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
    # The triplets tables in S3 hold the same rows as the local store's.
    local_tables = TripletStore(local_store)
    assert local_tables.counts() == remote_counts
    local_triplets = local_tables.triplets_frame()
    columns = ["shard", "query_id", "target_id", "instructions", "hard_negative_ids", "views"]
    pd.testing.assert_frame_equal(remote_triplets[columns], local_triplets[columns])
