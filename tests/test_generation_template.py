"""Template backends, prompts and the driver, on demo-corpus captions and free-form ones."""

import json
import time
from collections import Counter

import pandas as pd
import pytest

from megapairs_dagster.demo import shard_samples
from megapairs_dagster.synthesis.generation.base import PairInput
from megapairs_dagster.synthesis.generation.parsing import (
    BACKEND_ERROR,
    NOT_A_LIST,
    TOO_DIFFERENT,
    parse_instructions,
    validate_description,
)
from megapairs_dagster.synthesis.generation.prompts import (
    PROMPT_VERSION,
    load_demonstrations,
    render_description_prompt,
    render_instruction_prompt,
    sample_demonstrations,
)
from megapairs_dagster.synthesis.generation.run import generate_descriptions, generate_instructions
from megapairs_dagster.synthesis.generation.template import (
    TemplateDescriber,
    TemplateInstructor,
    describe_pair,
    instruct_pair,
)

NIGHT_QUERY = (
    "a large red striped circle on the left and a small blue star at the top, on a sand background"
)
NIGHT_TARGET = NIGHT_QUERY.replace("sand", "night")


def _demo_pairs(images: int = 600) -> list[tuple[PairInput, dict, dict]]:
    """(pair, query sample, target sample) for each family variant whose base is in the shard."""
    samples = shard_samples(seed=3, shard_index=0, images_per_shard=images)
    by_key = {s["key"]: s for s in samples}
    pairs = []
    for sample in samples:
        base = by_key.get(sample["variant_of"])
        if base is not None:
            pair = PairInput(
                f"{base['key']}-{sample['key']}", b"", b"", base["caption"], sample["caption"]
            )
            pairs.append((pair, base, sample))
    return pairs


@pytest.fixture(scope="module")
def demo_pairs():
    return _demo_pairs()


def test_night_example_names_the_new_background_and_keeps_the_rest_vague():
    instructions = instruct_pair(NIGHT_QUERY, NIGHT_TARGET, seed=1)
    assert len(instructions) >= 3
    assert all("night" in text.lower() for text in instructions)
    assert not any("striped circle" in text for text in instructions)
    assert len({text.lower() for text in instructions}) == len(instructions)


def test_descriptions_follow_the_shape_and_the_word_budget(demo_pairs):
    for index, (pair, _, _) in enumerate(demo_pairs[:150]):
        budget = 60 + index % 41
        text = describe_pair(pair.query_caption, pair.target_caption, budget, seed=index)
        both, however, whereas = (
            text.find("Both images "),
            text.find("However, the source image "),
            text.find(", whereas the target image "),
        )
        assert both == 0 and 0 < however < whereas, text
        assert 10 <= len(text.split()) <= 1.2 * budget, text
        assert (
            validate_description(text, budget, captions=(pair.query_caption, pair.target_caption))
            is None
        )


def test_long_free_form_captions_are_truncated_to_the_budget():
    query = (
        "The image shows a young woman with long brown hair standing in a sunlit kitchen. "
        "She is wearing a red knitted sweater and holding a white mug with both hands, "
        "while a wooden shelf with jars of pasta, spices and a potted basil plant hangs on "
        "the tiled wall behind her; a window on the left lets in morning light, and a bowl "
        "of green apples sits on the marble counter in the foreground."
    )
    target = query.replace("red knitted sweater", "blue denim shirt").replace(
        "morning light", "evening light"
    )
    for budget in (60, 80, 100):
        text = describe_pair(query, target, budget, seed=budget)
        assert len(text.split()) <= budget
        assert "blue denim shirt" in text
    instructions = instruct_pair(query, target, seed=5)
    assert any("blue" in text for text in instructions)
    assert all(len(text) <= 200 for text in instructions)
    accepted = parse_instructions(
        json.dumps(instructions), query_caption=query, target_caption=target
    )
    assert accepted.ok, accepted


def test_instructions_are_pair_specific_varied_and_mostly_name_the_single_edit(demo_pairs):
    counts: Counter[str] = Counter()
    named = total = 0
    for index, (pair, base, variant) in enumerate(demo_pairs):
        instructions = instruct_pair(pair.query_caption, pair.target_caption, seed=index)
        assert len(instructions) >= 3
        counts.update(set(instructions))
        if variant["edit"] in (["background"], ["colour"], ["shape"]):
            attribute = variant["edit"][0]
            if attribute == "background":
                new_value = variant["scene"]["background"]
            else:
                new_value = next(  # attribute edits keep the object order
                    new[attribute]
                    for old, new in zip(base["scene"]["objects"], variant["scene"]["objects"])
                    if old[attribute] != new[attribute]
                )
            total += 1
            named += all(new_value.split()[0] in text.lower() for text in instructions)
    assert counts.most_common(1)[0][1] <= 0.05 * len(demo_pairs)
    assert len(counts) >= 2.5 * len(demo_pairs)
    assert total >= 40 and named / total >= 0.8, (named, total)


def test_instructions_vary_with_the_seed():
    variants = {tuple(instruct_pair(NIGHT_QUERY, NIGHT_TARGET, seed=s)) for s in range(10)}
    assert len(variants) >= 8


def test_fifty_demonstrations_load_and_five_are_sampled_per_seed():
    pool = load_demonstrations()
    assert len(pool) == 50 and all(len(d.instructions) >= 3 for d in pool)
    assert len({d.description for d in pool}) == 50
    first = sample_demonstrations(pool, seed=7)
    assert len(first) == len(set(first)) == 5
    assert sample_demonstrations(pool, seed=7) == first
    assert len({sample_demonstrations(pool, seed=s) for s in range(20)}) == 20


def test_prompts_carry_the_budget_demonstrations_and_description():
    describe = render_description_prompt(73)
    assert "73 words" in describe and "{word_budget}" not in describe
    assert "whereas the target image" in describe
    demos = sample_demonstrations(load_demonstrations(), seed=1)
    prompt = render_instruction_prompt("Both images show X. However, ...", demos)
    assert prompt.count("Description: ") == 6 and prompt.rstrip().endswith("Instructions:")
    assert all(json.dumps(list(d.instructions)) in prompt for d in demos)
    assert "JSON list" in prompt and "{description}" not in prompt


def test_template_backends_through_the_driver_are_deterministic_and_fast(demo_pairs):
    pairs = [pair for pair, _, _ in demo_pairs]
    describer, instructor = TemplateDescriber(), TemplateInstructor()
    assert describer.identity == {"backend": "template", "prompt_version": PROMPT_VERSION}
    pool = load_demonstrations()
    start = time.perf_counter()
    described, rejected = generate_descriptions(pairs, describer, seed=11, batch_size=50)
    texts = dict(zip(described.pair_id, described.description))
    by_id = {p.pair_id: p for p in pairs}
    instructed, rejected_instructions = generate_instructions(
        [(by_id[pid], texts[pid]) for pid in described.pair_id],
        instructor,
        demonstrations=pool,
        seed=11,
    )
    elapsed = time.perf_counter() - start
    assert rejected.empty and rejected_instructions.empty
    assert len(instructed) == len(pairs)
    assert described.word_budget.between(60, 100).all() and described.word_budget.nunique() > 10
    assert elapsed < 2.0 * len(pairs) / 1000 + 1.0  # far under 2 s per 1,000 pairs
    again, _ = generate_descriptions(list(reversed(pairs)), describer, seed=11, batch_size=7)
    pd.testing.assert_frame_equal(
        described.set_index("pair_id").sort_index(), again.set_index("pair_id").sort_index()
    )
    other_seed, _ = generate_descriptions(pairs, describer, seed=12)
    assert (other_seed.description != described.description).mean() > 0.5


class _FlakyInstructor:
    """Fails validation on each pair's first attempt; records the seeds it was given."""

    def __init__(self, good_from_attempt: int):
        self.identity = {"backend": "flaky"}
        self.good_from_attempt = good_from_attempt
        self.seeds: dict[str, list[int]] = {}

    def instruct(self, requests):
        outputs = []
        for request in requests:
            seeds = self.seeds.setdefault(request.pair.pair_id, [])
            seeds.append(request.seed)
            if len(seeds) < self.good_from_attempt:
                outputs.append("Sorry, I cannot help with that.")
            else:
                pair_id = request.pair.pair_id
                outputs.append(json.dumps([f"Variant {i} of {pair_id}" for i in range(3)]))
        return outputs


def _pairs(count: int) -> list[tuple[PairInput, str]]:
    return [
        (PairInput(f"{i}-{i + 1}", b"", b"", NIGHT_QUERY, NIGHT_TARGET), "Both images ...")
        for i in range(count)
    ]


def test_a_failed_parse_is_retried_with_a_new_seed_and_then_accepted():
    backend = _FlakyInstructor(good_from_attempt=2)
    rows, rejects = generate_instructions(
        _pairs(5),
        backend,
        demonstrations=load_demonstrations(),
        seed=0,
        max_attempts=2,
        batch_size=2,
    )
    assert rejects.empty and list(rows.attempts) == [2] * 5
    assert all(len(set(seeds)) == 2 for seeds in backend.seeds.values())
    assert rows.instructions[0] == ["Variant 0 of 0-1", "Variant 1 of 0-1", "Variant 2 of 0-1"]


def test_retries_are_bounded_and_the_last_failure_is_recorded():
    backend = _FlakyInstructor(good_from_attempt=10)
    rows, rejects = generate_instructions(
        _pairs(4),
        backend,
        demonstrations=load_demonstrations(),
        seed=0,
        max_attempts=3,
    )
    assert rows.empty and len(rejects) == 4
    assert all(len(seeds) == 3 for seeds in backend.seeds.values())
    assert set(rejects.reason) == {NOT_A_LIST} and set(rejects.stage) == {"instructions"}
    assert rejects.raw[0] == "Sorry, I cannot help with that."


class _CrashingDescriber:
    """Raises on any batch that holds the poisoned pair, answers the others."""

    def __init__(self):
        self.identity = {"backend": "crashing"}

    def describe(self, requests):
        if any(r.pair.pair_id == "poison" for r in requests):
            raise RuntimeError("CUDA out of memory")
        return [
            describe_pair(r.pair.query_caption, r.pair.target_caption, r.word_budget, r.seed)
            for r in requests
        ]


def test_a_backend_error_rejects_only_the_request_that_raises():
    pairs = [pair for pair, _ in _pairs(6)]
    pairs[4] = PairInput("poison", b"", b"", NIGHT_QUERY, NIGHT_TARGET)
    rows, rejects = generate_descriptions(pairs, _CrashingDescriber(), seed=0, batch_size=2)
    # The batch (poison, 5-6) failed; sent again one by one, only poison fails.
    assert list(rows.pair_id) == ["0-1", "1-2", "2-3", "3-4", "5-6"]
    assert list(rejects.pair_id) == ["poison"]
    assert set(rejects.reason) == {BACKEND_ERROR}
    assert rejects.detail[0] == "RuntimeError: CUDA out of memory"


class _CountingDescriber(TemplateDescriber):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def describe(self, requests):
        self.seen += [r.pair.pair_id for r in requests]
        return super().describe(requests)


def test_pairs_whose_captions_differ_too_much_are_rejected_before_the_model():
    unrelated = "two green squares at the bottom over a grey background"  # 4 clauses differ
    pairs = [
        PairInput("close", b"", b"", NIGHT_QUERY, NIGHT_TARGET),
        PairInput("far", b"", b"", NIGHT_QUERY, unrelated),
    ]
    describer = _CountingDescriber()
    rows, rejects = generate_descriptions(pairs, describer, seed=0, max_caption_changes=2)
    assert list(rows.pair_id) == ["close"] and describer.seen == ["close"]
    assert list(rejects.pair_id) == ["far"] and list(rejects.reason) == [TOO_DIFFERENT]
    assert rejects.detail[0].endswith("(max 2)")
    kept, none_rejected = generate_descriptions(pairs, TemplateDescriber(), seed=0)
    assert list(kept.pair_id) == ["close", "far"] and none_rejected.empty
