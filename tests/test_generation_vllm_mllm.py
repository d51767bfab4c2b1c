"""The description step's vLLM paths on a real multimodal model: vLLM's CPU build, in its own
environment (.venv-vllm; ``make test`` builds it).

A tiny random Idefics3 (tests/tiny_idefics3.py) describes pairs of noise images. Greedy
descriptions from vLLM's offline engine (the vllm backend, driven by
tests/vllm_mllm_worker.py) and from ``vllm serve`` (the openai backend, which sends the JPEG
bytes as data URLs) equal the transformers backend's on the same model and requests, and
they depend on the images and on their order.

Both sides must resize the images alike. Idefics3's processor resizes with Lanczos; vLLM's
environment has no torchvision, so its transformers uses the PIL image processor, while the
project's environment has torchvision >= 0.27, whose Lanczos differs from PIL's by one grey
level in about 1 % of the pixels, enough to change a random model's greedy text. The
transformers backend is therefore loaded with the PIL processor here; images already at the
model's side, which neither resizes, agree with the default processor too.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from tiny_idefics3 import (
    MAX_MODEL_LEN,
    NEW_TOKENS,
    description_requests,
    save_tiny_idefics3,
    swapped,
)
from transformers.models.auto import image_processing_auto
from vllm_models import ROOT, vllm_python, without_dangling_bytes

from megapairs_dagster.resources.generation_server import GenerationServer, serve_model
from megapairs_dagster.synthesis.generation.backends import BackendSettings, make_describer

pytestmark = pytest.mark.integration
VLLM_PYTHON = vllm_python()
PAIRS = 5
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_idefics3(tmp_path_factory.mktemp("idefics3"))


def transformers_describer(model, *, pil: bool):
    """The transformers backend on ``model``; with ``pil`` its processor resizes with PIL,
    as vLLM's does (transformers' own default where torchvision is older than 0.27)."""
    settings = BackendSettings(backend="transformers", description_model=str(model),
                               temperature=0.0, max_new_tokens=NEW_TOKENS, dtype="float32")
    with pytest.MonkeyPatch.context() as patch:
        if pil:
            patch.setattr(image_processing_auto, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS",
                          ["Idefics3ImageProcessor"])
        describer = make_describer(settings)
    if pil:
        assert type(describer.processor.image_processor).__name__ == "Idefics3ImageProcessorPil"
    return describer


@pytest.fixture(scope="module")
def local(model):
    describer = transformers_describer(model, pil=True)
    requests = description_requests(PAIRS)
    return {"greedy": describer.describe(requests),
            "swapped": describer.describe(swapped(requests))}


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-mllm") / "answers.json"
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_mllm_worker.py"), str(model), str(PAIRS),
         str(out)],
        env=env, capture_output=True, text=True, check=False, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_greedy_descriptions_of_the_engine_equal_the_transformers_backends(model, engine, local):
    assert without_dangling_bytes(engine["greedy"]) == without_dangling_bytes(local["greedy"])
    assert without_dangling_bytes(engine["swapped"]) == without_dangling_bytes(local["swapped"])
    assert engine["identity"]["backend"] == "vllm"
    assert engine["identity"]["model"] == str(model)


def test_descriptions_depend_on_the_images_and_their_order(local):
    # The prompts differ only in their word budget; the images differ in every pair.
    assert len(set(local["greedy"])) == PAIRS
    assert sum(a != b for a, b in zip(local["greedy"], local["swapped"])) == PAIRS


def test_images_the_processor_does_not_resize_agree_with_its_default_backend(model, engine):
    native = transformers_describer(model, pil=False).describe(
        description_requests(PAIRS, native=True))
    assert without_dangling_bytes(engine["native"]) == without_dangling_bytes(native)
    assert len(set(native)) == PAIRS


def test_greedy_descriptions_through_vllm_serve_equal_the_transformers_backends(
    model, local, tmp_path
):
    server = GenerationServer(
        vllm_command=[str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
        description_args=["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"],
    )
    command = server.command(str(model), "description", dtype="float32")
    with serve_model(command, env=VLLM_ENV, startup_timeout_s=300, log_dir=tmp_path) as served:
        answers = make_describer(BackendSettings(
            backend="openai", description_model=str(model), endpoint_url=served.url,
            temperature=0.0, max_new_tokens=NEW_TOKENS,
        )).describe(description_requests(PAIRS))
    assert without_dangling_bytes(answers) == without_dangling_bytes(local["greedy"])
