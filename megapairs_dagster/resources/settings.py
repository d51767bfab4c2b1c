"""Resources that carry configuration: where the corpus is, which encoders, which device.

Every setting counts towards the code version of the assets that read it
(``assets/code_versions.py``) unless it is declared ``unversioned``: settings that change where
or how fast an asset is computed, not what it holds. Device and dtype are among those: a
different precision is not a reason to recompute a corpus.
"""

import dataclasses
from typing import Any, Literal, TypeVar

import fsspec
from dagster import ConfigurableResource
from pydantic import Field

from megapairs_dagster.storage import S3_PROTOCOLS, S3Retries


def unversioned(default: Any = ..., **kwargs) -> Any:
    """A setting left out of code versions: changing it marks no asset stale."""
    return Field(default, json_schema_extra={"versioned": False}, **kwargs)


def versioned_fields(resource: ConfigurableResource) -> list[str]:
    """The settings of ``resource`` that shape what the assets reading it produce."""
    return [
        name for name, field in type(resource).model_fields.items()
        if (field.json_schema_extra or {}).get("versioned", True)
    ]


Config = TypeVar("Config")


def domain_config(cls: type[Config], resource: ConfigurableResource, **overrides: Any) -> Config:
    """The domain dataclass ``cls`` filled from the resource's settings of the same names, plus
    ``overrides``: a setting is declared once, on its resource, and the domain code that uses it
    never imports Dagster. Fields the resource does not have keep the dataclass's defaults."""
    values = {
        field.name: getattr(resource, field.name)
        for field in dataclasses.fields(cls)
        if field.name in type(resource).model_fields and field.name not in overrides
    }
    return cls(**values, **overrides)


class CorpusSource(ConfigurableResource):
    """Where shards come from: webdataset tars, image folders or parquet files, local or S3."""

    url: str = unversioned(description="Folder or s3://bucket/prefix holding the shards.")
    format: Literal["auto", "webdataset", "folder", "parquet"] = unversioned("auto")
    endpoint_url: str | None = unversioned(None, description="S3-compatible endpoint.")
    image_column: str = Field(default="image", description="Parquet column with image bytes.")
    caption_column: str = Field(default="caption", description="Parquet column with captions.")
    max_side: int = Field(default=512, description="Longest side of a normalised image.")
    # img2dataset's min_image_size defaults to 0 (keep everything, 1x1 tracking pixels
    # included); img2dataset commands people publish pass e.g. 100 (a CC12M download) or 256
    # (LAION-Aesthetics subsets), and DataComp's basic filter asks for 200. 100 drops pixels,
    # spacers and icons while keeping the demo corpus (128 px) and ordinary web thumbnails;
    # the encoders upscale to 224 either way. Raise it for a corpus whose small images are junk.
    min_side: int = Field(
        default=100, ge=0, description="Reject an image whose shorter side is smaller (pixels)."
    )
    # 2,000 characters is some 300 words: several times a long descriptive caption, and the
    # CLIP text encoders read 77 tokens. What is longer is a page of scraped text.
    max_caption_chars: int = Field(
        default=2000, ge=1, description="Longer captions (after cleaning) are truncated at a "
        "word boundary or rejected, as long_captions says; the original length is kept.",
    )
    long_captions: Literal["truncate", "reject"] = Field(
        default="truncate", description="What happens to a caption over max_caption_chars."
    )

    def storage_options(self) -> dict:
        """fsspec options for the source; on S3 with the artifact store's default retries and
        timeouts (botocore's legacy defaults would let a hung endpoint stall a shard)."""
        options: dict[str, Any] = (
            {"client_kwargs": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else {})
        if fsspec.utils.get_protocol(self.url) in S3_PROTOCOLS:
            options["config_kwargs"] = S3Retries().config_kwargs()
        return options


class Encoders(ConfigurableResource):
    """The three similarity views' base encoders.

    ``bootstrap`` (demo profile) trains a small CLIP on the corpus's own captions and builds a
    small DINOv2, because no pretrained weights can be downloaded offline; ``pretrained``
    (paper profile) pins open_clip / transformers weights from the hub or a local path.
    """

    mode: Literal["bootstrap", "pretrained"] = "bootstrap"
    clip_model: str = Field(default="megapairs-demo-clip", description="open_clip model name.")
    clip_pretrained: str | None = Field(
        default=None, description="open_clip pretrained tag, weights file or directory."
    )
    dino_model: str = Field(
        default="facebook/dinov2-base", description="transformers DINOv2 id or local directory."
    )
    dino_image_size: int = 224
    foreground_only: bool = Field(
        default=True,
        description="Blind the visual-pattern view to the background (estimated from the border).",
    )
    trust_remote_code: bool = unversioned(False)
    bootstrap_max_seconds: float = Field(default=240, description="Demo CLIP training budget.")
    bootstrap_max_images: int = Field(default=4000, description="Demo CLIP training sample.")
    seed: int = 0


class Compute(ConfigurableResource):
    """Device and batching for model inference."""

    device: str = unversioned("auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["float32", "bfloat16", "float16"] = unversioned("float32")
    batch_size: int = unversioned(64)
    num_workers: int = unversioned(1, description="DataLoader workers decoding images.")


class Mining(ConfigurableResource):
    """Pair-mining settings shared by the diagnostics and the miner."""

    targets_per_query: int = Field(default=3, description="Targets drawn per query image.")
    num_hard_negatives: int = Field(
        default=5, description="Hard negatives per pair besides the query itself."
    )
    seed: int = Field(default=0, description="Seed of the deterministic target choice.")

    windows: dict[str, list[float]] = Field(
        default={view: [0.80, 0.96] for view in ("clip_image", "dino_image", "clip_caption")},
        description="Open similarity window (low, high) per view: a neighbour is a target only "
        "if low < score < high (paper: 0.8 < s < 0.96).",
    )

    def all_windows(self) -> dict[str, tuple[float, float]]:
        return {view: self.window(view) for view in self.windows}

    def window(self, view: str) -> tuple[float, float]:
        low, high = self.windows[view]
        if not 0 <= low < high <= 1:
            raise ValueError(f"window for {view} must satisfy 0 <= low < high <= 1, got {low, high}")
        return low, high


class Indexes(ConfigurableResource):
    """The global KNN indexes and the neighbour search: settings every index build reads,
    whether a launched run, automation or a schedule starts it."""

    memory_budget_gb: float = Field(
        default=8.0, description="Memory an index may take; it decides the faiss index type "
        "(and, on Kubernetes, the memory the index step's pod requests).",
    )
    index_spec: str = Field(
        default="auto", description="A faiss index_factory string, or auto to choose by size."
    )
    neighbors_k: int = Field(default=20, description="Neighbours kept per image (itself excluded).")
    recall_k: int = unversioned(20)
    recall_sample: int = unversioned(1000, description="Queries used to estimate recall.")
    min_recall: float = unversioned(0.95, description="Asset check threshold for recall@k.")


class Generation(ConfigurableResource):
    """The two-step instruction generator: backend, models, prompts, retries and chunking."""

    backend: Literal["template", "transformers", "vllm", "openai"] = Field(
        default="template",
        description="template (offline, no model), transformers (local Hugging Face models), "
        "vllm (vLLM's offline engine in the step's process) or openai (an OpenAI-compatible "
        "endpoint: vllm serve, see generation_server).",
    )
    description_model: str | None = Field(
        default=None, description="Vision-language model for descriptions (dir or hub id)."
    )
    instruction_model: str | None = Field(
        default=None, description="Causal LM that writes instructions (dir or hub id)."
    )
    prompt_version: str = "v1"
    word_budget_min: int = 60
    word_budget_max: int = 100
    min_instructions: int = 3
    max_caption_changes: int | None = Field(
        default=None,
        description="Reject a pair (reason too_different) whose captions differ in more "
        "clauses than this, before any model runs; None keeps every pair.",
    )
    max_attempts: int = Field(default=2, description="Tries per pair, each with a new seed.")
    max_new_tokens: int = 256
    temperature: float = 0.7
    # Seeds derive from (seed, pair, stage, attempt): batch and chunk size do not change output.
    batch_size: int = unversioned(8)
    chunk_size: int = unversioned(256, description="Pairs per saved chunk (resume unit).")
    device: str = unversioned("cpu")
    dtype: str = unversioned("auto")
    trust_remote_code: bool = unversioned(False)
    seed: int = 0
    min_parse_rate: float = unversioned(
        0.9, description="Asset check: share of pairs that must yield instructions."
    )
    # The openai backend: how requests reach the endpoint, not what they ask.
    max_concurrency: int = unversioned(16, description="openai: requests in flight at once.")
    request_timeout_s: float = unversioned(600.0, description="openai: seconds per request.")
    max_retries: int = unversioned(
        5, description="openai: retries of a request after 429/5xx/timeout/connection errors "
        "(exponential backoff); then the step fails naming the endpoint, saved chunks kept.",
    )
    retry_backoff_s: float = unversioned(1.0, description="openai: first backoff, doubled per retry.")
    api_key_env: str | None = unversioned(
        None, description="openai: the environment variable holding the endpoint's API key "
        "(the key itself never goes in config).",
    )
    instruction_tokenizer: str | None = unversioned(
        None, description="openai: where the instruction model's tokenizer loads from (a "
        "directory or hub id; unset: instruction_model). The backend tokenizes the instruction "
        "prompt itself and sends token ids, so a description spelling </s> stays text.",
    )
    # The vllm backend: where and how the engine runs, and the images it is given.
    description_engine_args: dict[str, Any] = unversioned(
        {}, description="vllm: arguments of the description step's vllm.LLM, e.g. "
        "{tensor_parallel_size: 2, max_model_len: 8192, gpu_memory_utilization: 0.9}.",
    )
    instruction_engine_args: dict[str, Any] = unversioned(
        {}, description="vllm: arguments of the instruction step's vllm.LLM."
    )
    image_max_side: int | None = Field(
        default=None, description="Descriptions: query and target images are scaled down so "
        "that their longer side is at most this, by every backend (None: as stored).",
    )
    image_workers: int = unversioned(8, description="vllm: CPU threads decoding images.")


class BenchmarkData(ConfigurableResource):
    """Where the real benchmarks live; a benchmark whose paths are unset is skipped.

    A benchmark is scored once all its ``<benchmark>_...`` settings are set (annotations and
    images; GeneCIS has two image folders). CIRCO and CIRR also have
    ``<benchmark>_test_annotations``, not needed to score: set, ``benchmark_scores`` also
    writes the test server's submission files; unset, it writes none and says so.
    """

    circo_annotations: str | None = unversioned(
        None, description="CIRCO annotations file (val.json, with ground truths), or the "
        "folder holding it."
    )
    circo_images: str | None = unversioned(
        None, description="Folder of the COCO unlabeled2017 images (NNNNNNNNNNNN.jpg)."
    )
    circo_test_annotations: str | None = unversioned(
        None, description="CIRCO's test.json (no ground truths), or the folder holding it: "
        "also write the CIRCO test server's submission file. The gallery is circo_images.",
    )
    cirr_annotations: str | None = unversioned(
        None, description="Folder with CIRR's cap.rc2.val.json and split.rc2.val.json (directly "
        "or in captions/ and image_splits/, as the CIRR repository has them).",
    )
    cirr_images: str | None = unversioned(
        None, description="CIRR's img_raw folder, which the split file's paths are relative "
        "to: it holds dev/ with the NLVR2 images (dev/dev-244-0-img0.png), and test1/ for the "
        "test split.",
    )
    cirr_test_annotations: str | None = unversioned(
        None, description="Folder with CIRR's cap.rc2.test1.json and split.rc2.test1.json "
        "(directly or in captions/ and image_splits/): also write the CIRR test server's recall "
        "and recall_subset files. The images are cirr_images' test1/.",
    )
    fashioniq_annotations: str | None = unversioned(
        None, description="Folder with FashionIQ's cap.<category>.val.json and "
        "split.<category>.val.json for dress, shirt and toptee (directly or in captions/ and "
        "image_splits/).",
    )
    fashioniq_images: str | None = unversioned(
        None, description="Folder of the FashionIQ images (<asin>.png or <asin>.jpg)."
    )
    genecis_annotations: str | None = unversioned(
        None, description="Folder with GeneCIS's focus_attribute.json, change_attribute.json, "
        "focus_object.json and change_object.json (directly or in genecis/, as the GeneCIS "
        "repository has them).",
    )
    genecis_coco_images: str | None = unversioned(
        None, description="COCO's val2017 folder (000000153527.jpg): the object tasks' images."
    )
    genecis_vg_images: str | None = unversioned(
        None, description="Visual Genome 1.2's images, both parts in one folder (VG_100K_all/"
        "2365581.jpg): the attribute tasks crop their boxes from them.",
    )
    mmeb_data: str | None = unversioned(
        None, description="MMEB-eval as the Hugging Face repository lays it out: one folder per "
        "dataset with test-*.parquet. Every MMEB v1 dataset found there is scored; the overall "
        "score needs all 36.",
    )
    mmeb_images: str | None = unversioned(
        None, description="The folder MMEB's qry_img_path / tgt_img_path are relative to (the "
        "repository's images.zip unpacked, eval_images/).",
    )

    def unset(self, benchmark: str) -> list[str]:
        """The settings still to set before ``benchmark`` can be scored (the demo needs none)."""
        names = [name for name in type(self).model_fields
                 if name.startswith(f"{benchmark}_") and not name.endswith("_test_annotations")]
        return [f"benchmark_data.{name}" for name in names if not getattr(self, name)]

    def unset_test(self, benchmark: str) -> list[str] | None:
        """The settings still to set before ``benchmark``'s test-server files are written
        (besides those of ``unset``); None for a benchmark without a test server."""
        if benchmark not in ("circo", "cirr"):
            return None
        name = f"{benchmark}_test_annotations"
        return [] if getattr(self, name) else [f"benchmark_data.{name}"]


class Training(ConfigurableResource):
    """MMRet-CLIP training recipe (paper: lr 5e-6 from pretrained CLIP, temperature 0.02)."""

    max_steps: int = Field(default=150, description="Optimizer steps.")
    batch_size: int = 32
    grad_accum_steps: int = 1
    learning_rate: float = Field(default=3e-5, description="Paper: 5e-6 (pretrained CLIP).")
    warmup_steps: int = 10
    caption_loss_weight: float = Field(
        default=1.0, description="Weight of an image–caption term kept beside the triplets."
    )
    seed: int = 0
    cache_images: int = unversioned(
        0,
        description="Preprocessed images kept in memory per data process (0: decode every "
        "time). Worth it when the corpus fits: a triplet sample decodes 5 images.",
    )
    nproc_per_node: int = Field(
        default=1, description="Training processes (GPUs) per run: more than 1 launches "
        "torchrun through Dagster Pipes. The global batch is batch_size x grad_accum_steps x "
        "nproc_per_node.",
    )
    num_workers: int = unversioned(0, description="DataLoader workers per training process.")
    checkpoint_every: int = unversioned(
        0, description="Optimizer steps between resumable states saved to the artifact store "
        "(0: none; a failed run then starts over).",
    )
    hard_negatives: Literal["query_and_mined", "query", "none"] = Field(
        default="query_and_mined", description="Hard negatives per query (paper Table 4): the "
        "query image then 3 mined ones (1 positive + 4 hard negatives), the query image only, "
        "or none. A training run's own hard_negatives overrides it.",
    )
    views: list[str] | None = Field(
        default=None, description="Train on the pairs these views mined (paper Table 5: "
        "dino_image, clip_image, clip_caption); None: all. A run's own views overrides it.",
    )
    export_transformers: bool = unversioned(
        False, description="Also save each trained model in the transformers CLIPModel layout "
        "(as the released MMRet weights are), below the checkpoint's transformers/ folder.",
    )


class MLLMTraining(ConfigurableResource):
    """MMRet-MLLM training recipe: LoRA on LLaVA-NeXT (paper: LLaVA-1.6, LoRA rank 32).

    The paper does not give the learning rate; 1e-4 is the usual LoRA rate (VLM2Vec's LLaVA-NeXT
    LoRA scripts use 2e-5 to 1e-4). Processes per run are ``training.nproc_per_node``.
    Stage 2 reads MMEB-train from ``mmeb_train`` (skipped while unset).
    """

    base_model: str = Field(
        default="demo-llava-next", description="LLaVA-NeXT directory or hub name (paper: "
        "llava-hf/llava-v1.6-mistral-7b-hf); demo-llava-next builds the demo's small random one.",
    )
    lora_rank: int = 32
    learning_rate: float = Field(default=1e-4, description="Not given by the paper: LoRA's usual.")
    max_steps: int = 2000
    batch_size: int = 8
    grad_accum_steps: int = 1
    warmup_steps: int = 0
    image_side: int = Field(default=512, description="Every image is resized to this square.")
    bf16: bool = Field(default=False, description="Keep the frozen base in bfloat16.")
    gradient_checkpointing: bool = True
    hard_negatives: Literal["query_and_mined", "query", "none"] = "query_and_mined"
    seed: int = 0
    cache_images: int = unversioned(0, description="Preprocessed images kept per data process.")
    num_workers: int = unversioned(0, description="DataLoader workers per training process.")
    checkpoint_every: int = unversioned(0, description="Steps between resumable states.")
    mmeb_train: str | None = unversioned(
        None, description="Stage 2: a local copy of TIGER-Lab/MMEB-train (one folder per "
        "subset with <split>-*.parquet)."
    )
    mmeb_train_images: str | None = unversioned(
        None, description="The folder MMEB-train's qry_image_path / pos_image_path are "
        "relative to (default: mmeb_train itself).",
    )
    mmeb_train_split: str = "original"
    mmeb_train_subsets: list[str] | None = Field(
        default=None, description="Subsets to train on; None: every folder."
    )
    mmeb_train_per_subset: int | None = Field(
        default=None, description="First rows per subset (VLM2Vec: 50,000)."
    )
