"""Instruction-generation backends by name: one place that maps configuration to objects.

``template`` needs no model (the offline default); ``transformers`` runs local Hugging Face
models; ``vllm`` runs vLLM's offline engine in the step's process; ``openai`` sends each
request to an OpenAI-compatible endpoint (``vllm serve`` or another server;
``resources/generation_server.py`` gives the step its address). A further backend is one more
name here and in the ``generation.backend`` setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megapairs_dagster.synthesis.generation.base import DescriptionBackend, InstructionBackend
from megapairs_dagster.synthesis.generation.prompts import (
    render_description_prompt,
    render_instruction_prompt,
)

if TYPE_CHECKING:  # the encoders module imports open_clip; the template backend needs none
    from megapairs_dagster.synthesis.encoders import RecordedFiles

BACKENDS = ("template", "transformers", "vllm", "openai")


@dataclass(frozen=True)
class BackendSettings:
    """The settings the backends read. The assets fill it from the ``generation`` resource's
    settings of the same names (``resources.settings.domain_config``), so a field here keeps
    its setting's name."""

    backend: str = "template"
    description_model: str | None = None  # MLLM: local directory or hub id
    instruction_model: str | None = None  # LLM: local directory or hub id
    prompt_version: str = "v1"
    max_new_tokens: int = 256
    temperature: float = 0.7
    batch_size: int = 8
    device: str = "cpu"  # generation.device: auto, cpu, cuda or cuda:N
    dtype: str = "auto"
    trust_remote_code: bool = False
    # File hashes of each model as recorded earlier (a backend's identity["file_sha256"]);
    # when set, a model whose files changed is refused.
    description_files: RecordedFiles | None = None
    instruction_files: RecordedFiles | None = None
    # The openai backend: the endpoint's address comes from the generation_server resource
    # (an override, not a generation setting); the rest are generation settings.
    endpoint_url: str | None = None
    max_concurrency: int = 16
    request_timeout_s: float = 600.0
    max_retries: int = 5
    retry_backoff_s: float = 1.0
    api_key_env: str | None = None
    instruction_tokenizer: str | None = None  # None: instruction_model's own
    # Every describer scales the images down to this first (None: as stored).
    image_max_side: int | None = None
    # The vllm backend: arguments of each step's engine, and its image-decoding threads.
    description_engine_args: dict | None = None
    instruction_engine_args: dict | None = None
    image_workers: int = 8


def make_describer(settings: BackendSettings) -> DescriptionBackend:
    """The MLLM step's backend that ``settings`` names."""
    if settings.backend == "template":
        from megapairs_dagster.synthesis.generation.template import TemplateDescriber

        return TemplateDescriber()
    version = settings.prompt_version
    model = _model(settings, "description_model")

    def render(request):
        return render_description_prompt(request.word_budget, version)

    if settings.backend == "openai":
        from megapairs_dagster.synthesis.generation.openai_backend import OpenAIDescriber

        return OpenAIDescriber(model, render_prompt=render, image_max_side=settings.image_max_side,
                               **_openai_kwargs(settings))
    if settings.backend == "vllm":
        from megapairs_dagster.synthesis.generation.vllm_backend import VLLMDescriber

        return VLLMDescriber(
            model, render_prompt=render, engine_args=settings.description_engine_args,
            image_max_side=settings.image_max_side, image_workers=settings.image_workers,
            **_vllm_kwargs(settings),
        )
    from megapairs_dagster.synthesis.generation.hf import TransformersDescriber

    return TransformersDescriber(
        model, render_prompt=render, expected_files=settings.description_files,
        image_max_side=settings.image_max_side,
        **_generation_kwargs(settings),
    )


def make_instructor(settings: BackendSettings) -> InstructionBackend:
    """The LLM step's backend that ``settings`` names."""
    if settings.backend == "template":
        from megapairs_dagster.synthesis.generation.template import TemplateInstructor

        return TemplateInstructor()
    version = settings.prompt_version
    model = _model(settings, "instruction_model")

    def render(request):
        return render_instruction_prompt(request.description, request.demonstrations, version)

    if settings.backend == "openai":
        from megapairs_dagster.synthesis.generation.openai_backend import OpenAIInstructor

        return OpenAIInstructor(
            model, render_prompt=render, tokenizer=settings.instruction_tokenizer,
            trust_remote_code=settings.trust_remote_code, **_openai_kwargs(settings),
        )
    if settings.backend == "vllm":
        from megapairs_dagster.synthesis.generation.vllm_backend import VLLMInstructor

        return VLLMInstructor(
            model, render_prompt=render, engine_args=settings.instruction_engine_args,
            **_vllm_kwargs(settings),
        )
    from megapairs_dagster.synthesis.generation.hf import TransformersInstructor

    return TransformersInstructor(
        model, render_prompt=render, expected_files=settings.instruction_files,
        **_generation_kwargs(settings),
    )


def _model(settings: BackendSettings, field: str) -> str:
    if settings.backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {settings.backend!r}; expected one of {BACKENDS}")
    model = getattr(settings, field)
    if not model:
        raise ValueError(f"the {settings.backend} backend needs {field} (a local directory or hub id)")
    return model


def _generation_kwargs(settings: BackendSettings) -> dict:
    return {
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "batch_size": settings.batch_size,
        "device": settings.device,
        "dtype": settings.dtype,
        "trust_remote_code": settings.trust_remote_code,
    }


def _vllm_kwargs(settings: BackendSettings) -> dict:
    return {
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "dtype": settings.dtype,
        "trust_remote_code": settings.trust_remote_code,
    }


def _openai_kwargs(settings: BackendSettings) -> dict:
    if not settings.endpoint_url:
        raise ValueError(
            "the openai backend needs an endpoint: set generation_server.description_url / "
            "instruction_url, or let the generation_server resource start vllm serve"
        )
    return {
        "endpoint_url": settings.endpoint_url,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "max_concurrency": settings.max_concurrency,
        "request_timeout_s": settings.request_timeout_s,
        "max_retries": settings.max_retries,
        "retry_backoff_s": settings.retry_backoff_s,
        "api_key_env": settings.api_key_env,
    }
