"""Tiny checkpoints in the formats of the paper profile's models, built offline.

The paper profile reads EVA-CLIP through open_clip, DINOv2 through ``transformers`` and the
two generators (InternVL2, Llama-3) through ``transformers`` or vLLM. The hub is unreachable
here, so these builders write random-weight models of the same kinds, laid out as a user's
downloads would be, for a rehearsal of the paper profile:

- ``save_tiny_eva_clip``: open_clip's EVA02 config shape (a timm ``eva02_*`` vision tower, no
  extra projection, a custom text tower) with timm's smallest EVA02 (``eva02_tiny_patch14_224``:
  timm names fix the tower's size, so it cannot be smaller) and a 1-layer, width-32 text tower.
  Written twice: as open_clip's hub layout (``open_clip_config.json`` +
  ``open_clip_model.safetensors``) and as a single weights file next to an
  architecture-only directory. A custom architecture is named as ``local-dir:<directory>``,
  which open_clip itself understands; ``load_clip`` and ``MMRetCLIP.from_open_clip`` take the
  returned (model name, pretrained) pairs as they are.
- ``save_tiny_dino``: a small ``Dinov2Config`` model saved with ``save_pretrained`` (the
  demo's builder: the same format as ``facebook/dinov2-*``), for ``load_dino``.
- ``save_tiny_llm`` / ``save_tiny_llava`` (from ``tiny_hf_models``): a Llama and a LLaVA
  directory with tokenizers and chat templates, for the ``transformers`` generation backend.

Import as ``from tiny_paper_models import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from tiny_hf_models import save_tiny_llava, save_tiny_llm

from megapairs_dagster.synthesis.encoders import CLIP_CONFIG_FILE, build_demo_dino

__all__ = ["TinyClip", "save_tiny_dino", "save_tiny_eva_clip", "save_tiny_llava", "save_tiny_llm"]

HUB_WEIGHTS_FILE = "open_clip_model.safetensors"
TINY_EVA_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 224,
        "timm_model_name": "eva02_tiny_patch14_224",
        "timm_model_pretrained": False,
        "timm_pool": "token",
        "timm_proj": None,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    "custom_text": True,
}
# What open_clip's EVA02 tags use (OpenAI's mean and std, bicubic resize of the short side).
EVA_PREPROCESS = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


@dataclass(frozen=True)
class TinyClip:
    hub_dir: Path  # open_clip's hub layout: config + open_clip_model.safetensors
    architecture_dir: Path  # the config alone: names the architecture of weights_file
    weights_file: Path  # the same weights as one .safetensors file

    @property
    def hub_pair(self) -> tuple[str, str | None]:
        """(model name, pretrained) for config: the hub-layout directory with its own weights."""
        return f"local-dir:{self.hub_dir}", None

    @property
    def file_pair(self) -> tuple[str, str | None]:
        """(model name, pretrained) for config: an architecture and a separate weights file."""
        return f"local-dir:{self.architecture_dir}", str(self.weights_file)


def save_tiny_eva_clip(out_dir: str | Path, seed: int = 0) -> TinyClip:
    """Write a random tiny EVA02-style open_clip CLIP under ``out_dir`` in both layouts."""
    out = Path(out_dir)
    config = json.dumps({"model_cfg": TINY_EVA_CONFIG, "preprocess_cfg": EVA_PREPROCESS}, indent=2)
    hub_dir, architecture_dir = out / "tiny-eva-clip", out / "tiny-eva-clip-architecture"
    for directory in (hub_dir, architecture_dir):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CLIP_CONFIG_FILE).write_text(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{architecture_dir}")
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    weights_file = out / "tiny_eva_clip.safetensors"
    save_file(state, str(hub_dir / HUB_WEIGHTS_FILE))
    save_file(state, str(weights_file))
    return TinyClip(hub_dir, architecture_dir, weights_file)


def save_tiny_dino(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random small DINOv2 (``save_pretrained`` layout); returns the directory."""
    build_demo_dino(out_dir, seed=seed)
    return Path(out_dir)
