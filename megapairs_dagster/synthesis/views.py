"""The three similarity views of MegaPairs and how each one's encoder is opened."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# torch and the encoders load when an encoder is opened, not when the views are named: the
# code location imports this module for VIEWS (see tests/test_import_cost.py).
if TYPE_CHECKING:
    from megapairs_dagster.synthesis.encoders import RecordedFiles

VIEWS: dict[str, str] = {
    "clip_image": "CLIP image (visual-semantic)",
    "dino_image": "DINOv2 image (visual pattern)",
    "clip_caption": "CLIP text of the caption (caption similarity)",
}


def open_view_encoder(
    view: str,
    manifest: dict,
    *,
    resolve_stored: Callable[[str], Path],
    device: str = "cpu",
    dtype: str = "float32",
):
    """Open the encoder of ``view`` as pinned in a ``base_encoders`` manifest.

    ``resolve_stored`` turns an artifact-store path (weights the pipeline trained itself) into a
    local directory; hub names and user paths are passed to the loaders unchanged. The files
    must still have the sha256 that ``base_encoders`` recorded (else ModelMismatchError), so
    that every shard is embedded by the same weights; ``device`` is ``compute.device``.
    """
    from megapairs_dagster.synthesis.encoders import DTYPES, load_clip, load_dino, resolve_device

    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {sorted(VIEWS)}")
    torch_device = resolve_device(device, setting="compute.device")
    torch_dtype = DTYPES[dtype]
    if view == "dino_image":
        spec = manifest["dino"]
        source = spec["name_or_path"]
        return load_dino(
            str(resolve_stored(source)) if spec.get("stored") else source,
            device=torch_device,
            dtype=torch_dtype,
            foreground_only=spec.get("foreground_only", False),
            image_size=spec.get("image_size", 224),
            expected_files=_recorded(spec),
        )
    spec = manifest["clip"]
    pretrained = spec.get("pretrained")
    if spec.get("stored"):
        pretrained = str(resolve_stored(pretrained))
    image_encoder, text_encoder = load_clip(
        spec["model_name"], pretrained, device=torch_device, dtype=torch_dtype,
        expected_files=_recorded(spec),
    )
    return text_encoder if view == "clip_caption" else image_encoder


def _recorded(spec: dict) -> RecordedFiles:
    from megapairs_dagster.synthesis.encoders import RecordedFiles

    return RecordedFiles(spec["identity"]["files"], recorded_by="base_encoders")
