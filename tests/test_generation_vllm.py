"""The vllm backend's side of the engine boundary: what it hands vLLM, and its errors.

The engine itself is a stand-in here (tests/stand_in_vllm.py says why); the real vLLM engine
runs in test_generation_vllm_engine.py.
"""

from __future__ import annotations

import sys

import pytest
from fixtures_images import noise_jpeg, truncated_jpeg
from stand_in_vllm import StandInVLLM

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
from megapairs_dagster.synthesis.generation.parsing import BACKEND_ERROR
from megapairs_dagster.synthesis.generation.run import generate_descriptions

MODEL = "/models/tiny"


@pytest.fixture
def vllm(monkeypatch) -> StandInVLLM:
    module = StandInVLLM()
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def settings(**changes) -> BackendSettings:
    values = {"backend": "vllm", "description_model": MODEL, "instruction_model": MODEL,
              "temperature": 0.7, "max_new_tokens": 40, "dtype": "bfloat16"}
    return BackendSettings(**{**values, **changes})


def pair(index: int, *, broken: bool = False) -> PairInput:
    return PairInput(
        pair_id=f"{index}-{index + 100}",
        query_jpeg=truncated_jpeg() if broken else noise_jpeg((64, 40), seed=index),
        target_jpeg=noise_jpeg((30, 90), seed=1000 + index),
        query_caption="a red bicycle by a wall", target_caption="a blue bicycle by a river",
    )


def test_without_vllm_the_backend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match="gpu extra.*openai backend"):
        make_instructor(settings())


def test_the_description_step_sends_both_images_scaled_down_with_a_seed_per_request(vllm):
    describer = make_describer(settings(
        image_max_side=32, description_engine_args={"tensor_parallel_size": 2},
    ))
    (engine,) = vllm.engines
    assert engine.model == MODEL
    assert engine.engine_args == {
        "dtype": "bfloat16", "trust_remote_code": False, "seed": 0,
        "limit_mm_per_prompt": {"image": 2}, "tensor_parallel_size": 2,
    }
    requests = [DescriptionRequest(pair(i), 60 + i, seed=10 + i) for i in range(3)]
    outputs = describer.describe(requests)

    assert [text.split("seed ")[1][:2] for text in outputs] == ["10", "11", "12"]
    (conversations, params), = engine.calls  # the whole batch in one call
    assert [p.seed for p in params] == [10, 11, 12]
    assert {(p.temperature, p.max_tokens, p.n) for p in params} == {(0.7, 40, 1)}
    (turn,) = conversations[0]
    assert turn["role"] == "user"
    kinds = [part["type"] for part in turn["content"]]
    assert kinds == ["image_pil", "image_pil", "text"]  # the query image first
    query, target = (part["image_pil"] for part in turn["content"][:2])
    assert (query.size, target.size) == ((32, 20), (11, 32))  # longer side 32, aspect kept
    assert query.mode == target.mode == "RGB"
    assert "60 words" in turn["content"][2]["text"]  # the prompt with this request's budget
    assert describer.identity["settings"]["image_max_side"] == 32


def test_a_bad_image_rejects_its_pair_and_the_rest_of_the_batch_is_described(vllm):
    describer = make_describer(settings())
    pairs = [pair(0), pair(1, broken=True), pair(2)]
    rows, rejects = generate_descriptions(pairs, describer, seed=0, batch_size=3, max_attempts=1)
    assert list(rejects["pair_id"]) == ["1-101"]
    assert rejects["reason"].iloc[0] == BACKEND_ERROR
    assert "pair 1-101: cannot decode the query image" in rejects["detail"].iloc[0]
    assert list(rows["pair_id"]) == ["0-100", "2-102"]
    (engine,) = vllm.engines
    # The batch failed before reaching the engine; then one call per pair that decodes.
    assert [len(conversations) for conversations, _ in engine.calls] == [1, 1]


def test_the_instruction_step_sends_one_text_turn_and_close_shuts_the_engine_down(vllm):
    instructor = make_instructor(settings(temperature=0.0, instruction_engine_args={"max_model_len": 4096}))
    (engine,) = vllm.engines
    assert "limit_mm_per_prompt" not in engine.engine_args
    assert engine.engine_args["max_model_len"] == 4096
    request = InstructionRequest(pair(0), "Both show a bicycle.", (), seed=5)
    (output,) = instructor.instruct([request])
    assert "seed 5" in output
    assert engine.calls == []  # token ids through LLM.generate, not LLM.chat
    (((prompt,), params),) = engine.generated
    assert params[0].temperature == 0.0
    # One user turn of the engine tokenizer's chat template, the prompt inside it.
    tokenizer = engine.get_tokenizer()
    text = instructor.render_prompt(request)
    assert "Both show a bicycle." in text
    assert tokenizer.decode(prompt["prompt_token_ids"]) == tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    assert instructor.identity["settings"]["sampling"] == "greedy"
    instructor.close()
    instructor.close()  # a second close is harmless
    assert engine.shutdowns == 1
    assert instructor.engine is None


def test_special_token_strings_in_a_description_reach_the_engine_as_text(vllm):
    """A description spelling '</s>' must not end the prompt early (issue 15): the engine
    gets ids in which the template's bos is the only special token."""
    instructor = make_instructor(settings())
    (engine,) = vllm.engines
    request = InstructionRequest(pair(0), "<s> a car </s> parked <image> <pad>", (), seed=1)
    instructor.instruct([request])
    (((prompt,), _),) = engine.generated
    ids = prompt["prompt_token_ids"]
    tokenizer = engine.get_tokenizer()
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": instructor.render_prompt(request)}], tokenize=False,
        add_generation_prompt=True,
    )
    # What LLM.chat would have sent: the rendered turn tokenized whole.
    assert tokenizer.eos_token_id in tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert not set(ids[1:]) & set(tokenizer.all_special_ids), ids
    assert tokenizer.decode(ids) == rendered


def test_bad_settings_are_refused_before_the_engine_starts(vllm):
    with pytest.raises(ValueError, match="image_max_side must be positive"):
        make_describer(settings(image_max_side=0))
    with pytest.raises(ValueError, match="temperature >= 0"):
        make_instructor(settings(temperature=-1.0))
    assert vllm.engines == []
