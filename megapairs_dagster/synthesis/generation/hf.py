"""Hugging Face ``transformers`` backends for both generation steps (MLLM and LLM).

Models come from a local directory written by ``save_pretrained`` or a hub id (read from the
local cache when ``HF_HUB_OFFLINE=1``); the device is checked before any model loads, and
file hashes recorded earlier are checked when given. Prompts are rendered by an injected
callable, so these classes only turn prompts into raw text; parsing and validation live
elsewhere.

Seeding: sampling uses the Gumbel-max trick with one ``torch.Generator`` per request, seeded
with the request's seed. A request's output therefore depends on its prompt and seed only,
not on the batch it shares or its position in it, so retries and re-batching reproduce it.
``temperature == 0`` means greedy decoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from megapairs_dagster.synthesis.encoders import (
    RecordedFiles,
    file_hashes,
    hf_model_dir,
    resolve_device,
)
from megapairs_dagster.synthesis.generation.base import DescriptionRequest, InstructionRequest
from megapairs_dagster.synthesis.generation.chat_tokens import chat_prompt, chat_prompt_ids
from megapairs_dagster.synthesis.generation.images import (
    check_max_side,
    fit_within,
    open_image,
)

# Files that decide a model's output: weights, configs, tokenizer and chat templates.
_HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".model", ".tiktoken", ".txt", ".py")
_SEED_MASK = (1 << 64) - 1  # torch seeds are unsigned 64-bit; any int maps into range


def model_file_hashes(
    directory: Path, *, model: str, expected: RecordedFiles | None = None
) -> dict[str, str]:
    """sha256 of every file in ``directory`` that decides the model's output, by file name;
    with ``expected`` (hashes recorded earlier) a difference raises ModelMismatchError."""
    files = [p for p in directory.iterdir() if p.is_file() and p.name.endswith(_HASHED_SUFFIXES)]
    return file_hashes(files, model=model, expected=expected)


class SeededSampler(LogitsProcessor):
    """Samples every row from its own seeded generator (Gumbel-max), then lets greedy pick.

    ``generate`` runs with ``do_sample=False``; adding Gumbel noise to the tempered,
    top-p-filtered log-probabilities makes the argmax an exact sample from that distribution.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device):
        self._generators = [
            torch.Generator(device=device).manual_seed(seed & _SEED_MASK) for seed in seeds
        ]
        self._warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        for warper in self._warpers:
            scores = warper(input_ids, scores)
        uniform = torch.stack([
            torch.rand(scores.shape[-1], generator=generator, device=scores.device)
            for generator in self._generators
        ])
        return scores - torch.log(-torch.log(uniform))


def check_loadable(
    directory: Path, model: str, auto_class: type, supported: dict[str, str], trust_remote_code: bool
) -> None:
    """Refuse, before anything loads, a model that ``auto_class`` cannot load: one whose
    checkpoint needs remote code (``auto_map`` in its config.json) without an explicit
    ``trust_remote_code: true``, or one of a kind ``auto_class`` does not cover (InternVL2's
    checkpoints register ``AutoModel``, not ``AutoModelForImageTextToText``)."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        return  # hf_model_dir found the directory; from_pretrained will say what is missing
    config = json.loads(config_file.read_text())
    auto_map = config.get("auto_map") or {}
    model_type = config.get("model_type")
    name = auto_class.__name__
    classes = ", ".join(sorted(set(supported.values())))
    if model_type in supported:
        return
    if not auto_map:
        raise ValueError(
            f"generation model {model!r} (model_type {model_type!r}) is not a model {name} "
            f"loads; the transformers backend supports: {classes}. Serve it with the openai "
            "backend (vLLM) instead."
        )
    if not trust_remote_code:
        raise ValueError(
            f"generation model {model!r} needs remote code (its config.json maps "
            f"{sorted(auto_map)} to code in the checkpoint); set generation.trust_remote_code: "
            f"true to run that code, or use a model {name} loads without it: {classes}"
        )
    if name not in auto_map:
        raise ValueError(
            f"generation model {model!r}'s remote code registers {sorted(auto_map)}, not {name}, "
            f"so the transformers backend cannot load it (it supports: {classes}). Serve it "
            "with the openai backend (vLLM) instead."
        )


class _TransformersBackend:
    """Shared loading, batching and seeded generation of both backends."""

    backend_name = "transformers"
    auto_class: type = AutoModelForCausalLM
    supported: dict[str, str] = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def __init__(
        self,
        model_path: str,
        *,
        render_prompt: Callable,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 1.0,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        expected_files: RecordedFiles | None = None,
    ):
        """``render_prompt(request) -> str`` writes the prompt text of one request; ``device``
        is the ``generation.device`` setting; ``expected_files`` are the model's file hashes
        as an earlier run recorded them (its ``identity["file_sha256"]``)."""
        self.render_prompt = render_prompt
        if temperature < 0 or not 0 < top_p <= 1 or batch_size < 1 or max_new_tokens < 1:
            raise ValueError(
                "need temperature >= 0, 0 < top_p <= 1, batch_size >= 1 and max_new_tokens >= 1"
            )
        self.device = resolve_device(device, setting="generation.device")
        directory, _ = hf_model_dir(model_path, what="model", allow_patterns=["config.json"])
        check_loadable(directory, model_path, self.auto_class, self.supported, trust_remote_code)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        # Handed to from_pretrained as is (device_map would need accelerate, not a dependency).
        self.load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype}
        self.tokenizer: Any = None  # set by ``_load``; the processor's tokenizer for an MLLM
        self.model = self._load(model_path).to(self.device).eval()
        # Hashed after loading: from a hub id, only loading brings every file into the cache.
        file_sha256 = model_file_hashes(
            directory, model=f"generation model {model_path!r}", expected=expected_files
        )
        self.identity = {
            "backend": self.backend_name,
            "model": model_path,
            "model_class": type(self.model).__name__,
            "file_sha256": file_sha256,
            "settings": {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "sampling": "greedy" if temperature == 0 else "gumbel-max, one generator per request",
                "batch_size": batch_size,
                "dtype": str(self.model.dtype),
                "device": str(self.device),
                "trust_remote_code": trust_remote_code,
            },
        }

    def _load(self, model_path: str) -> torch.nn.Module:
        """Load the preprocessing side (left-padded) and return the model."""
        raise NotImplementedError

    def _generate(self, inputs: dict[str, torch.Tensor], seeds: Sequence[int]) -> list[str]:
        """Generate for one padded batch and decode only the new tokens of each row."""
        # Pixel values follow the model's dtype; not every vision tower casts them itself.
        inputs = {
            key: value.to(self.device, self.model.dtype) if value.is_floating_point()
            else value.to(self.device)
            for key, value in inputs.items()
        }
        processors = LogitsProcessorList()
        if self.temperature > 0:
            processors.append(SeededSampler(seeds, self.temperature, self.top_p, self.device))
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=processors,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _left_padded(tokenizer: Any) -> Any:
    """Decoder-only batches must be padded on the left so new tokens follow every prompt."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _starts_with_bos(text: str, tokenizer: Any) -> bool:
    """Chat templates often write the bos token themselves; it must not be added twice."""
    return tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)


class TransformersInstructor(_TransformersBackend):
    """LLM step: a local causal LM rewrites each description into instructions."""

    def _load(self, model_path: str) -> torch.nn.Module:
        trust = self.load_kwargs["trust_remote_code"]
        self.tokenizer = _left_padded(
            AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
        )
        return AutoModelForCausalLM.from_pretrained(model_path, **self.load_kwargs)

    def format_prompt(self, request: InstructionRequest) -> str:
        """The exact text the model sees: the chat template's user turn, or the plain prompt."""
        return chat_prompt(self.tokenizer, self.render_prompt(request))

    def encode(self, request: InstructionRequest) -> list[int]:
        """The ids the model gets: the template's special tokens as such, while the prompt
        (which carries the description) stays text even where it spells ``</s>``."""
        return chat_prompt_ids(self.tokenizer, self.render_prompt(request))

    def instruct(self, requests: Sequence[InstructionRequest]) -> list[str]:
        outputs: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            inputs = self.tokenizer.pad(
                {"input_ids": [self.encode(request) for request in batch]}, padding=True,
                return_tensors="pt",
            )
            outputs += self._generate(inputs, [request.seed for request in batch])
        return outputs


class TransformersDescriber(_TransformersBackend):
    """MLLM step: a local vision-language model describes each (query, target) image pair.

    Loaded through ``AutoModelForImageTextToText`` and ``AutoProcessor`` (LLaVA, and other
    families whose processors accept two images per chat turn). The query image comes first.
    Its prompt is the project's own text with no caption in it, so the processor may read
    special tokens in it (the image placeholders are such tokens).
    """

    processor: Any = None
    auto_class = AutoModelForImageTextToText
    supported = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    def __init__(self, model_path: str, *, image_max_side: int | None = None, **options: Any):
        """``image_max_side``: images are scaled down to it first, as every describer does."""
        self.image_max_side = check_max_side(image_max_side)
        super().__init__(model_path, **options)
        self.identity["settings"]["image_max_side"] = image_max_side

    def _load(self, model_path: str) -> torch.nn.Module:
        trust = self.load_kwargs["trust_remote_code"]
        self.processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust)
        self.tokenizer = _left_padded(self.processor.tokenizer)
        return AutoModelForImageTextToText.from_pretrained(model_path, **self.load_kwargs)

    def format_prompt(self, request: DescriptionRequest) -> str:
        """The exact text the model sees, with two image placeholders (query, then target)."""
        prompt = self.render_prompt(request)
        if self.processor.chat_template is None:
            image = self.processor.image_token
            return f"{image}\n{image}\n{prompt}"
        content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def describe(self, requests: Sequence[DescriptionRequest]) -> list[str]:
        # Decode everything once up front so a bad image fails before any generation, but
        # keep only one batch of decoded images in memory (a shard can hold many pairs).
        for request in requests:
            self._pair_images(request)
        outputs: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            texts = [self.format_prompt(request) for request in batch]
            inputs = self.processor(
                text=texts, images=[self._pair_images(request) for request in batch], padding=True,
                return_tensors="pt",
                add_special_tokens=not _starts_with_bos(texts[0], self.tokenizer),
            )
            outputs += self._generate(inputs, [request.seed for request in batch])
        return outputs


    def _pair_images(self, request: DescriptionRequest) -> list[Image.Image]:
        """The query image, then the target image, as the prompt's placeholders expect them."""
        pair = request.pair
        return [
            fit_within(open_image(data, pair.pair_id, role).convert("RGB"), self.image_max_side)
            for data, role in ((pair.query_jpeg, "query"), (pair.target_jpeg, "target"))
        ]
