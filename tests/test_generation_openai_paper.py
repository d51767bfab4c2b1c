"""The paper profile's generation: vLLM through the openai backend, the paper's prompt rules,
and the transformers backend's refusal of remote-code checkpoints (InternVL2's kind)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_hf_models import save_tiny_llm

from megapairs_dagster import cli
from megapairs_dagster.resources.generation_server import GenerationServer
from megapairs_dagster.resources.profiles import resources_for
from megapairs_dagster.resources.settings import Generation
from megapairs_dagster.resources.vllm_servers import gpus_for, server_manifests
from megapairs_dagster.synthesis.generation.backends import BackendSettings, make_instructor
from megapairs_dagster.synthesis.generation.prompts import (
    PAPER_PROMPT_VERSION,
    PROMPT_VERSION,
    load_demonstrations,
    render_description_prompt,
    render_instruction_prompt,
)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"

# InternVL2-26B's config.json, as far as loading goes: its own model type and code.
INTERNVL2_CONFIG = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "auto_map": {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
    },
}


def test_the_paper_profile_generates_through_vllm_with_the_papers_prompts(monkeypatch):
    monkeypatch.setenv("MEGAPAIRS_MLLM", "/models/InternVL2-26B")
    monkeypatch.setenv("MEGAPAIRS_LLM", "/models/Meta-Llama-3-8B-Instruct")
    resources = resources_for("paper")
    generation = resources["generation"]
    assert generation.backend == "openai"
    assert generation.prompt_version == PAPER_PROMPT_VERSION
    assert isinstance(resources["generation_server"], GenerationServer)
    # The demo keeps its prompt (and its "at most two changes" rule).
    assert resources_for("demo", "home")["generation"].prompt_version == PROMPT_VERSION


def test_the_paper_prompts_follow_the_papers_rules_and_the_demo_keeps_its_own():
    demonstrations = load_demonstrations(PAPER_PROMPT_VERSION)
    assert demonstrations == load_demonstrations(PROMPT_VERSION)  # one pool of examples
    paper = render_instruction_prompt("Both show a dog.", demonstrations[:5], PAPER_PROMPT_VERSION)
    demo = render_instruction_prompt("Both show a dog.", demonstrations[:5], PROMPT_VERSION)
    assert "at most two changes" in demo and "at most two changes" not in paper
    assert "present in the target image" in paper
    assert "under 73 words" in render_description_prompt(73, PAPER_PROMPT_VERSION)
    assert "about 73 words" in render_description_prompt(73, PROMPT_VERSION)


def test_a_managed_server_gets_the_steps_model_and_arguments():
    server = GenerationServer(vllm_command=["/opt/vllm/bin/vllm", "serve"],
                              description_args=["--tensor-parallel-size", "2"])
    command = server.command("/models/InternVL2-26B", "description", dtype="bfloat16",
                             trust_remote_code=True)
    assert command[:4] == ["/opt/vllm/bin/vllm", "serve", "--model", "/models/InternVL2-26B"]
    assert "--trust-remote-code" in command
    assert command[command.index("--limit-mm-per-prompt") + 1] == '{"image": 2}'
    assert command[-2:] == ["--tensor-parallel-size", "2"]
    assert "--limit-mm-per-prompt" not in server.command("/models/llm", "instruction")


def _remote_code_checkpoint(directory, config):
    save_tiny_llm(directory)  # a tokenizer and weights; the config says what kind of model
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("trust", [False, True])
def test_the_transformers_backend_refuses_internvl2_naming_the_classes_it_supports(tmp_path, trust):
    model = _remote_code_checkpoint(tmp_path, INTERNVL2_CONFIG)
    from megapairs_dagster.synthesis.generation.hf import TransformersDescriber

    with pytest.raises(ValueError) as error:
        TransformersDescriber(str(model), render_prompt=str, trust_remote_code=trust)
    message = str(error.value)
    assert "LlavaForConditionalGeneration" in message  # the supported classes are listed
    if trust:
        assert "registers ['AutoConfig', 'AutoModel', 'AutoModelForCausalLM']" in message
        assert "openai backend" in message
    else:
        assert "needs remote code" in message and "trust_remote_code: true" in message


def test_remote_code_needs_an_explicit_trust_remote_code(tmp_path):
    config = {**INTERNVL2_CONFIG, "model_type": "my_llm"}
    model = _remote_code_checkpoint(tmp_path, config)
    settings = BackendSettings(backend="transformers", instruction_model=str(model))
    with pytest.raises(ValueError, match="needs remote code.*LlamaForCausalLM"):
        make_instructor(settings)


def _rendered_servers(monkeypatch, capsys, config: Path) -> tuple[dict, dict, str]:
    """``megapairs vllm-servers`` on ``config``: Deployments and Services by name, stderr."""
    import yaml

    monkeypatch.setenv("MEGAPAIRS_PROFILE", "paper")
    monkeypatch.setenv("MEGAPAIRS_CONFIG", str(config))
    cli.main(["vllm-servers", "--image", "vllm/vllm-openai:pinned"])
    out, err = capsys.readouterr()
    items = yaml.safe_load(out)["items"]
    deployments = {i["metadata"]["name"]: i for i in items if i["kind"] == "Deployment"}
    services = {i["metadata"]["name"]: i for i in items if i["kind"] == "Service"}
    return deployments, services, err


def test_the_cluster_vllm_servers_run_what_the_managed_server_would_run(monkeypatch, capsys):
    """The manifests rendered from deploy/config_paper.yaml: each server serves its step's
    model with exactly the managed server's arguments, and its Service is the URL printed."""
    deployments, services, err = _rendered_servers(monkeypatch, capsys, DEPLOY / "config_paper.yaml")
    names = {"description": "megapairs-vllm-description", "instruction": "megapairs-vllm-instruction"}
    assert set(deployments) == set(services) == set(names.values())
    resources = resources_for("paper")
    generation = resources["generation"]
    server = resources["generation_server"]
    for step, name in names.items():
        pod = deployments[name]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        managed = server.command(getattr(generation, f"{step}_model"), step,
                                 dtype=generation.dtype,
                                 trust_remote_code=generation.trust_remote_code)
        assert container["args"] == [*managed[len(server.vllm_command):],
                                     "--host", "0.0.0.0", "--port", "8000"]
        assert container["image"] == "vllm/vllm-openai:pinned"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
        selector = services[name]["spec"]["selector"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        assert services[name]["spec"]["ports"][0]["port"] == 8000
        assert f"{step}_url: http://{name}:8000/v1" in err
    description = deployments[names["description"]]["spec"]["template"]["spec"]
    args = description["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/InternVL2-26B"
    assert "--trust-remote-code" in args and '{"image": 2}' in args
    assert [volume["name"] for volume in description["volumes"]] == ["models"]  # one GPU


def test_tensor_parallel_servers_ask_for_their_gpus_and_shared_memory(monkeypatch, capsys, tmp_path):
    import yaml

    config = yaml.safe_load((DEPLOY / "config_paper.yaml").read_text())
    config["resources"]["generation_server"]["config"]["description_args"] = [
        "--tensor-parallel-size", "2", "--pipeline-parallel-size=2"]
    config["resources"]["generation"]["config"]["api_key_env"] = "VLLM_KEY"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    deployments, _, _ = _rendered_servers(monkeypatch, capsys, path)
    spec = deployments["megapairs-vllm-description"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in spec["volumes"]
    (key,) = [v for v in container["env"] if v["name"] == "VLLM_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] == "megapairs-vllm-api-key"  # not the key
    assert gpus_for(["-tp", "8"]) == 8 and gpus_for([]) == 1


def test_rendering_servers_needs_a_pinned_image_and_both_models(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli.main(["vllm-servers"])
    assert "--image" in capsys.readouterr().err
    with pytest.raises(ValueError, match="generation.description_model is not set"):
        server_manifests(Generation(instruction_model="/models/llm"), GenerationServer(),
                         image="vllm/vllm-openai:pinned")
