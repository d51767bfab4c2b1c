"""Kubernetes manifests for the generation servers, rendered from the deployment's own config.

For clusters where the two generators run as long-lived vLLM Services rather than a
``vllm serve`` started inside each step's pod. Rendered, not written by hand: each server
runs exactly the command the ``generation_server`` resource would start (the step's model,
dtype, remote-code switch, image limit and ``description_args`` / ``instruction_args``), and
asks for as many GPUs as those arguments' tensor × pipeline parallelism, so the manifests
cannot drift from the config the steps check the servers against.

    MEGAPAIRS_PROFILE=paper MEGAPAIRS_CONFIG=deploy/config_paper.yaml \\
        megapairs vllm-servers --image vllm/vllm-openai:<tag> | kubectl -n megapairs apply -f -

then set ``generation_server.description_url`` / ``instruction_url`` to the URLs that
``service_url`` gives (the command prints them on stderr).
"""

from __future__ import annotations

from megapairs_dagster.resources.generation_server import GenerationServer, Step
from megapairs_dagster.resources.settings import Generation

PORT = 8000
STEPS: tuple[Step, ...] = ("description", "instruction")
API_KEY_SECRET = "megapairs-vllm-api-key"  # a Secret with the key under `api-key`


def server_name(step: Step) -> str:
    return f"megapairs-vllm-{step}"


def service_url(step: Step) -> str:
    """The in-cluster address of ``step``'s Service, for ``generation_server``."""
    return f"http://{server_name(step)}:{PORT}/v1"


def gpus_for(args: list[str]) -> int:
    """GPUs one replica needs: tensor × pipeline parallel size, as vLLM reads its arguments."""
    def size(*flags: str) -> int:
        for index, arg in enumerate(args):
            name, _, value = arg.partition("=")
            if name in flags:
                return int(value or args[index + 1])
        return 1

    return size("--tensor-parallel-size", "-tp") * size("--pipeline-parallel-size", "-pp")


def server_manifests(
    generation: Generation,
    server: GenerationServer,
    *,
    image: str,
    models_claim: str = "megapairs-models",
    shm_size: str = "16Gi",
) -> dict:
    """A ``v1/List`` of one Deployment and one Service per generation step."""
    items = []
    for step in STEPS:
        model = getattr(generation, f"{step}_model")
        if not model:
            raise ValueError(f"generation.{step}_model is not set: no server to render for it")
        command = server.command(model, step, dtype=generation.dtype,
                                 trust_remote_code=generation.trust_remote_code)
        # The image's entrypoint is vLLM's OpenAI server: only the arguments go in the pod.
        args = [*command[len(server.vllm_command):], "--host", "0.0.0.0", "--port", str(PORT)]
        items += _server(server_name(step), args, image, gpus_for(args), server.env,
                         generation.api_key_env, models_claim, shm_size)
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _server(name: str, args: list[str], image: str, gpus: int, env: dict[str, str],
            api_key_env: str | None, models_claim: str, shm_size: str) -> list[dict]:
    def labels() -> dict:  # a fresh dict each time: YAML would print shared ones as anchors
        return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "megapairs"}

    variables = [{"name": "HF_HUB_OFFLINE", "value": "1"},
                 *({"name": key, "value": value} for key, value in sorted(env.items()))]
    if api_key_env:  # the steps read the key from api_key_env; vLLM from VLLM_API_KEY
        variables.append({"name": "VLLM_API_KEY", "valueFrom": {
            "secretKeyRef": {"name": API_KEY_SECRET, "key": "api-key"}}})
    mounts = [{"name": "models", "mountPath": "/models", "readOnly": True}]
    volumes = [{"name": "models",
                "persistentVolumeClaim": {"claimName": models_claim, "readOnly": True}}]
    if gpus > 1:  # tensor-parallel workers exchange tensors through /dev/shm
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}})
    container = {
        "name": "vllm",
        "image": image,
        "args": args,
        "env": variables,
        "ports": [{"name": "http", "containerPort": PORT}],
        # Loading tens of GB of weights takes minutes: up to 15 of them before it is ready.
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                           "periodSeconds": 10, "failureThreshold": 90},
        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels()},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                     "effect": "NoSchedule"}],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels()},
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]},
    }
    return [deployment, service]
