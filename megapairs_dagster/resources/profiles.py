"""Deployments: a profile's resources, training runs and executor, chosen in one place.

``demo`` (default) runs offline on a laptop CPU over the procedural demo corpus; ``paper``
uses the MegaPairs paper's encoders and a corpus and store given by environment variables.

A deployment's own settings (models, devices, paths, windows, backends, extra training runs)
go in one YAML file named by ``MEGAPAIRS_CONFIG``. It is merged into the profile when the code
location loads, so every run reads it: runs started by sensors and automation as much
as launched ones (``-c run_config.yaml`` stays for one-off overrides). The executor comes
from ``MEGAPAIRS_EXECUTOR``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from dagster import (
    ConfigurableResource,
    EnvVar,
    ExecutorDefinition,
    in_process_executor,
    multiprocess_executor,
)

from megapairs_dagster.resources.generation_server import GenerationServer
from megapairs_dagster.resources.settings import (
    BenchmarkData,
    Compute,
    CorpusSource,
    Encoders,
    Generation,
    Indexes,
    Mining,
    MLLMTraining,
    Training,
)
from megapairs_dagster.resources.store import ArtifactIOManager, ArtifactStore
from megapairs_dagster.retrieval.defaults import DEMO_BASE, HARD_NEGATIVE_MODES, IMAGE_SIDE
from megapairs_dagster.synthesis.demo_models import DEMO_DINO_IMAGE_SIZE
from megapairs_dagster.synthesis.generation.prompts import PAPER_PROMPT_VERSION
from megapairs_dagster.synthesis.views import VIEWS

PROFILES = ("demo", "paper")
EXECUTORS = ("in_process", "multiprocess", "k8s")
# The demo runs each run's steps in one process: a step subprocess imports the code location
# (~3.5 s on 2 cores) and then what it computes with (torch alone ~3 s, with transformers and
# peft ~9 s), more than many of the demo's steps themselves.
DEFAULT_EXECUTOR = {"demo": "in_process", "paper": "multiprocess"}
CONFIG_ENV = "MEGAPAIRS_CONFIG"

# Demo windows come from the demo encoders' score distributions (docs/demo.md): the demo CLIP
# spreads top-20 scores over ~0.6–0.98, the random-weight DINOv2 squeezes them into ~0.985–0.999.
DEMO_WINDOWS = {
    "clip_image": [0.85, 0.99],
    "dino_image": [0.993, 0.9995],
    "clip_caption": [0.85, 0.99],
}

BASE_ENCODER = "base_encoder"


class DeploymentConfigError(ValueError):
    """A deployment config file names an unknown resource, setting or run field."""


@dataclass(frozen=True)
class TrainingRun:
    """One partition of ``mmret_clip``: the model it starts from, its data and its seed.

    ``start`` is ``base_encoder`` (the CLIP that ``base_encoders`` pinned), an open_clip
    model name, or a directory (open_clip's layout or a transformers ``CLIPModel``'s, e.g. the
    released MMRet / BGE-VL weights), with ``pretrained`` a tag, a weights file or a directory.
    ``data="none"`` trains nothing: the start model itself, scored as the zero-shot baseline.
    ``max_steps``, ``hard_negatives`` and ``views`` override the ``training`` resource's
    settings for this run, so a deployment can hold the paper's sizes and its ablations
    (Table 4: hard negatives; Table 5: which views' pairs) side by side;
    ``triplets_fraction`` trains on a nested subset of the triplets (Fig. 2's scaling curve)
    for the same number of steps.
    """

    start: str = BASE_ENCODER
    pretrained: str | None = None
    data: Literal["triplets", "captions", "none"] = "triplets"
    seed_offset: int = 0  # added to the Training resource's seed
    max_steps: int | None = None
    hard_negatives: str | None = None  # a key of HARD_NEGATIVE_MODES
    views: tuple[str, ...] | None = None  # train on the pairs these views mined
    # train on a nested subset of the triplets (a scaling curve's point): see nested_subset
    triplets_fraction: float | None = None

    def __post_init__(self):
        if self.data not in ("triplets", "captions", "none"):
            raise ValueError(f"data must be triplets, captions or none, got {self.data!r}")
        if self.hard_negatives is not None and self.hard_negatives not in HARD_NEGATIVE_MODES:
            raise ValueError(f"hard_negatives must be one of {sorted(HARD_NEGATIVE_MODES)}, "
                             f"got {self.hard_negatives!r}")
        if self.views is not None:
            object.__setattr__(self, "views", tuple(self.views))
            unknown = sorted(set(self.views) - set(VIEWS))
            if unknown or not self.views:
                raise ValueError(f"views must be a non-empty subset of {sorted(VIEWS)}, "
                                 f"got {list(self.views)}")
        if self.triplets_fraction is not None and not 0 < self.triplets_fraction <= 1:
            raise ValueError(f"triplets_fraction must be in (0, 1], got {self.triplets_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")


ZERO_SHOT = TrainingRun(data="none")
# The demo trains its base CLIP on three seeds and once on captions alone with the same
# compute: the control that shows what the mined triplets add beyond more training.
DEMO_SEEDS = ("demo", "demo_seed1", "demo_seed2")
DEMO_CONTROL = "demo_captions"
DEMO_RUNS = {
    BASE_ENCODER: ZERO_SHOT,
    **{name: TrainingRun(seed_offset=offset) for offset, name in enumerate(DEMO_SEEDS)},
    DEMO_CONTROL: TrainingRun(data="captions"),
}
# The paper's MMRet-CLIP sizes, from OpenAI's CLIP; a deployment config points them at local
# weights (``training_runs: {base: {pretrained: /models/vit-b-16.pt}}``) or adds runs.
PAPER_RUNS = {
    BASE_ENCODER: ZERO_SHOT,
    "base": TrainingRun("ViT-B-16", "openai", max_steps=15_000),
    "large": TrainingRun("ViT-L-14", "openai", max_steps=25_000),
}
PRIMARY_RUN = {"demo": DEMO_SEEDS[0], "paper": "base"}  # what the studies vary


MLLM_BASE = "base"  # an MLLM run that starts from mllm_training.base_model
PAPER_MLLM_BASE = "llava-hf/llava-v1.6-mistral-7b-hf"


@dataclass(frozen=True)
class MLLMRun:
    """One partition of ``mmret_mllm``: its data and the model it starts from.

    ``data="triplets"`` trains on the mined triplets, ``"mmeb_train"`` on MMEB's training set
    (``mllm_training.mmeb_train``). ``start`` is ``base`` (``mllm_training.base_model`` with a
    fresh LoRA adapter) or another MLLM run, whose merged checkpoint gets a fresh adapter: the
    paper's stage 2 continues from stage 1 so.
    """

    data: Literal["triplets", "mmeb_train"] = "triplets"
    start: str = MLLM_BASE
    seed_offset: int = 0
    max_steps: int | None = None

    def __post_init__(self):
        if self.data not in ("triplets", "mmeb_train"):
            raise ValueError(f"data must be triplets or mmeb_train, got {self.data!r}")


# The paper's two stages: S1 on the mined triplets, S2 from S1 on MMEB-train.
PAPER_MLLM_RUNS = {"mllm_s1": MLLMRun(), "mllm_s2": MLLMRun(data="mmeb_train", start="mllm_s1")}
# The demo's small random LLaVA-NeXT on the demo triplets: minutes on a laptop CPU, so only
# with MEGAPAIRS_DEMO_MLLM=1 (MEGAPAIRS_MLLM already names the paper's description model).
DEMO_MLLM_ENV = "MEGAPAIRS_DEMO_MLLM"
DEMO_MLLM_RUNS = {"mllm_demo": MLLMRun()}


@dataclass(frozen=True)
class Study:
    """Training runs compared along one axis, each point trained once per seed: the paper's
    Fig. 2 (score vs training triplets), Table 5 (which views' pairs) and Table 4 (hard
    negatives). ``points`` maps a point's label to its runs, one per seed."""

    title: str
    axis: str
    points: dict[str, tuple[str, ...]]

    @property
    def runs(self) -> list[str]:
        return [run for runs in self.points.values() for run in runs]


STUDIES_ENV = "MEGAPAIRS_STUDIES"  # how many seeds the studies train; unset or 0: no studies
# Fig. 2's points, as fractions of the triplets (nested subsets, the same steps each).
SCALING_FRACTIONS = {"1/16": 1 / 16, "1/8": 1 / 8, "1/4": 1 / 4, "1/2": 1 / 2}
# Table 5's mining views by the paper's letters: D(INOv2) image, (CLIP) I(mage), T(ext).
VIEW_LETTERS = {"D": "dino_image", "I": "clip_image", "T": "clip_caption"}
VIEW_COMBINATIONS = ("D", "I", "T", "D+I", "D+T", "I+T")
# Table 4's points, by HARD_NEGATIVE_MODES key.
HARD_NEGATIVE_LABELS = {"none": "none", "query": "query only", "query_and_mined": "query + mined"}


def with_studies(
    runs: dict[str, TrainingRun], primary: str, seeds: int, default_hard_negatives: str,
) -> tuple[dict[str, TrainingRun], dict[str, Study]]:
    """``runs`` plus the studies' runs, each a variant of ``primary`` (whose own seeds,
    ``primary``, ``primary_seed1``..., are every study's full-data, all-views, default point)."""
    if seeds < 1:
        raise ValueError(f"{STUDIES_ENV} is the number of seeds per study point, got {seeds}")
    base = runs[primary]
    added = dict(runs)

    def point(name: str, **changes) -> tuple[str, ...]:
        names = tuple(name if k == 0 else f"{name}_seed{k}" for k in range(seeds))
        for k, run_name in enumerate(names):
            added[run_name] = dataclasses.replace(
                base, seed_offset=base.seed_offset + k, **changes)
        return names

    full = tuple(primary if k == 0 else f"{primary}_seed{k}" for k in range(seeds))
    missing = [name for name in full if name not in runs]
    if missing:
        raise ValueError(f"the studies compare against {primary}'s seeds, but the deployment "
                         f"has no run {missing}")
    scaling = {label: point(f"frac_{label.replace('/', '_')}", triplets_fraction=fraction)
               for label, fraction in SCALING_FRACTIONS.items()}
    views = {label: point(f"views_{label.replace('+', '')}",
                          views=tuple(VIEW_LETTERS[v] for v in label.split("+")))
             for label in VIEW_COMBINATIONS}
    negatives = {label: full if mode == default_hard_negatives
                 else point(f"hn_{mode}", hard_negatives=mode)
                 for mode, label in HARD_NEGATIVE_LABELS.items()}
    studies = {
        "scaling_curve": Study("score vs training triplets (paper Fig. 2)", "triplets",
                               {"0": (BASE_ENCODER,), **scaling, "1": full}),
        "view_ablation": Study("mining views (paper Table 5)", "views",
                               {**views, "D+I+T": full}),
        "hard_negative_ablation": Study("hard negatives (paper Table 4)", "hard negatives",
                                        negatives),
    }
    return added, studies


@dataclass(frozen=True)
class Deployment:
    profile: str
    resources: dict[str, Any]
    training_runs: dict[str, TrainingRun]
    executor: str = "in_process"
    config_file: str | None = field(default=None)
    studies: dict[str, Study] = field(default_factory=dict)
    mllm_runs: dict[str, MLLMRun] = field(default_factory=dict)

    def __post_init__(self):
        shared = sorted(set(self.training_runs) & set(self.mllm_runs))
        if shared:  # the benchmark_scores table names a model by its run
            raise ValueError(f"training runs {shared} are both MMRet-CLIP and MMRet-MLLM runs")
        for name, run in self.mllm_runs.items():
            if run.start != MLLM_BASE and run.start not in self.mllm_runs:
                raise ValueError(f"mllm_runs.{name} starts from {run.start!r}, which is neither "
                                 f"{MLLM_BASE!r} nor one of the MLLM runs {sorted(self.mllm_runs)}")

    def executor_definition(self) -> ExecutorDefinition:
        if self.executor == "in_process":
            return in_process_executor
        if self.executor == "multiprocess":
            return multiprocess_executor
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as error:
            raise ImportError(
                "MEGAPAIRS_EXECUTOR=k8s needs dagster-k8s: install the package with its "
                "`deploy` extra (pip install 'megapairs-dagster[deploy]')"
            ) from error
        return k8s_job_executor


def _demo(home: str) -> tuple[dict[str, dict], dict[str, TrainingRun]]:
    settings = {
        "store": {"url": f"{home}/artifacts"},
        "corpus_source": {"url": f"{home}/demo_corpus", "format": "webdataset"},
        "encoders": {
            "mode": "bootstrap", "dino_image_size": DEMO_DINO_IMAGE_SIZE,
            # MEGAPAIRS_BOOTSTRAP_SECONDS shortens the demo CLIP training (server tests use 5 s).
            "bootstrap_max_seconds": float(os.environ.get("MEGAPAIRS_BOOTSTRAP_SECONDS", "240")),
        },
        "mining": {"windows": DEMO_WINDOWS},
        # Demo instructions state at most two changes; see docs/demo.md for the measured effect.
        "generation": {"backend": "template", "max_caption_changes": 2},
        "training": {"max_steps": 300, "learning_rate": 3e-5, "caption_loss_weight": 4.0,
                     "cache_images": 20_000},
        # A random base: only the adapter learns, so it needs a large rate to move at all.
        "mllm_training": {"base_model": DEMO_BASE, "image_side": IMAGE_SIDE, "max_steps": 60,
                          "batch_size": 8, "learning_rate": 2e-3, "cache_images": 20_000},
    }
    return settings, DEMO_RUNS


def _paper() -> tuple[dict[str, dict], dict[str, TrainingRun]]:
    settings = {
        "store": {"url": EnvVar("MEGAPAIRS_STORE_URL")},
        "corpus_source": {"url": EnvVar("MEGAPAIRS_CORPUS_URL")},
        "encoders": {
            "mode": "pretrained", "clip_model": "EVA02-B-16",
            "clip_pretrained": "merged2b_s8b_b131k", "dino_model": "facebook/dinov2-base",
            "foreground_only": False,
        },
        # The paper's generators (InternVL2-26B describes, Llama-3-8B-Instruct instructs) served
        # by vLLM: started per step by generation_server, or a cluster Service it points at.
        # Model paths come from the environment; the paper's prompt rules (PAPER_PROMPT_VERSION).
        "generation": {
            "backend": "openai", "description_model": EnvVar("MEGAPAIRS_MLLM"),
            "instruction_model": EnvVar("MEGAPAIRS_LLM"), "prompt_version": PAPER_PROMPT_VERSION,
            "device": "cuda", "dtype": "bfloat16", "trust_remote_code": True,
            # Continuous batching wants many requests in flight; a batch is the driver's unit.
            "batch_size": 256, "max_concurrency": 64,
        },
        "generation_server": {
            "description_args": ["--max-model-len", "8192"],
            "instruction_args": ["--max-model-len", "8192"],
        },
        # The paper's recipe: a global batch of 2,048 (128 per GPU x 8 GPUs x 2 micro-batches
        # through the gradient cache), lr 5e-6 decayed linearly, temperature 0.02 (the
        # trainer's), 1 positive + 4 hard negatives with the query image first; 15k steps
        # (base) / 25k (large), set on the runs. Resumable state every 500 steps.
        "training": {"learning_rate": 5e-6, "caption_loss_weight": 0.0, "batch_size": 128,
                     "grad_accum_steps": 2, "nproc_per_node": 8, "warmup_steps": 0,
                     "hard_negatives": "query_and_mined", "checkpoint_every": 500,
                     "num_workers": 8, "export_transformers": True},
        # MMRet-MLLM: LLaVA-1.6 (Mistral-7B; a local copy through the config file, as for the
        # encoders), LoRA rank 32, bf16, gradient checkpointing; the learning rate is not in
        # the paper (LoRA's usual 1e-4).
        "mllm_training": {"base_model": PAPER_MLLM_BASE, "bf16": True,
                          "gradient_checkpointing": True, "lora_rank": 32,
                          "learning_rate": 1e-4, "checkpoint_every": 500, "num_workers": 8},
    }
    return settings, PAPER_RUNS


RESOURCE_TYPES: dict[str, type[ConfigurableResource]] = {
    "store": ArtifactStore,
    "corpus_source": CorpusSource,
    "encoders": Encoders,
    "compute": Compute,
    "indexes": Indexes,
    "mining": Mining,
    "generation": Generation,
    "generation_server": GenerationServer,
    "benchmark_data": BenchmarkData,
    "training": Training,
    "mllm_training": MLLMTraining,
}


def read_config_file(path: str | os.PathLike) -> dict:
    """A deployment config: ``resources: {key: {config: {...}}}``, ``training_runs`` and
    ``mllm_runs``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_ENV}={path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or set(data) - {"resources", *RUN_KINDS}:
        raise DeploymentConfigError(
            f"{path}: expected a mapping with `resources`, `training_runs` and/or `mllm_runs`, "
            f"got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}"
        )
    return data


def _value(value: Any) -> Any:
    """``{env: NAME}`` in a config file is an environment variable, as in Dagster run config."""
    if isinstance(value, dict) and set(value) == {"env"}:
        return EnvVar(value["env"])
    return value


def _merge_resources(settings: dict[str, dict], overrides: dict, source: str) -> dict[str, dict]:
    merged = {key: dict(values) for key, values in settings.items()}
    for key, entry in (overrides or {}).items():
        if key not in RESOURCE_TYPES:
            raise DeploymentConfigError(f"{source}: unknown resource {key!r}; expected one of "
                             f"{sorted(RESOURCE_TYPES)}")
        values = entry.get("config", {}) if isinstance(entry, dict) else None
        if not isinstance(values, dict):
            raise DeploymentConfigError(
                f"{source}: resources.{key} must be {{config: {{setting: value}}}}"
            )
        known = RESOURCE_TYPES[key].model_fields
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise DeploymentConfigError(f"{source}: resources.{key} has no setting {unknown}; "
                             f"settings are {sorted(known)}")
        merged.setdefault(key, {}).update({name: _value(v) for name, v in values.items()})
    return merged


# The config file's run sections: the partitions of mmret_clip and of mmret_mllm.
RUN_KINDS = {"training_runs": TrainingRun, "mllm_runs": MLLMRun}


def _merge_runs(runs: dict, overrides: dict, source: str, section: str = "training_runs") -> dict:
    """``runs`` with a config file's section laid over it: a known run's settings changed, a
    new name added as a run."""
    kind = RUN_KINDS[section]
    merged = dict(runs)
    for name, values in (overrides or {}).items():
        if not isinstance(values, dict):
            raise DeploymentConfigError(f"{source}: {section}.{name} must be a mapping of settings")
        try:
            merged[name] = kind(**{**merged.get(name, kind()).__dict__, **values})
        except (TypeError, ValueError) as error:
            raise DeploymentConfigError(f"{source}: {section}.{name}: {error}") from error
    return merged


def load_deployment(
    profile: str | None = None, home: str | None = None, config_file: str | None = None
) -> Deployment:
    """The deployment the environment describes (``MEGAPAIRS_PROFILE``, ``MEGAPAIRS_HOME``,
    ``MEGAPAIRS_CONFIG``, ``MEGAPAIRS_EXECUTOR``), or the one given by arguments."""
    profile = profile or os.environ.get("MEGAPAIRS_PROFILE", "demo")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    if profile == "demo":
        settings, runs = _demo(home or os.environ.get("MEGAPAIRS_HOME", "data"))
    else:
        settings, runs = _paper()
    if profile == "paper":
        mllm_runs = PAPER_MLLM_RUNS
    else:
        mllm_runs = DEMO_MLLM_RUNS if os.environ.get(DEMO_MLLM_ENV, "") not in ("", "0") else {}
    config_file = config_file or os.environ.get(CONFIG_ENV) or None
    if config_file:
        data = read_config_file(config_file)
        settings = _merge_resources(settings, data.get("resources"), str(config_file))
        runs = _merge_runs(runs, data.get("training_runs"), str(config_file))
        mllm_runs = _merge_runs(mllm_runs, data.get("mllm_runs"), str(config_file), "mllm_runs")
    studies: dict[str, Study] = {}
    seeds = int(os.environ.get(STUDIES_ENV) or 0)
    if seeds:
        runs, studies = with_studies(runs, PRIMARY_RUN[profile], seeds,
                                     settings["training"].get("hard_negatives", "query_and_mined"))
    executor = os.environ.get("MEGAPAIRS_EXECUTOR") or DEFAULT_EXECUTOR[profile]
    if executor not in EXECUTORS:
        raise ValueError(f"MEGAPAIRS_EXECUTOR={executor!r}; expected one of {EXECUTORS}")
    resources: dict[str, Any] = {
        key: RESOURCE_TYPES[key](**settings.get(key, {})) for key in RESOURCE_TYPES
    }
    resources["io_manager"] = ArtifactIOManager(store=resources["store"])
    return Deployment(profile, resources, runs, executor, config_file, studies, mllm_runs)


def resources_for(profile: str | None = None, home: str | None = None) -> dict:
    """The resources of a deployment (see ``load_deployment``)."""
    return load_deployment(profile, home).resources
