"""MMRet-CLIP model and loss: input kinds, fusion, checkpoint round trip, InfoNCE by hand."""

import json
import math
import tempfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from synthetic_shapes import shape_image

from megapairs_dagster.retrieval import (
    VARIANTS,
    MMRetCLIP,
    composed_infonce,
    training_loss,
)
from megapairs_dagster.synthesis.encoders import load_clip

# A CLIP small enough that a training step takes milliseconds on a CPU. open_clip rescans
# its config folders on every registration, so this folder must outlive the module.
TINY_CLIP = "mmret-tiny-test-clip"
_TINY_CLIP_DIR = Path(tempfile.mkdtemp(prefix="mmret-tiny-clip-"))
(_TINY_CLIP_DIR / f"{TINY_CLIP}.json").write_text(
    json.dumps(
        {
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8
            },
            "text_cfg": {
                "context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1
            },
        }
    )
)
open_clip.add_model_config(_TINY_CLIP_DIR)


def tiny_model(seed: int = 0) -> MMRetCLIP:
    torch.manual_seed(seed)
    return MMRetCLIP.from_open_clip(TINY_CLIP, None)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_encode_accepts_paths_images_texts_and_lists(model, tmp_path):
    red = shape_image("circle", "red", "white", size=40)
    blue = shape_image("square", "blue", "yellow", size=40)
    red_path = tmp_path / "red.png"
    red.save(red_path)

    one_image = model.encode(images=red)
    from_path = model.encode(images=str(red_path))
    from_pathlib = model.encode(images=red_path)
    images = model.encode(images=[red, blue])
    texts = model.encode(text=["a red circle", "a blue square", "a green triangle"])
    composed = model.encode(images=[red_path, blue], text=["make it blue", "make it red"])

    assert one_image.shape == (1, 32) and images.shape == (2, 32) and texts.shape == (3, 32)
    assert composed.shape == (2, 32) and composed.dtype == torch.float32
    for embeddings in (one_image, images, texts, composed):
        assert embeddings.device.type == "cpu"
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(embeddings)))
    torch.testing.assert_close(from_path, one_image)  # PNG is lossless
    torch.testing.assert_close(from_pathlib, one_image)
    torch.testing.assert_close(images[:1], one_image, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(composed[0], one_image[0])
    # Batching long inputs gives the same embeddings as one batch.
    torch.testing.assert_close(
        model.encode(images=[red, blue, red], batch_size=2),
        model.encode(images=[red, blue, red]),
        atol=1e-5, rtol=1e-5,
    )
    with pytest.raises(ValueError, match="as many images as texts"):
        model.encode(images=[red, blue], text=["only one"])
    with pytest.raises(ValueError, match="needs images, text or both"):
        model.encode()


def test_composed_query_is_normalised_sum_of_projections(model):
    image = shape_image("triangle", "green", "purple", size=32)
    text = "the same triangle in red"
    with torch.no_grad():
        image_features = model.clip.encode_image(model.preprocess(image)[None])
        text_features = model.clip.encode_text(open_clip.get_tokenizer(TINY_CLIP)([text]))
    expected = F.normalize(image_features + text_features, dim=-1)
    assert not torch.allclose(expected, F.normalize(image_features, dim=-1) + 0)
    torch.testing.assert_close(model.encode(images=image, text=text), expected)


def test_save_and_from_pretrained_round_trip(model, tmp_path):
    image = shape_image("circle", "yellow", "blue", size=32)
    before = model.encode(images=[image, image], text=["make it red", "a yellow circle"])
    model.save_pretrained(tmp_path / "mmret")

    loaded = MMRetCLIP.from_pretrained(tmp_path / "mmret")
    assert loaded.model_name == TINY_CLIP
    assert loaded.mmret["fusion"] == "sum" and loaded.mmret["temperature"] == 0.02
    torch.testing.assert_close(
        loaded.encode(images=[image, image], text=["make it red", "a yellow circle"]),
        before, rtol=0, atol=0,
    )
    # The directory is an open_clip local-dir: the synthesis pipeline's loader opens it too.
    image_encoder, _ = load_clip(TINY_CLIP, str(tmp_path / "mmret"))
    with torch.no_grad():
        pixels = image_encoder.preprocess(image)[None]
        torch.testing.assert_close(
            F.normalize(image_encoder.encode(pixels), dim=-1), model.encode(images=image)
        )


def test_unobtainable_pretrained_weights_fail_clearly():
    with pytest.raises(RuntimeError, match="ViT-B-16.*openai"):
        MMRetCLIP.from_open_clip(*VARIANTS["base"])
    with pytest.raises(ValueError, match="'no-such-model' is neither an open_clip model name"):
        MMRetCLIP.from_open_clip("no-such-model", None)
    with pytest.raises(FileNotFoundError, match="no-such-model is not a directory"):
        MMRetCLIP.from_pretrained("no-such-model")


def test_infonce_matches_hand_computation():
    s = 1 / math.sqrt(2)
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[s, s], [0.0, 1.0]])
    negatives = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])  # one hard negative per query
    temperature = 0.5
    # Candidates: both positives, then both negatives.
    similarities = [[s, 0.0, 1.0, -1.0], [s, 1.0, 0.0, 0.0]]
    expected = 0.0
    for row, label in zip(similarities, [0, 1]):
        exps = [math.exp(value / temperature) for value in row]
        expected += -math.log(exps[label] / sum(exps))
    expected /= 2
    loss = composed_infonce(queries, positives, negatives, temperature=temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # The second query alone, as process 1 of 2 would see it against the global batch.
    second = composed_infonce(
        queries[1:], positives, negatives, temperature=temperature, query_offset=1
    )
    exps = [math.exp(value / temperature) for value in similarities[1]]
    assert second.item() == pytest.approx(-math.log(exps[1] / sum(exps)), rel=1e-6)


def test_caption_term_is_clip_loss_by_its_definition():
    """open_clip's ClipLoss, as the trainer calls it, is CLIP's symmetric InfoNCE: the mean of
    the image->caption and caption->image cross-entropies of logits / temperature."""
    torch.manual_seed(0)
    images, captions, queries, positives = F.normalize(torch.randn(4, 3, 8), dim=-1)
    temperature = 0.1
    logits = images @ captions.T / temperature
    labels = torch.arange(3)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    caption_only = training_loss(
        {"images": images, "captions": captions}, temperature=temperature, caption_loss_weight=1
    )
    torch.testing.assert_close(caption_only, expected)
    # Beside triplets, the caption's image is the query image (also the first hard negative).
    negatives = torch.stack([images, positives.roll(1, dims=0)], dim=1)
    triplets = {"queries": queries, "positives": positives, "negatives": negatives,
                "query_images": images}
    with_captions = training_loss(
        {**triplets, "captions": captions}, temperature=temperature, caption_loss_weight=0.5
    )
    composed = composed_infonce(queries, positives, negatives, temperature=temperature)
    torch.testing.assert_close(with_captions, composed + 0.5 * expected)
    torch.testing.assert_close(
        training_loss(triplets, temperature=temperature, caption_loss_weight=0), composed
    )
