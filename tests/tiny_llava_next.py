"""A tiny random LLaVA-NeXT (LLaVA-1.6) saved to disk, the base model of MMRet-MLLM tests.

Built offline from configs with a fixed seed: a 2-layer CLIP vision tower on 16-pixel tiles,
the 2-layer Llama of ``tiny_hf_models`` as the language model, and LLaVA-NeXT's "anyres"
image processing with grid pinpoints up to 32x32, so a 32-pixel image becomes a base tile
plus a 2x2 grid (5 tiles), as a 512-pixel image does on the 7B model's 336-pixel tiles. The processor pairs
``tiny_hf_models``' offline byte-level tokenizer with an image processor built in code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_hf_models import IMAGE, PATCH_SIZE, _text_config, build_tokenizer
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

TILE_SIZE = 16  # the vision tower's input side
IMAGE_SIDE = 32  # what MMRet-MLLM resizes every image to here (the released model: 512)
GRID_PINPOINTS = [[TILE_SIZE, 2 * TILE_SIZE], [2 * TILE_SIZE, TILE_SIZE], [IMAGE_SIDE, IMAGE_SIDE]]


def save_tiny_llava_next(directory: Path, seed: int = 0) -> Path:
    """Save the random model and its processor to ``directory``."""
    tokenizer = build_tokenizer(chat_template=None)
    vision = CLIPVisionConfig(
        image_size=TILE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2,
    )
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=_text_config(tokenizer).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    LlavaNextForConditionalGeneration(config).save_pretrained(directory)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": TILE_SIZE},
            crop_size={"height": TILE_SIZE, "width": TILE_SIZE},
            image_grid_pinpoints=GRID_PINPOINTS,
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, as llava-hf's processors say
    )
    processor.save_pretrained(directory)
    return directory
