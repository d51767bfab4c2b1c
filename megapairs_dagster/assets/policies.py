"""Execution policies shared by the assets: retries for transient failures, GPU placement."""

from dagster import BackfillPolicy, Backoff, Jitter, RetryPolicy

# S3 hiccups and model-server restarts are transient: retry with growing, jittered delays.
TRANSIENT_RETRY = RetryPolicy(max_retries=2, delay=5, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)

# Assets that use an accelerator: the `gpu` pool caps them at the number of GPUs, and the
# dagster-k8s tag turns into a GPU request when runs go to Kubernetes. A pod that requests
# `nvidia.com/gpu` is only scheduled on nodes that have one; the toleration lets it onto GPU
# nodes tainted `nvidia.com/gpu` (the NVIDIA GPU operator's convention). Tags, unlike run
# config, hold for every run: launched, or started by a sensor, automation or a schedule.
GPU_POOL = "gpu"


def gpu_tags(count: int = 1) -> dict:
    """Op tags that request ``count`` GPUs (and tolerate GPU nodes' taint) on Kubernetes."""
    if count < 1:
        raise ValueError(f"a GPU step needs at least one GPU, got {count}")
    return {
        "dagster-k8s/config": {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(count)}}},
            "pod_spec_config": {"tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]},
        }
    }


GPU_TAGS = gpu_tags(1)

# A backfill of many shards gives each run up to this many, so a model is loaded once per run
# rather than once per shard (the assets accept one shard or several).
SHARDS_PER_RUN = BackfillPolicy.multi_run(max_partitions_per_run=8)
