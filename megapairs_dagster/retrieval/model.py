"""MMRet-CLIP: an open_clip CLIP whose composed query is image + instruction.

MegaPairs fuses a composed query by summing the projected image embedding and the projected
text embedding and L2-normalising the sum; a candidate image is its normalised image
embedding. The checkpoint directory is an open_clip ``local-dir`` (so ``load_clip`` and
``open_clip.create_model('local-dir:…')`` also open it) whose config carries an ``mmret``
section.
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import fsspec
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from megapairs_dagster.synthesis.encoders import CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE

# The paper's MMRet-CLIP variants: (open_clip model name, pretrained tag).
VARIANTS = {"base": ("ViT-B-16", "openai"), "large": ("ViT-L-14", "openai")}
FUSION = "sum"
DEFAULT_TEMPERATURE = 0.02
ENCODE_BATCH_SIZE = 64

ImageInput = str | os.PathLike | Image.Image
TextInput = str


def _as_list(value):
    """A single input becomes a one-item list; lists and tuples pass through."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _open_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with fsspec.open(str(image), "rb") as handle:
        return Image.open(io.BytesIO(handle.read())).convert("RGB")


class MMRetCLIP(torch.nn.Module):
    """A CLIP retriever for image, text and composed (image + text) queries."""

    def __init__(
        self,
        clip: open_clip.CLIP,
        *,
        model_name: str,
        model_cfg: dict,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        mmret: dict | None = None,
    ):
        super().__init__()
        self.clip = clip
        self.model_name = model_name
        self.model_cfg = model_cfg
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.mmret = {"fusion": FUSION, "temperature": DEFAULT_TEMPERATURE, **(mmret or {})}

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def forward(
        self, pixels: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Projected, unnormalised (image features, text features); the trainer's entry point
        (DistributedDataParallel needs one forward that produces everything)."""
        image = None if pixels is None else self.clip.encode_image(pixels)
        text = None if tokens is None else self.clip.encode_text(tokens)
        return image, text

    @staticmethod
    def fuse(
        image_features: torch.Tensor | None, text_features: torch.Tensor | None
    ) -> torch.Tensor:
        """The retrieval embedding: normalise(image + text) for composed queries, else one."""
        if image_features is None and text_features is None:
            raise ValueError("need image features, text features or both")
        if image_features is None:
            summed = text_features
        elif text_features is None:
            summed = image_features
        else:
            summed = image_features + text_features
        return F.normalize(summed.float(), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def encode(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        text: TextInput | Sequence[TextInput] | None = None,
        *,
        batch_size: int = ENCODE_BATCH_SIZE,
    ) -> torch.Tensor:
        """L2-normalised float32 CPU embeddings [N, D] of images, texts or composed queries.

        Images are paths/URLs or PIL images; with both images and texts, item i is the
        composed query (images[i], text[i]). Inputs are processed ``batch_size`` at a time.
        """
        image_list = None if images is None else _as_list(images)
        text_list = None if text is None else _as_list(text)
        if image_list is None and text_list is None:
            raise ValueError("encode needs images, text or both")
        if image_list is not None and text_list is not None and len(image_list) != len(text_list):
            raise ValueError(
                f"composed queries need as many images as texts, got {len(image_list)} images "
                f"and {len(text_list)} texts"
            )
        count = len(image_list if image_list is not None else text_list)
        was_training = self.training
        self.eval()
        device = self.device
        chunks = []
        try:
            for start in range(0, count, batch_size):
                pixels = tokens = None
                if image_list is not None:
                    batch = image_list[start : start + batch_size]
                    pixels = torch.stack([self.preprocess(_open_image(item)) for item in batch])
                    pixels = pixels.to(device, next(self.clip.visual.parameters()).dtype)
                if text_list is not None:
                    tokens = self.tokenize(text_list[start : start + batch_size]).to(device)
                chunks.append(self.fuse(*self(pixels, tokens)).cpu())
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.model_cfg["embed_dim"])

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the open_clip ``local-dir`` config (with the ``mmret`` section) and weights."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "model_name": self.model_name,
            "model_cfg": self.model_cfg,
            "preprocess_cfg": open_clip.get_model_preprocess_cfg(self.clip),
            "mmret": self.mmret,
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.clip.state_dict().items()}
        save_file(state, str(out / CLIP_WEIGHTS_FILE))
        (out / CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return out

    @classmethod
    def from_pretrained(
        cls,
        dir_or_base: str | Path,
        pretrained: str | None = None,
        *,
        device: str | torch.device = "cpu",
    ) -> MMRetCLIP:
        """Load a ``save_pretrained`` directory, or start from an open_clip model.

        ``dir_or_base`` is a directory, a variant name (``base`` = ViT-B-16, ``large`` =
        ViT-L-14, both from OpenAI's weights) or an open_clip model name; ``pretrained`` is
        then an open_clip tag or a weights file (None: random weights, for tests and demos).
        """
        path = Path(dir_or_base)
        if path.is_dir():
            config = json.loads((path / CLIP_CONFIG_FILE).read_text())
            clip, _, preprocess = open_clip.create_model_and_transforms(
                f"local-dir:{path}", device=device, weights_only=True
            )
            return cls(
                clip,
                model_name=config["model_name"],
                model_cfg=config["model_cfg"],
                preprocess=preprocess,
                tokenizer=open_clip.get_tokenizer(f"local-dir:{path}"),
                mmret=config.get("mmret"),
            )
        model_name = str(dir_or_base)
        if model_name in VARIANTS:
            model_name, default_tag = VARIANTS[model_name]
            pretrained = default_tag if pretrained is None else pretrained
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(
                f"'{dir_or_base}' is neither a saved MMRet directory, a variant "
                f"{sorted(VARIANTS)}, nor an open_clip model name"
            )
        model_cfg = copy.deepcopy(model_cfg)
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
        # OpenAI's weights were trained with QuickGELU; the saved config must say so too.
        if tag_cfg.get("quick_gelu"):
            model_cfg["quick_gelu"] = True
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=pretrained,
                device=device,
                force_quick_gelu=bool(model_cfg.get("quick_gelu")),
                weights_only=True,
            )
        except RuntimeError as error:
            raise RuntimeError(
                f"cannot load open_clip '{model_name}' with pretrained={pretrained!r} "
                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {error}"
            ) from error
        return cls(
            clip,
            model_name=model_name,
            model_cfg=model_cfg,
            preprocess=preprocess,
            tokenizer=open_clip.get_tokenizer(model_name),
            mmret={"base_model": model_name, "base_pretrained": pretrained},
        )
