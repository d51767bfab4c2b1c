"""Encoders of the three similarity views, built by name like open_clip's factory.

`load_clip` gives the `clip_image` and `clip_caption` views, `load_dino` the `dino_image`
(visual pattern) view. Every encoder carries an `identity` dict (what was loaded, with file
hashes) so that embeddings can be traced back to the exact weights that produced them, and
a loader given the hashes recorded earlier refuses files that no longer match them.
Small demo models are configs in `model_configs/` (CLIP) or built by `build_demo_dino`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from megapairs_dagster.synthesis.demo_models import DEMO_DINO_IMAGE_SIZE

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "model.safetensors"
# The weights files a CLIP directory may hold, in the order open_clip prefers them when it
# opens a `local-dir:` (the hub layout's names first; `save_clip` writes CLIP_WEIGHTS_FILE).
# Only these names are accepted, so the file hashed here is the file open_clip loads.
CLIP_DIR_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    CLIP_WEIGHTS_FILE,
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
# compute.dtype's names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


def resolve_device(name: str | torch.device, *, setting: str = "device") -> torch.device:
    """'auto' picks CUDA when present; a device this process cannot use fails at once.

    ``setting`` is the configuration key the value came from (e.g. "generation.device"), so
    the message says what to change instead of torch failing deep inside a model load.
    """
    value = str(name)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise ValueError(
            f"{setting} is {value!r}, which is not a device; use auto, cpu, cuda or cuda:N"
        ) from error
    if device.type == "cuda":
        fix = f"set {setting} to cpu or auto (in the deployment config)"
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"{setting} is {value!r} but this process sees no CUDA device; {fix}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"{setting} is {value!r} but this process sees only "
                f"{torch.cuda.device_count()} CUDA device(s); {fix}"
            )
    return device


class ModelMismatchError(ValueError):
    """A model file differs from the one whose sha256 was recorded when the model was pinned."""

    def __init__(
        self, model: str, file: str, recorded: str | None, found: str | None, recorded_by: str
    ):
        self.model, self.file, self.recorded, self.found = model, file, recorded, found
        self.recorded_by = recorded_by
        if found is None:
            change = f"{file} is missing, but {recorded_by} recorded it with sha256 {recorded}"
        elif recorded is None:
            change = f"{file} (sha256 {found}) is not among the files {recorded_by} recorded"
        else:
            change = f"{file} has sha256 {found}, but {recorded_by} recorded {recorded}"
        super().__init__(
            f"{model}: {change}. The model changed since {recorded_by} pinned it; if the "
            f"change is intended, rematerialise {recorded_by} (and what depends on it), "
            f"otherwise restore the recorded files."
        )

    def __reduce__(self):  # picklable across processes despite the custom signature
        return type(self), (self.model, self.file, self.recorded, self.found, self.recorded_by)


@dataclass(frozen=True)
class RecordedFiles:
    """sha256 by file name as recorded when a model was pinned, and who recorded them."""

    sha256: Mapping[str, str]
    recorded_by: str  # the asset to rematerialise when a change is intended, e.g. base_encoders


def sha256_file(path: str | Path) -> str:
    """The file's sha256, computed once per process per (path, inode, size, mtime)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256_cached(str(resolved), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256_cached(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(
    paths: Iterable[Path], *, model: str = "", expected: RecordedFiles | None = None
) -> dict[str, str]:
    """sha256 of each file by file name; with ``expected``, any difference from the recorded
    hashes (changed, missing or extra file) raises ModelMismatchError naming ``model``."""
    by_name = {path.name: path for path in sorted(paths)}
    hashes = {name: sha256_file(path) for name, path in by_name.items()}
    if expected is not None:
        unrecorded = sorted(set(hashes) - set(expected.sha256))
        for name in [*sorted(expected.sha256), *unrecorded]:
            recorded, found = expected.sha256.get(name), hashes.get(name)
            if recorded != found:
                file = str(by_name[name]) if name in by_name else name
                raise ModelMismatchError(model, file, recorded, found, expected.recorded_by)
    return hashes


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


@dataclass(frozen=True)
class ClipSource:
    """Where a CLIP's architecture and weights come from, resolved before anything loads."""

    architecture: str  # what open_clip's factory gets: a model name or 'local-dir:<dir>'
    model_cfg: dict  # the architecture; quick_gelu is set when the weights need it
    kind: str  # "random", "tag", "file" or "dir"
    weights: Path | None = None  # the weights file that is loaded
    config: Path | None = None  # a directory's open_clip_config.json
    tag: str | None = None

    @property
    def files(self) -> list[Path]:
        """The files that decide the model's output (weights, and a directory's config)."""
        return [path for path in (self.weights, self.config) if path is not None]


def _offline_note() -> str:
    return f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}"


def _directory_source(directory: Path, *, need_weights: bool) -> ClipSource:
    """An open_clip directory: its config gives the architecture, its weights (if any) load."""
    config = directory / CLIP_CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(
            f"{directory} is not an open_clip directory: it has no {CLIP_CONFIG_FILE}"
        )
    settings = json.loads(config.read_text())
    if "model_cfg" not in settings:
        raise ValueError(f"{config} has no model_cfg section")
    weights = next((directory / n for n in CLIP_DIR_WEIGHTS if (directory / n).is_file()), None)
    others = sorted(p.name for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if weights is None and (need_weights or others):
        found = f"found {others}" if others else "found none"
        raise FileNotFoundError(
            f"{directory} holds no CLIP weights under a name open_clip loads "
            f"(one of {list(CLIP_DIR_WEIGHTS)}; {found})"
        )
    return ClipSource(
        f"{LOCAL_DIR_PREFIX}{directory}", settings["model_cfg"],
        "dir" if weights else "random", weights, config,
    )


def _hub_source(repo: str, cache_dir: str | None) -> ClipSource:
    """``hf-hub:<repo>``: an open_clip directory on the hub, fetched into the local cache."""
    from huggingface_hub import hf_hub_download
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        hf_hub_download(repo, CLIP_CONFIG_FILE, cache_dir=cache_dir)
        weights = download_pretrained_from_hf(repo, cache_dir=cache_dir)
    except Exception as error:
        raise RuntimeError(
            f"cannot obtain open_clip model '{HF_HUB_PREFIX}{repo}' ({_offline_note()}; not in "
            f"the local cache or the hub is unreachable): {error}"
        ) from error
    return _directory_source(Path(weights).parent, need_weights=True)


def _architecture(model_name: str, cache_dir: str | None) -> ClipSource:
    """The architecture ``model_name`` names, with a directory's own weights if it has any."""
    if model_name.startswith(HF_HUB_PREFIX):
        return _hub_source(model_name.removeprefix(HF_HUB_PREFIX), cache_dir)
    directory = Path(model_name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
    if model_name.startswith(LOCAL_DIR_PREFIX) or directory.is_dir():
        if not directory.is_dir():
            raise FileNotFoundError(f"open_clip model directory {directory} does not exist")
        return _directory_source(directory, need_weights=False)
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(
            f"'{model_name}' is neither an open_clip model name (open_clip.list_models()), "
            f"a directory or {LOCAL_DIR_PREFIX}<directory> holding {CLIP_CONFIG_FILE}, "
            f"nor {HF_HUB_PREFIX}<org/repo>"
        )
    return ClipSource(model_name, model_cfg, "random")  # open_clip returns a copy


def resolve_clip_source(
    model_name: str, pretrained: str | None, *, cache_dir: str | None = None
) -> ClipSource:
    """Resolve an open_clip (model name, pretrained) pair the one way every loader here does.

    ``model_name``: an open_clip model name, a directory (``local-dir:`` optional) whose
    ``open_clip_config.json`` gives the architecture (open_clip's hub layout, or a directory
    written by ``save_clip`` / ``MMRetCLIP.save_pretrained``), or ``hf-hub:<org/repo>``.
    ``pretrained``: an open_clip tag of the model name (fetched through the hub cache), a
    weights file (.safetensors, .bin, .pt), such a directory (which then also gives the
    architecture), or None: a directory's own weights if it has any, else random weights.
    """
    if pretrained is not None and Path(pretrained).expanduser().is_dir():
        return _directory_source(Path(pretrained).expanduser(), need_weights=True)
    base = _architecture(model_name, cache_dir)
    if pretrained is None:
        return base
    path = Path(pretrained).expanduser()
    if path.is_file():
        return replace(base, kind="file", weights=path)
    if path.is_absolute() or pretrained.startswith((".", "~")) or path.suffix in _WEIGHT_SUFFIXES:
        raise FileNotFoundError(f"pretrained weights {pretrained} do not exist")
    tag_cfg = None if base.config else open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        tags = [] if base.config else open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"'{pretrained}' is neither a local path nor an open_clip tag of '{model_name}' "
            f"(known tags: {tags})"
        )
    try:
        weights = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as error:
        raise RuntimeError(
            f"cannot obtain weights of open_clip model '{model_name}' tag '{pretrained}' "
            f"({_offline_note()}; not in the local cache or the hub is unreachable): {error}"
        ) from error
    # OpenAI's weights were trained with QuickGELU; the architecture must say so too.
    model_cfg = {**base.model_cfg, **({"quick_gelu": True} if tag_cfg.get("quick_gelu") else {})}
    return ClipSource(model_name, model_cfg, "tag", Path(weights), tag=pretrained)


class _RandomWeightsNotice(logging.Filter):
    """Drops open_clip's (root logger) notices that a model got no weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "initialized randomly" not in message and "no CLIP weights found" not in message


@dataclass
class LoadedClip:
    model: open_clip.CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]  # open_clip's eval transform
    tokenizer: Callable[[list[str]], torch.Tensor]
    source: ClipSource
    files: dict[str, str]  # sha256 of source.files by file name


def load_open_clip(
    model_name: str,
    pretrained: str | None,
    *,
    device: torch.device,
    cache_dir: str | None = None,
    expected_files: RecordedFiles | None = None,
) -> LoadedClip:
    """The one way every CLIP here is loaded: resolve the pair (``resolve_clip_source``),
    hash the files (refusing them if they differ from ``expected_files``), then build.

    open_clip loads a tag, a file named with a model name, and a directory's own weights
    itself (the same file ``ClipSource.weights`` names); a separate weights file for a
    directory's architecture is loaded here.
    """
    source = resolve_clip_source(model_name, pretrained, cache_dir=cache_dir)
    files = file_hashes(
        source.files, model=f"open_clip '{model_name}' (pretrained={pretrained!r})",
        expected=expected_files,
    )
    from_directory = source.architecture.startswith(LOCAL_DIR_PREFIX)
    separate_file = from_directory and source.kind == "file"
    factory_pretrained = source.tag or (str(source.weights) if source.kind == "file" else None)
    # Told not to load weights, open_clip warns that the model is random; here they load next.
    notice = _RandomWeightsNotice()
    if separate_file:
        logging.getLogger().addFilter(notice)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            source.architecture,
            pretrained=None if from_directory else factory_pretrained,
            load_weights=not separate_file,
            device=device,
            force_quick_gelu=bool(source.model_cfg.get("quick_gelu")),
            cache_dir=cache_dir,
            weights_only=True,
        )
        if separate_file:
            open_clip.load_checkpoint(model, str(source.weights), weights_only=True)
    except (RuntimeError, KeyError, AssertionError) as error:  # open_clip asserts shapes too
        raise ValueError(
            f"cannot build open_clip '{source.architecture}' with weights {source.weights}: "
            f"{error}"
        ) from error
    finally:
        logging.getLogger().removeFilter(notice)
    tokenizer = open_clip.get_tokenizer(source.architecture, cache_dir=cache_dir)
    return LoadedClip(model, preprocess, tokenizer, source, files)


def load_clip(
    model_name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
    expected_files: RecordedFiles | None = None,
) -> tuple[ClipImageEncoder, ClipTextEncoder]:
    """Load an open_clip model as (image encoder, caption encoder).

    ``model_name`` and ``pretrained`` are read by ``resolve_clip_source``. With
    ``expected_files`` the files are checked against those hashes before the model loads.
    """
    torch_device = resolve_device(device)
    loaded = load_open_clip(
        model_name, pretrained, device=torch_device, cache_dir=cache_dir,
        expected_files=expected_files,
    )
    model = loaded.model.to(dtype=dtype).eval()
    embed_dim = int(loaded.source.model_cfg["embed_dim"])
    base = {
        "kind": "open_clip",
        "model_name": model_name,
        "pretrained": pretrained,
        "source": loaded.source.kind,
        "files": loaded.files,
        "embed_dim": embed_dim,
        "dtype": str(dtype).removeprefix("torch."),
    }
    image = ClipImageEncoder(
        model=model,
        preprocess=loaded.preprocess,
        identity={**base, "tower": "image", "image_size": model.visual.image_size},
        embed_dim=embed_dim,
        device=torch_device,
        dtype=dtype,
    )
    text = ClipTextEncoder(
        model=model,
        tokenizer=loaded.tokenizer,
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
        "files": file_hashes([out / CLIP_CONFIG_FILE, out / CLIP_WEIGHTS_FILE]),
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


def hf_model_dir(name: str, *, what: str, allow_patterns: list[str]) -> tuple[Path, str]:
    """The local directory of a transformers model given as a directory or a hub id, and
    which of the two it was ("dir" or "hub"; a hub model is read from the local cache when
    HF_HUB_OFFLINE=1). Checked before loading so that a wrong name fails at once, naming it.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path, "dir"
    if path.is_file():
        raise NotADirectoryError(
            f"{what} {name!r} is a single file, but a transformers model is a directory "
            f"written by save_pretrained (config.json and weights) or a hub id"
        )
    if path.is_absolute() or name.startswith((".", "~")):
        raise FileNotFoundError(f"{what} directory {name!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns)), "hub"
    except Exception as error:
        raise FileNotFoundError(
            f"{what} {name!r} is neither a local directory nor a hub id available here "
            f"({_offline_note()}; offline, only models in the hub cache load): {error}"
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
    expected_files: RecordedFiles | None = None,
) -> DinoImageEncoder:
    """Load a DINOv2 image encoder (hub id or `save_pretrained` directory).

    `pooling="cls"` is DINOv2's global descriptor; "cls+mean" appends the mean patch
    token (what DINOv2's own linear probes use), which keeps more layout information in
    weak or untrained models. `foreground_only` neutralises the background first. With
    `expected_files` the directory's files are checked against those hashes before loading.
    """
    from transformers import AutoModel

    if pooling not in DINO_POOLINGS:
        raise ValueError(f"pooling must be one of {DINO_POOLINGS}, got '{pooling}'")
    torch_device = resolve_device(device)
    patterns = ["*.json", "*.safetensors"] + (["*.py"] if trust_remote_code else [])
    local_dir, source = hf_model_dir(name_or_path, what="DINOv2 model", allow_patterns=patterns)
    files = file_hashes(
        [p for p in local_dir.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors"}],
        model=f"DINOv2 '{name_or_path}'", expected=expected_files,
    )
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
    identity = {
        "kind": "dinov2",
        "name": name_or_path,
        "source": source,
        "files": files,
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
    return {
        "kind": "dinov2",
        "name": str(out),
        "source": "dir",
        "files": file_hashes(p for p in out.iterdir() if p.is_file()),
        "hidden_size": config.hidden_size,
        "image_size": DEMO_DINO_IMAGE_SIZE,
        "seed": seed,
    }
