"""MMRet-MLLM: a LLaVA-NeXT (LLaVA-1.6) embedder trained with LoRA.

Inputs follow the released BGE-VL-MLLM's ``data_process`` (its model code, read for the
format): a query is ``[INST] \\n <instruct> {task_instruction} <query>  {text} \\n <image>
[/INST]``, a candidate ``[INST]  <image> [/INST]`` (with `` {text} \\n`` before the image when
it has text); every image is first resized to ``image_side`` squared (512 there), so all
images have the same number of tiles and image tokens. The embedding is the L2-normalised
last hidden state of the final token; sequences are padded on the LEFT, so the final token
is position -1 of every row, which is what users of the released model take
(``model(**inputs)[:, -1, :]``).

LoRA (peft): rank 32 (the paper's), alpha 64 (2 x rank, the usual scale), dropout 0 (the
trainer's cached-embedding accumulation embeds each micro-batch twice and needs the same
forward both times; dropout would also make one and two DDP processes differ), on every
linear layer of the language model (attention q/k/v/o and MLP gate/up/down), as LLaVA-NeXT
embedders such as VLM2Vec do; the vision tower and projector stay frozen.

``train_mmret`` trains it like MMRet-CLIP (global-batch InfoNCE, query image first among
the hard negatives, DDP, accumulation, resume) through the hooks here: ``preprocess`` /
``tokenize`` build ``MMRetTrainingSet`` items, ``collate`` left-pads their prompts,
``training_embeddings`` embeds a batch in ONE forward (DistributedDataParallel needs one)
and ``training_state_dict`` keeps only the adapter in training states. Gradient
checkpointing is on (non-reentrant: the frozen base's inputs need no gradient, and DDP
accepts it); on CUDA the trainer's bf16 autocast computes, and ``dtype=torch.bfloat16``
also stores the frozen base in bf16 (the adapter stays float32).

    model = MMRetMLLM.from_llava_next("llava-hf/llava-v1.6-mistral-7b-hf")
    train_mmret(model, MMRetTrainingSet(examples, load_image, preprocess=model.preprocess,
                                        tokenizer=model.tokenize), TrainConfig(max_steps=...))
    model.save_pretrained(out, merge_lora=True)
    model = MMRetMLLM.from_pretrained(out)          # or the released BAAI/BGE-VL-MLLM-S1
    inputs = model.data_process(text="make it red", images="q.jpg", q_or_c="q",
                                task_instruction=CIR_TASK_INSTRUCTION)
    query = F.normalize(model(**inputs)[:, -1, :], dim=-1)   # the released model's call
    scores = query.cpu() @ model.encode(images=["a.jpg", "b.jpg"]).T  # candidates
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from torch.utils.data import default_collate
from transformers import BatchFeature, LlavaNextForConditionalGeneration, LlavaNextProcessor

from megapairs_dagster.synthesis.encoders import resolve_device

from .model import DEFAULT_TEMPERATURE, ImageInput, TextInput, _inputs, _open_image

# The released model card's instruction for composed image retrieval: the default task.
CIR_TASK_INSTRUCTION = (
    "Retrieve the target image that best meets the combined criteria by using both the "
    "provided image and the image retrieval instructions: "
)
DEFAULT_IMAGE_SIDE = 512  # the released data_process resizes every image to 512 x 512
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 32, 64, 0.0
# Linear layers of the language model only (not the CLIP vision tower's q/k/v/out_proj).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CONFIG_FILE = "mmret_mllm.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # what peft's save_pretrained writes
QUERY, CANDIDATE = "q", "c"
ROLES = {"q": QUERY, "query": QUERY, "c": CANDIDATE, "candidate": CANDIDATE}
ENCODE_BATCH_SIZE = 16


def query_prompt(text: str | None, image_token: str | None, task_instruction: str) -> str:
    """The released query format; ``image_token`` None for a text-only query."""
    return _close(f"[INST] \n <instruct> {task_instruction} <query> ", text, image_token)


def candidate_prompt(text: str | None, image_token: str | None) -> str:
    return _close("[INST] ", text, image_token)


def _close(prompt: str, text: str | None, image_token: str | None) -> str:
    if text is not None:
        prompt = f"{prompt} {text} \n"
    if image_token is not None:
        prompt = f"{prompt} {image_token}"
    return f"{prompt} [/INST]"


def _left_pad(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int):
    extra = length - ids.shape[1]
    return F.pad(ids, (extra, 0), value=pad_id), F.pad(mask, (extra, 0), value=0)


class MLLMInputs:
    """The processor side of MMRet-MLLM: prompts, pixels, padding. Holds no model weights, so
    its ``preprocess`` / ``tokenize`` / ``collate`` travel cheaply to DataLoader workers.

    It caches what training items need: the number of image tokens of an
    ``image_side``-square image and the (text-free, so constant) candidate prompt."""

    def __init__(self, processor: LlavaNextProcessor, *, task_instruction: str, image_side: int):
        processor.tokenizer.padding_side = "left"
        self.processor = processor
        self.task_instruction = task_instruction
        self.image_side = image_side
        blank = Image.new("RGB", (image_side, image_side))
        candidate = processor(
            text=[candidate_prompt(None, processor.image_token)], images=[blank],
            return_tensors="pt",
        )
        self.candidate_ids = candidate["input_ids"][0]
        self.image_size = candidate["image_sizes"][0]
        self.image_tokens = int((self.candidate_ids == processor.image_token_id).sum())

    def process(self, text, images, q_or_c: str, task_instruction: str | None) -> BatchFeature:
        """``MMRetMLLM.data_process`` on the CPU."""
        if q_or_c not in ROLES:
            raise ValueError(f"q_or_c must be one of {sorted(ROLES)}, got {q_or_c!r}")
        image_list, text_list, count = _inputs(images, text)
        texts = text_list or [None] * count
        image_token = None if image_list is None else self.processor.image_token
        if ROLES[q_or_c] == QUERY:
            instruction = self.task_instruction if task_instruction is None else task_instruction
            prompts = [query_prompt(t, image_token, instruction) for t in texts]
        else:
            prompts = [candidate_prompt(t, image_token) for t in texts]
        pixels = None if image_list is None else [self.resized(image) for image in image_list]
        return self.processor(text=prompts, images=pixels, return_tensors="pt", padding=True)

    def resized(self, image: ImageInput) -> Image.Image:
        return _open_image(image).resize((self.image_side, self.image_side))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Pixel tiles [P, C, H, W] of one image, as ``process`` makes them."""
        return self.processor.image_processor(
            images=[self.resized(image)], return_tensors="pt"
        )["pixel_values"][0]

    def tokenize(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Unpadded token ids of the query prompts of ``texts`` (each with one image): the
        ids ``process`` gives, without processing an image again for each (the image token
        is expanded to the cached count, as the processor would)."""
        image_token = self.processor.image_token
        expanded = image_token * self.image_tokens
        prompts = [
            query_prompt(text, image_token, self.task_instruction).replace(image_token, expanded)
            for text in texts
        ]
        return [torch.tensor(ids) for ids in self.processor.tokenizer(prompts)["input_ids"]]

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """A DataLoader batch of ``MMRetTrainingSet`` items: query prompts left-padded
        (``instruction``, ``instruction_mask``), pixels stacked. Captions are dropped:
        MMRet-MLLM trains on triplets only."""
        prompts = [{"input_ids": item["instruction"]} for item in items]
        padded = self.processor.tokenizer.pad(prompts, padding=True, return_tensors="pt")
        rest = [
            {key: value for key, value in item.items() if key not in ("instruction", "caption")}
            for item in items
        ]
        return {
            **default_collate(rest),
            "instruction": padded["input_ids"],
            "instruction_mask": padded["attention_mask"],
        }


class MMRetMLLM(torch.nn.Module):
    """A LLaVA-NeXT retriever; ``model`` is the LLaVA-NeXT model, wrapped by peft when it
    carries a separate LoRA adapter (trained or loaded), plain when merged or released."""

    def __init__(
        self,
        model: LlavaNextForConditionalGeneration | PeftModel,
        processor: LlavaNextProcessor | str | Path,
        *,
        mmret: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.mmret = {
            "task_instruction": CIR_TASK_INSTRUCTION,
            "image_side": DEFAULT_IMAGE_SIDE,
            "temperature": DEFAULT_TEMPERATURE,
            **(mmret or {}),
        }
        self.set_processor(processor)

    @property
    def llava(self) -> LlavaNextForConditionalGeneration:
        """The LLaVA-NeXT model (with the LoRA layers injected, when there are some)."""
        return self.model.get_base_model() if self.has_lora else self.model

    @property
    def has_lora(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.llava.config.text_config.hidden_size

    # -- the released inference API ----------------------------------------------------

    def set_processor(self, processor: LlavaNextProcessor | str | Path) -> None:
        """Use ``processor`` (or load it from a directory or hub name), padding on the left."""
        if not isinstance(processor, LlavaNextProcessor):
            processor = LlavaNextProcessor.from_pretrained(processor)
        self.inputs = MLLMInputs(
            processor, task_instruction=self.mmret["task_instruction"],
            image_side=self.mmret["image_side"],
        )
        self.processor = processor
        # What MMRetTrainingSet and train_mmret take, as from MMRetCLIP.
        self.preprocess, self.tokenize, self.collate = (
            self.inputs.preprocess, self.inputs.tokenize, self.inputs.collate
        )

    def data_process(
        self,
        text: TextInput | Sequence[TextInput] | None = None,
        images: ImageInput | Sequence[ImageInput] | None = None,
        q_or_c: str = QUERY,
        task_instruction: str | None = None,
    ) -> BatchFeature:
        """Model inputs (on the model's device) of queries (``q_or_c`` "q") or candidates
        ("c"): item i is (text[i], images[i]), either may be None. Images are paths, URLs or
        PIL images. A query without ``task_instruction`` gets the model's default (the
        released code then leaves it empty, with a warning)."""
        return self.inputs.process(text, images, q_or_c, task_instruction).to(self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Last hidden states [B, L, D]; row b's embedding is ``[b, -1]`` (left padding).
        Runs LLaVA-NeXT's base model, so no language-model head is computed, and keeps no
        key-value cache unless asked (an embedding generates nothing)."""
        return self.llava.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_sizes=image_sizes, **{"use_cache": False, **kwargs},
        ).last_hidden_state

    def embed(self, inputs: BatchFeature | dict) -> torch.Tensor:
        """Normalised float32 embeddings [B, D] of ``data_process`` output."""
        return F.normalize(self(**inputs)[:, -1].float(), dim=-1)

    @torch.no_grad()
    def encode(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        text: TextInput | Sequence[TextInput] | None = None,
        *,
        q_or_c: str | None = None,
        task_instruction: str | None = None,
        batch_size: int = ENCODE_BATCH_SIZE,
    ) -> torch.Tensor:
        """L2-normalised float32 CPU embeddings [N, D], ``batch_size`` at a time, as
        MMRetCLIP.encode gives them (the evaluation's interface): inputs with text are
        queries, images alone are candidates, unless ``q_or_c`` says otherwise."""
        image_list, text_list, count = _inputs(images, text)
        role = q_or_c or (QUERY if text_list is not None else CANDIDATE)
        was_training = self.training
        self.eval()
        chunks = []
        try:
            for start in range(0, count, batch_size):
                rows = slice(start, start + batch_size)
                inputs = self.data_process(
                    text=None if text_list is None else text_list[rows],
                    images=None if image_list is None else image_list[rows],
                    q_or_c=role, task_instruction=task_instruction,
                )
                chunks.append(self.embed(inputs).cpu())
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)

    # -- training hooks (train_mmret) ---------------------------------------------------

    def training_embeddings(
        self,
        forward: Callable[..., torch.Tensor],
        batch: dict[str, torch.Tensor],
        autocast,
        query_as_negative: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Normalised ``queries``, ``positives`` and ``negatives`` [B, K, D] (the query
        image, embedded as a candidate, first unless ``query_as_negative`` is off) of a
        collated batch, from one call of ``forward`` (this model, or its DDP wrapper) over
        the queries and all candidates, left-padded to one length."""
        queries, mined = batch["query"], batch["negatives"]
        size, others = len(queries), mined.shape[1]
        candidates = torch.cat(
            [batch["positive"], *([queries] if query_as_negative else []), mined.flatten(0, 1)]
        )
        length = max(batch["instruction"].shape[1], len(self.inputs.candidate_ids))
        pad_id = self.processor.tokenizer.pad_token_id
        query_ids, query_mask = _left_pad(
            batch["instruction"], batch["instruction_mask"], length, pad_id
        )
        candidate_ids = self.inputs.candidate_ids.to(queries.device).expand(len(candidates), -1)
        candidate_ids, candidate_mask = _left_pad(
            candidate_ids, torch.ones_like(candidate_ids), length, pad_id
        )
        pixel_values = torch.cat([queries, candidates])
        with autocast:
            hidden = forward(
                input_ids=torch.cat([query_ids, candidate_ids]),
                attention_mask=torch.cat([query_mask, candidate_mask]),
                pixel_values=pixel_values,
                image_sizes=self.inputs.image_size.to(queries.device).expand(len(pixel_values), -1),
            )
        embeddings = F.normalize(hidden[:, -1].float(), dim=-1)
        query, positive, query_image, negative = embeddings.split(
            [size, size, size * query_as_negative, size * others]
        )
        negatives = negative.view(size, others, embeddings.shape[-1])  # others may be 0
        if query_as_negative:
            negatives = torch.cat([query_image[:, None], negatives], dim=1)
        return {"queries": query, "positives": positive, "negatives": negatives}

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights: what a training state keeps (the base is frozen)."""
        return get_peft_model_state_dict(self.model)

    def load_training_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.model, state)

    # -- checkpoints -------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | Path, *, merge_lora: bool = False) -> Path:
        """Write the checkpoint to ``out_dir`` and return it: the processor, ``mmret_mllm.json``
        and either the LoRA adapter alone (peft's files; the base is read again from
        ``mmret["base_model"]`` on loading) or, with ``merge_lora`` (or no adapter), a whole
        LLaVA-NeXT model that ``LlavaNextForConditionalGeneration.from_pretrained`` opens,
        as the released weights are. Merging works on a copy (the model's memory once
        more), so this model keeps training with its adapter."""
        out = Path(out_dir)
        separate = self.has_lora and not merge_lora
        if (out / (ADAPTER_CONFIG_FILE if not separate else "config.json")).exists():
            raise ValueError(
                f"{out} already holds a checkpoint with the LoRA "
                f"{'separate' if not separate else 'merged'}; save each to its own directory"
            )
        out.mkdir(parents=True, exist_ok=True)
        merged = self.has_lora and not separate
        (copy.deepcopy(self.model).merge_and_unload() if merged else self.model).save_pretrained(out)
        self.processor.save_pretrained(out)
        layout = {"lora_layout": "separate" if separate else "merged"}
        (out / CONFIG_FILE).write_text(json.dumps({**self.mmret, **layout}, indent=2))
        return out

    @classmethod
    def from_llava_next(
        cls,
        base_model: str | Path | LlavaNextForConditionalGeneration,
        *,
        processor: LlavaNextProcessor | None = None,
        lora_rank: int = LORA_RANK,
        lora_alpha: int = LORA_ALPHA,
        lora_dropout: float = LORA_DROPOUT,
        target_modules: str | list[str] = LORA_TARGETS,
        task_instruction: str = CIR_TASK_INSTRUCTION,
        image_side: int = DEFAULT_IMAGE_SIDE,
        gradient_checkpointing: bool = True,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> MMRetMLLM:
        """Start training from a LLaVA-NeXT model (directory or hub name, e.g.
        ``llava-hf/llava-v1.6-mistral-7b-hf``) and its processor, with a fresh LoRA adapter.
        ``dtype`` is the frozen base's, None for the checkpoint's own (bf16 halves a 7B
        model's memory; the adapter stays float32, the trainer's autocast computes in bf16
        on CUDA). An in-memory model (random weights built from a config, say) needs its
        ``processor``; a separate adapter saved from it then needs ``base_model`` to load."""
        lora = {"r": lora_rank, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                "target_modules": target_modules}
        in_memory = isinstance(base_model, LlavaNextForConditionalGeneration)
        if in_memory and processor is None:
            raise ValueError("an in-memory base model needs its processor")
        llava = cls._base(base_model, dtype, gradient_checkpointing)
        mmret = {
            "base_model": None if in_memory else str(base_model),
            "task_instruction": task_instruction,
            "image_side": image_side, "lora": lora,
            "gradient_checkpointing": gradient_checkpointing,
        }
        model = get_peft_model(llava, LoraConfig(**lora))
        return cls(model, processor or base_model, mmret=mmret).to(resolve_device(device))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        base_model: str | Path | None = None,
        trainable: bool = False,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> MMRetMLLM:
        """Open a ``save_pretrained`` directory of either kind, or a LLaVA-NeXT checkpoint
        such as the released BGE-VL-MLLM weights (default ``mmret`` settings). A separate
        adapter goes onto ``base_model`` (default: the one it was trained from); with
        ``trainable`` it trains on (resume training from a saved adapter)."""
        directory = Path(path)
        config_file = directory / CONFIG_FILE
        mmret = json.loads(config_file.read_text()) if config_file.exists() else {}
        mmret.pop("lora_layout", None)  # describes the files, not the model
        checkpointing = trainable and mmret.get("gradient_checkpointing", True)
        if (directory / ADAPTER_CONFIG_FILE).exists():
            base = base_model or mmret.get("base_model")
            if base is None:
                raise ValueError(f"{directory} holds a LoRA adapter; name its base_model")
            model = PeftModel.from_pretrained(
                cls._base(base, dtype, checkpointing), directory, is_trainable=trainable
            )
        else:
            if trainable:
                raise ValueError(
                    f"{directory} has no separate adapter to train; start a new one with "
                    f"MMRetMLLM.from_llava_next({str(path)!r})"
                )
            model = cls._base(path, dtype, False)
        return cls(model, path, mmret=mmret).to(resolve_device(device))

    @staticmethod
    def _base(
        source: str | Path | LlavaNextForConditionalGeneration,
        dtype: torch.dtype | None,
        gradient_checkpointing: bool,
    ) -> LlavaNextForConditionalGeneration:
        if isinstance(source, LlavaNextForConditionalGeneration):
            llava = source if dtype is None else source.to(dtype)
        else:
            llava = LlavaNextForConditionalGeneration.from_pretrained(source, dtype=dtype)
        if gradient_checkpointing:  # non-reentrant: works with frozen inputs and with DDP
            llava.activation_checkpointing_enable({"use_reentrant": False})
        return llava
