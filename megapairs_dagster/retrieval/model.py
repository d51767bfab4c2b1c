"""MMRet-CLIP: an open_clip CLIP whose composed query is image + instruction.

MegaPairs fuses a composed query by summing the projected image embedding and the projected
text embedding and L2-normalising the sum; a candidate image is its normalised image
embedding. A model starts from an open_clip (model name, pretrained) pair
(``from_open_clip``, read like the view encoders' CLIP) or from a checkpoint directory
(``from_pretrained``): an open_clip ``local-dir`` (so ``load_clip`` and
``open_clip.create_model('local-dir:…')`` also open it) whose config carries an ``mmret``
section.
"""

from __future__ import annotations

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

from megapairs_dagster.synthesis.encoders import (
    CLIP_CONFIG_FILE,
    CLIP_WEIGHTS_FILE,
    LoadedClip,
    RecordedFiles,
    load_open_clip,
    resolve_device,
)

# The paper's MMRet-CLIP starting points, as (open_clip model name, pretrained tag) for
# ``MMRetCLIP.from_open_clip(*VARIANTS["base"])``; the weights come through the hub cache.
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
    def from_open_clip(
        cls,
        model_name: str,
        pretrained: str | None,
        *,
        cache_dir: str | None = None,
        device: str | torch.device = "cpu",
        expected_files: RecordedFiles | None = None,
    ) -> MMRetCLIP:
        """Start from an open_clip model, read exactly as the view encoders read theirs.

        ``model_name``: an open_clip name, a directory or ``local-dir:<dir>`` (open_clip's hub
        layout or a saved checkpoint), or ``hf-hub:<org/repo>``; ``pretrained``: a tag, a
        weights file, a directory, or None (random weights unless the directory has some).
        See ``resolve_clip_source``. The files loaded are hashed into ``mmret["base_files"]``
        and, with ``expected_files``, must match those hashes.
        """
        loaded = load_open_clip(
            model_name, pretrained, device=resolve_device(device), cache_dir=cache_dir,
            expected_files=expected_files,
        )
        base = {"base_model": model_name, "base_pretrained": pretrained, "base_files": loaded.files}
        return cls._from_loaded(loaded, model_name, base)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu") -> MMRetCLIP:
        """Open a ``save_pretrained`` checkpoint, or an open_clip hub-layout directory.

        An open_clip model name or tag is not a checkpoint: ``from_open_clip`` starts from one.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"{path} is not a directory; MMRetCLIP.from_pretrained opens a directory written "
                f"by save_pretrained or an open_clip hub-layout directory (start from an open_clip "
                f"name or tag with MMRetCLIP.from_open_clip(model_name, pretrained))"
            )
        loaded = load_open_clip(str(directory), str(directory), device=resolve_device(device))
        config = json.loads(loaded.source.config.read_text())
        model_name = config.get("model_name", str(directory))  # hub layouts have none
        return cls._from_loaded(loaded, model_name, config.get("mmret"))

    @classmethod
    def _from_loaded(cls, loaded: LoadedClip, model_name: str, mmret: dict | None) -> MMRetCLIP:
        return cls(
            loaded.model,
            model_name=model_name,
            model_cfg=loaded.source.model_cfg,
            preprocess=loaded.preprocess,
            tokenizer=loaded.tokenizer,
            mmret=mmret,
        )
