"""The transformers backends, run on tiny random models saved to disk and loaded back."""

from __future__ import annotations

import hashlib
import io
import time

import pytest
import torch
from fixtures_images import noise_jpeg, truncated_jpeg
from PIL import Image
from tiny_hf_models import save_tiny_llava, save_tiny_llm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from megapairs_dagster.synthesis.encoders import ModelMismatchError, RecordedFiles
from megapairs_dagster.synthesis.generation.backends import (
    BackendSettings,
    make_describer,
    make_instructor,
)
from megapairs_dagster.synthesis.generation.base import (
    DescriptionRequest,
    InstructionRequest,
    PairInput,
)
from megapairs_dagster.synthesis.generation.hf import (
    SeededSampler,
    TransformersDescriber,
    TransformersInstructor,
)

NEW_TOKENS = 12


def instruction_prompt(request: InstructionRequest) -> str:
    return f"Rewrite as instructions: {request.description}"


def description_prompt(request: DescriptionRequest) -> str:
    return f"Describe both images in {request.word_budget} words."


def make_pair(index: int) -> PairInput:
    return PairInput(
        pair_id=f"{index}-{index + 100}",
        query_jpeg=noise_jpeg((48, 40), seed=index),
        target_jpeg=noise_jpeg((40, 56), seed=1000 + index),
        query_caption="a red bicycle",
        target_caption="a blue bicycle",
    )


def instruction_requests(count: int, seed: int = 0) -> list[InstructionRequest]:
    return [
        InstructionRequest(make_pair(i), f"Both show a bicycle; variant {i}. " * (1 + i % 3), (),
                           seed=seed + i)
        for i in range(count)
    ]


def description_requests(count: int, seed: int = 0) -> list[DescriptionRequest]:
    return [DescriptionRequest(make_pair(i), 60 + i, seed=seed + i) for i in range(count)]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return save_tiny_llm(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava"))


def instructor(llm_dir, **settings) -> TransformersInstructor:
    settings = {"max_new_tokens": NEW_TOKENS, "batch_size": 4, **settings}
    return TransformersInstructor(str(llm_dir), render_prompt=instruction_prompt, **settings)


def describer(llava_dir, **settings) -> TransformersDescriber:
    settings = {"max_new_tokens": NEW_TOKENS, "batch_size": 4, **settings}
    return TransformersDescriber(str(llava_dir), render_prompt=description_prompt, **settings)


# --- instructor -------------------------------------------------------------------------


def test_instructor_is_deterministic_per_seed(llm_dir):
    backend = instructor(llm_dir, temperature=1.0)
    requests = instruction_requests(4)
    first = backend.instruct(requests)
    assert len(first) == 4 and all(isinstance(text, str) and text for text in first)
    assert backend.instruct(requests) == first
    assert backend.instruct(instruction_requests(4, seed=50)) != first


def test_instructor_output_does_not_depend_on_the_batch(llm_dir):
    """Per-request generators: 4 requests in batches of 3 + 1, or of 4, equal 4 single calls."""
    requests = instruction_requests(4)
    for temperature, batch_size in ((1.0, 3), (0.0, 4)):
        backend = instructor(llm_dir, temperature=temperature, batch_size=batch_size)
        assert backend.instruct(requests) == [backend.instruct([r])[0] for r in requests]


def test_instructor_greedy_equals_direct_generate(llm_dir):
    backend = instructor(llm_dir, temperature=0.0)
    request = instruction_requests(1)[0]
    prompt = f"<s><|user|>\n{instruction_prompt(request)}\n<|assistant|>\n"
    assert backend.format_prompt(request) == prompt

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    output = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
    expected = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    assert backend.instruct([request]) == [expected]


def test_instructor_without_chat_template_sends_the_plain_prompt(tmp_path):
    backend = instructor(save_tiny_llm(tmp_path, chat_template=None), temperature=0.0)
    request = instruction_requests(1)[0]
    assert backend.format_prompt(request) == instruction_prompt(request)
    assert len(backend.instruct([request])) == 1


def test_instructor_identity_pins_files_and_settings(llm_dir):
    backend = instructor(llm_dir, temperature=0.5)
    identity = backend.identity
    weights = (llm_dir / "model.safetensors").read_bytes()
    assert identity["file_sha256"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= set(identity["file_sha256"])
    assert identity["model"] == str(llm_dir)
    assert identity["settings"]["temperature"] == 0.5
    assert identity["settings"]["max_new_tokens"] == NEW_TOKENS
    # load_kwargs is the dict handed to from_pretrained.
    assert backend.load_kwargs["trust_remote_code"] is False
    assert identity["settings"]["trust_remote_code"] is False


def test_empty_requests_give_empty_lists(llm_dir, llava_dir):
    assert instructor(llm_dir).instruct([]) == []
    assert describer(llava_dir).describe([]) == []


@pytest.mark.parametrize("missing", ["/nonexistent/megapairs-model", "nobody-here/no-such-model"])
def test_missing_model_fails_fast_naming_it(missing):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=missing):
        TransformersInstructor(missing, render_prompt=instruction_prompt)
    with pytest.raises(FileNotFoundError, match=missing):
        TransformersDescriber(missing, render_prompt=description_prompt)
    assert time.monotonic() - start < 5


def test_single_weights_file_asks_for_a_save_pretrained_directory(llm_dir):
    weights = str(llm_dir / "model.safetensors")
    for backend in (TransformersInstructor, TransformersDescriber):
        with pytest.raises(NotADirectoryError, match=f"{weights}.*written by save_pretrained"):
            backend(weights, render_prompt=instruction_prompt)


def test_cuda_device_without_cuda_fails_naming_the_setting_before_loading(
    llm_dir, llava_dir, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_loading(self, model_path):
        raise AssertionError("a model was loaded before the device was checked")

    monkeypatch.setattr(TransformersInstructor, "_load", no_loading)
    monkeypatch.setattr(TransformersDescriber, "_load", no_loading)
    message = (r"generation.device is 'cuda' but this process sees no CUDA device; "
               r"set generation.device to cpu or auto")
    with pytest.raises(RuntimeError, match=message):
        instructor(llm_dir, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        describer(llava_dir, device="cuda")
    settings = BackendSettings(backend="transformers", description_model=str(llava_dir),
                               instruction_model=str(llm_dir), device="cuda")
    for make in (make_describer, make_instructor):
        with pytest.raises(RuntimeError, match=message):
            make(settings)


def test_recorded_file_hashes_are_checked(llm_dir, tmp_path):
    recorded = instructor(llm_dir).identity["file_sha256"]
    same = instructor(llm_dir, expected_files=RecordedFiles(recorded, "instructions"))
    assert same.identity["file_sha256"] == recorded

    changed = save_tiny_llm(tmp_path)  # same files; chat template edited below
    (changed / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(ModelMismatchError) as caught:
        instructor(changed, expected_files=RecordedFiles(recorded, "instructions"))
    message = str(caught.value)
    assert str(changed / "chat_template.jinja") in message
    assert recorded["chat_template.jinja"] in message and "rematerialise instructions" in message


# --- sampler ----------------------------------------------------------------------------


def test_seeded_sampler_draws_from_the_tempered_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -3.0])
    temperature, count = 0.8, 4000
    sampler = SeededSampler(range(count), temperature, top_p=0.95, device=torch.device("cpu"))
    choices = sampler(None, logits.repeat(count, 1)).argmax(dim=-1)
    frequencies = torch.bincount(choices, minlength=4).float() / count
    # Token 3 lies outside the 0.95 nucleus; the other three keep their relative odds.
    assert frequencies[3] == 0
    expected = torch.softmax(logits[:3] / temperature, dim=0)
    assert torch.allclose(frequencies[:3], expected, atol=0.03)


# --- describer --------------------------------------------------------------------------


def test_describer_is_deterministic_per_seed(llava_dir):
    backend = describer(llava_dir, temperature=1.0)
    requests = description_requests(4)
    first = backend.describe(requests)
    assert len(first) == 4 and all(isinstance(text, str) and text for text in first)
    assert backend.describe(requests) == first
    assert backend.describe(description_requests(4, seed=50)) != first


def test_describer_batch_equals_single_calls(llava_dir):
    backend = describer(llava_dir, temperature=0.0)
    requests = description_requests(4)
    assert backend.describe(requests) == [backend.describe([r])[0] for r in requests]


def test_describer_greedy_equals_direct_generate_and_sees_both_images(llava_dir):
    backend = describer(llava_dir, temperature=0.0)
    request = description_requests(1)[0]
    prompt = f"<|user|>\n<image><image>{description_prompt(request)}<|assistant|>\n"
    assert backend.format_prompt(request) == prompt

    processor = AutoProcessor.from_pretrained(llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(llava_dir)
    images = [Image.open(io.BytesIO(data)).convert("RGB")
              for data in (request.pair.query_jpeg, request.pair.target_jpeg)]
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
    expected = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert backend.describe([request]) == [expected]

    pair = request.pair
    swapped = PairInput(pair.pair_id, pair.target_jpeg, pair.query_jpeg,
                        pair.target_caption, pair.query_caption)
    assert backend.describe([DescriptionRequest(swapped, 60, 0)]) != [expected]


def test_describer_honours_dtype(llava_dir):
    backend = describer(llava_dir, dtype="bfloat16", max_new_tokens=4)
    assert backend.model.dtype == torch.bfloat16
    assert backend.identity["settings"]["dtype"] == "torch.bfloat16"
    assert len(backend.describe(description_requests(2))) == 2


def test_describer_rejects_undecodable_image_naming_the_pair(llava_dir):
    backend = describer(llava_dir)
    good = make_pair(0)
    bad = PairInput("7-8", good.query_jpeg, truncated_jpeg(), "a", "b")
    with pytest.raises(ValueError, match="pair 7-8.*target"):
        backend.describe([DescriptionRequest(good, 60, 0), DescriptionRequest(bad, 60, 1)])
    with pytest.raises(ValueError, match="pair 9-9.*query"):
        backend.describe([DescriptionRequest(PairInput("9-9", b"not a jpeg", good.target_jpeg,
                                                       "a", "b"), 60, 0)])
