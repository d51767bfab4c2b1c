"""Encoders of the three similarity views, built by name like open_clip's factory.

`load_clip` gives the `clip_image` and `clip_caption` views, `load_dino` the `dino_image`
(visual pattern) view. Every encoder carries an `identity` dict (what was loaded, with file
hashes) so that embeddings can be traced back to the exact weights that produced them.
Small demo models are configs in `model_configs/` (CLIP) or built by `build_demo_dino`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(Protocol):
    identity: dict
    embed_dim: int
    device: torch.device
    # A picklable PIL -> CHW tensor transform; DataLoader workers call it.
    preprocess: Callable[[Image.Image], torch.Tensor]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...


class TextEncoder(Protocol):
    identity: dict
    embed_dim: int
    device: torch.device

    def tokenize(self, texts: list[str]) -> torch.Tensor: ...

    def encode(self, tokens: torch.Tensor) -> torch.Tensor: ...


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' picks CUDA when present; an explicit CUDA request without CUDA fails loudly."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}' requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device '{name}' requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return device


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(paths: list[Path]) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(paths)}


@dataclass
class ClipImageEncoder:
    model: open_clip.CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]
    identity: dict
    embed_dim: int
    device: torch.device
    dtype: torch.dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device, self.dtype, non_blocking=True))


@dataclass
class ClipTextEncoder:
    model: open_clip.CLIP
    tokenizer: Callable[[list[str]], torch.Tensor]
    identity: dict
    embed_dim: int
    device: torch.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device, non_blocking=True))


def _resolve_clip_weights(model_name: str, pretrained: str) -> tuple[str, str, Path]:
    """Return (open_clip model name, source kind, weights file) for a dir, file or tag."""
    path = Path(pretrained)
    if path.is_dir():
        if not (path / CLIP_CONFIG_FILE).is_file() or not (path / CLIP_WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{path} is not a save_clip directory ({CLIP_CONFIG_FILE} + {CLIP_WEIGHTS_FILE})"
            )
        return f"local-dir:{path}", "dir", path / CLIP_WEIGHTS_FILE
    if path.is_file():
        return model_name, "file", path
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        raise ValueError(
            f"'{pretrained}' is neither a local path nor an open_clip tag of '{model_name}' "
            f"(known tags: {open_clip.list_pretrained_tags_by_model(model_name)})"
        )
    try:
        weights = open_clip.download_pretrained(tag_cfg)
    except Exception as error:
        raise RuntimeError(
            f"cannot obtain weights of open_clip model '{model_name}' tag '{pretrained}' "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}; not in the local cache "
            f"or the hub is unreachable): {error}"
        ) from error
    return model_name, "tag", Path(weights)


def load_clip(
    model_name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[ClipImageEncoder, ClipTextEncoder]:
    """Load an open_clip model as (image encoder, caption encoder).

    `pretrained` is an open_clip tag (downloaded through the hub), a local weights file,
    a directory written by `save_clip`, or None for random weights (shapes only).
    """
    torch_device = resolve_device(device)
    if pretrained is None:
        source, files, factory_name = "random", {}, model_name
        factory_pretrained = None
    else:
        factory_name, source, weights = _resolve_clip_weights(model_name, pretrained)
        hashed = [weights] + ([weights.parent / CLIP_CONFIG_FILE] if source == "dir" else [])
        files = _hash_files(hashed)
        factory_pretrained = None if source == "dir" else str(pretrained)
    model, _, preprocess = open_clip.create_model_and_transforms(
        factory_name, pretrained=factory_pretrained, device=torch_device, weights_only=True
    )
    model = model.to(dtype=dtype).eval()
    embed_dim = int(open_clip.get_model_config(factory_name)["embed_dim"])
    base = {
        "kind": "open_clip",
        "model_name": model_name,
        "pretrained": pretrained,
        "source": source,
        "files": files,
        "embed_dim": embed_dim,
        "dtype": str(dtype).removeprefix("torch."),
    }
    image = ClipImageEncoder(
        model=model,
        preprocess=preprocess,
        identity={**base, "tower": "image", "image_size": model.visual.image_size},
        embed_dim=embed_dim,
        device=torch_device,
        dtype=dtype,
    )
    text = ClipTextEncoder(
        model=model,
        tokenizer=open_clip.get_tokenizer(factory_name),
        identity={**base, "tower": "text"},
        embed_dim=embed_dim,
        device=torch_device,
    )
    return image, text


def save_clip(model: open_clip.CLIP, model_name: str, out_dir: str | Path) -> dict:
    """Write an open_clip `local-dir` checkpoint (config json + safetensors) and its identity."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model config '{model_name}'")
    config = {
        "model_name": model_name,
        "model_cfg": model_cfg,
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
    }
    (out / CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(out / CLIP_WEIGHTS_FILE))
    return {
        "kind": "open_clip",
        "model_name": model_name,
        "pretrained": str(out),
        "source": "dir",
        "files": _hash_files([out / CLIP_CONFIG_FILE, out / CLIP_WEIGHTS_FILE]),
        "embed_dim": int(model_cfg["embed_dim"]),
    }


@dataclass(frozen=True)
class NeutralizeBackground:
    """Paint the background a constant colour so the visual-pattern view ignores it.

    Without this, unrelated scenes that share a background crowd out the variants of one
    scene among each image's near neighbours. The background colour is fitted as a plane
    (per channel, over x and y) to the outer `border` pixels, which follows gentle gradients;
    border pixels far from the border median (objects touching the edge) are left out of the
    fit. Pixels within `tolerance` (RGB Euclidean distance, 0-255) of it become `fill`.
    """

    tolerance: float = 40.0
    border: int = 3
    fill: tuple[int, int, int] = tuple(round(255 * m) for m in IMAGENET_MEAN)

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        background = self._fit_background(rgb)
        is_background = np.linalg.norm(rgb - background, axis=-1) < self.tolerance
        rgb = rgb.copy()
        rgb[is_background] = self.fill
        return Image.fromarray(rgb.astype(np.uint8))

    def _fit_background(self, rgb: np.ndarray) -> np.ndarray:
        height, width, _ = rgb.shape
        ys, xs = np.mgrid[0:height, 0:width]
        edge = min(self.border, height // 2, width // 2)
        on_border = np.zeros((height, width), dtype=bool)
        on_border[:edge], on_border[-edge:], on_border[:, :edge], on_border[:, -edge:] = (
            True, True, True, True,
        )
        colours = rgb[on_border]
        median = np.median(colours, axis=0)
        keep = np.linalg.norm(colours - median, axis=-1) < 2 * self.tolerance
        if keep.sum() < 3:
            return median
        design = np.stack(
            [np.ones(on_border.sum()), xs[on_border] / width, ys[on_border] / height], axis=1
        )
        coefficients, *_ = np.linalg.lstsq(design[keep], colours[keep], rcond=None)
        grid = np.stack([np.ones_like(xs), xs / width, ys / height], axis=-1).astype(np.float32)
        return grid @ coefficients.astype(np.float32)


@dataclass
class DinoImageEncoder:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    identity: dict
    embed_dim: int
    device: torch.device
    dtype: torch.dtype
    pooling: str

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(
            pixel_values=pixels.to(self.device, self.dtype, non_blocking=True)
        ).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1)


DINO_POOLINGS = ("cls", "cls+mean")


def _local_hf_dir(name_or_path: str, trust_remote_code: bool) -> tuple[Path, str]:
    """A local directory holding the model: the path itself, or the hub snapshot."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path), "dir"
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"] + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns)), "hub"
    except Exception as error:
        raise RuntimeError(
            f"cannot obtain DINOv2 model '{name_or_path}': not a local directory, not in the "
            f"hub cache, or the hub is unreachable "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {error}"
        ) from error


def load_dino(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    foreground_only: bool = False,
    background_tolerance: float = 40.0,
    image_size: int = 224,
    pooling: str = "cls",
    trust_remote_code: bool = False,
) -> DinoImageEncoder:
    """Load a DINOv2 image encoder (hub id or `save_pretrained` directory).

    `pooling="cls"` is DINOv2's global descriptor; "cls+mean" appends the mean patch
    token (what DINOv2's own linear probes use), which keeps more layout information in
    weak or untrained models. `foreground_only` neutralises the background first.
    """
    from transformers import AutoModel

    if pooling not in DINO_POOLINGS:
        raise ValueError(f"pooling must be one of {DINO_POOLINGS}, got '{pooling}'")
    torch_device = resolve_device(device)
    local_dir, source = _local_hf_dir(name_or_path, trust_remote_code)
    model = AutoModel.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    model = model.to(device=torch_device, dtype=dtype).eval()
    steps: list = [NeutralizeBackground(tolerance=background_tolerance)] if foreground_only else []
    steps += [
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    hidden = int(model.config.hidden_size)
    embed_dim = hidden if pooling == "cls" else 2 * hidden
    files = [p for p in local_dir.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors"}]
    identity = {
        "kind": "dinov2",
        "name": name_or_path,
        "source": source,
        "files": _hash_files(files),
        "embed_dim": embed_dim,
        "image_size": image_size,
        "pooling": pooling,
        "foreground_only": foreground_only,
        "background_tolerance": background_tolerance if foreground_only else None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return DinoImageEncoder(
        model=model,
        preprocess=transforms.Compose(steps),
        identity=identity,
        embed_dim=embed_dim,
        device=torch_device,
        dtype=dtype,
        pooling=pooling,
    )


DEMO_DINO_IMAGE_SIZE = 112


def build_demo_dino(out_dir: str | Path, seed: int = 0) -> dict:
    """Save a small random-weight DINOv2 for the offline demo; returns its identity."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=4,
        patch_size=8,
        image_size=DEMO_DINO_IMAGE_SIZE,
    )
    out = Path(out_dir)
    Dinov2Model(config).save_pretrained(out)
    files = [p for p in out.iterdir() if p.is_file()]
    return {
        "kind": "dinov2",
        "name": str(out),
        "source": "dir",
        "files": _hash_files(files),
        "hidden_size": config.hidden_size,
        "image_size": DEMO_DINO_IMAGE_SIZE,
        "seed": seed,
    }
