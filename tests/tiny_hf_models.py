"""Tiny random Hugging Face models saved to disk, so backends load them like real weights.

The hub is unreachable here, so tests build a byte-level BPE tokenizer, a 2-layer Llama and a
2-layer LLaVA from configs with fixed seeds and ``save_pretrained`` them; the backends under
test then read the directories through their ordinary loading path.

Import as ``from tiny_hf_models import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from megapairs_dagster.offline_models import (
    IMAGE,
    PATCH_SIZE,
    byte_level_tokenizer,
    llama_text_config,
)

IMAGE_SIZE = 32

# Role markers differ from plain prompts so a test can tell the template was applied.
TEXT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VISION_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The query image shows a red bicycle leaning on a brick wall; the target shows it parked",
    "near a river. Both share the same frame colour and basket, but the background differs.",
    "Find the same dog on a beach instead of a snowy park. Show this mug in blue.",
    "[\"Show the same building at night\", \"Find a photo with more people\", \"Make it sunny\"]",
    "Instruction: rewrite the description into retrieval instructions as a JSON list of strings.",
    "<|user|> <|assistant|> <|system|> description: similarities, differences, objects, scenes.",
]


def build_tokenizer(chat_template: str | None = TEXT_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes) trained in memory, with bos/eos/pad/<image>."""
    return byte_level_tokenizer(_CORPUS * 4, chat_template=chat_template)


_text_config = llama_text_config


def save_tiny_llm(directory: Path, *, chat_template: str | None = TEXT_CHAT_TEMPLATE) -> Path:
    """Save a random 2-layer Llama and its tokenizer to ``directory``."""
    tokenizer = build_tokenizer(chat_template)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_text_config(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_llava(directory: Path) -> Path:
    """Save a random LLaVA (2-layer CLIP vision tower, 2-layer Llama) and its processor."""
    tokenizer = build_tokenizer(chat_template=None)
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(directory)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VISION_CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory
