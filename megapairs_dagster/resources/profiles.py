"""Resources per profile, chosen in one place.

``demo`` (default) runs offline on a laptop CPU over the procedural demo corpus; ``paper``
uses the MegaPairs paper's encoders and a corpus/store given by environment variables.
"""


import os

from dagster import EnvVar, ExecutorDefinition, in_process_executor

from megapairs_dagster.resources.settings import (
    BenchmarkData,
    Compute,
    CorpusSource,
    Encoders,
    Generation,
    Mining,
    Training,
    TripletDatabase,
)
from megapairs_dagster.resources.store import ArtifactIOManager, ArtifactStore
from megapairs_dagster.synthesis.encoders import DEMO_DINO_IMAGE_SIZE

PROFILES = ("demo", "paper")

# Demo windows come from the demo encoders' score distributions (docs/demo.md): the demo CLIP
# spreads top-20 scores over ~0.6–0.98, the random-weight DINOv2 squeezes them into ~0.985–0.999.
DEMO_WINDOWS = {
    "clip_image": [0.85, 0.99],
    "dino_image": [0.993, 0.9995],
    "clip_caption": [0.85, 0.99],
}


def executor_for(profile: str | None = None) -> ExecutorDefinition | None:
    """The demo runs each run's steps in one process: a step subprocess re-imports torch and
    costs 10–15 s on a laptop, more than the demo's steps themselves. Other profiles keep
    Dagster's default (multiprocess, or the k8s executor selected in run config)."""
    profile = profile or os.environ.get("MEGAPAIRS_PROFILE", "demo")
    return in_process_executor if profile == "demo" else None


def resources_for(profile: str | None = None, home: str | None = None) -> dict:
    profile = profile or os.environ.get("MEGAPAIRS_PROFILE", "demo")
    home = home or os.environ.get("MEGAPAIRS_HOME", "data")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    if profile == "demo":
        store = ArtifactStore(url=f"{home}/artifacts")
        corpus = CorpusSource(url=f"{home}/demo_corpus", format="webdataset")
        encoders = Encoders(
            mode="bootstrap", dino_image_size=DEMO_DINO_IMAGE_SIZE,
            # MEGAPAIRS_BOOTSTRAP_SECONDS shortens the demo CLIP training (server tests use 5 s).
            bootstrap_max_seconds=float(os.environ.get("MEGAPAIRS_BOOTSTRAP_SECONDS", "240")),
        )
        mining = Mining(windows=DEMO_WINDOWS)
        # Demo instructions state at most two changes; see docs/demo.md for the measured effect.
        generation = Generation(backend="template", max_caption_changes=2)
        training = Training(
            max_steps=300, learning_rate=3e-5, caption_loss_weight=4.0, cache_images=20_000
        )
    else:
        store = ArtifactStore(url=EnvVar("MEGAPAIRS_STORE_URL"))
        corpus = CorpusSource(url=EnvVar("MEGAPAIRS_CORPUS_URL"))
        encoders = Encoders(
            mode="pretrained",
            clip_model="EVA02-B-16",
            clip_pretrained="merged2b_s8b_b131k",
            dino_model="facebook/dinov2-base",
            foreground_only=False,
        )
        mining = Mining()
        generation = Generation(
            backend="transformers",
            description_model=EnvVar("MEGAPAIRS_MLLM"),
            instruction_model=EnvVar("MEGAPAIRS_LLM"),
            device="cuda",
            dtype="bfloat16",
        )
        training = Training(learning_rate=5e-6, caption_loss_weight=0.0, max_steps=10_000,
                            batch_size=256)
    return {
        "store": store,
        "io_manager": ArtifactIOManager(store=store),
        "corpus_source": corpus,
        "encoders": encoders,
        "compute": Compute(cache_dir=f"{home}/cache"),
        "mining": mining,
        "generation": generation,
        "triplet_db": TripletDatabase(path=f"{home}/megapairs.duckdb"),
        "benchmark_data": BenchmarkData(),
        "training": training,
    }
