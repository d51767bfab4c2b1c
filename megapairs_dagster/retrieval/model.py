"""MMRet-CLIP: an open_clip CLIP whose composed query is image + instruction.

MegaPairs fuses a composed query by summing the projected image embedding and the projected
text embedding and L2-normalising the sum; a candidate image is its normalised image
embedding. A model starts from an open_clip (model name, pretrained) pair
(``from_open_clip``, read like the view encoders' CLIP) or from a checkpoint directory
(``from_pretrained``). Checkpoints come in two layouts (``LAYOUTS``):

- ``open_clip``: an open_clip ``local-dir`` (so ``load_clip`` and
  ``open_clip.create_model('local-dir:…')`` also open it) whose config carries an ``mmret``
  section;
- ``transformers``: a transformers ``CLIPModel`` directory (``config.json``,
  ``model.safetensors``, processor and tokenizer files), the layout the released MMRet /
  BGE-VL weights come in; ``CLIPModel.from_pretrained`` opens what is saved in it. Its
  weights are mapped onto open_clip's CLIP (``hf_clip``), so the model, its training and its
  ``encode`` are the same whichever layout it came from.
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
    LOCAL_DIR_PREFIX,
    LoadedClip,
    RecordedFiles,
    load_open_clip,
    resolve_device,
)

from . import hf_clip

# The paper's MMRet-CLIP starting points, as (open_clip model name, pretrained tag) for
# ``MMRetCLIP.from_open_clip(*VARIANTS["base"])``; the weights come through the hub cache.
VARIANTS = {"base": ("ViT-B-16", "openai"), "large": ("ViT-L-14", "openai")}
FUSION = "sum"
DEFAULT_TEMPERATURE = 0.02
ENCODE_BATCH_SIZE = 64
# Checkpoint layouts save_pretrained writes and from_pretrained opens.
OPEN_CLIP_LAYOUT, TRANSFORMERS_LAYOUT = "open_clip", "transformers"
LAYOUTS = (OPEN_CLIP_LAYOUT, TRANSFORMERS_LAYOUT)
# config.json key (transformers layout) that keeps the open_clip model name of a checkpoint.
MODEL_NAME_KEY = "open_clip_model_name"

ImageInput = str | os.PathLike | Image.Image
TextInput = str


def _as_list(value):
    """A single input becomes a one-item list; lists and tuples pass through."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _inputs(images, text) -> tuple[list | None, list | None, int]:
    """(images as a list or None, texts as a list or None, item count) of an encoder call;
    with both, item i is the composed query (images[i], text[i])."""
    image_list = None if images is None else _as_list(images)
    text_list = None if text is None else _as_list(text)
    if image_list is None and text_list is None:
        raise ValueError("encode needs images, text or both")
    if image_list is not None and text_list is not None and len(image_list) != len(text_list):
        raise ValueError(
            f"composed queries need as many images as texts, got {len(image_list)} images "
            f"and {len(text_list)} texts"
        )
    return image_list, text_list, len(image_list if image_list is not None else text_list)


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
        image_list, text_list, count = _inputs(images, text)
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

    def save_pretrained(self, out_dir: str | Path, *, layout: str = OPEN_CLIP_LAYOUT) -> Path:
        """Write the checkpoint to ``out_dir`` in ``layout`` and return the directory.

        ``"open_clip"``: open_clip's ``local-dir`` config (with the ``mmret`` section) and
        weights. ``"transformers"``: a ``CLIPModel`` directory (``config.json`` with the
        ``mmret`` section, ``model.safetensors``, CLIP's image processor and tokenizer) that
        ``transformers.CLIPModel`` / ``CLIPProcessor.from_pretrained`` open; only OpenAI's CLIP
        architecture (a ViT and open_clip's text tower) has one. Both layouts name their
        weights ``model.safetensors``, so one directory holds one layout.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        out = Path(out_dir)
        other = hf_clip.CONFIG_FILE if layout == OPEN_CLIP_LAYOUT else CLIP_CONFIG_FILE
        if (out / other).exists():
            raise ValueError(
                f"{out} already holds a checkpoint in another layout ({other}); both layouts "
                f"write model.safetensors, so save each layout to its own directory"
            )
        if layout == TRANSFORMERS_LAYOUT:
            extra = {"mmret": self.mmret, MODEL_NAME_KEY: self.model_name}
            return hf_clip.save_transformers_clip(
                self.clip, self.model_cfg, out, extra_config=extra
            )
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
        See ``resolve_clip_source``. A transformers ``CLIPModel`` directory (released MMRet /
        BGE-VL weights) as ``pretrained``, or as ``model_name`` with no ``pretrained``, is
        opened as ``from_pretrained`` opens it; its config then gives the architecture. The
        files loaded are hashed into ``mmret["base_files"]`` and, with ``expected_files``,
        must match those hashes.
        """
        transformers_dir = _transformers_source(model_name, pretrained)
        if transformers_dir is not None:
            return cls._from_transformers(
                transformers_dir, device=device, expected_files=expected_files,
                base_model=model_name, base_pretrained=pretrained,
            )
        loaded = load_open_clip(
            model_name, pretrained, device=resolve_device(device), cache_dir=cache_dir,
            expected_files=expected_files,
        )
        base = {"base_model": model_name, "base_pretrained": pretrained,
                "base_layout": OPEN_CLIP_LAYOUT, "base_files": loaded.files}
        return cls._from_loaded(loaded, model_name, base)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        expected_files: RecordedFiles | None = None,
    ) -> MMRetCLIP:
        """Open a ``save_pretrained`` checkpoint of either layout, an open_clip hub-layout
        directory, or a transformers ``CLIPModel`` directory (the released MMRet / BGE-VL
        weights: ``config.json``, ``model.safetensors``, processor files).

        A directory with ``open_clip_config.json`` is read as open_clip's; otherwise its
        ``config.json`` must describe a CLIP model. A checkpoint saved here keeps its
        ``mmret`` section; a released one records its files' hashes in ``mmret["base_files"]``
        (with ``expected_files``, they must match). An open_clip model name or tag is not a
        checkpoint: ``from_open_clip`` starts from one.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"{path} is not a directory; MMRetCLIP.from_pretrained opens a directory written "
                f"by save_pretrained, an open_clip hub-layout directory or a transformers "
                f"CLIPModel directory (start from an open_clip name or tag with "
                f"MMRetCLIP.from_open_clip(model_name, pretrained))"
            )
        if hf_clip.is_transformers_dir(directory):
            return cls._from_transformers(
                directory, device=device, expected_files=expected_files,
                base_model=str(directory), base_pretrained=None,
            )
        loaded = load_open_clip(
            str(directory), str(directory), device=resolve_device(device),
            expected_files=expected_files,
        )
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

    @classmethod
    def _from_transformers(
        cls,
        directory: Path,
        *,
        device: str | torch.device,
        expected_files: RecordedFiles | None,
        base_model: str,
        base_pretrained: str | None,
    ) -> MMRetCLIP:
        """A transformers CLIP directory; a checkpoint saved here keeps its own ``mmret``."""
        loaded = hf_clip.load_transformers_clip(
            directory, device=resolve_device(device), expected_files=expected_files
        )
        mmret = loaded.config.get("mmret") or {
            "base_model": base_model, "base_pretrained": base_pretrained,
            "base_layout": TRANSFORMERS_LAYOUT, "base_files": loaded.files,
        }
        return cls(
            loaded.model,
            model_name=loaded.config.get(MODEL_NAME_KEY, str(directory)),
            model_cfg=loaded.model_cfg,
            preprocess=loaded.preprocess,
            tokenizer=loaded.tokenizer,
            mmret=mmret,
        )


def _transformers_source(model_name: str, pretrained: str | None) -> Path | None:
    """The transformers CLIP directory an open_clip (model name, pretrained) pair names, if
    any: ``pretrained`` itself, or ``model_name`` when ``pretrained`` is None."""
    if pretrained is not None:
        candidate = Path(pretrained).expanduser()
    else:
        candidate = Path(model_name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
    return candidate if hf_clip.is_transformers_dir(candidate) else None
