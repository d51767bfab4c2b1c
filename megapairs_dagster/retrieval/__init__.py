"""Framework-free MMRet retrievers: models, losses, trainer, inference API (no dagster import)."""

from .data import (
    DEFAULT_HARD_NEGATIVES,
    HARD_NEGATIVE_MODES,
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
