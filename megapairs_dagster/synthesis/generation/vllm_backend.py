"""The ``vllm`` backend: vLLM's offline engine inside the step's own process (a GPU node).

One engine per step run: the asset builds the backend once and every shard of a multi-shard
backfill run goes through it; ``close()`` shuts the engine down and frees its GPU memory when
the step ends. Each call hands the engine a whole batch (the paper profile's ``batch_size`` is
its ``chunk_size``), so continuous batching keeps the GPU full. Every request carries its own
``SamplingParams(seed=...)``, so a retried or re-batched request reproduces its output, and
greedy decoding (``temperature == 0``) equals the other backends' on the same model. The
instruction step hands the engine token ids (``LLM.generate``), built with the engine's own
tokenizer and chat template as the ``transformers`` backend builds them (``chat_tokens``), so a
description that spells ``</s>`` stays text; ``LLM.chat`` would tokenize the rendered turn whole
and read it as the end of the sequence. The description step sends the query and the target
image in one chat turn (its prompt is the project's own text)
(``limit_mm_per_prompt={"image": 2}``); both are decoded and scaled down to
``image_max_side`` on a pool of CPU threads before the batch reaches the engine.

vLLM is imported only here and only when this backend is chosen: it pins its own torch, so it
is installed with the ``gpu`` extra on a GPU image (or, on a CPU, in the separate
``make vllm-env`` environment the tests use).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from megapairs_dagster.synthesis.generation.base import DescriptionRequest, InstructionRequest
from megapairs_dagster.synthesis.generation.chat_tokens import chat_prompt_ids
from megapairs_dagster.synthesis.generation.images import (
    check_max_side,
    fit_within,
    open_image,
)

IMAGES_PER_PROMPT = 2  # the query image, then the target image


def start_engine(model: str, **engine_args: Any) -> Any:
    """``vllm.LLM(model, **engine_args)``, or a clear error where vLLM is not installed."""
    try:
        from vllm import LLM
    except ImportError as error:
        raise ImportError(
            "generation.backend 'vllm' runs vLLM in the step's process, and vllm does not "
            f"import here ({error}). Install the gpu extra on a GPU image, or serve the model "
            "with `vllm serve` and use the openai backend."
        ) from error
    return LLM(model=model, **engine_args)


def _sampling(request_seed: int, *, max_tokens: int, temperature: float, top_p: float) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          seed=request_seed, n=1)


class _VLLMBackend:
    backend_name = "vllm"
    images_per_prompt = 0
    api = ""

    def __init__(
        self,
        model: str,
        *,
        render_prompt: Callable,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 1.0,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        engine_args: dict[str, Any] | None = None,
        image_max_side: int | None = None,
        image_workers: int = 8,
    ):
        """``engine_args`` go to ``vllm.LLM`` as they are (``tensor_parallel_size``,
        ``max_model_len``, ``gpu_memory_utilization``...)."""
        if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or image_workers < 1:
            raise ValueError(
                "need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1 and image_workers >= 1"
            )
        self.model = model
        self.render_prompt = render_prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.image_max_side = check_max_side(image_max_side)
        self.image_workers = image_workers
        args = {"dtype": dtype, "trust_remote_code": trust_remote_code, "seed": 0,
                **(engine_args or {})}
        if self.images_per_prompt:
            args.setdefault("limit_mm_per_prompt", {"image": self.images_per_prompt})
        self.engine = start_engine(model, **args)
        settings = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "sampling": "greedy" if temperature == 0 else "vLLM sampler, seeded per request",
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "api": self.api,
        }
        if self.images_per_prompt:
            settings["image_max_side"] = image_max_side
        self.identity = {"backend": self.backend_name, "model": model, "settings": settings}

    def _params(self, requests: Sequence) -> list:
        return [
            _sampling(request.seed, max_tokens=self.max_new_tokens,
                      temperature=self.temperature, top_p=self.top_p)
            for request in requests
        ]

    @staticmethod
    def _texts(outputs: Sequence, requests: Sequence) -> list[str]:
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        return [output.outputs[0].text for output in outputs]

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (the step's process goes on)."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del engine, core
        gc.collect()
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMInstructor(_VLLMBackend):
    """LLM step: the rendered instruction prompt as one user turn, as token ids."""

    api = "LLM.generate (prompt token ids)"

    def encode(self, request: InstructionRequest) -> list[int]:
        """The ids the engine gets: the chat template's special tokens as such, the prompt
        (which carries the description) as text even where it spells ``</s>``."""
        return chat_prompt_ids(self.engine.get_tokenizer(), self.render_prompt(request))

    def instruct(self, requests: Sequence[InstructionRequest]) -> list[str]:
        if not requests:
            return []
        prompts = [{"prompt_token_ids": self.encode(request)} for request in requests]
        outputs = self.engine.generate(prompts, sampling_params=self._params(requests),
                                       use_tqdm=False)
        return self._texts(outputs, requests)


class VLLMDescriber(_VLLMBackend):
    """MLLM step: the query image, the target image, then the prompt, in one user turn."""

    images_per_prompt = IMAGES_PER_PROMPT
    api = "LLM.chat"

    def _pictures(self, request: DescriptionRequest) -> list:
        pair = request.pair
        return [
            fit_within(open_image(data, pair.pair_id, role).convert("RGB"), self.image_max_side)
            for data, role in ((pair.query_jpeg, "query"), (pair.target_jpeg, "target"))
        ]

    def _content(self, request: DescriptionRequest, images) -> list[dict]:
        return [
            *({"type": "image_pil", "image_pil": image} for image in images),
            {"type": "text", "text": self.render_prompt(request)},
        ]

    def describe(self, requests: Sequence[DescriptionRequest]) -> list[str]:
        # PIL's decoder and resampler release the GIL: threads decode in parallel. A bad image
        # raises here, naming its pair, before anything reaches the engine.
        with ThreadPoolExecutor(max_workers=min(self.image_workers, max(len(requests), 1))) as pool:
            images = list(pool.map(self._pictures, requests))
        if not requests:
            return []
        conversations = [
            [{"role": "user", "content": self._content(request, pictures)}]
            for request, pictures in zip(requests, images)
        ]
        outputs = self.engine.chat(conversations, sampling_params=self._params(requests),
                                   use_tqdm=False)
        return self._texts(outputs, requests)
