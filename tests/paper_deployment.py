"""A paper-profile deployment on this CPU, for the rehearsal in ``test_paper_rehearsal.py``.

What a user of the ``paper`` profile owns, built offline and small: tiny checkpoints in the
paper models' formats (``tiny_paper_models``), a deployment config file (``MEGAPAIRS_CONFIG``)
naming them, a corpus and an artifact store on S3 (moto on loopback), a Postgres-backed
Dagster instance, and the README's shell commands to drive it.

The generators. ``transformers`` generation runs real ``generate`` calls on the tiny LLaVA and
Llama; random weights write byte soup that the parser rightly rejects, so no pair would yield
instructions. Each tokenizer therefore gets one added (ordinary, not special) token whose text
is a well-formed answer: a comparison paragraph for the MLLM, a JSON list of three
instructions for the LLM. A few optimizer steps over the real prompts (``prompts.py``) teach
each model to emit that token, then end-of-sequence. Production code runs unchanged: the
prompts, chat templates, batching, seeded sampling, decoding, parsing and validation are the
ones a real model goes through; only the checkpoint is a trained toy.

Import as ``from paper_deployment import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from tiny_paper_models import (
    TinyClip,
    save_tiny_dino,
    save_tiny_eva_clip,
    save_tiny_llava,
    save_tiny_llm,
)

from megapairs_dagster.synthesis.generation.prompts import (
    PAPER_PROMPT_VERSION,
    load_demonstrations,
    render_description_prompt,
    render_instruction_prompt,
    sample_demonstrations,
)

REPO = Path(__file__).resolve().parents[1]

# What the tiny generators answer. The description has 24 words: inside every word budget
# (60–100 words, at most 1.5x over and at least 10); the instructions are three distinct,
# short items, none a copy of a demo caption.
DESCRIPTION_ANSWER = (
    "Both images show a similar arrangement of simple shapes on a plain ground. However, the "
    "source image is brighter, whereas the target image looks darker."
)
INSTRUCTIONS_ANSWER = '["Make it darker", "Show the same shapes at dusk", "Keep the layout but dim it"]'
# One added token, then end-of-sequence; a little room in case sampling repeats the token.
MAX_NEW_TOKENS = 4


@dataclass(frozen=True)
class PaperModels:
    clip: TinyClip  # EVA02-style open_clip checkpoint, hub layout and weights-file layout
    dino: Path  # DINOv2 in transformers' save_pretrained layout
    mllm: Path  # LLaVA directory (description_model)
    llm: Path  # Llama directory (instruction_model)


def _fit(model: torch.nn.Module, example: Callable[[int], tuple[dict, int]], steps: int,
         lr: float) -> float:
    """A few AdamW steps on ``example(step) -> (inputs, answer_tokens)``; loss on the answer."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        inputs, answer = example(step)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -answer:] = inputs["input_ids"][:, -answer:]
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def _descriptions(seed: int) -> Callable[[], str]:
    """Random description-like texts of 10–80 words, the LLM prompts' variable part."""
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "star", "large", "small", "left", "right", "top", "bottom", "background", "striped", "dotted", "plain", "dark", "light", "scene", "shape", "object"]

    def draw() -> str:
        return "Both images show " + " ".join(rng.choice(words, int(rng.integers(10, 80))))

    return draw


def _noise_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def save_answering_llm(directory: Path, steps: int = 20) -> Path:
    """The tiny Llama of ``tiny_hf_models``, taught to answer every instruction prompt with
    ``INSTRUCTIONS_ANSWER``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tiny_llm(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_tokens([INSTRUCTIONS_ANSWER])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    answer = tokenizer(INSTRUCTIONS_ANSWER, add_special_tokens=False).input_ids
    answer += [tokenizer.eos_token_id]
    pool, description = load_demonstrations(PAPER_PROMPT_VERSION), _descriptions(0)

    def example(step: int) -> tuple[dict, int]:
        prompt = render_instruction_prompt(description(), sample_demonstrations(pool, step),
                                           PAPER_PROMPT_VERSION)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids + answer
        return {"input_ids": torch.tensor([ids])}, len(answer)

    loss = _fit(model, example, steps, lr=1e-2)
    assert loss < 0.05, f"the tiny LLM did not learn its answer (loss {loss:.3f})"
    # The instruction prompt (rules + 5 demonstrations) is ~1,700 tokens of this small BPE;
    # Llama-3's context is 8,192.
    model.config.max_position_embeddings = 8192
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_answering_llava(directory: Path, steps: int = 20) -> Path:
    """The tiny LLaVA of ``tiny_hf_models``, taught to answer every description prompt, for
    any two images, with ``DESCRIPTION_ANSWER``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    save_tiny_llava(directory)
    processor = AutoProcessor.from_pretrained(directory)
    tokenizer = processor.tokenizer
    tokenizer.add_tokens([DESCRIPTION_ANSWER])
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(directory)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    answer = len(tokenizer(DESCRIPTION_ANSWER, add_special_tokens=False).input_ids) + 1

    def example(step: int) -> tuple[dict, int]:
        content = [{"type": "image"}, {"type": "image"},
                   {"type": "text",
                    "text": render_description_prompt(60 + step % 41, PAPER_PROMPT_VERSION)}]
        text = processor.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
        text += DESCRIPTION_ANSWER + tokenizer.eos_token
        images = [[_noise_image(2 * step), _noise_image(2 * step + 1)]]
        return dict(processor(text=[text], images=images, return_tensors="pt")), answer

    loss = _fit(model, example, steps, lr=1e-2)
    assert loss < 0.05, f"the tiny LLaVA did not learn its answer (loss {loss:.3f})"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def paper_model_paths(root: Path) -> PaperModels:
    """Where ``build_paper_models(root)`` puts each model (the CLIP's layout is
    ``save_tiny_eva_clip``'s), so a config file can name them before they are built."""
    clip = root / "clip"
    return PaperModels(
        clip=TinyClip(clip / "tiny-eva-clip", clip / "tiny-eva-clip-architecture",
                      clip / "tiny_eva_clip.safetensors"),
        dino=root / "dinov2-small", mllm=root / "llava-tiny", llm=root / "llama-tiny",
    )


def build_paper_models(root: Path) -> PaperModels:
    """Every model the paper profile loads, tiny, under ``root``."""
    paths = paper_model_paths(root)
    built = PaperModels(
        clip=save_tiny_eva_clip(root / "clip"),
        dino=save_tiny_dino(paths.dino),
        mllm=save_answering_llava(paths.mllm),
        llm=save_answering_llm(paths.llm),
    )
    assert built == paths, f"tiny_paper_models changed its layout: {built} != {paths}"
    return built


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


# --- deployment files -------------------------------------------------------------------------


def paper_config(models: PaperModels, circo_dir: Path) -> dict:
    """The deployment config (``MEGAPAIRS_CONFIG``) of the rehearsal: the paper profile with
    tiny models, small batches and the CPU. The generator paths stay in the environment
    (``MEGAPAIRS_MLLM``/``MEGAPAIRS_LLM``, the profile's own ``{env: ...}`` defaults, as the
    README exports them)."""
    clip_model, clip_pretrained = models.clip.hub_pair  # the open_clip hub-layout directory
    run_model, run_weights = models.clip.file_pair  # an architecture + a .safetensors file
    # max_steps on the runs: the paper profile's runs set theirs (15k / 25k), which a run's
    # own value overrides, not the training resource's.
    tiny_run = {"start": run_model, "pretrained": run_weights, "max_steps": 3}
    return {
        "resources": {
            "encoders": {"config": {
                "mode": "pretrained", "clip_model": clip_model, "clip_pretrained": clip_pretrained,
                "dino_model": str(models.dino), "foreground_only": False,
            }},
            "compute": {"config": {"device": "cpu", "dtype": "float32", "batch_size": 16,
                                   "num_workers": 0}},
            "mining": {"config": {
                # Random tiny encoders give arbitrary score distributions (the random DINOv2
                # squeezes its top-20 into ~0.98-0.999, the random CLIP spreads them around
                # zero), so the paper's 0.8 < s < 0.96 could keep no pair at all. The open
                # window (0, 1) keeps every neighbour with a positive score short of an exact
                # duplicate: mining, its checks and everything after it get pairs to work on.
                "windows": {"clip_image": [0.0, 1.0], "dino_image": [0.0, 1.0],
                            "clip_caption": [0.0, 1.0]},
                "targets_per_query": 2, "num_hard_negatives": 3,
            }},
            "generation": {"config": {
                "backend": "transformers",
                "description_model": {"env": "MEGAPAIRS_MLLM"},
                "instruction_model": {"env": "MEGAPAIRS_LLM"},
                "device": "cpu", "dtype": "float32", "max_new_tokens": MAX_NEW_TOKENS,
                "batch_size": 8, "chunk_size": 16,
            }},
            # Two training processes through torchrun and Pipes (gloo on the CPU), the global
            # batch of 4 as before; resumable state through the S3 store. The tiny EVA CLIP has
            # no transformers CLIPModel layout, so no export.
            "training": {"config": {"max_steps": 3, "batch_size": 2, "warmup_steps": 1,
                                    "learning_rate": 5.0e-6, "nproc_per_node": 2,
                                    "grad_accum_steps": 1, "checkpoint_every": 2,
                                    "num_workers": 0, "export_transformers": False}},
            "benchmark_data": {"config": {
                "circo_annotations": str(circo_dir / "annotations" / "val.json"),
                "circo_images": str(circo_dir / "images"),
            }},
        },
        # Both sizes start from the tiny CLIP's weights file (no hub download).
        "training_runs": {"base": dict(tiny_run), "large": dict(tiny_run)},
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def add_postgres_storage(dagster_yaml: Path, postgres_db: Mapping) -> None:
    """Give an instance config (``config/dagster.yaml`` as copied) Postgres storage."""
    config = yaml.safe_load(dagster_yaml.read_text()) or {}
    config["storage"] = {"postgres": {"postgres_db": dict(postgres_db)}}
    write_yaml(dagster_yaml, config)


def make_bucket(url: str, storage_options: dict) -> None:
    """Create the bucket of ``url`` (a deployment's store bucket exists before it runs)."""
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)


def upload_folder(local: Path, url: str, storage_options: dict) -> None:
    import s3fs

    make_bucket(url, storage_options)
    fs = s3fs.S3FileSystem(**storage_options)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{url.rstrip('/')}/{file.relative_to(local).as_posix()}", file.read_bytes())


def s3_listing(url: str, storage_options: dict) -> dict[str, int]:
    """Every object below ``url`` with its size."""
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    fs.invalidate_cache()
    prefix = url.removeprefix("s3://").rstrip("/")
    return {path.removeprefix(prefix + "/"): info["size"]
            for path, info in fs.find(prefix, detail=True).items()}


# --- snapshots ------------------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root``, by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file()
    }


def files_below(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def entries_below(root: Path) -> list[str]:
    """Files and folders below ``root`` (an empty folder created there counts too)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# Folders of the checkout where a stray write of the pipeline would land (the demo's default
# paths, the paper's default Dagster home) and the checkout's top level.
CHECKOUT_WATCHED = ("data", ".dagster_home", ".dagster_paper", "tmp")
CHECKOUT_TOP_LEVEL_NOISE = {".pytest_cache", ".ruff_cache", ".coverage"}


def checkout_snapshot(repo: Path = REPO) -> dict[str, object]:
    """What a stray write would change in the checkout: top-level names, and every file (with
    size and mtime) under the watched folders. Files other engineers edit are not in it."""
    watched = {}
    for name in CHECKOUT_WATCHED:
        folder = repo / name
        if folder.exists():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    watched[path.relative_to(repo).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    top = sorted(p.name for p in repo.iterdir() if p.name not in CHECKOUT_TOP_LEVEL_NOISE)
    return {"top_level": top, "watched": watched}


# --- the README ---------------------------------------------------------------------------------


def readme_bash_blocks(section: str, readme: Path = REPO / "README.md") -> list[list[str]]:
    """The ```bash blocks of a README section (``## <section>``), as lists of lines."""
    text = readme.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end >= 0 else None]
    return [block.strip("\n").splitlines() for block in re.findall(r"```bash\n(.*?)```", body, re.DOTALL)]


_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


def export_names(line: str) -> list[str]:
    """The variables an ``export A=1 B=2 && ...  # comment`` line assigns ([] otherwise)."""
    if not line.startswith("export "):
        return []
    head = line.split("&&")[0].split(" #")[0]
    return [m.group(1) for word in shlex.split(head)[1:] if (m := _ASSIGNMENT.match(word))]


def substitute_exports(line: str, values: Mapping[str, str]) -> str:
    """``line`` with the value of every ``export`` assignment replaced by ``values[name]``;
    the rest of the line (``&& ...`` commands, comments) stays as written."""
    names = export_names(line)
    if not names:
        return line
    head, sep, tail = line.partition(" &&")
    head = head.split(" #")[0]
    missing = [name for name in names if name not in values]
    if missing:
        raise KeyError(f"README exports {missing} that the rehearsal gives no value: {line}")
    assigned = " ".join(f"{name}={shlex.quote(values[name])}" for name in names)
    return f"export {assigned}" + (f"{sep}{tail}" if sep else "")


# --- running commands -----------------------------------------------------------------------------


@dataclass
class CommandLog:
    """Every shell command the rehearsal ran, with its duration (printed at the end)."""

    entries: list[tuple[str, float]] = field(default_factory=list)

    def run(self, script: str, *, env: Mapping[str, str], cwd: Path, timeout: float = 300,
            check: bool = True, label: str | None = None) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run(["bash", "-c", script], cwd=cwd, env=dict(env), text=True,
                              capture_output=True, timeout=timeout, check=False)
        seconds = time.monotonic() - started
        label = label or script.strip().splitlines()[-1][:110]
        self.entries.append((label, seconds))
        print(f"[rehearsal] {seconds:6.1f}s  rc={done.returncode}  {label}", flush=True)
        if check and done.returncode != 0:
            raise AssertionError(f"command failed ({done.returncode}) after {seconds:.0f}s:\n"
                                 f"{script}\n--- stdout\n{done.stdout[-6000:]}\n"
                                 f"--- stderr\n{done.stderr[-10000:]}")
        return done

    def report(self) -> str:
        width = max((len(label) for label, _ in self.entries), default=0)
        return "\n".join(f"{seconds:6.1f}s  {label:<{width}}" for label, seconds in self.entries)


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The process environment without any deployment setting of the caller, plus ``extra``."""
    drop = ("MEGAPAIRS_", "DAGSTER_", "AWS_", "XDG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def copy_instance_config(dagster_home: Path) -> None:
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config" / "dagster.yaml", dagster_home / "dagster.yaml")
