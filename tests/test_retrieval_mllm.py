"""MMRet-MLLM on a tiny random LLaVA-NeXT: the released input format, last-token embeddings,
training through train_mmret (LoRA only, resume, two gloo processes with gradient
accumulation), checkpoints.

This file is also the worker torchrun starts: run as a script it trains the tiny model from
the base directory given as first argument and rank 0 writes its losses to the second.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from synthetic_shapes import shape_image
from test_retrieval_train import shape_examples, shape_images
from tiny_llava_next import IMAGE_SIDE, save_tiny_llava_next
from torchrun import run_two_processes
from transformers import LlavaNextForConditionalGeneration

from megapairs_dagster.retrieval import MMRetMLLM, MMRetTrainingSet, TrainConfig, train_mmret
from megapairs_dagster.retrieval.train import STATE_FILE

pytestmark = pytest.mark.slow

# A 32-pixel image: a 2x2-patch base tile, a 2x2-tile grid of 4x4 patches and one newline
# token per grid row.
IMAGE_TOKENS = 2 * 2 + 4 * 4 + 4
TASK = "Find the target image:"  # short, so that the tiny model's sequences stay short
STEPS, GLOBAL_BATCH = 3, 4


def mllm(base: Path, seed: int = 0) -> MMRetMLLM:
    torch.manual_seed(seed)
    return MMRetMLLM.from_llava_next(base, image_side=IMAGE_SIDE, task_instruction=TASK)


def dataset(model: MMRetMLLM, count: int = 8) -> MMRetTrainingSet:
    """Two hard negatives per query (the query image and one mined): 3 candidates each."""
    return MMRetTrainingSet(
        shape_examples(count), shape_images().__getitem__,
        preprocess=model.preprocess, tokenizer=model.tokenize, hard_negatives=2,
    )


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{
        "max_steps": STEPS, "batch_size": GLOBAL_BATCH, "learning_rate": 2e-3, "seed": 1,
        **overrides,
    })


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="module")
def trained(base):
    """A model after a few steps, and its report (the adapter is no longer zero)."""
    model = mllm(base)
    return model, train_mmret(model, dataset(model), config())


def expanded_ids(model: MMRetMLLM, prompt: str) -> list[int]:
    image = model.processor.image_token
    return model.processor.tokenizer(prompt.replace(image, image * IMAGE_TOKENS))["input_ids"]


def test_query_and_candidate_inputs_are_formatted_as_released(base):
    model = mllm(base)
    red, blue = (shape_image("circle", c, "white", size=48) for c in ("red", "blue"))
    query = model.data_process(text=["make it blue", "a much longer instruction here"],
                               images=[red, blue], q_or_c="q")
    short = query["input_ids"][0][query["attention_mask"][0].bool()].tolist()
    assert short == expanded_ids(
        model, "[INST] \n <instruct> Find the target image: <query>  make it blue \n <image> [/INST]"
    )
    # Left padding: the shorter row starts with pads, and both rows end on the prompt's end.
    pads = len(query["input_ids"][0]) - len(short)
    assert pads > 0 and not query["attention_mask"][0][:pads].any()
    assert query["input_ids"][0][-1] == query["input_ids"][1][-1] == short[-1]

    other = model.data_process(text="make it blue", images=red, q_or_c="query",
                               task_instruction="Retrieve:")["input_ids"][0].tolist()
    assert other == expanded_ids(
        model, "[INST] \n <instruct> Retrieve: <query>  make it blue \n <image> [/INST]"
    )
    candidates = model.data_process(images=[red, blue], q_or_c="c")
    assert candidates["input_ids"][0].tolist() == expanded_ids(model, "[INST]  <image> [/INST]")
    captioned = model.data_process(text="a red circle", images=red, q_or_c="candidate")
    assert captioned["input_ids"][0].tolist() == expanded_ids(
        model, "[INST]  a red circle \n <image> [/INST]"
    )
    text_only = model.data_process(text="a red circle", q_or_c="c")
    assert text_only["input_ids"][0].tolist() == model.processor.tokenizer(
        "[INST]  a red circle \n [/INST]")["input_ids"]
    assert "pixel_values" not in text_only

    # Training items: the same ids and pixels, without the processor's per-item image pass.
    assert model.tokenize(["make it blue"])[0].tolist() == short
    assert torch.equal(model.preprocess(red), query["pixel_values"][0])
    with pytest.raises(ValueError, match="q_or_c"):
        model.data_process(text="x", q_or_c="target")


def test_embedding_is_the_normalised_last_token_whatever_the_padding(base):
    model = mllm(base)
    red = shape_image("square", "red", "white", size=40)
    alone = model.encode(images=red, text="make it green")
    batched = model.encode(images=[red, red], text=["make it green", "x " * 30])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(2))
    inputs = model.data_process(text="make it green", images=red, q_or_c="q")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True)  # the released call
    assert torch.allclose(F.normalize(hidden[:, -1], dim=-1), alone, atol=1e-6)
    # Images alone are candidates, and a candidate is not the query of the same image.
    assert not torch.allclose(model.encode(images=red), alone, atol=1e-3)


def test_training_lowers_the_loss_and_trains_only_the_adapter(base, trained):
    model, report = trained
    assert report.losses[-1] < report.losses[0]
    assert model.llava.is_gradient_checkpointing
    fresh = LlavaNextForConditionalGeneration.from_pretrained(base).state_dict()
    changed = {name for name, value in model.llava.state_dict().items()
               if "lora_" in name and value.abs().sum() > 0 and "lora_B" in name}
    assert changed  # LoRA B starts at zero: trained adapters moved
    for name, value in model.llava.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, fresh[name.replace(".base_layer", "")]), name


def test_resumed_training_continues_exactly(base, trained, tmp_path):
    _, straight = trained
    first = mllm(base)
    train_mmret(first, dataset(first), config(checkpoint_dir=str(tmp_path)),
                progress=lambda p: p.step == 2)  # stops after step 2, as a crash would
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["model"] and all("lora_" in name for name in state["model"])  # no base
    resumed = mllm(base, seed=7)  # another adapter initialisation, replaced by the state's
    report = train_mmret(resumed, dataset(resumed), config(checkpoint_dir=str(tmp_path)))
    assert report.resumed_from_step == 2
    assert report.losses == pytest.approx(straight.losses, rel=1e-5)


@pytest.mark.parametrize("merge_lora", [False, True])
def test_checkpoint_round_trip_gives_the_same_embeddings(base, trained, tmp_path, merge_lora):
    model, _ = trained
    images = [shape_image("triangle", "blue", "white", size=56), shape_image("circle", "red",
                                                                             "yellow", size=64)]
    queries = model.encode(images=images, text=["make it red", "the same on white"])
    candidates = model.encode(images=images)
    saved = model.save_pretrained(tmp_path / "mmret-mllm", merge_lora=merge_lora)
    assert (saved / "adapter_config.json").exists() != merge_lora
    loaded = MMRetMLLM.from_pretrained(saved)
    assert loaded.has_lora != merge_lora and loaded.mmret["task_instruction"] == TASK
    # Merging sums the adapter into the weights: the same function, other float rounding.
    tolerance = 1e-5 if merge_lora else 0.0
    assert torch.allclose(loaded.encode(images=images, text=["make it red", "the same on white"]),
                          queries, atol=tolerance, rtol=0)
    assert torch.allclose(loaded.encode(images=images), candidates, atol=tolerance, rtol=0)
    assert model.has_lora  # merging worked on a copy
    if merge_lora:  # a plain LLaVA-NeXT checkpoint, like the released weights
        LlavaNextForConditionalGeneration.from_pretrained(saved)
    with pytest.raises(ValueError, match="already holds"):
        model.save_pretrained(saved, merge_lora=not merge_lora)


def test_an_in_memory_base_trains_like_the_same_base_from_disk(base, tmp_path):
    """What bench/gpu.py does with a 7B-sized model built from its config: no files."""
    from_disk = mllm(base)
    llava = LlavaNextForConditionalGeneration.from_pretrained(base)
    with pytest.raises(ValueError, match="needs its processor"):
        MMRetMLLM.from_llava_next(llava)
    torch.manual_seed(0)  # the adapter's initialisation, as mllm() draws it
    in_memory = MMRetMLLM.from_llava_next(
        llava, processor=from_disk.processor, image_side=IMAGE_SIDE, task_instruction=TASK
    )
    losses = [train_mmret(model, dataset(model), config()).losses
              for model in (from_disk, in_memory)]
    assert losses[0] == losses[1]
    assert in_memory.mmret["base_model"] is None
    saved = in_memory.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="name its base_model"):
        MMRetMLLM.from_pretrained(saved)
    loaded = MMRetMLLM.from_pretrained(saved, base_model=base)
    images = [shape_image("star", "green", "white", size=40)]
    assert torch.equal(loaded.encode(images=images), in_memory.encode(images=images))


def test_two_processes_match_one_process_with_the_global_batch(base, trained, tmp_path):
    out = tmp_path / "ddp_losses.json"
    completed = run_two_processes(__file__, str(base), str(out), timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    distributed = json.loads(out.read_text())
    assert distributed["world_size"] == 2 and distributed["samples"] == STEPS * GLOBAL_BATCH
    _, single = trained
    # Each process pads its own queries (positions shift) and accumulates two micro-batches
    # of one (cached embeddings, then one backward each): only float rounding differs.
    assert distributed["losses"] == pytest.approx(single.losses, rel=1e-4)
    assert len(set(single.losses)) == STEPS


if __name__ == "__main__":
    worker = mllm(Path(sys.argv[1]))
    world_size = int(os.environ["WORLD_SIZE"])
    report = train_mmret(worker, dataset(worker), config(
        batch_size=GLOBAL_BATCH // world_size // 2, grad_accum_steps=2
    ))
    if int(os.environ["RANK"]) == 0:
        Path(sys.argv[2]).write_text(json.dumps(
            {"losses": report.losses, "samples": report.samples, "world_size": report.world_size}
        ))
