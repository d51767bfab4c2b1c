"""Small LLaVA-NeXT (LLaVA-1.6) models built from configs, offline: the demo's MMRet-MLLM base.

No weights can be downloaded where the demo runs, so the base model is random, built with a
fixed seed: a 2-layer CLIP vision tower on 16-pixel tiles, a 2-layer Llama (width 64) and
LLaVA-NeXT's "anyres" image processing with grid pinpoints up to 32x32, so a 32-pixel image
becomes a base tile plus a 2x2 grid (5 tiles), as a 512-pixel image does on the 7B model's
336-pixel tiles. The tokenizer is a byte-level BPE trained in memory (any text encodes).
Only the LoRA adapter trains (``MMRetMLLM``), so such a model shows that the pipeline runs,
not what the paper's 7B model scores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from megapairs_dagster.offline_models import (
    IMAGE,
    PATCH_SIZE,
    byte_level_tokenizer,
    llama_text_config,
)

from .defaults import IMAGE_SIDE
from .mllm import CIR_TASK_INSTRUCTION, candidate_prompt, query_prompt

TILE_SIZE = 16  # the vision tower's input side
GRID_PINPOINTS = [[TILE_SIZE, 2 * TILE_SIZE], [2 * TILE_SIZE, TILE_SIZE], [IMAGE_SIDE, IMAGE_SIDE]]

# What the demo's prompts hold: the prompt format, the task instruction and the demo's words.
_DEMO_CORPUS = [
    query_prompt("make it blue", IMAGE, CIR_TASK_INSTRUCTION), candidate_prompt(None, IMAGE),
    ("a red green blue yellow purple orange white black gray brown circle square triangle star "
     "on a background; change the colour, the shape, the size, the position; same but different"),
]


def llava_next_parts(
    tokenizer: PreTrainedTokenizerFast,
    *,
    vision: CLIPVisionConfig,
    text: PretrainedConfig,
    grid_pinpoints: list[list[int]],
    vision_feature_layer: int = -1,
) -> tuple[LlavaNextConfig, LlavaNextProcessor]:
    """The config and processor of a LLaVA-NeXT around ``tokenizer`` (its ``<image>`` token is
    the image token): "anyres" tiles of the vision tower's input side, arranged by
    ``grid_pinpoints``, as llava-hf's checkpoints set them up."""
    tile = vision.image_size
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=grid_pinpoints,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": tile},
            crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=grid_pinpoints,
        ),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, as llava-hf's processors say
    )
    return config, processor


def save_small_llava_next(
    directory: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> Path:
    """Save the random model and its processor (around ``tokenizer``) to ``directory``."""
    directory = Path(directory)
    vision = CLIPVisionConfig(
        image_size=TILE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2,
    )
    config, processor = llava_next_parts(
        tokenizer, vision=vision, text=llama_text_config(tokenizer),
        grid_pinpoints=GRID_PINPOINTS,
    )
    torch.manual_seed(seed)
    LlavaNextForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_demo_llava_next(directory: str | Path, seed: int = 0) -> Path:
    """The demo's base model (``defaults.DEMO_BASE``): the same every time it is built."""
    return save_small_llava_next(directory, byte_level_tokenizer(_DEMO_CORPUS * 4), seed)
