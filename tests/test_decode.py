import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from megapairs_dagster.demo.corpus import shard_samples
from megapairs_dagster.demo.render import jpeg_bytes, render_scene
from megapairs_dagster.synthesis.decode import split_preprocess
from megapairs_dagster.synthesis.encoders import build_demo_dino, load_clip, load_dino


@pytest.fixture(scope="module")
def clip_image():
    torch.manual_seed(0)
    return load_clip("megapairs-demo-clip")[0]


@pytest.fixture(scope="module")
def demo_jpegs() -> list[bytes]:
    """128 px demo scenes, as the demo corpus stores them (the demo CLIP takes 64 px)."""
    samples = shard_samples(seed=0, shard_index=0, images_per_shard=24)
    return [
        jpeg_bytes(render_scene(s["scene"], np.random.default_rng(i)))
        for i, s in enumerate(samples)
    ]


def _reference(transform, jpegs: list[bytes]) -> torch.Tensor:
    """The preprocessing embed_images used before the split: the transform per image."""
    tensors = []
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            tensors.append(transform(image.convert("RGB")))
    return torch.stack(tensors)


def _split_batch(split, jpegs: list[bytes]) -> torch.Tensor:
    return split.to_tensor([split.decode(data) for data in jpegs])


def test_full_size_decode_gives_the_transforms_exact_values(clip_image, demo_jpegs):
    # a non-square JPEG larger than the target exercises resize and crop
    wide = Image.open(io.BytesIO(demo_jpegs[0])).convert("RGB").resize((200, 150))
    jpegs = demo_jpegs[:8] + [jpeg_bytes(wide)]
    split = split_preprocess(clip_image.preprocess, reduced_dct=False)
    assert split is not None and split.draft_side is None
    assert torch.equal(_split_batch(split, jpegs), _reference(clip_image.preprocess, jpegs))


def test_reduced_dct_decode_stays_within_tolerance(clip_image, demo_jpegs):
    split = split_preprocess(clip_image.preprocess)
    assert split.draft_side == 64
    with Image.open(io.BytesIO(demo_jpegs[0])) as image:
        image.draft("RGB", (64, 64))
        assert image.size == (64, 64)  # decoded at half scale: the resize has nothing to do
    fast = _split_batch(split, demo_jpegs)
    reference = _reference(clip_image.preprocess, demo_jpegs)
    std = torch.tensor(split.std).view(1, -1, 1, 1)
    levels = ((fast - reference) * std * 255).abs()  # difference in 8-bit grey levels
    assert 0 < levels.mean() < 1.5 and levels.flatten().quantile(0.99) < 16
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(
            clip_image.encode(fast), clip_image.encode(reference)
        )
    assert cosine.min() > 0.999


def test_a_leading_custom_step_keeps_full_size_decode(tmp_path, demo_jpegs):
    build_demo_dino(tmp_path)
    dino = load_dino(str(tmp_path), image_size=112, foreground_only=True)
    split = split_preprocess(dino.preprocess)
    assert split is not None and split.draft_side is None  # the first step is not a Resize
    assert torch.equal(_split_batch(split, demo_jpegs[:6]), _reference(dino.preprocess, demo_jpegs[:6]))


@pytest.mark.parametrize(
    "transform",
    [
        lambda image: transforms.functional.to_tensor(image),
        transforms.Compose([transforms.Resize(8), transforms.ToTensor()]),
        transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3),
                            transforms.Resize(8)]),
    ],
)
def test_other_transforms_do_not_split(transform):
    assert split_preprocess(transform) is None


def test_reduced_dct_only_for_a_leading_shorter_side_resize():
    tail = [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    assert split_preprocess(transforms.Compose([transforms.Resize(32), *tail])).draft_side == 32
    squash = transforms.Compose([transforms.Resize((32, 48)), *tail])
    assert split_preprocess(squash).draft_side is None
    crop_first = transforms.Compose([transforms.CenterCrop(100), transforms.Resize(32), *tail])
    assert split_preprocess(crop_first).draft_side is None
