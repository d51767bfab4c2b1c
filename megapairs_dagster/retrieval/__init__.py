"""Framework-free MMRet retrievers: models, losses, trainer, inference API (no dagster import).

The names below load with the submodule that defines them, on first use: importing the package
(the code location does, for the training assets' settings) does not import torch, open_clip,
transformers or peft (tests/test_import_cost.py).
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .defaults import DEFAULT_HARD_NEGATIVES, HARD_NEGATIVE_MODES

_SUBMODULE = {
    **dict.fromkeys(
        ["CaptionSet", "ExportedImages", "ImagePixels", "MMRetTrainingSet", "PairExample",
         "nested_subset", "triplets_from_views"], ".data"),
    **dict.fromkeys(["composed_infonce", "training_loss"], ".loss"),
    **dict.fromkeys(["CIR_TASK_INSTRUCTION", "MMRetMLLM"], ".mllm"),
    **dict.fromkeys(["LAYOUTS", "VARIANTS", "MMRetCLIP"], ".model"),
    **dict.fromkeys(["StepProgress", "TrainConfig", "TrainReport", "train_mmret"], ".train"),
}

if TYPE_CHECKING:
    from .data import (
        CaptionSet,
        ExportedImages,
        ImagePixels,
        MMRetTrainingSet,
        PairExample,
        nested_subset,
        triplets_from_views,
    )
    from .loss import composed_infonce, training_loss
    from .mllm import CIR_TASK_INSTRUCTION, MMRetMLLM
    from .model import LAYOUTS, VARIANTS, MMRetCLIP
    from .train import StepProgress, TrainConfig, TrainReport, train_mmret


def __getattr__(name: str):
    submodule = _SUBMODULE.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(submodule, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULE})


__all__ = [
    "CIR_TASK_INSTRUCTION",
    "DEFAULT_HARD_NEGATIVES",
    "HARD_NEGATIVE_MODES",
    "LAYOUTS",
    "VARIANTS",
    "CaptionSet",
    "ExportedImages",
    "ImagePixels",
    "MMRetCLIP",
    "MMRetMLLM",
    "MMRetTrainingSet",
    "PairExample",
    "StepProgress",
    "TrainConfig",
    "TrainReport",
    "composed_infonce",
    "nested_subset",
    "train_mmret",
    "training_loss",
    "triplets_from_views",
]
