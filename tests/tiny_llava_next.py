"""A tiny random LLaVA-NeXT (LLaVA-1.6) saved to disk, the base model of MMRet-MLLM tests: the
package's small configuration (``retrieval.mllm_configs``) around ``tiny_hf_models``' tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tiny_hf_models import build_tokenizer

from megapairs_dagster.retrieval.mllm_configs import IMAGE_SIDE, save_small_llava_next

__all__ = ["IMAGE_SIDE", "save_tiny_llava_next"]


def save_tiny_llava_next(directory: Path, seed: int = 0) -> Path:
    """Save the random model and its processor to ``directory``."""
    return save_small_llava_next(directory, build_tokenizer(chat_template=None), seed)
