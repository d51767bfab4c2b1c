"""transformers ``CLIPModel`` checkpoints in and out of open_clip's ``CLIP``.

The released MMRet-CLIP / BGE-VL weights are plain transformers ``CLIPModel`` directories
(``config.json``, ``model.safetensors``, processor and tokenizer files) of OpenAI's CLIP
architecture. This module maps them onto open_clip's CLIP, which ``MMRetCLIP`` wraps, and back:

- ``open_clip_model_cfg`` / ``clip_config``: a ``CLIPConfig`` as an open_clip ``model_cfg``
  and the reverse; a setting one side cannot express is an error, never dropped.
- ``hf_to_open_clip_state_dict`` / ``open_clip_to_hf_state_dict``: the weights, renamed,
  with each layer's q/k/v projections fused into (or split out of) the attention's
  ``in_proj`` and the two projections transposed; any missing or unexpected key is an error.
- ``preprocess_cfg_from_processor`` / ``image_processor_kwargs``: the image processor's
  resize, crop and normalisation as open_clip's preprocess config and the reverse.
- ``clip_bpe``: OpenAI CLIP's BPE (the vocabulary open_clip ships) as ``CLIPTokenizer``'s
  ``vocab.json`` / ``merges.txt``, written beside saved weights and checked against a
  checkpoint's own tokenizer files when it is loaded.
- ``load_transformers_clip`` / ``save_transformers_clip``: whole directories. Weights are
  read from safetensors only: a pickled ``pytorch_model.bin`` is refused, never unpickled.

Text pooling: transformers pools the text at the first ``eos_token_id``, except for the
legacy ``eos_token_id == 2`` of OpenAI's own configs, where it pools at the highest token id
(``argmax``), as open_clip does. A config's id maps to open_clip's ``pool_type`` accordingly
("argmax" for 2, "eos" with that ``eos_id`` otherwise), so both pool the same position.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import QuickGELU
from safetensors.torch import load_file, save_file

from megapairs_dagster.synthesis.encoders import (
    CLIP_CONFIG_FILE,
    RecordedFiles,
    file_hashes,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image
    from transformers import CLIPConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Older transformers write the image processor to the first, newer ones to the second.
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE = "vocab.json", "merges.txt", "tokenizer.json"
MODEL_TYPE = "clip"
ARCHITECTURE = "CLIPModel"
# transformers' legacy eos_token_id: pool at the highest token id, like open_clip's "argmax".
ARGMAX_EOS_TOKEN_ID = 2
# Buffers older transformers saved beside the weights: position indices (arange), not weights.
POSITION_ID_BUFFERS = (
    "text_model.embeddings.position_ids",
    "vision_model.embeddings.position_ids",
)
OPENAI_MEAN = tuple(open_clip.OPENAI_DATASET_MEAN)
OPENAI_STD = tuple(open_clip.OPENAI_DATASET_STD)
# PIL's resampling filters, as transformers' image processors store them.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_IMAGE_PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPFeatureExtractor")
# open_clip writes its special tokens under other names than CLIPTokenizer; the ids agree.
_SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
CLIP_VOCAB_SIZE = 49408
_LAYER_NORM_EPS = 1e-5  # torch's default, which open_clip's LayerNorm keeps
_DEFAULT_MLP_RATIO = 4.0


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- configuration


def read_clip_config(directory: str | Path) -> dict:
    """``config.json`` of a transformers CLIP directory; anything but a CLIP model is an error."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: it is not a transformers model")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(
            f"{path} describes a transformers model of type {raw.get('model_type')!r} "
            f"(architectures {raw.get('architectures')}); MMRetCLIP opens transformers CLIP "
            f"checkpoints (model_type '{MODEL_TYPE}', {ARCHITECTURE} weights, as MMRet / "
            f"BGE-VL release them) and open_clip directories ({CLIP_CONFIG_FILE})"
        )
    return raw


def is_transformers_dir(path: str | Path) -> bool:
    """A directory in the transformers layout (``config.json``) and not open_clip's (which
    wins where both configs are present, as in open_clip's own hub repositories)."""
    directory = Path(path)
    return (
        directory.is_dir()
        and (directory / CONFIG_FILE).is_file()
        and not (directory / CLIP_CONFIG_FILE).is_file()
    )


def clip_config_from_dict(raw: Mapping) -> CLIPConfig:
    """transformers' ``CLIPConfig`` (its defaults and legacy keys applied) of a config dict."""
    from transformers import CLIPConfig

    return CLIPConfig.from_dict(dict(raw))


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{what} {value} is not square; transformers CLIP needs one size")
        value = value[0]
    return int(value)


def _mlp_ratio(hidden: int, intermediate: int, what: str) -> float:
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:  # open_clip sizes the MLP as int(width * ratio)
        raise ValueError(f"{what}: an MLP of {intermediate} for width {hidden} has no exact ratio")
    return ratio


def _tower_extras(hidden: int, intermediate: int, eps: float, what: str) -> dict:
    extras = {}
    ratio = _mlp_ratio(hidden, intermediate, what)
    if ratio != _DEFAULT_MLP_RATIO:
        extras["mlp_ratio"] = ratio
    if not math.isclose(eps, _LAYER_NORM_EPS, rel_tol=0, abs_tol=1e-12):
        extras["norm_kwargs"] = {"eps": eps}
    return extras


def open_clip_model_cfg(config: CLIPConfig | Mapping) -> dict:
    """The open_clip ``model_cfg`` (embed_dim, vision_cfg, text_cfg, quick_gelu) of a
    transformers CLIP config; for OpenAI's ViT-B/16 it is open_clip's ``ViT-B-16`` with
    quick_gelu."""
    if isinstance(config, Mapping):
        config = clip_config_from_dict(config)
    vision, text = config.vision_config, config.text_config
    acts = {vision.hidden_act, text.hidden_act}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ValueError(
            f"hidden_act vision {vision.hidden_act!r} / text {text.hidden_act!r}: open_clip's "
            f"CLIP uses one activation for both towers, quick_gelu or gelu"
        )
    if getattr(vision, "num_channels", 3) != 3:
        raise ValueError(f"vision num_channels {vision.num_channels}: open_clip's CLIP takes RGB")
    if vision.hidden_size % vision.num_attention_heads:
        raise ValueError("vision hidden_size is not a multiple of num_attention_heads")
    eos = text.eos_token_id
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"text eos_token_id {eos}: CLIP pools at one end-of-text token")
        eos = eos[0]
    if eos is None:
        raise ValueError("text eos_token_id is not set: CLIP pools at the end-of-text token")
    vision_cfg = {
        "image_size": _square(vision.image_size, "vision image_size"),
        "layers": int(vision.num_hidden_layers),
        "width": int(vision.hidden_size),
        "head_width": int(vision.hidden_size // vision.num_attention_heads),
        "patch_size": _square(vision.patch_size, "vision patch_size"),
        **_tower_extras(vision.hidden_size, vision.intermediate_size, vision.layer_norm_eps,
                        "vision"),
    }
    text_cfg = {
        "context_length": int(text.max_position_embeddings),
        "vocab_size": int(text.vocab_size),
        "width": int(text.hidden_size),
        "heads": int(text.num_attention_heads),
        "layers": int(text.num_hidden_layers),
        **_tower_extras(text.hidden_size, text.intermediate_size, text.layer_norm_eps, "text"),
        **({} if eos == ARGMAX_EOS_TOKEN_ID else {"pool_type": "eos", "eos_id": int(eos)}),
    }
    model_cfg = {"embed_dim": int(config.projection_dim), "vision_cfg": vision_cfg,
                 "text_cfg": text_cfg}
    if acts == {"quick_gelu"}:
        model_cfg["quick_gelu"] = True
    return model_cfg


_VISION_FIELDS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size",
                  "norm_kwargs", "patch_dropout", "output_tokens"}
_TEXT_FIELDS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                "norm_kwargs", "pool_type", "eos_id", "pad_id", "output_tokens"}
_MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}


def _unsupported(cfg: Any, default: Any, supported: set[str], prefix: str) -> list[str]:
    return [
        f"{prefix}.{field.name}={getattr(cfg, field.name)!r}"
        for field in fields(cfg)
        if field.name not in supported and getattr(cfg, field.name) != getattr(default, field.name)
    ]


def _eps(cfg: Any, what: str, problems: list[str]) -> float:
    kwargs = dict(cfg.norm_kwargs or {})
    eps = kwargs.pop("eps", _LAYER_NORM_EPS)
    if kwargs:
        problems.append(f"{what}.norm_kwargs={cfg.norm_kwargs!r}")
    return float(eps)


def clip_config(model_cfg: Mapping) -> CLIPConfig:
    """The transformers ``CLIPConfig`` of an open_clip ``model_cfg``: OpenAI's CLIP
    architecture only (a ViT image tower and open_clip's own text tower); any other setting
    is an error naming it."""
    from transformers import CLIPConfig

    problems = [
        f"{key}={value!r}" for key, value in model_cfg.items()
        if key not in _MODEL_KEYS and value not in (None, False)
    ]
    vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
    text = CLIPTextCfg(**model_cfg["text_cfg"])
    problems += _unsupported(vision, CLIPVisionCfg(), _VISION_FIELDS, "vision_cfg")
    problems += _unsupported(text, CLIPTextCfg(), _TEXT_FIELDS, "text_cfg")
    if not isinstance(vision.layers, int):
        problems.append(f"vision_cfg.layers={vision.layers!r} (a ResNet)")
    if vision.width % vision.head_width:
        problems.append(f"vision_cfg.width={vision.width} not a multiple of head_width")
    if text.pool_type == "argmax":
        eos = ARGMAX_EOS_TOKEN_ID
    elif text.pool_type == "eos" and text.eos_id != ARGMAX_EOS_TOKEN_ID:
        eos = text.eos_id
    else:
        eos = None
        problems.append(f"text_cfg.pool_type={text.pool_type!r} (eos_id {text.eos_id})")
    vision_eps, text_eps = _eps(vision, "vision_cfg", problems), _eps(text, "text_cfg", problems)
    if problems:
        raise ValueError(
            f"this open_clip model cannot be written as a transformers CLIPModel: "
            f"{'; '.join(problems)} (supported: OpenAI CLIP's ViT architecture)"
        )
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    embed_dim = int(model_cfg["embed_dim"])
    return CLIPConfig(
        projection_dim=embed_dim,
        vision_config={
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.width // vision.head_width,
            "image_size": _square(vision.image_size, "vision_cfg.image_size"),
            "patch_size": _square(vision.patch_size, "vision_cfg.patch_size"),
            "hidden_act": act,
            "layer_norm_eps": vision_eps,
            "projection_dim": embed_dim,
        },
        text_config={
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": act,
            "layer_norm_eps": text_eps,
            "eos_token_id": eos,
            "projection_dim": embed_dim,
        },
    )


# --------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class _Rule:
    """One open_clip tensor and the transformers tensor(s) it is made of."""

    hf: tuple[str, ...]
    open_clip: str
    kind: str = "copy"  # "copy", "transpose" (a projection) or "qkv" (fused attention input)


_LAYER_RENAMES = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)


def _rules(vision_layers: int, text_layers: int) -> list[_Rule]:
    rules = [
        _Rule(("logit_scale",), "logit_scale"),
        _Rule(("vision_model.embeddings.class_embedding",), "visual.class_embedding"),
        _Rule(("vision_model.embeddings.patch_embedding.weight",), "visual.conv1.weight"),
        _Rule(("vision_model.embeddings.position_embedding.weight",),
              "visual.positional_embedding"),
        _Rule(("visual_projection.weight",), "visual.proj", "transpose"),
        _Rule(("text_model.embeddings.token_embedding.weight",), "token_embedding.weight"),
        _Rule(("text_model.embeddings.position_embedding.weight",), "positional_embedding"),
        _Rule(("text_projection.weight",), "text_projection", "transpose"),
    ]
    for param in ("weight", "bias"):
        rules += [
            _Rule((f"vision_model.pre_layrnorm.{param}",), f"visual.ln_pre.{param}"),
            _Rule((f"vision_model.post_layernorm.{param}",), f"visual.ln_post.{param}"),
            _Rule((f"text_model.final_layer_norm.{param}",), f"ln_final.{param}"),
        ]
    towers = (
        ("vision_model.encoder.layers", "visual.transformer.resblocks", vision_layers),
        ("text_model.encoder.layers", "transformer.resblocks", text_layers),
    )
    for hf_prefix, oc_prefix, layers in towers:
        for index in range(layers):
            hf, oc = f"{hf_prefix}.{index}.", f"{oc_prefix}.{index}."
            for param in ("weight", "bias"):
                qkv = tuple(f"{hf}self_attn.{name}_proj.{param}" for name in "qkv")
                rules.append(_Rule(qkv, f"{oc}attn.in_proj_{param}", "qkv"))
                rules += [
                    _Rule((f"{hf}{hf_name}.{param}",), f"{oc}{oc_name}.{param}")
                    for hf_name, oc_name in _LAYER_RENAMES
                ]
    return rules


def _check_keys(found: Iterable[str], expected: set[str], what: str,
                ignorable: Iterable[str] = ()) -> None:
    found = set(found)
    missing = expected - found
    unexpected = found - expected - set(ignorable)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({_listing(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({_listing(unexpected)})")
        raise ValueError(f"{what}: {'; '.join(parts)}")


def hf_to_open_clip_state_dict(
    state: Mapping[str, torch.Tensor], *, vision_layers: int, text_layers: int,
    what: str = "transformers CLIP weights",
) -> dict[str, torch.Tensor]:
    """open_clip CLIP weights from transformers ``CLIPModel`` weights of the given depths.

    Every key must be used and present: the position-id buffers older transformers saved are
    the only keys passed over (they hold ``arange``, no weights).
    """
    rules = _rules(vision_layers, text_layers)
    _check_keys(
        state, {key for rule in rules for key in rule.hf},
        f"{what} do not match a CLIPModel with {vision_layers} vision and {text_layers} text "
        f"layers", ignorable=POSITION_ID_BUFFERS,
    )
    mapped = {}
    for rule in rules:
        tensors = [state[key] for key in rule.hf]
        if rule.kind == "qkv":
            mapped[rule.open_clip] = torch.cat(tensors, dim=0)
        elif rule.kind == "transpose":
            mapped[rule.open_clip] = tensors[0].t().contiguous()
        else:
            mapped[rule.open_clip] = tensors[0]
    return mapped


def open_clip_to_hf_state_dict(
    state: Mapping[str, torch.Tensor], *, vision_layers: int, text_layers: int,
    what: str = "open_clip CLIP weights",
) -> dict[str, torch.Tensor]:
    """transformers ``CLIPModel`` weights from open_clip CLIP weights (each tensor its own
    contiguous copy, as safetensors needs); every key must be used and present."""
    rules = _rules(vision_layers, text_layers)
    _check_keys(
        state, {rule.open_clip for rule in rules},
        f"{what} do not fit a transformers CLIPModel with {vision_layers} vision and "
        f"{text_layers} text layers",
    )
    mapped = {}
    for rule in rules:
        tensor = state[rule.open_clip].detach()
        if rule.kind == "qkv":
            if tensor.shape[0] % 3:
                raise ValueError(f"{rule.open_clip} of shape {tuple(tensor.shape)} is not q/k/v")
            parts = tensor.chunk(3, dim=0)
        elif rule.kind == "transpose":
            parts = (tensor.t(),)
        else:
            parts = (tensor,)
        for key, part in zip(rule.hf, parts):
            mapped[key] = part.cpu().contiguous().clone()
    return mapped


def _safetensors_files(directory: Path) -> list[Path]:
    """The safetensors weights of a directory: one file or the shards an index names."""
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [name for name in shards if not (directory / name).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are missing: {_listing(absent)}")
        return [index, *(directory / name for name in shards)]
    pickled = [name for name in PICKLED_WEIGHTS if (directory / name).is_file()]
    found = f"it holds only pickled weights ({', '.join(pickled)})" if pickled else "found none"
    raise FileNotFoundError(
        f"{directory} has no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE}): {found}. Weights are read "
        f"from safetensors only, never unpickled; re-save the model with transformers' "
        f"save_pretrained (which writes {WEIGHTS_FILE}) where the pickle is trusted"
    )


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.name.endswith(".json"):
            continue
        tensors = load_file(str(path))
        repeated = set(tensors) & set(state)
        if repeated:
            raise ValueError(f"{path.name} repeats weights of other shards: {_listing(repeated)}")
        state.update(tensors)
    return state


# ----------------------------------------------------------------------- image processing


def _size_dict(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, (int, float)):
        return {key: int(value)}
    return {k: v for k, v in dict(value).items() if v is not None}


def preprocess_cfg_from_processor(processor: Mapping | None, image_size: int) -> dict:
    """open_clip's preprocess config for a transformers CLIP image processor config (None:
    CLIP's defaults at the model's image size). Settings open_clip cannot reproduce (a resize
    other than to the crop size, no normalisation, ...) are an error naming them."""
    proc = dict(processor or {})
    kind = proc.get("image_processor_type", proc.get("feature_extractor_type"))
    if kind is not None and kind not in _IMAGE_PROCESSOR_TYPES:
        raise ValueError(
            f"image processor {kind!r} is not CLIP's (one of {_IMAGE_PROCESSOR_TYPES})"
        )
    size = _size_dict(proc.get("size", image_size), "shortest_edge")
    crop = _size_dict(proc.get("crop_size", image_size), "height")
    if "height" in crop and "width" not in crop:
        crop["width"] = crop["height"]
    square = {"height": image_size, "width": image_size}
    center_crop = proc.get("do_center_crop", True)
    problems = []
    if not proc.get("do_resize", True):
        problems.append("do_resize=False")
    if size == {"shortest_edge": image_size} and center_crop and crop == square:
        resize_mode = "shortest"
    elif size == square and (not center_crop or crop == square):
        resize_mode = "squash"
    else:
        resize_mode = None
        problems.append(f"size={size} crop_size={crop} do_center_crop={center_crop} "
                        f"(the model takes {image_size}x{image_size})")
    interpolation = _RESAMPLE.get(int(proc.get("resample", 3)))
    if interpolation is None:
        problems.append(f"resample={proc.get('resample')} (bilinear 2 or bicubic 3)")
    rescale = float(proc.get("rescale_factor", 1 / 255))
    if not proc.get("do_rescale", True) or not math.isclose(rescale, 1 / 255, rel_tol=1e-6):
        problems.append(f"do_rescale={proc.get('do_rescale', True)} rescale_factor={rescale}")
    if not proc.get("do_normalize", True):
        problems.append("do_normalize=False")
    if problems:
        raise ValueError(
            f"the image processor cannot be reproduced by open_clip's preprocessing: "
            f"{'; '.join(problems)}"
        )
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": tuple(float(x) for x in proc.get("image_mean", OPENAI_MEAN)),
        "std": tuple(float(x) for x in proc.get("image_std", OPENAI_STD)),
        "interpolation": interpolation,
        "resize_mode": resize_mode,
        "fill_color": 0,
    }


def image_processor_kwargs(preprocess_cfg: Mapping) -> dict:
    """``CLIPImageProcessor`` settings that preprocess as open_clip's config does."""
    cfg = PreprocessCfg(**{k: v for k, v in preprocess_cfg.items()
                           if k in {f.name for f in fields(PreprocessCfg)}})
    size = _square(cfg.size, "preprocess size")
    resample = {name: code for code, name in _RESAMPLE.items()}.get(cfg.interpolation)
    if resample is None or cfg.resize_mode not in ("shortest", "squash"):
        raise ValueError(
            f"open_clip preprocessing with interpolation {cfg.interpolation!r} and resize_mode "
            f"{cfg.resize_mode!r} has no CLIPImageProcessor equivalent (bicubic or bilinear; "
            f"shortest or squash)"
        )
    shortest = cfg.resize_mode == "shortest"
    return {
        "do_resize": True,
        "size": {"shortest_edge": size} if shortest else {"height": size, "width": size},
        "resample": resample,
        "do_center_crop": shortest,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in cfg.mean],
        "image_std": [float(x) for x in cfg.std],
        "do_convert_rgb": True,
    }


def _processor_configs(directory: Path) -> dict[Path, dict]:
    """The image processor settings each processor file of a directory holds."""
    found = {}
    legacy, combined = directory / IMAGE_PROCESSOR_FILE, directory / PROCESSOR_FILE
    if legacy.is_file():
        found[legacy] = json.loads(legacy.read_text())
    if combined.is_file():
        section = json.loads(combined.read_text()).get("image_processor")
        if section is not None:
            found[combined] = section
    return found


# ------------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], tuple[str, ...]]:
    """OpenAI CLIP's BPE as ``CLIPTokenizer`` files hold it: (vocab.json, merges.txt lines),
    built from the vocabulary open_clip ships (the one its tokenizer uses)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    vocab = {_SPECIAL_TOKENS.get(token, token): index for token, index in tokenizer.encoder.items()}
    merges = tuple(" ".join(pair) for pair, _ in sorted(tokenizer.bpe_ranks.items(),
                                                        key=lambda item: item[1]))
    return vocab, merges


def _merge_lines(lines: Iterable) -> tuple[str, ...]:
    return tuple(" ".join(line) if isinstance(line, (list, tuple)) else line for line in lines)


def check_tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files of a checkpoint, checked to hold CLIP's BPE (which open_clip's
    tokenizer applies to the model's text); a different vocabulary is an error."""
    vocab, merges = clip_bpe()
    checked = []
    for name in (VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE):
        path = directory / name
        if not path.is_file():
            continue
        if name == VOCAB_FILE:
            same = json.loads(path.read_text()) == vocab
        elif name == MERGES_FILE:
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            same = _merge_lines(line for line in lines if not line.startswith("#version")) == merges
        else:  # the special tokens may be kept as added tokens only
            settings = json.loads(path.read_text())
            model = settings.get("model", {})
            added = {t["content"]: t["id"] for t in settings.get("added_tokens") or ()}
            same = ({**model.get("vocab", {}), **added} == vocab
                    and _merge_lines(model.get("merges", ())) == merges)
        if not same:
            raise ValueError(
                f"{path} is not OpenAI CLIP's BPE vocabulary; MMRetCLIP tokenizes with open_clip's "
                f"CLIP tokenizer, so this checkpoint's text tower would get other token ids"
            )
        checked.append(path)
    return checked


# ------------------------------------------------------------------------------ directories


@dataclass
class TransformersClip:
    """A transformers CLIP directory, opened as open_clip's CLIP."""

    model: open_clip.CLIP
    model_cfg: dict
    preprocess_cfg: dict
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    config: dict  # the raw config.json
    files: dict[str, str]  # sha256 of the files that decide the model's output, by name


def load_transformers_clip(
    directory: str | Path,
    *,
    device: torch.device | str = "cpu",
    expected_files: RecordedFiles | None = None,
) -> TransformersClip:
    """Open a transformers ``CLIPModel`` directory as open_clip's CLIP, with open_clip's
    preprocessing (from the image processor config) and tokenizer (CLIP's BPE).

    The files that decide the output (config, safetensors weights, processor config, tokenizer
    vocabulary) are hashed, and with ``expected_files`` must match those hashes.
    """
    from open_clip.tokenizer import SimpleTokenizer

    directory = Path(directory)
    raw = read_clip_config(directory)
    model_cfg = open_clip_model_cfg(raw)
    if model_cfg["text_cfg"]["vocab_size"] != CLIP_VOCAB_SIZE:
        raise ValueError(
            f"{directory / CONFIG_FILE}: a text vocabulary of {model_cfg['text_cfg']['vocab_size']}"
            f" tokens is not CLIP's BPE ({CLIP_VOCAB_SIZE}), which open_clip's tokenizer applies"
        )
    weights = _safetensors_files(directory)
    processors = _processor_configs(directory)
    image_size = model_cfg["vision_cfg"]["image_size"]
    preprocess_cfgs = {path: preprocess_cfg_from_processor(settings, image_size)
                       for path, settings in processors.items()}
    if len({json.dumps(cfg, sort_keys=True) for cfg in preprocess_cfgs.values()}) > 1:
        raise ValueError(f"{_listing(p.name for p in processors)} disagree on preprocessing")
    preprocess_cfg = next(iter(preprocess_cfgs.values()), None) or preprocess_cfg_from_processor(
        None, image_size
    )
    tokenizer_files = check_tokenizer_files(directory)
    files = file_hashes(
        [directory / CONFIG_FILE, *weights, *processors, *tokenizer_files],
        model=f"transformers CLIP '{directory}'", expected=expected_files,
    )
    state = hf_to_open_clip_state_dict(
        _read_safetensors(weights),
        vision_layers=model_cfg["vision_cfg"]["layers"],
        text_layers=model_cfg["text_cfg"]["layers"],
        what=f"the weights in {directory}",
    )
    model = open_clip.CLIP(**model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # shapes that disagree with config.json
        raise ValueError(
            f"the weights in {directory} do not fit its {CONFIG_FILE}: {error}"
        ) from error
    open_clip.set_model_preprocess_cfg(model, preprocess_cfg)
    return TransformersClip(
        model=model.to(device),
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_cfg,
        preprocess=image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False),
        tokenizer=SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"]),
        config=raw,
        files=files,
    )


def _uses_quick_gelu(clip: torch.nn.Module) -> bool:
    """Whether the model's MLPs apply QuickGELU (else exact GELU); a mix or another
    activation has no CLIPConfig ``hidden_act``."""
    kinds = {
        "quick_gelu" if isinstance(module, QuickGELU) else module.approximate
        for module in clip.modules() if isinstance(module, (QuickGELU, torch.nn.GELU))
    }
    if kinds == {"quick_gelu"} or kinds == {"none"}:
        return kinds == {"quick_gelu"}
    raise ValueError(f"the model's activations {sorted(kinds)} are not one of quick_gelu, gelu")


def save_transformers_clip(
    clip: open_clip.CLIP,
    model_cfg: Mapping,
    out_dir: str | Path,
    *,
    extra_config: Mapping | None = None,
) -> Path:
    """Write open_clip's CLIP as a transformers ``CLIPModel`` directory: ``config.json`` (with
    ``extra_config`` added), ``model.safetensors``, the image processor and CLIP's tokenizer,
    so that ``CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained`` open it."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    # The activation the modules apply decides, whatever the config says.
    config = clip_config({**model_cfg, "quick_gelu": _uses_quick_gelu(clip)})
    state = open_clip_to_hf_state_dict(
        clip.state_dict(),
        vision_layers=config.vision_config.num_hidden_layers,
        text_layers=config.text_config.num_hidden_layers,
    )
    image_processor = CLIPImageProcessor(
        **image_processor_kwargs(open_clip.get_model_preprocess_cfg(clip))
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    with tempfile.TemporaryDirectory() as tmp:  # built apart from out's possibly stale files
        (Path(tmp) / VOCAB_FILE).write_text(vocab_text, encoding="utf-8")
        (Path(tmp) / MERGES_FILE).write_text(merges_text, encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp, model_max_length=config.text_config.max_position_embeddings
        )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    # Newer transformers keep these inside processor_config.json / tokenizer.json; older
    # versions (and slow tokenizers) read them as files.
    image_processor.save_pretrained(out)
    (out / VOCAB_FILE).write_text(vocab_text, encoding="utf-8")
    (out / MERGES_FILE).write_text(merges_text, encoding="utf-8")
    config.architectures = [ARCHITECTURE]
    for key, value in (extra_config or {}).items():  # kept as attributes, written as keys
        setattr(config, key, value)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(out)
    return out
