"""MMRet training data and trainer on a tiny CLIP and coloured-shape triplets."""

import io
import itertools
import json
from contextlib import nullcontext
from dataclasses import replace

import pandas as pd
import pytest
import torch
from PIL import Image
from synthetic_shapes import COLOURS, SHAPES, shape_image
from test_retrieval_model import tiny_model

from megapairs_dagster.retrieval import (
    HARD_NEGATIVE_MODES,
    CaptionSet,
    ExportedImages,
    ImagePixels,
    MMRetTrainingSet,
    PairExample,
    StepProgress,
    TrainConfig,
    train_mmret,
    triplets_from_views,
)
from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.megapairs_format import EXPORT_COLUMNS, write_megapairs
from megapairs_dagster.synthesis.triplet_store import TRIPLETS_SCHEMA, TripletStore

SHAPE_COLOURS = [c for c in sorted(COLOURS) if c != "white"]


def shape_images() -> dict[int, Image.Image]:
    """One image per (shape, colour) on white; id = shape index * 10 + colour index."""
    return {
        s * 10 + c: shape_image(shape, colour, "white", size=32)
        for (s, shape), (c, colour) in itertools.product(
            enumerate(SHAPES), enumerate(SHAPE_COLOURS)
        )
    }


def shape_examples(count: int = 32) -> list[PairExample]:
    """'Same shape, another colour' pairs; negatives: the same shape in other colours and
    other shapes in the target colour."""
    pairs = [
        (s, c1, c2)
        for s in range(len(SHAPES))
        for c1, c2 in itertools.permutations(range(len(SHAPE_COLOURS)), 2)
    ][:count]
    examples = []
    for s, c1, c2 in pairs:
        colour, shape = SHAPE_COLOURS[c2], SHAPES[s]
        others = [s * 10 + c for c in range(len(SHAPE_COLOURS)) if c not in (c1, c2)]
        others += [o * 10 + c2 for o in range(len(SHAPES)) if o != s]
        examples.append(
            PairExample(
                query=s * 10 + c1,
                instructions=(f"the same {shape} in {colour}", f"make the {shape} {colour}"),
                target=s * 10 + c2,
                negatives=tuple(others),
            )
        )
    return examples


def shapes_dataset(model, count: int = 32, **options) -> MMRetTrainingSet:
    return MMRetTrainingSet(
        shape_examples(count),
        shape_images().__getitem__,
        preprocess=model.preprocess,
        tokenizer=model.tokenizer,
        **options,
    )


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_items_sample_one_instruction_per_epoch_and_pad_negatives():
    model = tiny_model()
    images = shape_images()
    examples = [
        PairExample(query=0, instructions=("a", "b", "c", "d"), target=1, negatives=(2,)),
    ]
    dataset = MMRetTrainingSet(
        examples, images.__getitem__, preprocess=model.preprocess, tokenizer=model.tokenizer,
        hard_negatives=4,
    )
    draws = [dataset.draw(epoch, 0) for epoch in range(12)]
    assert draws == [dataset.draw(epoch, 0) for epoch in range(12)]  # deterministic
    assert len({instruction for instruction, _ in draws}) > 1  # varies across epochs
    assert all(negatives == [2, 2, 2] for _, negatives in draws)  # padded by repetition
    item = dataset[(3, 0)]
    assert item["query"].shape == (3, 32, 32)
    assert item["negatives"].shape == (3, 3, 32, 32)
    assert item["instruction"].shape == (16,)
    assert "caption" not in item
    alone = MMRetTrainingSet(
        [PairExample(query=0, instructions=("x",), target=1, negatives=())],
        images.__getitem__, preprocess=model.preprocess, tokenizer=model.tokenizer,
    )
    assert alone.draw(0, 0)[1] == [0, 0, 0]  # nothing else: the query image again
    many = shapes_dataset(model)
    _, picked = many.draw(0, 5)
    assert len(set(picked)) == 3 and set(picked) <= set(many.examples[5].negatives)


def test_dataset_reads_the_triplet_store(tmp_path):
    model = tiny_model()
    images = shape_images()
    examples = shape_examples(6)
    store = TripletStore(ArtifactStoreClient(str(tmp_path / "store")))
    rows = pd.DataFrame(
        {
            "query_id": [e.query for e in examples],
            "target_id": [e.target for e in examples],
            "instructions": [list(e.instructions) for e in examples],
            "hard_negative_ids": [[e.query, *e.negatives] for e in examples],
        }
    )
    rows["views"] = [["clip_image"]] * len(rows)
    rows["scores"] = [[0.9]] * len(rows)
    for column in TRIPLETS_SCHEMA.names[6:]:
        rows[column] = "test"
    image_rows = pd.DataFrame({"image_id": list(images), "caption": "", "uri": "mem://"})
    store.replace_shard("s0", rows, image_rows)
    captions = {image_id: f"caption {image_id}" for image_id in images}

    frame = store.triplets_frame(columns=list(EXPORT_COLUMNS))
    # the images come one file each from an export, as the training asset reads them
    write_megapairs(frame, str(tmp_path / "export"),
                    images=lambda ids: ((i, png_bytes(images[i])) for i in ids))
    exported = ExportedImages(str(tmp_path / "export"))
    dataset = MMRetTrainingSet.from_triplets(
        frame, exported,
        preprocess=model.preprocess, tokenizer=model.tokenizer, captions=captions,
    )
    assert len(dataset) == 6
    by_pair = {(e.query, e.target): e for e in dataset.examples}
    for example in examples:
        read = by_pair[(example.query, example.target)]
        assert read.instructions == example.instructions
        assert read.negatives == example.negatives  # the query (listed first) is not repeated
    item = dataset[(0, 0)]
    expected = model.preprocess(images[dataset.examples[0].target].convert("RGB"))
    torch.testing.assert_close(item["positive"], expected)
    torch.testing.assert_close(item["caption"], model.tokenizer([f"caption {dataset.examples[0].query}"])[0])
    with pytest.raises(FileNotFoundError, match="image 999 is not in the export.*megapairs_export"):
        exported(999)


def test_dataset_reads_megapairs_jsonl(tmp_path):
    model = tiny_model()
    images = shape_images()
    (tmp_path / "images").mkdir()
    for image_id, image in images.items():
        image.save(tmp_path / "images" / f"{image_id}.png")
    records = [
        {"q_img": "images/0.png", "q_text": ["make it green", "in green"],
         "t_img": "images/1.png", "hns": ["images/0.png", "images/2.png", "images/3.png"]},
        {"q_img": "images/10.png", "q_text": ["as a circle"],
         "t_img": "images/0.png", "hns": ["images/10.png"]},
    ]
    path = tmp_path / "megapairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))

    dataset = MMRetTrainingSet.from_megapairs(
        str(path), preprocess=model.preprocess, tokenizer=model.tokenizer,
        captions={"images/0.png": "a red circle", "images/10.png": "a red square"},
    )
    assert len(dataset) == 2
    first = dataset.examples[0]
    assert first.query == f"{tmp_path}/images/0.png"
    assert first.negatives == (f"{tmp_path}/images/2.png", f"{tmp_path}/images/3.png")
    item = dataset[(1, 1)]
    torch.testing.assert_close(item["query"], model.preprocess(images[10]))
    torch.testing.assert_close(item["positive"], model.preprocess(images[0]))
    torch.testing.assert_close(item["instruction"], model.tokenizer(["as a circle"])[0])
    torch.testing.assert_close(item["caption"], model.tokenizer(["a red square"])[0])
    with pytest.raises(ValueError, match="no caption"):
        MMRetTrainingSet.from_megapairs(
            str(path), preprocess=model.preprocess, tokenizer=model.tokenizer,
            captions={"images/0.png": "only one"},
        )


def test_training_loss_falls_on_shape_triplets():
    model = tiny_model()
    before = model.encode(text=["make the circle red"])
    seen: list[StepProgress] = []
    config = TrainConfig(max_steps=40, batch_size=8, learning_rate=1e-3, warmup_steps=2)
    report = train_mmret(model, shapes_dataset(model), config, progress=seen.append)
    assert report.steps == 40 and len(report.losses) == 40 and report.samples == 320
    assert [p.step for p in seen] == list(range(1, 41))
    assert report.learning_rates[0] == pytest.approx(5e-4)  # warmup
    assert report.learning_rates[-1] < report.learning_rates[5]  # linear decay
    first, last = sum(report.losses[:4]) / 4, sum(report.losses[-4:]) / 4
    assert last < 0.6 * first, report.losses
    assert report.samples_per_s > 0
    assert not torch.allclose(model.encode(text=["make the circle red"]), before)
    assert model.clip.logit_scale.requires_grad is False


def test_progress_can_end_a_run_with_a_constant_learning_rate():
    """The demo bootstrap's use: no decay, and its callback decides when to stop."""
    config = TrainConfig(
        max_steps=100, batch_size=8, learning_rate=1e-3, warmup_steps=2, lr_decay=False
    )
    report = train_mmret(
        tiny_model(), shapes_dataset(tiny_model()), config, progress=lambda p: p.step == 4
    )
    assert report.steps == 4 and report.samples == 32
    assert report.learning_rates == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    config = TrainConfig(
        max_steps=6, batch_size=8, learning_rate=1e-3, checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=1,
    )
    reference = train_mmret(
        tiny_model(), shapes_dataset(tiny_model()), replace(config, checkpoint_dir=None)
    )

    def crash_after_three(progress: StepProgress) -> None:
        if progress.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_mmret(tiny_model(), shapes_dataset(tiny_model()), config, crash_after_three)
    state = torch.load(tmp_path / "ckpt" / "training_state.pt", weights_only=True)
    assert state["step"] == 3

    resumed_model = tiny_model(seed=123)  # different weights: the checkpoint must restore them
    resumed = train_mmret(resumed_model, shapes_dataset(resumed_model), config)
    assert resumed.resumed_from_step == 3 and resumed.samples == 24
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-6)
    with pytest.raises(ValueError, match="same order"):
        train_mmret(
            tiny_model(), shapes_dataset(tiny_model()),
            replace(config, max_steps=8, seed=1),
        )


def test_grad_accumulation_equals_the_large_batch():
    large = train_mmret(
        tiny_model(), shapes_dataset(tiny_model()),
        TrainConfig(max_steps=3, batch_size=8, learning_rate=1e-4),
    )
    accumulated = train_mmret(
        tiny_model(), shapes_dataset(tiny_model()),
        TrainConfig(max_steps=3, batch_size=4, grad_accum_steps=2, learning_rate=1e-4),
    )
    # Float sums run in another order; Adam's first steps amplify that a little.
    assert accumulated.losses == pytest.approx(large.losses, rel=1e-4)
    small = train_mmret(
        tiny_model(), shapes_dataset(tiny_model()),
        TrainConfig(max_steps=1, batch_size=4, learning_rate=1e-4),
    )
    assert small.losses[0] != pytest.approx(large.losses[0], rel=1e-2)  # fewer candidates


def test_caption_term_needs_captions_and_changes_the_loss():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs a dataset built with captions"):
        train_mmret(model, shapes_dataset(model), TrainConfig(max_steps=1, caption_loss_weight=1))
    captions = {image_id: f"image {image_id}" for image_id in shape_images()}
    config = TrainConfig(max_steps=2, batch_size=8, learning_rate=1e-4)
    plain = train_mmret(tiny_model(), shapes_dataset(model, captions=captions), config)
    with_term = train_mmret(
        tiny_model(), shapes_dataset(model, captions=captions),
        replace(config, caption_loss_weight=0.5),
    )
    assert with_term.losses[0] > plain.losses[0]
    accumulated = train_mmret(
        tiny_model(), shapes_dataset(model, captions=captions),
        replace(config, caption_loss_weight=0.5, batch_size=4, grad_accum_steps=2),
    )
    assert accumulated.losses == pytest.approx(with_term.losses, rel=1e-4)


def test_pixel_cache_decodes_each_image_once_and_evicts_the_oldest():
    model = tiny_model()
    images = shape_images()
    loads: list[int] = []

    def load(image_id: int) -> Image.Image:
        loads.append(image_id)
        return images[image_id]

    pixels = ImagePixels(load, model.preprocess, cache_images=2)
    first = pixels(0)
    torch.testing.assert_close(pixels(0), first)
    pixels(1)
    pixels(0)  # refreshes 0, so 1 is now the oldest
    pixels(2)  # evicts 1
    pixels(0)
    pixels(1)
    assert loads == [0, 1, 2, 1]
    uncached = ImagePixels(load, model.preprocess)
    uncached(0), uncached(0)
    assert loads[-2:] == [0, 0]
    with pytest.raises(ValueError, match="cache_images"):
        ImagePixels(load, model.preprocess, cache_images=-1)


def test_cached_and_uncached_training_take_the_same_steps():
    config = TrainConfig(max_steps=3, batch_size=8, learning_rate=1e-4)
    plain = train_mmret(tiny_model(), shapes_dataset(tiny_model()), config)
    cached = train_mmret(tiny_model(), shapes_dataset(tiny_model(), cache_images=100), config)
    assert cached.losses == pytest.approx(plain.losses, rel=1e-6)


def caption_set(model, **options) -> CaptionSet:
    images = shape_images()
    captions = {i: f"a {SHAPES[i // 10]} in {SHAPE_COLOURS[i % 10]}" for i in images}
    return CaptionSet(
        captions, images.__getitem__, preprocess=model.preprocess, tokenizer=model.tokenizer,
        **options,
    )


def test_caption_only_training_aligns_images_with_their_captions():
    """The equal-compute control: the image-caption term alone, on (image, caption) items."""
    model = tiny_model()
    dataset = caption_set(model)
    item = dataset[(2, 5)]
    assert set(item) == {"image", "caption"}
    torch.testing.assert_close(item["image"], model.preprocess(shape_images()[dataset.keys[5]]))
    with pytest.raises(ValueError, match="trains nothing"):
        train_mmret(model, dataset, TrainConfig(max_steps=1, batch_size=8))
    report = train_mmret(
        model, dataset,
        TrainConfig(max_steps=40, batch_size=5, learning_rate=1e-3, caption_loss_weight=1.0),
    )
    first, last = sum(report.losses[:4]) / 4, sum(report.losses[-4:]) / 4
    assert last < 0.6 * first, report.losses
    accumulated = train_mmret(
        tiny_model(), caption_set(tiny_model()),
        TrainConfig(max_steps=2, batch_size=4, grad_accum_steps=2, learning_rate=1e-4,
                    caption_loss_weight=1.0),
    )
    large = train_mmret(
        tiny_model(), caption_set(tiny_model()),
        TrainConfig(max_steps=2, batch_size=8, learning_rate=1e-4, caption_loss_weight=1.0),
    )
    assert accumulated.losses == pytest.approx(large.losses, rel=1e-4)


def test_caption_set_rejects_empty_captions():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty caption"):
        CaptionSet({0: "a circle", 1: "  "}, shape_images().__getitem__,
                   preprocess=model.preprocess, tokenizer=model.tokenizer)


def test_hard_negative_modes_change_the_candidates_of_each_query():
    """Paper Table 4's switches: query + mined, the query image only, or none at all."""
    from megapairs_dagster.retrieval.train import _embed

    model = tiny_model()
    losses, shapes = {}, {}
    for mode, (query_as_negative, per_item) in HARD_NEGATIVE_MODES.items():
        dataset = shapes_dataset(model, hard_negatives=per_item)
        batch = {key: torch.stack([dataset[i][key] for i in range(4)]) for key in dataset[0]}
        with torch.no_grad():
            embedded = _embed(model, batch, nullcontext(), query_as_negative)
        shapes[mode] = tuple(embedded["negatives"].shape[:2])
        if query_as_negative:  # the query image comes first
            torch.testing.assert_close(embedded["negatives"][:, 0], embedded["query_images"])
        config = TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-4,
                             query_as_negative=query_as_negative)
        losses[mode] = train_mmret(tiny_model(), dataset, config).losses
    assert shapes == {"query_and_mined": (4, 4), "query": (4, 1), "none": (4, 0)}
    # Fewer candidates, lower loss at the same weights (the first step's).
    assert losses["none"][0] < losses["query"][0] < losses["query_and_mined"][0]


def test_triplets_can_be_restricted_to_the_pairs_of_some_views():
    frame = pd.DataFrame({"query_id": [1, 2, 3, 4],
                          "views": [["dino_image"], ["clip_image", "clip_caption"],
                                    ["clip_caption"], None]})
    assert list(triplets_from_views(frame, ["dino_image"])["query_id"]) == [1]
    assert list(triplets_from_views(frame, ["clip_caption", "dino_image"])["query_id"]) == [1, 2, 3]
    assert triplets_from_views(frame, None) is frame
