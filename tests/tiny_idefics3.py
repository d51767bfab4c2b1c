"""A tiny random Idefics3 (the SmolVLM family) saved to disk: a multimodal model that both
the transformers backend and vLLM's CPU build run (vLLM's LLaVA, Qwen2-VL and InternVL
modules need torchvision, which .venv-vllm lacks; its Idefics3 module does not).

Built offline from configs with a fixed seed: a 2-layer SigLIP-style vision encoder on
32-pixel images, a pixel-shuffle connector (4 tokens per image) and a 2-layer Llama with
head size 32 (vLLM's CPU attention has no kernel for 16). Image splitting is off, so each
image becomes one global tile; its processor and tokenizer come from tiny_hf_models'
byte-level tokenizer with Idefics3's image tokens added.

Imported by test_generation_vllm_mllm.py and its worker (tests/vllm_mllm_worker.py, which
runs in .venv-vllm), so it uses only what both environments' transformers provide.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from tiny_hf_models import build_tokenizer
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
)

from megapairs_dagster.synthesis.generation.base import DescriptionRequest, PairInput

IMAGE_SIZE = 32  # the vision encoder's input side, and the processor's
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # <image> tokens per image
MAX_MODEL_LEN = 1024  # the v1 description prompt with its two images: under 500 tokens
NEW_TOKENS = 24
IMAGE_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]

# SmolVLM's template, shortened: one user turn whose image parts become <image>, each turn
# closed by <end_of_utterance>. It writes the bos token itself, as vLLM's chat expects.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def save_tiny_idefics3(directory: Path) -> Path:
    """Save the random model and its processor to ``directory``. The saved image processor
    names no backend: each environment's transformers picks torchvision or PIL on loading."""
    tokenizer = build_tokenizer(chat_template=None)
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(
            do_image_splitting=False,
            size={"longest_edge": IMAGE_SIZE},
            max_image_size={"longest_edge": IMAGE_SIZE},
        ),
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer = processor.tokenizer
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_MODEL_LEN,
        # A wide initialisation gives peaked logits, so float noise cannot flip a greedy pick.
        initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = Idefics3VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, initializer_range=0.3,
    )
    config = Idefics3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def description_requests(count: int, *, native: bool = False) -> list[DescriptionRequest]:
    """Pairs of distinct noise images: of sides the processor resizes (Lanczos), or with
    ``native`` of the model's own side, which it leaves as they are."""
    from fixtures_images import noise_jpeg

    def sides(i: int) -> tuple[tuple[int, int], tuple[int, int]]:
        if native:
            return (IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE)
        return (48 + 8 * i, 40), (40, 56)

    return [
        DescriptionRequest(
            PairInput(f"{i}-{i + 50}", noise_jpeg(sides(i)[0], seed=2 * i + 100 * native),
                      noise_jpeg(sides(i)[1], seed=2 * i + 1 + 100 * native), "noise", "noise"),
            60 + 5 * i, seed=i,
        )
        for i in range(count)
    ]


def swapped(requests: list[DescriptionRequest]) -> list[DescriptionRequest]:
    """The same requests with the query and the target image exchanged."""
    return [
        replace(request, pair=replace(request.pair, query_jpeg=request.pair.target_jpeg,
                                      target_jpeg=request.pair.query_jpeg))
        for request in requests
    ]
